"""The human monitor, for QEMUs started by the 2011 driver.

The 2011 driver gave QEMU one monitor, ``-monitor unix:NAME.monitor``, in
the human (readline) mode, and no QMP.  Until such an instance is rebooted
or migrated (both give it QMP), this client is the only way to ask it
anything.  Every read has a deadline; nothing goes through a shell.
"""

from __future__ import annotations

import re
import socket
import time

from ganeti_kvm import errors
from ganeti_kvm.qmp.client import open_monitor_socket

PROMPT = b"(qemu) "
_ESCAPES = re.compile(rb"\x1b\[[0-9;]*[A-Za-z]")
_REPLY_LIMIT = 1 << 20
_REASON = re.compile(r"\(([a-z-]+)\)")


class HmpClient:
    """One connection to a human monitor socket; use as a context manager."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.path = path
        self.timeout = timeout
        self._sock: socket.socket | None = None

    def __enter__(self) -> HmpClient:
        # Waits while another client holds the monitor, as QMP connects do.
        self._sock = open_monitor_socket(self.path, self.timeout, kind="human monitor")
        self._read_until_prompt(time.monotonic() + self.timeout, "the greeting")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def command(self, line: str) -> str:
        """Run one monitor command and return its output (without the echo)."""
        if self._sock is None:
            raise errors.MonitorError(f"The human monitor {self.path} is not connected")
        if "\n" in line or "\r" in line or "\0" in line:
            raise errors.MonitorError(f"Monitor command {line!r} contains a line break")
        deadline = time.monotonic() + self.timeout
        try:
            self._sock.sendall(line.encode("utf-8") + b"\n")
        except OSError as err:
            raise errors.MonitorError(
                f"Cannot send {line!r} to the human monitor {self.path}: {err}") from None
        raw = self._read_until_prompt(deadline, repr(line))
        text = _ESCAPES.sub(b"", raw).replace(b"\r", b"").decode("utf-8", "replace")
        # The first line is QEMU's echo of the command.
        return text.partition("\n")[2].strip()

    def _read_until_prompt(self, deadline: float, what: str) -> bytes:
        assert self._sock is not None
        data = b""
        while not data.endswith(PROMPT):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or len(data) > _REPLY_LIMIT:
                raise errors.MonitorTimeout(
                    f"The human monitor {self.path} did not answer {what} within "
                    f"{self.timeout:.0f} s")
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as err:
                raise errors.MonitorError(
                    f"Reading {what} from the human monitor {self.path} failed: {err}") from None
            if not chunk:
                raise errors.MonitorError(
                    f"The human monitor {self.path} closed the connection during {what}")
            data += chunk
        return data[:-len(PROMPT)]


def hmp_command(path: str, line: str, timeout: float = 10.0) -> str:
    """Connect to the human monitor at ``path``, run ``line`` and return its output."""
    with HmpClient(path, timeout) as client:
        return client.command(line)


def run_state(output: str) -> str:
    """QMP's name of the run state shown by ``info status``.

    ``VM status: running`` is ``running``, ``VM status: paused`` is
    ``paused``, and a reason in parentheses is the state QMP's
    ``query-status`` reports (``paused (prelaunch)`` is ``prelaunch``).
    """
    status = output.partition("VM status:")[2].strip()
    if status.startswith("running"):
        return "running"
    reason = _REASON.search(status)
    if reason:
        return reason.group(1)
    return (status.split() or ["unknown"])[0]
