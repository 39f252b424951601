"""Helpers for tests that run real instances: parameters, serial readers, cleanup."""

from __future__ import annotations

import contextlib
import os
import random
import re
import select
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from typing import Any

from ganeti_kvm import constants as c
from ganeti_kvm import objects
from ganeti_kvm.host import paths, process
from ganeti_kvm.qmp.client import qmp_execute
from ganeti_kvm.tools.console_wrapper import find_serial_chardev


def guest_hvparams(qemu_bin: str, guest: Any, **overrides: Any) -> dict[str, Any]:
    """Parameters that boot the tiny test guest under TCG with a serial console."""
    hvp = dict(c.HVC_DEFAULTS[c.HT_KVM])
    hvp.update(kvm_path=qemu_bin, kernel_path=guest.kernel, initrd_path=guest.initrd,
               root_path="/dev/vda1", kernel_args="panic=-1 quiet", kvm_flag="disabled",
               serial_console=True)
    hvp.update(overrides)
    return hvp


def make_instance(name: str, hvparams: dict[str, Any], memory: int = 128, vcpus: int = 1,
                  nics: list | None = None, tags: list | None = None,
                  network_port: int | None = None) -> objects.Instance:
    return objects.Instance(name=name, primary_node="node1", hvparams=hvparams,
                            beparams={"memory": memory, "vcpus": vcpus}, nics=nics or [],
                            tags=tags or [], network_port=network_port)


class SerialReader:
    """Reads the serial socket of an instance, collecting every line."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock.connect(path)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        self.sock.setblocking(False)
        self.text = ""

    def read_until(self, pattern: str, timeout: float = 60.0) -> re.Match[str]:
        """Read until ``pattern`` (a regex) matches the collected text."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while True:
            match = regex.search(self.text)
            if match:
                return match
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{pattern!r} not seen within {timeout} s; got:\n"
                                     f"{self.text[-3000:]}")
            ready, _, _ = select.select([self.sock], [], [], min(remaining, 0.5))
            if ready:
                data = self.sock.recv(65536)
                if not data:
                    raise AssertionError(f"serial closed before {pattern!r}; got:\n"
                                         f"{self.text[-3000:]}")
                self.text += data.decode("utf-8", "replace").replace("\r", "")

    def send(self, data: str) -> None:
        self.sock.setblocking(True)
        self.sock.sendall(data.encode())
        self.sock.setblocking(False)

    def counters(self) -> list[int]:
        return [int(n) for n in re.findall(r"COUNTER (\d+)", self.text)]

    def close(self) -> None:
        self.sock.close()


def kill_instances(run_dir: str) -> None:
    """SIGKILL every QEMU that really runs an instance under ``run_dir``."""
    layout = paths.RunDir(run_dir)
    try:
        names = os.listdir(layout.pid_dir)
    except FileNotFoundError:
        return
    for name in names:
        pidfile = os.path.join(layout.pid_dir, name)
        pid = process.read_pidfile(pidfile)
        if pid and process.runs_instance(pid, name, pidfile):
            process.signal_pid(pid, signal.SIGCONT)
            process.signal_pid(pid, signal.SIGKILL)
            process.wait_gone(pid, 10)


def free_vnc_port() -> int:
    """A free TCP port >= 5900 on loopback (random, to stay clear of other test runs)."""
    candidates = list(range(6200, 6900))
    random.shuffle(candidates)
    for port in candidates:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free VNC port")


def free_port() -> int:
    """A free TCP port on loopback, chosen by the kernel."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class BareVm:
    """A guest-less QEMU started paused (-S) with a QMP and a serial socket."""

    def __init__(self, qemu_bin: str, directory: str, extra: tuple[str, ...] = ()) -> None:
        self.qmp = os.path.join(directory, "qmp")
        self.serial = os.path.join(directory, "serial")
        self.pidfile = os.path.join(directory, "pid")
        argv = [qemu_bin, "-S", "-nodefaults", "-display", "none",
                "-machine", "pc,accel=tcg", "-m", "64",
                "-qmp", f"unix:{self.qmp},server=on,wait=off",
                "-chardev", f"socket,id=serial0,path={self.serial},server=on,wait=off",
                "-serial", "chardev:serial0",
                "-daemonize", "-pidfile", self.pidfile, *extra]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, f"QEMU failed to start: {result.stderr}"
        with open(self.pidfile, encoding="ascii") as handle:
            self.pid = int(handle.read().strip())

    def status(self) -> str:
        return str(qmp_execute(self.qmp, "query-status", timeout=10)["status"])

    def serial_filename(self) -> str:
        chardev = find_serial_chardev(qmp_execute(self.qmp, "query-chardev", timeout=10),
                                      self.serial)
        assert chardev is not None
        return str(chardev["filename"])


def g3_instance(name: str, hvparams: dict[str, Any], maxmem: int = 64, vcpus: int = 1,
                minmem: int | None = None) -> dict[str, Any]:
    """A Ganeti 3 instance as its RPC sends it (filled hvparams and beparams)."""
    return {"name": name, "primary_node": "node-uuid-1", "hvparams": hvparams,
            "beparams": {"maxmem": maxmem, "minmem": maxmem if minmem is None else minmem,
                         "vcpus": vcpus, "auto_balance": True, "always_failover": False,
                         "spindle_use": 1},
            "nics": [], "disks": [], "tags": set(), "network_port": None}


@contextlib.contextmanager
def node_hypervisors(cls: Any, short_dir: str, *names: str,
                     **options: Any) -> Iterator[tuple[Any, ...]]:
    """One ``cls`` per name, each with its own run directory under ``short_dir``
    (a node on this machine) and ``options``; every QEMU in them is killed at the end."""
    hypervisors = tuple(cls(run_dir=os.path.join(short_dir, name), **options)
                        for name in names)
    try:
        yield hypervisors
    finally:
        for hypervisor in hypervisors:
            kill_instances(hypervisor.node.layout.root)


MIGRATION_BOUND = 90.0  # seconds a test's live migration has at most


def live_migrate(source: Any, target: Any, instance: Any) -> None:
    """A live migration between two Ganeti 3 hypervisors on this machine, finished both ends.

    The calls Ganeti's master makes, in its order; the migration must
    complete within :data:`MIGRATION_BOUND`.
    """
    info = source.MigrationInfo(instance)
    target.AcceptInstance(instance, info, "127.0.0.1")
    source.MigrateInstance("cluster1", instance, "127.0.0.1", True)
    deadline = time.monotonic() + MIGRATION_BOUND
    while source.GetMigrationStatus(instance).status == "active" and \
            time.monotonic() < deadline:
        time.sleep(0.05)
    assert source.GetMigrationStatus(instance).status == "completed"
    source.FinalizeMigrationSource(instance, True, True)
    target.FinalizeMigrationDst(instance, info, True)


def recv_exact(sock: socket.socket, size: int) -> bytes:
    """Exactly ``size`` bytes from ``sock``; the peer closing early fails the test."""
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise AssertionError(f"connection closed after {data!r}, wanted {size} bytes")
        data += chunk
    return data
