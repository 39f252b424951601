"""A small synchronous client for QEMU's QMP monitor over a unix socket.

QMP is a line-oriented JSON protocol: on connect QEMU sends a greeting
(``{"QMP": {"version": ..., "capabilities": [...]}}``), the client leaves
capabilities negotiation mode with ``qmp_capabilities``, then sends commands
``{"execute": NAME, "arguments": {...}, "id": ID}`` and gets back either
``{"return": ..., "id": ID}`` or ``{"error": {"class": ..., "desc": ...},
"id": ID}``.  Asynchronous events (``{"event": NAME, "data": ...,
"timestamp": ...}``) may arrive at any time, including between a command and
its reply; they are queued here and handed out by :meth:`QmpClient.wait_event`
and :meth:`QmpClient.events`.

Every operation is bounded by a timeout: a QEMU that is stopped (SIGSTOP),
hung, or whose monitor is held by another client (a QMP socket serves one
client at a time) makes the call fail with :class:`MonitorTimeout` instead of
blocking the caller.  A monitor busy with other clients (listings, the
console wrapper) refuses new connections while its backlog of one is full;
:meth:`QmpClient.connect` waits for its turn within the same timeout.

Only the standard library is used; no subprocess and no shell are involved.

The client is not thread-safe: use one instance per thread.
"""

from __future__ import annotations

import array
import contextlib
import logging
import socket
import time
from collections import deque
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Any

from ganeti_kvm.errors import MonitorError, MonitorTimeout, QmpCommandError
from ganeti_kvm.qmp.batch import Batch
from ganeti_kvm.qmp.wire import (
    already_negotiated,
    command_error,
    connect_error,
    decode_message,
    encode_request,
    is_reply,
    request_ids,
)

__all__ = ["QmpClient", "qmp_execute", "open_monitor_socket", "DEFAULT_TIMEOUT"]

logger = logging.getLogger(__name__)

#: Default bound, in seconds, of every single QMP operation.
DEFAULT_TIMEOUT = 10.0

_RECV_SIZE = 65536
#: Seconds between connects to a monitor whose backlog is full: the first
#: pause, doubled on each try up to the last.
CONNECT_RETRY_FIRST = 0.001
CONNECT_RETRY_MAX = 0.01


class QmpClient:
    """A synchronous QMP connection to one QEMU instance.

    ``path`` is the QMP unix socket (``-qmp unix:PATH,server=on,wait=off``).
    ``timeout`` bounds every single operation (:meth:`connect`, each
    :meth:`execute` unless it is given its own timeout).

    The connection is opened by :meth:`connect`, or lazily by the first
    :meth:`execute`.  Use it as a context manager to be sure it is closed::

        with QmpClient("/run/ganeti/kvm-hypervisor/ctrl/inst1.qmp") as qmp:
            qmp.connect()
            status = qmp.execute("query-status")["status"]
    """

    def __init__(self, path: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Remember the socket path and the per-operation timeout; connect nothing yet."""
        if timeout <= 0:
            raise ValueError(f"QMP timeout must be positive, got {timeout!r}")
        self.path = path
        self.timeout = float(timeout)
        self.greeting: dict[str, Any] | None = None
        self._sock: socket.socket | None = None
        self._buffer = bytearray()
        self._events: deque[dict[str, Any]] = deque()
        self._eof = False
        self._limit = self.timeout
        self._ids = request_ids()

    # ------------------------------------------------------------------
    # Connection handling

    @property
    def connected(self) -> bool:
        """True while a negotiated connection is open."""
        return self._sock is not None

    def connect(self) -> dict[str, Any]:
        """Connect, read the greeting and leave capabilities negotiation mode.

        Returns the greeting's version information, e.g.
        ``{"qemu": {"major": 7, "minor": 2, "micro": 22}, "package": "..."}``
        (the whole greeting stays available as :attr:`greeting`).  Calling it
        on an open connection returns the same information again.

        A monitor whose backlog is full (another client talks to it) is
        tried again until the timeout.  Raises :class:`MonitorError` if the
        socket is missing or refuses the connection, and
        :class:`MonitorTimeout` if the connect, the greeting or the
        negotiation does not complete within the timeout.
        """
        return self._open()

    def _open(self, then: bytes = b"") -> dict[str, Any]:
        """:meth:`connect`; ``then``: requests sent in the same write as the
        negotiation (QEMU runs them right after it), for the caller to read."""
        if self._sock is not None and self.greeting is not None:
            return dict(self.greeting["QMP"].get("version", {}))
        self._limit = self.timeout
        deadline = time.monotonic() + self.timeout
        self._sock = open_monitor_socket(self.path, self.timeout)
        self._buffer.clear()
        self._eof = False
        try:
            # Sent before the greeting arrives: QEMU reads it once the greeting
            # is out, which saves a round trip.
            caps_id = next(self._ids)
            self._send(encode_request("qmp_capabilities", None, caps_id) + then, deadline,
                       "qmp_capabilities")
            while True:
                greeting = self._read_message(deadline, "waiting for the QMP greeting")
                if "QMP" in greeting:
                    break
                if "event" in greeting:
                    self._events.append(greeting)
                elif is_reply(greeting):
                    logger.debug("Dropping a reply to an earlier client on %s: %r",
                                 self.path, greeting)
                else:
                    raise MonitorError(
                        f"QMP socket {self.path} sent {greeting!r} instead of a QMP "
                        "greeting; check that the path is a QMP (not a human monitor) socket")
            self.greeting = greeting
            try:
                self._reply("qmp_capabilities", caps_id, deadline)
            except QmpCommandError as err:
                if not already_negotiated(err.error_class):
                    raise
        except BaseException:
            self.close()
            raise
        version = greeting["QMP"].get("version", {})
        logger.debug("Connected to QMP %s: %s", self.path, version)
        return dict(version)

    def close(self) -> None:
        """Close the connection; queued events are kept. Safe to call twice."""
        sock, self._sock = self._sock, None
        self.greeting = None
        self._buffer.clear()
        if sock is not None:
            with contextlib.suppress(OSError):  # close on a unix socket does not fail
                sock.close()

    def __enter__(self) -> QmpClient:
        """Return the client; the connection opens on first use."""
        return self

    def __exit__(self, exc_type: type[BaseException] | None,
                 exc: BaseException | None, tb: TracebackType | None) -> None:
        """Close the connection."""
        self.close()

    # ------------------------------------------------------------------
    # Commands

    def execute(self, command: str, arguments: dict[str, Any] | None = None,
                timeout: float | None = None) -> Any:
        """Run one QMP command and return its ``"return"`` value.

        ``timeout`` (default: the client's) bounds the whole exchange.  Events
        that arrive before the reply are queued.  Raises
        :class:`QmpCommandError` when QEMU answers with an error,
        :class:`MonitorTimeout` when no reply comes in time, and
        :class:`MonitorError` when the connection fails or closes.
        """
        return self._command(command, arguments, self._begin(timeout))

    def _limit_of(self, timeout: float | None) -> float:
        """The bound of one exchange: ``timeout``, or the client's."""
        limit = self.timeout if timeout is None else float(timeout)
        if limit <= 0:
            raise ValueError(f"QMP timeout must be positive, got {timeout!r}")
        return limit

    def _begin(self, timeout: float | None) -> float:
        """Start an exchange bounded by ``timeout`` on a negotiated connection; its deadline."""
        limit = self._limit_of(timeout)
        if self._sock is None:
            self.connect()
        self._limit = limit
        return time.monotonic() + limit

    def execute_many(self, requests: Sequence[tuple[str, dict[str, Any] | None]],
                     timeout: float | None = None) -> list[Any]:
        """Run several commands sent in one write; each one's result, in order.

        QEMU runs a monitor's requests one after the other, so the whole
        sequence costs one round trip instead of one per command (on a new
        connection, the same write as the negotiation).  It runs
        them all, whatever an earlier one answered: send together only
        commands that may run even if one before them fails.  A command
        QEMU refused gives its :class:`QmpCommandError` in its place
        (returned, not raised); timeouts and a lost connection raise as in
        :meth:`execute`, with ``timeout`` bounding the whole exchange.
        """
        limit = self._limit_of(timeout)
        ids = [next(self._ids) for _ in requests]
        data = b"".join(encode_request(command, arguments, msg_id)
                        for (command, arguments), msg_id in zip(requests, ids, strict=True))
        if self._sock is None:  # the negotiation and the commands in one write
            self._open(then=data)
            self._limit = limit
            deadline = time.monotonic() + limit
        else:
            self._limit = limit
            deadline = time.monotonic() + limit
            self._send(data, deadline, ", ".join(command for command, _ in requests))
        results: list[Any] = []
        for (command, _), msg_id in zip(requests, ids, strict=True):
            try:
                results.append(self._reply(command, msg_id, deadline))
            except QmpCommandError as err:
                results.append(err)
        return results

    def pass_fd(self, name: str, fd: int, timeout: float | None = None) -> None:
        """Hand QEMU the open descriptor ``fd`` under ``name`` (QMP ``getfd``).

        The descriptor travels with the command as ``SCM_RIGHTS`` ancillary
        data; QEMU keeps its own copy under ``name`` for a later command
        (``netdev_add ... fd=NAME``) or until ``closefd``, so the caller
        may close ``fd`` once this returns.  Errors as :meth:`execute`.
        """
        deadline = self._begin(timeout)
        msg_id = next(self._ids)
        data = encode_request("getfd", {"fdname": name}, msg_id)
        sock = self._require_socket("sending getfd")
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())]
        try:
            sent = sock.sendmsg([data], rights)
        except TimeoutError:
            raise self._timeout_error("sending getfd") from None
        except OSError as err:
            self.close()
            raise MonitorError(
                f"Sending descriptor {fd} ({name}) to QMP socket {self.path} failed: {err}; "
                "check whether the instance is still running") from None
        if sent < len(data):  # the descriptor went with the first bytes
            self._send(data[sent:], deadline, "getfd")
        self._reply("getfd", msg_id, deadline)

    def human_command(self, command_line: str) -> str:
        """Run a human monitor command (e.g. ``"info status"``) and return its text."""
        result = self.execute("human-monitor-command", {"command-line": command_line})
        if not isinstance(result, str):
            raise MonitorError(
                f"human-monitor-command {command_line!r} on {self.path} returned "
                f"{type(result).__name__} instead of text; QEMU's QMP is not what we expect")
        return result

    def _command(self, command: str, arguments: dict[str, Any] | None,
                 deadline: float) -> Any:
        """Send ``command`` and read until its reply or the deadline.

        The id (unique within this client, from a random start) lets a late
        reply to an earlier, timed-out command, or to another client, be
        recognised and dropped (see :mod:`ganeti_kvm.qmp.wire`).
        """
        msg_id = next(self._ids)
        self._send(encode_request(command, arguments, msg_id), deadline, command)
        return self._reply(command, msg_id, deadline)

    def _reply(self, command: str, msg_id: int, deadline: float) -> Any:
        """Read until the reply to ``command`` (sent with ``msg_id``) or the deadline."""
        what = f"waiting for the reply to {command}"
        while True:
            message = self._read_message(deadline, what)
            if "event" in message:
                self._events.append(message)
                continue
            if not is_reply(message):
                logger.debug("Ignoring unexpected QMP message on %s: %r", self.path, message)
                continue
            if message.get("id") != msg_id:
                # The late reply to an earlier command that timed out, or to another client.
                logger.debug("Dropping stale QMP reply on %s: %r", self.path, message)
                continue
            if "error" in message:
                raise command_error(self.path, command, message["error"])
            return message["return"]

    # ------------------------------------------------------------------
    # Events

    def wait_event(self, names: Iterable[str] | None, timeout: float) -> dict[str, Any] | None:
        """Return the first queued or arriving event named in ``names`` (None: any).

        Non-matching events stay queued in order.  Returns None if no matching
        event arrives within ``timeout`` seconds.  Raises :class:`MonitorError`
        if the connection closes meanwhile.
        """
        wanted = None if names is None else frozenset(names)

        def matches(event: dict[str, Any]) -> bool:
            return wanted is None or event.get("event") in wanted

        for index, event in enumerate(self._events):
            if matches(event):
                del self._events[index]
                return event
        if self._sock is None:
            self.connect()
        deadline = time.monotonic() + max(0.0, float(timeout))
        while True:
            message = self._poll_message(deadline, "waiting for an event")
            if message is None:
                return None
            if "event" not in message:
                logger.debug("Dropping QMP reply outside a command on %s: %r",
                             self.path, message)
                continue
            if matches(message):
                return message
            self._events.append(message)

    def events(self) -> list[dict[str, Any]]:
        """Return and forget every queued event, including those already received."""
        if self._sock is not None and not self._eof:
            try:
                while True:
                    message = self._poll_message(time.monotonic(), "reading queued events")
                    if message is None:
                        break
                    if "event" in message:
                        self._events.append(message)
            except MonitorError as err:
                logger.debug("Stopped reading events on %s: %s", self.path, err)
        drained = list(self._events)
        self._events.clear()
        return drained

    # ------------------------------------------------------------------
    # Low-level I/O

    def _send(self, data: bytes, deadline: float, command: str) -> None:
        """Send ``data`` completely before ``deadline``."""
        sock = self._require_socket(f"sending {command}")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise self._timeout_error(f"sending {command}")
        sock.settimeout(remaining)
        try:
            sock.sendall(data)
        except TimeoutError:
            raise self._timeout_error(f"sending {command}") from None
        except (BrokenPipeError, ConnectionResetError):
            self.close()
            raise MonitorError(
                f"QEMU closed the monitor connection {self.path} before {command} was sent; "
                "check whether the instance is still running") from None
        except OSError as err:
            self.close()
            raise MonitorError(
                f"Sending {command} to QMP socket {self.path} failed: {err}; "
                "check whether the instance is still running") from None

    def _read_message(self, deadline: float, what: str) -> dict[str, Any]:
        """Read one JSON message; raise :class:`MonitorTimeout` at the deadline."""
        message = self._next_message(deadline, what, raise_timeout=True)
        assert message is not None
        return message

    def _poll_message(self, deadline: float, what: str) -> dict[str, Any] | None:
        """Read one JSON message; return None at the deadline."""
        return self._next_message(deadline, what, raise_timeout=False)

    def _next_message(self, deadline: float, what: str,
                      raise_timeout: bool) -> dict[str, Any] | None:
        """Read one JSON message; at the deadline raise or (``raise_timeout=False``) return None.

        A partial line stays buffered until its newline arrives.
        """
        while True:
            newline = self._buffer.find(b"\n")
            if newline >= 0:
                line = bytes(self._buffer[:newline])
                del self._buffer[:newline + 1]
                if not line.strip():
                    continue
                return decode_message(self.path, line, what)
            if self._eof:
                self.close()
                raise MonitorError(
                    f"QEMU closed the monitor connection {self.path} while {what}; "
                    "check whether the instance is still running")
            sock = self._require_socket(what)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                # A zero timeout still takes whatever is already there.
                remaining = 0.0
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(_RECV_SIZE)
            except (TimeoutError, BlockingIOError):
                if raise_timeout:
                    raise self._timeout_error(what) from None
                return None
            except ConnectionResetError:
                chunk = b""
            except OSError as err:
                self.close()
                raise MonitorError(
                    f"Reading from QMP socket {self.path} failed while {what}: {err}; "
                    "check whether the instance is still running") from None
            if not chunk:
                self._eof = True
                continue
            self._buffer += chunk

    def _require_socket(self, what: str) -> socket.socket:
        """Return the open socket or explain that there is none."""
        if self._sock is None:
            raise MonitorError(
                f"No open QMP connection to {self.path} while {what}; call connect() first")
        return self._sock

    def _timeout_error(self, what: str) -> MonitorTimeout:
        """Build the timeout error; ``what`` reads like "waiting for the reply to stop"."""
        return MonitorTimeout(
            f"Timed out after {self._limit:g}s {what} on QMP socket {self.path}; "
            "QEMU is stopped, hung or busy, or another client holds the monitor: "
            "check the QEMU process")


def open_monitor_socket(path: str, timeout: float, kind: str = "QMP socket") -> socket.socket:
    """Connect to the monitor socket ``path``, waiting while its backlog is full.

    A QEMU monitor (QMP or human, a ``kind``) accepts one client at a time
    and listens with a backlog of one: while another client (a listing,
    the console wrapper) talks to it, a connect fails at once with EAGAIN.
    That is not an error, only a queue: try again, from
    :data:`CONNECT_RETRY_FIRST` seconds apart up to :data:`CONNECT_RETRY_MAX`,
    for at most ``timeout`` seconds.  The cap stays small so that a caller
    retrying next to busy clients still gets its turn.  Returns a connected,
    non-blocking socket; raises :class:`MonitorTimeout` when the backlog
    stays full, :class:`MonitorError` when the connect fails otherwise.
    """
    deadline = time.monotonic() + timeout
    delay = CONNECT_RETRY_FIRST
    tries = 0
    while True:
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as err:
            raise MonitorError(f"Cannot open a socket for {kind} {path}: {err}; "
                               "check the process's open-file limit") from None
        try:
            sock.setblocking(False)
            sock.connect(path)
        except BlockingIOError:
            sock.close()
            tries += 1
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise MonitorTimeout(
                    f"Could not connect to {kind} {path} within {timeout:g}s: its "
                    f"backlog stayed full ({tries} tries); other clients keep the monitor "
                    "busy, or QEMU is stopped or hung: check the QEMU process") from None
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, CONNECT_RETRY_MAX)
            continue
        except OSError as err:
            sock.close()
            raise connect_error(path, err, kind) from None
        except BaseException:
            sock.close()
            raise
        if tries:
            logger.debug("Connected to %s %s after %d tries with a full backlog",
                         kind, path, tries)
        return sock


def qmp_execute(path: str, command: str, arguments: dict[str, Any] | None = None,
                timeout: float = DEFAULT_TIMEOUT) -> Any:
    """Connect to ``path``, run one QMP command, close, and return its result.

    The negotiation and the command go out in one write, so the whole
    exchange is a single round trip.  ``timeout`` bounds all of it.  Raises
    :class:`MonitorError` (:class:`MonitorTimeout`, :class:`QmpCommandError`)
    like :meth:`QmpClient.execute`.
    """
    with Batch(command, timeout, arguments) as batch:
        batch.ask(path)
        [outcome] = batch.answers()
    if isinstance(outcome, MonitorError):
        raise outcome
    return outcome
