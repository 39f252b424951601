"""The console wrapper against real QEMU, real socat and a real pseudo-terminal."""

from __future__ import annotations

import errno
import json
import os
import pty
import select
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from ganeti_kvm import constants
from ganeti_kvm.qmp.client import QmpClient
from ganeti_kvm.tools.console_wrapper import escape_description, find_serial_chardev, main
from tests.helpers import BareVm as Vm

WRAPPER = constants.KVM_CONSOLE_WRAPPER
TERMINAL = "STDIO,raw,echo=0,escape=0x1d"
ESCAPE = b"\x1d"


class Console:
    """The wrapper program running on the slave side of a fresh pseudo-terminal."""

    def __init__(self, socat: str, name: str, vm: Vm, timing: str | None = None) -> None:
        env = dict(os.environ)
        env.pop("GANETI_KVM_CONSOLE_TIMING", None)
        if timing is not None:
            env["GANETI_KVM_CONSOLE_TIMING"] = timing
        self.timing = timing
        master, slave = pty.openpty()
        try:
            self.proc = subprocess.Popen(
                [WRAPPER, socat, name, vm.qmp, TERMINAL, f"UNIX-CONNECT:{vm.serial}"],
                stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True)
        finally:
            os.close(slave)
        self.master = master
        self.output = b""

    def read_until(self, needle: bytes, timeout: float = 15.0) -> bytes:
        """Read the terminal until ``needle`` shows up; fail with what was read if not."""
        deadline = time.monotonic() + timeout
        while needle not in self.output:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            ready, _, _ = select.select([self.master], [], [], remaining)
            if not ready:
                continue
            try:
                chunk = os.read(self.master, 4096)
            except OSError as err:
                if err.errno != errno.EIO:  # EIO: every slave end is closed
                    raise
                chunk = b""
            if not chunk:
                break
            self.output += chunk
        assert needle in self.output, f"{needle!r} not in terminal output {self.output!r}"
        return self.output

    def drain(self) -> bytes:
        """Read whatever the terminal holds right now."""
        while select.select([self.master], [], [], 0.05)[0]:
            try:
                chunk = os.read(self.master, 4096)
            except OSError:
                break
            if not chunk:
                break
            self.output += chunk
        return self.output

    def type(self, data: bytes) -> None:
        os.write(self.master, data)

    def wait(self, timeout: float = 15.0) -> int:
        return self.proc.wait(timeout=timeout)

    def record(self, timeout: float = 15.0) -> dict[str, Any]:
        """The wrapper's timing record, once written (after its QMP work is done)."""
        assert self.timing is not None
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.timing):
            assert time.monotonic() < deadline, f"no timing record; output {self.drain()!r}"
            assert self.proc.poll() is None, f"wrapper exited early: {self.drain()!r}"
            time.sleep(0.01)
        with open(self.timing, encoding="utf-8") as handle:
            return dict(json.load(handle))

    def socat_pids(self) -> list[int]:
        path = f"/proc/{self.proc.pid}/task/{self.proc.pid}/children"
        with open(path, encoding="ascii") as handle:
            return [int(pid) for pid in handle.read().split()]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        os.close(self.master)


@pytest.fixture
def consoles() -> Iterator[list[Console]]:
    """Wrappers started by a test; killed and reaped at teardown."""
    started: list[Console] = []
    yield started
    for console in started:
        console.close()


def start_vm(qemu_bin: str, directory: str, reaper: Any, extra: tuple[str, ...] = ()) -> Vm:
    vm = Vm(qemu_bin, directory, extra)
    reaper.add(vm.pid)
    return vm


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_helpers() -> None:
    assert escape_description("STDIO,raw,echo=0,escape=0x1d") == "Ctrl+]"
    assert escape_description("STDIO,escape=29,raw") == "Ctrl+]"
    assert escape_description("STDIO,escape=0x0f") == "Ctrl+O"
    assert escape_description("STDIO,raw,echo=0") is None
    chardevs = [{"label": "compat_monitor0", "filename": "unix:/r/i.qmp,server=on"},
                {"label": "serial0", "filename": "disconnected:unix:/r/i.serial,server=on"}]
    assert find_serial_chardev(chardevs, "/r/i.serial") is chardevs[1]
    assert find_serial_chardev(chardevs, "/r/i.ser") is None
    assert find_serial_chardev(chardevs, "/r/other") is None


def test_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "Usage" in capsys.readouterr().err
    assert main(["/usr/bin/socat", "i", "/x.qmp", TERMINAL, "TCP:localhost:1"]) == 2
    assert "UNIX-CONNECT" in capsys.readouterr().err


def test_prelaunch_is_unpaused_and_escape_leaves(
        qemu_bin: str, socat_bin: str, short_dir: str, reaper: Any,
        consoles: list[Console]) -> None:
    vm = start_vm(qemu_bin, short_dir, reaper)
    assert vm.status() == "prelaunch"
    console = Console(socat_bin, "inst1", vm, os.path.join(short_dir, "timing.json"))
    consoles.append(console)
    output = console.read_until(b"Instance inst1 is paused, unpausing\r\n")
    assert output.startswith(b"Connected to instance inst1; press Ctrl+] to leave.\r\n")
    record = console.record()
    assert vm.status() == "running"
    assert record["status"] == "prelaunch"
    assert record["socat_started_at"] < record["attached_at"] < record["cont_at"]
    assert record["attached_wall"] <= record["cont_wall"]
    assert 0 < record["cont_delay"] < 2.0  # measured ~1 ms; the 2011 wrapper slept 3 s
    assert 0 < record["attach_delay"] < 5.0
    print(f"\nattach->cont {record['cont_delay'] * 1000:.2f} ms, "
          f"socat start->attach seen {record['attach_delay'] * 1000:.2f} ms")
    assert vm.serial_filename() == f"unix:{vm.serial},server=on"

    console.type(ESCAPE)
    assert console.wait() == 0
    assert vm.status() == "running"
    deadline = time.monotonic() + 5
    while vm.serial_filename() != f"disconnected:unix:{vm.serial},server=on":
        assert time.monotonic() < deadline, "socat did not disconnect"
        time.sleep(0.01)


def assert_left_alone(console: Console, vm: Vm, status: str) -> None:
    """The console did not unpause ``vm`` (in ``status``), before or after Ctrl+]."""
    assert vm.status() == status
    assert b"unpausing" not in console.drain()
    console.type(ESCAPE)
    assert console.wait() == 0
    assert vm.status() == status


def test_stopped_vm_stays_paused(qemu_bin: str, socat_bin: str, short_dir: str,
                                 reaper: Any, consoles: list[Console]) -> None:
    vm = start_vm(qemu_bin, short_dir, reaper)
    with QmpClient(vm.qmp, timeout=10) as qmp:
        qmp.execute("cont")
        qmp.execute("stop")
        assert qmp.execute("query-status")["status"] == "paused"
    console = Console(socat_bin, "inst2", vm, os.path.join(short_dir, "timing.json"))
    consoles.append(console)
    console.read_until(b"press Ctrl+] to leave.\r\n")
    record = console.record()
    assert record["attached_at"] is not None
    assert record["status"] == "paused" and record["cont_at"] is None
    assert_left_alone(console, vm, "paused")


def test_incoming_migration_is_not_unpaused(qemu_bin: str, socat_bin: str, short_dir: str,
                                            reaper: Any, consoles: list[Console]) -> None:
    vm = start_vm(qemu_bin, short_dir, reaper, ("-incoming", f"tcp:127.0.0.1:{free_port()}"))
    assert vm.status() == "inmigrate"
    console = Console(socat_bin, "inst3", vm, os.path.join(short_dir, "timing.json"))
    consoles.append(console)
    record = console.record()
    assert record["status"] == "inmigrate" and record["cont_at"] is None
    assert_left_alone(console, vm, "inmigrate")


def test_second_console_is_refused(qemu_bin: str, socat_bin: str, short_dir: str,
                                   reaper: Any, consoles: list[Console]) -> None:
    vm = start_vm(qemu_bin, short_dir, reaper)
    first = Console(socat_bin, "inst4", vm, os.path.join(short_dir, "timing.json"))
    consoles.append(first)
    first.record()
    start = time.monotonic()
    second = subprocess.run(
        [WRAPPER, socat_bin, "inst4", vm.qmp, TERMINAL, f"UNIX-CONNECT:{vm.serial}"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30, check=False)
    assert time.monotonic() - start < 10
    assert second.returncode != 0
    assert "Another console is already attached to instance inst4" in second.stderr
    assert "Connected" not in second.stdout
    assert first.proc.poll() is None
    assert vm.serial_filename() == f"unix:{vm.serial},server=on"
    first.type(ESCAPE)
    assert first.wait() == 0


def test_shell_metacharacters_are_data(qemu_bin: str, socat_bin: str, short_dir: str,
                                       reaper: Any, consoles: list[Console]) -> None:
    marker = os.path.join(short_dir, f"pwned-{os.getpid()}")
    name = f"a;touch {marker} `touch {marker}-bt` $(touch {marker}-ps) | true & '\" x"
    vm = start_vm(qemu_bin, short_dir, reaper)
    console = Console(socat_bin, name, vm, os.path.join(short_dir, "timing.json"))
    consoles.append(console)
    expected = f"Instance {name} is paused, unpausing\r\n".encode()
    output = console.read_until(expected)
    assert f"Connected to instance {name}; press Ctrl+] to leave.".encode() in output
    console.record()
    console.type(ESCAPE)
    assert console.wait() == 0

    missing = subprocess.run(
        [WRAPPER, socat_bin, name, os.path.join(short_dir, "none.qmp"), TERMINAL,
         f"UNIX-CONNECT:{vm.serial}"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30, check=False)
    assert missing.returncode == 1
    assert f"Instance {name} is not running" in missing.stderr
    for suffix in ("", "-bt", "-ps"):
        assert not os.path.exists(marker + suffix)


def test_not_running_instance(socat_bin: str, short_dir: str) -> None:
    missing = os.path.join(short_dir, "gone.qmp")
    refused = os.path.join(short_dir, "dead.qmp")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(refused)  # what a killed QEMU leaves behind: nobody listens
    try:
        for qmp_path in (missing, refused):
            start = time.monotonic()
            result = subprocess.run(
                [WRAPPER, socat_bin, "inst6", qmp_path, TERMINAL,
                 f"UNIX-CONNECT:{os.path.join(short_dir, 'serial')}"],
                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30,
                check=False)
            assert time.monotonic() - start < 10
            assert result.returncode == 1
            assert result.stderr.strip() == "Instance inst6 is not running"
            assert result.stdout == ""
    finally:
        stale.close()


def test_sigterm_is_forwarded_without_zombie(qemu_bin: str, socat_bin: str, short_dir: str,
                                             reaper: Any, consoles: list[Console]) -> None:
    vm = start_vm(qemu_bin, short_dir, reaper)
    console = Console(socat_bin, "inst7", vm, os.path.join(short_dir, "timing.json"))
    consoles.append(console)
    console.record()
    (socat_pid,) = console.socat_pids()
    console.proc.send_signal(signal.SIGTERM)
    returncode = console.wait()
    assert returncode != 0
    # The wrapper reaped socat: the pid is gone at once (an orphan zombie would linger).
    assert not os.path.exists(f"/proc/{socat_pid}")
    assert vm.status() == "running"
