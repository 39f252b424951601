"""A small client for the QEMU guest agent (qemu-ga) on an instance's channel.

The agent speaks JSON lines over the virtio-serial port
``org.qemu.guest_agent.0``, which QEMU offers on a unix socket
(:attr:`~ganeti_kvm.host.paths.InstancePaths.guest_agent_socket`).  Unlike
QMP there is no greeting and no negotiation, and the channel may hold a
previous client's unread replies, or nothing may listen at all (no agent
in the guest, or not yet started): QEMU accepts the connection either way.
So every session starts with ``guest-sync-delimited`` and a random id:
the agent answers it after a ``0xFF`` byte, and everything before the reply
carrying that id is stale and skipped.  A ``0xFF`` byte sent first resets
the agent's parser, in case a previous client left half a command.

Every call is bounded by the client's timeout and raises
:class:`ganeti_kvm.errors.GuestAgentError` (a ``HypervisorError``) naming
the instance, what failed and what to do.
"""

from __future__ import annotations

import contextlib
import json
import random
import select
import socket
import time
from types import TracebackType
from typing import Any

from ganeti_kvm.errors import GuestAgentError, MonitorError
from ganeti_kvm.qmp.client import open_monitor_socket

__all__ = ["GuestAgent", "AGENT_TIMEOUT", "SYNC_DELIMITER"]

#: Default bound, in seconds, of connecting and of each answer.
AGENT_TIMEOUT = 2.0
#: The byte the agent sends before its answer to guest-sync-delimited, and a
#: client sends to reset the agent's parser.
SYNC_DELIMITER = b"\xff"
_MAX_BUFFER = 1 << 20  # a channel that sends more than this before our reply is not an agent


class GuestAgent:
    """One session with the guest agent of instance ``name`` on socket ``path``."""

    def __init__(self, path: str, name: str, timeout: float = AGENT_TIMEOUT) -> None:
        self.path = path
        self.name = name
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buffer = bytearray()

    def __enter__(self) -> GuestAgent:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection (the agent itself runs on)."""
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None

    def _fail(self, what: str) -> GuestAgentError:
        return GuestAgentError(
            f"The guest agent of instance {self.name} ({self.path}) {what}; check that "
            "qemu-guest-agent runs in the guest, or set use_guest_agent to false")

    def _connect(self) -> socket.socket:
        if self._sock is None:
            try:
                self._sock = open_monitor_socket(self.path, self.timeout,
                                                 kind="guest agent socket")
            except MonitorError as err:
                raise GuestAgentError(
                    f"Cannot reach the guest agent of instance {self.name}: {err}") from None
        return self._sock

    def _send(self, data: bytes, deadline: float) -> None:
        sock = self._connect()
        view = memoryview(data)
        while view:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._fail(f"took no input within {self.timeout:g} s")
            _, writable, _ = select.select([], [sock], [], remaining)
            if not writable:
                continue
            try:
                sent = sock.send(view)
            except BlockingIOError:
                continue
            except OSError as err:
                raise self._fail(f"connection failed while sending: {err}") from None
            view = view[sent:]

    def _receive(self, deadline: float, what: str) -> None:
        """Append whatever arrives to the buffer; fail at the deadline or on EOF."""
        sock = self._connect()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise self._fail(f"did not answer {what} within {self.timeout:g} s")
        readable, _, _ = select.select([sock], [], [], remaining)
        if not readable:
            raise self._fail(f"did not answer {what} within {self.timeout:g} s")
        try:
            chunk = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as err:
            raise self._fail(f"connection failed while waiting for {what}: {err}") from None
        if not chunk:
            raise self._fail(f"closed the connection while waiting for {what}")
        self._buffer += chunk
        if len(self._buffer) > _MAX_BUFFER:
            raise self._fail(f"sent over {_MAX_BUFFER} bytes without answering {what}")

    def _reply(self, deadline: float, what: str) -> dict[str, Any]:
        """The next JSON object on the channel."""
        while True:
            newline = self._buffer.find(b"\n")
            if newline >= 0:
                line = bytes(self._buffer[:newline]).strip(SYNC_DELIMITER + b" \r\t")
                del self._buffer[:newline + 1]
                if not line:
                    continue
                try:
                    message = json.loads(line)
                except ValueError:
                    raise self._fail(f"sent invalid JSON for {what}: {line[:200]!r}") from None
                if not isinstance(message, dict):
                    raise self._fail(f"sent {message!r:.200} for {what}")
                return message
            self._receive(deadline, what)

    def sync(self) -> None:
        """Make sure the agent listens and the channel holds nothing stale.

        ``guest-sync-delimited`` with a random id; bytes before the agent's
        ``0xFF`` and replies with another id are a previous session's.
        """
        deadline = time.monotonic() + self.timeout
        token = random.randrange(1, 2**31)
        request = {"execute": "guest-sync-delimited", "arguments": {"id": token}}
        self._send(SYNC_DELIMITER + json.dumps(request).encode() + b"\n", deadline)
        while True:
            marker = self._buffer.find(SYNC_DELIMITER)
            if marker >= 0:
                del self._buffer[:marker + 1]
                break
            self._buffer.clear()  # stale bytes before the delimiter
            self._receive(deadline, "guest-sync-delimited")
        while True:
            reply = self._reply(deadline, "guest-sync-delimited")
            if "error" in reply:
                raise self._fail(f"refused guest-sync-delimited: {_desc(reply)}")
            if reply.get("return") == token:
                return

    def shutdown(self, mode: str = "powerdown") -> None:
        """Ask the guest OS to shut down (``guest-shutdown``; ``powerdown``, ``halt``
        or ``reboot``).  The agent answers nothing when it complies, so this only
        sends the request, after :meth:`sync`; the caller sees the guest go."""
        if mode not in ("powerdown", "halt", "reboot"):
            raise GuestAgentError(
                f"Cannot shut down instance {self.name} through its guest agent: unknown "
                f"mode {mode!r}; use powerdown, halt or reboot")
        self.sync()
        request = {"execute": "guest-shutdown", "arguments": {"mode": mode}}
        self._send(json.dumps(request).encode() + b"\n", time.monotonic() + self.timeout)


def _desc(reply: dict[str, Any]) -> str:
    error = reply.get("error")
    if isinstance(error, dict):
        return f"{error.get('class', '')}: {error.get('desc', '')}"
    return repr(error)[:200]
