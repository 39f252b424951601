"""Boot the tiny test guest under each real QEMU and check what it does.

These tests start QEMU directly (no library code) so that they check the
guest image and the QEMU binaries on their own.  QEMU starts paused (-S) and
is let go with QMP "cont" only once the serial socket is connected, so no
guest output can be lost before the test listens.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time

import pytest

from tests.guestimage import FIRST_LINE, KERNEL_ARGS, Guest, build_guest, make_disk

BOOT_TIMEOUT = 60       # seconds from "cont" to READY; TCG boots in a few here
POWERDOWN_TIMEOUT = 30  # seconds from system_powerdown to QEMU's exit
COUNTER_RE = re.compile(r"COUNTER (\d+)")


@pytest.fixture(scope="session")
def guest() -> Guest:
    return build_guest()


def connect_unix(path: str, deadline: float) -> socket.socket:
    """Connect to a unix socket QEMU is about to create."""
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


class Serial:
    """Line reader (and writer) on QEMU's serial socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        self.lines: list[str] = []  # every complete line seen, \r stripped

    def read_until(self, pattern: str | re.Pattern[str], timeout: float) -> str:
        """Return the first new line matching PATTERN (re.search); fail on timeout."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        seen = len(self.lines)
        while True:
            for line in self.lines[seen:]:
                if regex.search(line):
                    return line
            seen = len(self.lines)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"no line matching {regex.pattern!r} within {timeout} s; "
                            f"last lines: {self.lines[-20:]!r}, partial: {self.buffer!r}")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            if not data:
                pytest.fail(f"serial closed; last lines: {self.lines[-20:]!r}")
            self.buffer += data
            *complete, self.buffer = self.buffer.split(b"\n")
            self.lines += [line.decode(errors="replace").rstrip("\r") for line in complete]

    def send(self, text: str) -> None:
        self.sock.sendall(text.encode())


class QMP:
    """Just enough of the QMP protocol for these tests."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.file = sock.makefile("rb")
        sock.settimeout(10)
        greeting = json.loads(self.file.readline())
        assert "QMP" in greeting, greeting
        self.execute("qmp_capabilities")

    def execute(self, command: str) -> object:
        self.sock.sendall(json.dumps({"execute": command}).encode() + b"\n")
        while True:
            line = self.file.readline()
            if not line:
                raise EOFError(f"QMP closed while waiting for {command}")
            reply = json.loads(line)
            if "event" in reply:
                continue
            assert "return" in reply, reply
            return reply["return"]


class Guestrun:
    """A paused QEMU running the guest, with its serial and QMP sockets."""

    def __init__(self, qemu_bin: str, guest: Guest, rundir: str, reaper,
                 append: str = KERNEL_ARGS, extra: tuple[str, ...] = ()) -> None:
        serial_path = os.path.join(rundir, "serial")
        qmp_path = os.path.join(rundir, "qmp")
        argv = [
            qemu_bin, "-machine", "pc,accel=tcg", "-m", "128",
            "-nodefaults", "-nographic", "-no-reboot", "-S",
            "-kernel", guest.kernel, "-initrd", guest.initrd, "-append", append,
            "-chardev", f"socket,id=ser0,path={serial_path},server=on,wait=off",
            "-serial", "chardev:ser0",
            "-qmp", f"unix:{qmp_path},server=on,wait=off",
            *extra,
        ]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        reaper.add(self.proc.pid)
        deadline = time.monotonic() + 10
        self.serial = Serial(connect_unix(serial_path, deadline))
        self.qmp = QMP(connect_unix(qmp_path, deadline))
        self.started = time.monotonic()
        self.qmp.execute("cont")

    def close(self) -> None:
        self.serial.sock.close()
        self.qmp.sock.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        if self.proc.stderr:
            self.proc.stderr.close()


@pytest.fixture
def boot(qemu_bin, guest, short_dir, reaper):
    """boot(append=..., extra=...) starts the guest; all are stopped at teardown."""
    runs: list[Guestrun] = []

    def start(append: str = KERNEL_ARGS, extra: tuple[str, ...] = ()) -> Guestrun:
        rundir = os.path.join(short_dir, str(len(runs)))
        os.mkdir(rundir)
        runs.append(Guestrun(qemu_bin, guest, rundir, reaper, append, extra))
        return runs[-1]

    try:
        yield start
    finally:
        for run in runs:
            run.close()


def in_order(lines: list[str], prefixes: list[str]) -> bool:
    """Do LINES contain lines starting with each of PREFIXES, in that order?"""
    rest = iter(lines)
    return all(any(line.startswith(prefix) for line in rest) for prefix in prefixes)


def test_boot_lines_disk_and_counter(boot, short_dir):
    disk = make_disk(os.path.join(short_dir, "disk.img"), "test-marker-1")
    run = boot(extra=("-drive", f"file={disk},format=raw,if=virtio"))
    serial = run.serial
    serial.read_until(f"^{re.escape(FIRST_LINE)}$", BOOT_TIMEOUT)
    first_line_at = time.monotonic() - run.started
    first = serial.read_until(COUNTER_RE, BOOT_TIMEOUT)
    second = serial.read_until(COUNTER_RE, 5)
    ready_at = time.monotonic() - run.started

    # Everything from the first line to READY, in order, with nothing lost.
    lines = serial.lines[serial.lines.index(FIRST_LINE):]
    expected = [FIRST_LINE, "BOOT 1 kernel ", "BOOT 2 modules loaded",
                "DISK MARKER=test-marker-1", "NET NONE", "BOOT 3 acpid running", "READY"]
    assert in_order(lines, expected), lines
    assert not [line for line in lines if "MODULE" in line or "FAILED" in line], lines
    # The counter only starts after READY and counts up.
    assert lines.index("READY") < lines.index(first)
    assert int(COUNTER_RE.search(first)[1]) < int(COUNTER_RE.search(second)[1])
    print(f"first line after {first_line_at:.2f} s, counter after {ready_at:.2f} s")


def test_network_from_kernel_args(boot):
    run = boot(append=f"{KERNEL_ARGS} gk.ip=192.0.2.10/24 gk.gw=192.0.2.1",
               # A NIC on an otherwise empty hub: a device, but no traffic anywhere.
               extra=("-netdev", "hubport,id=n0,hubid=0",
                      "-device", "virtio-net-pci,netdev=n0,romfile="))
    line = run.serial.read_until(r"^(NET|READY)", BOOT_TIMEOUT)
    assert line == "NET eth0 192.0.2.10/24"


def test_system_powerdown_ends_qemu(boot):
    run = boot()
    run.serial.read_until(COUNTER_RE, BOOT_TIMEOUT)
    run.qmp.execute("system_powerdown")
    run.serial.read_until("POWER BUTTON", POWERDOWN_TIMEOUT)
    assert run.proc.wait(timeout=POWERDOWN_TIMEOUT) == 0


def test_serial_shell_echo(boot):
    run = boot()
    # Type only once the shell is there: input that arrives while nobody has
    # ttyS0 open is dropped by the guest's UART driver.
    run.serial.read_until("built-in shell", BOOT_TIMEOUT)
    run.serial.send("echo hello-$((6*7))\n")
    # The tty echoes the command as typed; only the shell prints the result.
    run.serial.read_until("hello-42", 15)
    # The shell is restarted after it exits, and the counter goes on.
    run.serial.send("exit\n")
    run.serial.read_until("SHELL EXITED", 15)
    last = int(COUNTER_RE.search(run.serial.read_until(COUNTER_RE, 5))[1])
    assert int(COUNTER_RE.search(run.serial.read_until(COUNTER_RE, 5))[1]) > last
