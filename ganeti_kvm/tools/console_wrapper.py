"""The serial console wrapper: attach socat to an instance's serial socket.

Usage (the argument order of the cluster manager's ``kvm-console-wrapper``)::

    kvm-console-wrapper SOCAT_PATH INSTANCE_NAME QMP_SOCKET
                        SOCAT_TERMINAL_OPTIONS UNIX-CONNECT:SERIAL_SOCKET

for example ``/usr/bin/socat inst1 /run/.../inst1.qmp
STDIO,raw,echo=0,escape=0x1d UNIX-CONNECT:/run/.../inst1.serial``.

The wrapper

1. asks QMP whether the instance runs and whether a console is already
   attached to its serial chardev (QEMU's socket chardev serves one client;
   ``query-chardev`` shows ``disconnected:unix:PATH,server=on`` when free and
   ``unix:PATH,server=on`` when taken, on QEMU 7.2 and 10.0 alike);
2. prints how to leave and starts socat with the two addresses as given
   (an argv list, never a shell), inheriting the terminal;
3. polls ``query-chardev`` every 10 ms over one QMP connection until socat is
   attached, then, only if the instance is in ``prelaunch`` (started paused
   and never ran, so that the console sees the boot from its first line),
   sends ``cont``; any other state (``paused`` by an admin, ``inmigrate``,
   ``postmigrate``, errors) is left alone;
4. closes QMP (QEMU's QMP socket serves one client at a time, so the wrapper
   must not hold it for the console session) and waits for socat, returning
   its exit code.  SIGINT, SIGTERM and SIGHUP are forwarded to socat.

If ``GANETI_KVM_CONSOLE_TIMING`` names a file, a JSON record of the
monotonic (``time.monotonic()``, system-wide on Linux) and wall-clock times
of socat's start, of the attachment's detection and of the ``cont`` is
written there, so tests and benchmarks can measure the unpause delay.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from types import FrameType
from typing import Any

from ganeti_kvm.errors import MonitorError, MonitorTimeout
from ganeti_kvm.qmp.client import QmpClient

__all__ = [
    "main",
    "ConsoleTiming",
    "find_serial_chardev",
    "escape_description",
    "serial_path_from_address",
    "ATTACH_DEADLINE",
    "ATTACH_POLL_INTERVAL",
    "QMP_TIMEOUT",
    "TIMING_ENV",
]

logger = logging.getLogger(__name__)

#: How long the wrapper watches for socat to attach before giving up on unpausing.
ATTACH_DEADLINE = 10.0
#: Interval between two ``query-chardev`` polls while waiting for socat.
ATTACH_POLL_INTERVAL = 0.01
#: Bound of every single QMP operation of the wrapper.
QMP_TIMEOUT = 5.0
#: Environment variable naming the file that receives the timing record.
TIMING_ENV = "GANETI_KVM_CONSOLE_TIMING"

#: The only state the wrapper unpauses: started with -S and never ran.
_UNPAUSE_STATUS = "prelaunch"
_DISCONNECTED = "disconnected:"
_UNIX_PREFIXES = ("unix:",)
_CONNECT_PREFIXES = ("UNIX-CONNECT:", "UNIX-CLIENT:")
_FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_USAGE = ("Usage: kvm-console-wrapper SOCAT_PATH INSTANCE_NAME QMP_SOCKET "
          "SOCAT_TERMINAL_OPTIONS UNIX-CONNECT:SERIAL_SOCKET")


@dataclass
class ConsoleTiming:
    """When the wrapper started socat, saw it attached and unpaused the instance.

    ``*_at`` fields are ``time.monotonic()`` values, ``*_wall`` fields
    ``time.time()`` values; None means the step did not happen.
    """

    instance: str
    socat_started_at: float | None = None
    socat_started_wall: float | None = None
    attached_at: float | None = None
    attached_wall: float | None = None
    status: str | None = None
    status_at: float | None = None
    cont_at: float | None = None
    cont_wall: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """Return the record plus the derived delays in seconds (None when unknown)."""
        record = asdict(self)
        record["attach_delay"] = _delta(self.socat_started_at, self.attached_at)
        record["cont_delay"] = _delta(self.attached_at, self.cont_at)
        return record


def _delta(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else end - start


def serial_path_from_address(address: str) -> str | None:
    """Return the socket path of a socat ``UNIX-CONNECT:PATH[,options]`` address.

    Returns None for any other kind of address.
    """
    for prefix in _CONNECT_PREFIXES:
        if address[:len(prefix)].upper() == prefix:
            path = address[len(prefix):].split(",", 1)[0]
            return path or None
    return None


def find_serial_chardev(chardevs: list[dict[str, Any]],
                        serial_path: str) -> dict[str, Any] | None:
    """Return the ``query-chardev`` entry of the unix socket chardev at ``serial_path``.

    Its ``filename`` is ``disconnected:unix:PATH,server=on`` while no client is
    connected and ``unix:PATH,server=on`` while one is.
    """
    for chardev in chardevs:
        filename = str(chardev.get("filename", ""))
        if filename.startswith(_DISCONNECTED):
            filename = filename[len(_DISCONNECTED):]
        for prefix in _UNIX_PREFIXES:
            if filename.startswith(prefix):
                path = filename[len(prefix):]
                if path == serial_path or path.startswith(serial_path + ","):
                    return chardev
    return None


def _is_connected(chardev: dict[str, Any]) -> bool:
    return not str(chardev.get("filename", "")).startswith(_DISCONNECTED)


def escape_description(socat_options: str) -> str | None:
    """Describe the key of socat's ``escape=`` option (e.g. ``Ctrl+]`` for 0x1d), if any."""
    match = re.search(r"(?:^|,)escape=(0[xX][0-9a-fA-F]+|\d+)(?:,|$)", socat_options)
    if match is None:
        return None
    value = int(match.group(1), 0)
    if value < 0x20:
        return "Ctrl+" + chr(0x40 + value)
    if value == 0x7F:
        return "Ctrl+?"
    return repr(chr(value)) if value < 0x110000 else match.group(1)


class _Wrapper:
    """One run of the console wrapper."""

    def __init__(self, socat: str, instance: str, qmp_path: str,
                 terminal_options: str, serial_address: str, serial_path: str) -> None:
        self.socat = socat
        self.instance = instance
        self.qmp_path = qmp_path
        self.terminal_options = terminal_options
        self.serial_address = serial_address
        self.serial_path = serial_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.pending_signal: int | None = None
        self.timing = ConsoleTiming(instance=instance)
        self.raw_terminal = False

    # -- output ---------------------------------------------------------

    def _write(self, fd: int, text: str) -> None:
        """Write a line to ``fd`` unbuffered; the terminal may be raw once socat runs."""
        ending = "\r\n" if self.raw_terminal else "\n"
        data = (text + ending).encode("utf-8", "backslashreplace")
        try:
            while data:
                written = os.write(fd, data)
                data = data[written:]
        except OSError as err:  # the terminal went away; nothing left to tell
            logger.debug("Could not write to fd %d: %s", fd, err)

    def say(self, text: str) -> None:
        """Tell the user ``text`` on stdout."""
        self._write(1, text)

    def complain(self, text: str) -> None:
        """Tell the user what went wrong on stderr."""
        self._write(2, text)

    # -- signals --------------------------------------------------------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        proc = self.proc
        if proc is not None and proc.returncode is None:
            logger.debug("Forwarding signal %d to socat (pid %d)", signum, proc.pid)
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signum)
        elif self.pending_signal is None:
            self.pending_signal = signum

    # -- steps ----------------------------------------------------------

    def check(self, qmp: QmpClient) -> int | None:
        """Check that the instance runs and its console is free; an exit code if not."""
        try:
            qmp.connect()
            chardevs = qmp.execute("query-chardev")
        except MonitorTimeout as err:
            self.complain(f"Instance {self.instance} is not responding on its monitor "
                          f"({err}); try again later")
            return 1
        except MonitorError as err:
            logger.debug("QMP check of %s failed: %s", self.instance, err)
            self.complain(f"Instance {self.instance} is not running")
            return 1
        chardev = find_serial_chardev(chardevs, self.serial_path)
        if chardev is None:
            found = ", ".join(f"{c.get('label')}={c.get('filename')}" for c in chardevs)
            self.complain(f"Instance {self.instance} has no serial console socket at "
                          f"{self.serial_path} (its chardevs: {found}); check that it was "
                          "started with a serial console")
            return 1
        if _is_connected(chardev):
            self.complain(f"Another console is already attached to instance {self.instance}")
            return 1
        return None

    def start_socat(self) -> int | None:
        """Print how to leave and start socat; an exit code if it cannot start."""
        key = escape_description(self.terminal_options)
        if key is None:
            self.say(f"Connected to instance {self.instance}; close the terminal to leave.")
        else:
            self.say(f"Connected to instance {self.instance}; press {key} to leave.")
        argv = [self.socat, self.terminal_options, self.serial_address]
        try:
            self.proc = subprocess.Popen(argv)  # inherits stdin, stdout and stderr
        except OSError as err:
            self.complain(f"Cannot run socat ({self.socat}): {err.strerror or err}; "
                          "install socat or fix the socat path")
            return 1
        self.timing.socat_started_at = time.monotonic()
        self.timing.socat_started_wall = time.time()
        self.raw_terminal = True
        logger.debug("Started socat (pid %d): %s", self.proc.pid, argv)
        if self.pending_signal is not None:
            self._on_signal(self.pending_signal, None)
        return None

    def watch(self, qmp: QmpClient) -> None:
        """Wait for socat to attach, then unpause a ``prelaunch`` instance."""
        assert self.proc is not None
        deadline = time.monotonic() + ATTACH_DEADLINE
        attached = False
        while True:
            if self.proc.poll() is not None:
                logger.debug("socat exited before attaching to %s", self.serial_path)
                return
            chardev = find_serial_chardev(qmp.execute("query-chardev"), self.serial_path)
            if chardev is not None and _is_connected(chardev):
                attached = True
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            time.sleep(min(ATTACH_POLL_INTERVAL, remaining))
        if not attached:
            self.complain(f"socat did not attach to the serial console of instance "
                          f"{self.instance} within {ATTACH_DEADLINE:g}s; the instance "
                          "was not unpaused (relaying anyway)")
            return
        self.timing.attached_at = time.monotonic()
        self.timing.attached_wall = time.time()
        status = str(qmp.execute("query-status").get("status", ""))
        self.timing.status = status
        self.timing.status_at = time.monotonic()
        if status != _UNPAUSE_STATUS:
            logger.debug("Instance %s is %r; not unpausing", self.instance, status)
            return
        self.say(f"Instance {self.instance} is paused, unpausing")
        qmp.execute("cont")
        self.timing.cont_at = time.monotonic()
        self.timing.cont_wall = time.time()
        logger.debug("Unpaused %s %.1f ms after socat attached", self.instance,
                     (self.timing.cont_at - self.timing.attached_at) * 1000)

    def write_timing(self) -> None:
        """Write the timing record where ``GANETI_KVM_CONSOLE_TIMING`` says, if set."""
        path = os.environ.get(TIMING_ENV)
        if not path:
            return
        temporary = f"{path}.{os.getpid()}.tmp"
        try:
            with open(temporary, "w", encoding="utf-8") as handle:
                json.dump(self.timing.as_dict(), handle)
            os.replace(temporary, path)
        except OSError as err:
            self.complain(f"Cannot write the console timing record to {path}: {err}")

    def wait_socat(self) -> int:
        """Wait for socat to end (the console session) and return its exit code.

        Deliberately unbounded: the session lasts as long as the user stays.
        It ends when the user types the escape key, when the terminal hangs
        up (SIGHUP, forwarded) or when QEMU closes the serial socket.
        """
        assert self.proc is not None
        returncode = self.proc.wait()
        return returncode if returncode >= 0 else 128 - returncode

    def run(self) -> int:
        """Run the whole wrapper and return the exit code."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in _FORWARDED_SIGNALS}
        try:
            qmp = QmpClient(self.qmp_path, timeout=QMP_TIMEOUT)
            try:
                failed = self.check(qmp)
                if failed is not None:
                    return failed
                if self.pending_signal is not None:
                    return 128 + self.pending_signal
                failed = self.start_socat()
                if failed is not None:
                    return failed
                try:
                    self.watch(qmp)
                except MonitorError as err:
                    self.complain(f"Could not check or unpause instance {self.instance}: "
                                  f"{err}")
            finally:
                qmp.close()
            if self.proc is not None:
                self.write_timing()
            return self.wait_socat()
        finally:
            if self.proc is not None and self.proc.returncode is None:
                # Only reached on an unexpected error: still never leave a zombie.
                self.proc.wait()
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    """Run the console wrapper with ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    args = sys.argv[1:] if argv is None else list(argv)
    if len(args) != 5:
        print(_USAGE, file=sys.stderr)
        return 2
    socat, instance, qmp_path, terminal_options, serial_address = args
    serial_path = serial_path_from_address(serial_address)
    if serial_path is None:
        print(f"The serial console address {serial_address!r} is not a "
              f"UNIX-CONNECT:PATH address; {_USAGE}", file=sys.stderr)
        return 2
    wrapper = _Wrapper(socat, instance, qmp_path, terminal_options, serial_address,
                       serial_path)
    return wrapper.run()
