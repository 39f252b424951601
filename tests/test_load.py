"""Under load: starts and stops while a node daemon and its watcher keep listing.

A QEMU monitor (a chardev socket) listens with a backlog of one and serves
one client at a time, so every listing connects to the monitor of an
instance that is being started at that very moment.  None of that may make
a start, a stop or a listing fail.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
from typing import Any

import pytest

from ganeti_kvm import constants as c
from ganeti_kvm import errors
from ganeti_kvm.core import node as lifecycle
from ganeti_kvm.host import process
from ganeti_kvm.hv_kvm import KVMHypervisor
from tests.helpers import make_instance

LISTERS = 5
CYCLES = 30  # start/stop cycles, shared by the starters
STARTERS = 3  # threads that start and stop instances, each its own


def bare_hvparams(qemu_bin: str, **overrides: Any) -> dict[str, Any]:
    """A guest-less VM under TCG: no kernel, no disk, nothing to boot."""
    hvp = dict(c.HVC_DEFAULTS[c.HT_KVM], kvm_path=qemu_bin, kernel_path="",
               root_path="", kvm_flag="disabled", serial_console=False)
    hvp.update(overrides)
    return hvp


class Listers:
    """Threads that call GetAllInstancesInfo in a loop until stopped."""

    def __init__(self, hv: KVMHypervisor, count: int) -> None:
        self.hv = hv
        self.done = threading.Event()
        self.failures: list[BaseException] = []
        self.rounds = 0
        self.states: set[str] = set()
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(count)]

    def _run(self) -> None:
        while not self.done.is_set():
            try:
                infos = self.hv.GetAllInstancesInfo()
            except BaseException as err:  # noqa: BLE001 - reported by the test
                with self._lock:
                    self.failures.append(err)
                return
            with self._lock:
                self.rounds += 1
                self.states.update(info[4] for info in infos)

    def __enter__(self) -> Listers:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.done.set()
        for thread in self.threads:
            thread.join(30)
        assert not any(t.is_alive() for t in self.threads), "a listing thread hangs"


def cycle_once(hv: KVMHypervisor, qemu_bin: str, name: str, cycle: int) -> None:
    """Start one guest-less VM, talk to it, and stop it one of several ways."""
    # With ACPI off a reboot stops at once instead of waiting for the button.
    inst = make_instance(name, bare_hvparams(qemu_bin, acpi=cycle % 5 != 4), memory=32)
    hv.StartInstance(inst, [], startup_paused=cycle % 2 == 0)
    # A short-monitor call of its own, next to the listings.
    assert hv.node.qmp(inst.name, "query-status")["running"] == (cycle % 2 == 1)
    if cycle % 5 == 4:
        hv.RebootInstance(inst)
    if cycle % 3 == 0:
        hv.StopInstance(inst, timeout=0.01)  # nothing hears the button: terminated
    else:
        hv.StopInstance(inst, force=True)


def spy_kills(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the PIDs that get a SIGKILL from the library."""
    killed: list[int] = []
    real = process.signal_pid

    def signal_pid(pid: int, signum: int) -> bool:
        if signum == signal.SIGKILL:
            killed.append(pid)
        return real(pid, signum)

    monkeypatch.setattr(process, "signal_pid", signal_pid)
    return killed


def test_starts_and_stops_never_fail_while_others_list(
        hv: KVMHypervisor, qemu_bin: str, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    hvp = bare_hvparams(qemu_bin)
    killed = spy_kills(monkeypatch)
    # Instances that stay up, so that every listing has monitors to ask.
    steady = [make_instance(f"steady{i}", hvp, memory=32) for i in range(2)]
    for inst in steady:
        hv.StartInstance(inst, [], startup_paused=True)
    failures: list[tuple[int, BaseException]] = []

    def starter(index: int) -> None:
        name = f"load{index}"
        for cycle in range(index, CYCLES, STARTERS):
            try:
                cycle_once(hv, qemu_bin, name, cycle)
            except errors.HypervisorError as err:
                failures.append((cycle, err))
                hv.StopInstance(None, force=True, name=name)  # go on clean

    with Listers(hv, LISTERS) as listers:
        starters = [threading.Thread(target=starter, args=(i,)) for i in range(STARTERS)]
        for thread in starters:
            thread.start()
        for thread in starters:
            thread.join(300)
    assert not any(t.is_alive() for t in starters), "a start or stop hangs"
    assert failures == [], failures
    # An ACPI press that could not reach the monitor falls back to a kill:
    # the stop "works", but not the way it was asked to.
    unpressed = [r.getMessage() for r in caplog.records if "ACPI power-down" in r.getMessage()]
    assert unpressed == []
    # QEMU may hang in its exit when a monitor client was busy at the time;
    # a SIGTERM that could only end in a SIGKILL 10 s later is a stall too.
    assert killed == []
    assert listers.failures == [], listers.failures
    assert listers.rounds > 0
    assert sorted(hv.ListInstances()) == ["steady0", "steady1"]


def test_start_talks_on_the_monitor_that_listings_never_use(
        hv: KVMHypervisor, qemu_bin: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The start's own QMP talk (status, password, cont) goes to the
    long-operation monitor: a short monitor kept busy by listings, here held
    with a full backlog for the whole start, cannot make it wait or fail."""
    monkeypatch.setattr(lifecycle, "QMP_READY_TIMEOUT", 2.0)
    held: list[socket.socket] = []
    real_launch = lifecycle.KvmNode._launch

    def launch_then_hold(self: lifecycle.KvmNode, *args: Any, **kwargs: Any) -> Any:
        result = real_launch(self, *args, **kwargs)
        path = self.paths("held1").qmp_socket
        while len(held) < 16:  # the first one is served, the others wait in the backlog
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                sock.connect(path)
            except BlockingIOError:
                sock.close()
                break
            held.append(sock)
        return result

    monkeypatch.setattr(lifecycle.KvmNode, "_launch", launch_then_hold)
    try:
        hv.StartInstance(make_instance("held1", bare_hvparams(qemu_bin), memory=32), [])
        assert 1 < len(held) < 16, "the short monitor was not held during the start"
    finally:
        for sock in held:
            sock.close()
    assert hv.node.qmp("held1", "query-status")["status"] == "running"


_DEAF_TO_ONE_SIGTERM = """
import os, signal, sys, time
heard = []
def on_term(signum, frame):
    heard.append(signum)
    if len(heard) > 1:
        print("ended by the second SIGTERM", flush=True)
        os._exit(0)
signal.signal(signal.SIGTERM, on_term)
print("ready", flush=True)
time.sleep(60)
"""


def test_terminate_repeats_sigterm_instead_of_waiting_for_sigkill(
        reaper: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """What QEMU does when its exit misses a wake-up: the first SIGTERM is
    not enough, a second one ends it.  That must not take a SIGKILL."""
    child = subprocess.Popen([sys.executable, "-c", _DEAF_TO_ONE_SIGTERM],
                             stdout=subprocess.PIPE)
    reaper.add(child.pid)
    assert child.stdout is not None and child.stdout.readline() == b"ready\n"
    killed = spy_kills(monkeypatch)
    assert process.terminate(child.pid, term_timeout=30)
    assert killed == []
    assert child.stdout.read() == b"ended by the second SIGTERM\n"
    child.stdout.close()
    child.wait(10)  # terminate reaped it already; this only settles Popen's bookkeeping
