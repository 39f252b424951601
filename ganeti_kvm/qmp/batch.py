"""One QMP question to many monitors at once, in one thread.

Listing a node asks every instance's monitor the same short question
(``query-status``).  Asked one monitor after the other, each answer costs
its own round trips and the node's listing their sum.  Here each connection
sends ``qmp_capabilities`` and the command in a single write as soon as it
is open (QEMU handles a monitor's requests in order, so the command runs
right after negotiation), and all connections progress together under one
selector: a node's listing takes about as long as its slowest monitor.
Replies are matched by id (see :mod:`ganeti_kvm.qmp.wire` for why).

Every exchange is bounded by one deadline.  A monitor that is stopped, hung
or held by another client gives a :class:`MonitorTimeout` for that socket
only; the other answers are unaffected.
"""

from __future__ import annotations

import selectors
import socket
import time
from collections.abc import Sequence
from typing import Any

from ganeti_kvm.errors import MonitorError, MonitorTimeout
from ganeti_kvm.qmp.wire import (
    command_error,
    connect_error,
    decode_message,
    encode_request,
    is_reply,
    request_ids,
)

__all__ = ["Batch", "execute_each"]

_RECV_SIZE = 65536
_RETRY_CONNECT = 0.002  # seconds between connects to a monitor whose backlog is full
#: Connections open at once.  More gains nothing (QEMU's work bounds the rate;
#: 8 in flight already keep two CPUs busy) and would spend file descriptors.
MAX_IN_FLIGHT = 32


class _Exchange:
    """One socket's part of the batch: the bytes so far and where it stands."""

    def __init__(self, path: str, command: str, command_id: int) -> None:
        self.path = path
        self.command = command
        self.command_id = command_id
        self.sock: socket.socket | None = None
        self.buffer = b""
        self.greeted = False
        self.outcome: Any = None
        self.done = False

    def connect(self, request: bytes) -> bool:
        """Connect and send ``request``; False if the monitor's backlog is full."""
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        except OSError as err:
            raise MonitorError(f"Cannot open a socket for QMP socket {self.path}: {err}; "
                               "check the process's open-file limit") from None
        try:
            sock.connect(self.path)
            # A fresh unix socket's send buffer is empty: a short request fits at once.
            sent = sock.send(request)
        except BlockingIOError:
            sock.close()
            return False
        except OSError as err:
            sock.close()
            raise connect_error(self.path, err) from None
        if sent != len(request):  # pragma: no cover - cannot happen on a fresh socket
            sock.close()
            raise MonitorError(f"Could not send {self.command} to QMP socket {self.path} "
                               "in one write; retry the call")
        self.sock = sock
        return True

    def feed(self, chunk: bytes) -> None:
        """Take bytes from QEMU; sets :attr:`outcome` once the command's reply is in."""
        if not chunk:
            raise MonitorError(
                f"QEMU closed the monitor connection {self.path} while answering "
                f"{self.command}; check whether the instance is still running")
        self.buffer += chunk
        while not self.done and b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            if line.strip():
                self._message(decode_message(self.path, line, f"answering {self.command}"))

    def _message(self, message: dict[str, Any]) -> None:
        if "event" in message:
            return  # an event between the replies is not an answer
        if not self.greeted:
            if "QMP" in message:
                self.greeted = True
            elif not is_reply(message):
                raise MonitorError(
                    f"QMP socket {self.path} sent {message!r} instead of a QMP greeting; "
                    "check that the path is a QMP (not a human monitor) socket")
            return  # a reply before the greeting answers an earlier client
        # The reply to qmp_capabilities carries no id and is not needed: had
        # negotiation failed, the command's own reply would say so.
        if message.get("id") == self.command_id and is_reply(message):
            if "error" in message:
                raise command_error(self.path, self.command, message["error"])
            self.outcome = message["return"]
            self.done = True

    def fail(self, error: MonitorError) -> None:
        self.outcome = error
        self.done = True
        self.close()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class Batch:
    """Ask many monitors the same QMP ``command`` (with ``arguments``) at once.

    :meth:`ask` opens the connection and sends the requests at once, so QEMU
    starts working while the caller goes on (e.g. reading /proc for the next
    instance); :meth:`answers` then collects every reply.  ``timeout`` bounds
    the whole batch from its creation.  Use it as a context manager so that
    no socket outlives it::

        with Batch("query-status", timeout=1.0) as batch:
            for path in paths:
                batch.ask(path)
            statuses = batch.answers()
    """

    def __init__(self, command: str, timeout: float,
                 arguments: dict[str, Any] | None = None) -> None:
        if timeout <= 0:
            raise ValueError(f"QMP timeout must be positive, got {timeout!r}")
        self.command = command
        self.timeout = float(timeout)
        self._deadline = time.monotonic() + self.timeout
        # Every byte sent delays the answer (see qmp_wire): only the command has an id.
        self._command_id = next(request_ids())
        self._request = (encode_request("qmp_capabilities")
                         + encode_request(command, arguments, self._command_id))
        self._exchanges: list[_Exchange] = []
        self._unconnected: list[_Exchange] = []  # waiting for room, or for a backlog
        self._backlog_full = False
        # poll(2): unlike epoll, no descriptor of its own to create, fill and close.
        self._selector = selectors.PollSelector()

    def __enter__(self) -> Batch:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def ask(self, path: str) -> int:
        """Send the question to QMP socket ``path``; the index of its answer."""
        exchange = _Exchange(path, self.command, self._command_id)
        self._exchanges.append(exchange)
        self._unconnected.append(exchange)
        self._connect_waiting()
        return len(self._exchanges) - 1

    def answers(self) -> list[Any | MonitorError]:
        """Each asked monitor's ``"return"`` value, in the order asked, or its error.

        The error is a :class:`MonitorTimeout` if the monitor did not answer
        before the batch's deadline, a :class:`QmpCommandError` if QEMU
        refused the command, and a :class:`MonitorError` otherwise.  One
        monitor's failure never raises.
        """
        try:
            while self._unconnected or self._selector.get_map():
                self._connect_waiting()
                remaining = self._deadline - time.monotonic()
                if remaining <= 0:
                    break
                pause = min(remaining, _RETRY_CONNECT) if self._backlog_full else remaining
                for key, _ in self._selector.select(pause):
                    self._read(key.data)
        finally:
            self.close()
        return [exchange.outcome for exchange in self._exchanges]

    def close(self) -> None:
        """Close every connection; unanswered questions time out.  Safe to call twice."""
        for exchange in self._exchanges:
            if not exchange.done:
                exchange.fail(MonitorTimeout(
                    f"Timed out after {self.timeout:g}s waiting for the reply to "
                    f"{self.command} on QMP socket {exchange.path}; QEMU is stopped, hung "
                    "or busy, or another client holds the monitor: check the QEMU process"))
        self._unconnected = []
        self._selector.close()

    def _connect_waiting(self) -> None:
        """Connect the waiting exchanges, in order, while fewer than
        :data:`MAX_IN_FLIGHT` are open; one whose monitor's backlog is full
        waits for a later try without holding up the others."""
        waiting, self._backlog_full = self._unconnected, False
        self._unconnected = []
        for index, exchange in enumerate(waiting):
            if len(self._selector.get_map()) >= MAX_IN_FLIGHT:
                self._unconnected += waiting[index:]
                break
            try:
                if not exchange.connect(self._request):
                    self._backlog_full = True
                    self._unconnected.append(exchange)
                    continue
            except MonitorError as err:
                exchange.fail(err)
                continue
            assert exchange.sock is not None
            self._selector.register(exchange.sock, selectors.EVENT_READ, exchange)

    def _read(self, exchange: _Exchange) -> None:
        assert exchange.sock is not None
        try:
            exchange.feed(_receive(exchange.sock))
        except BlockingIOError:
            return
        except MonitorError as err:
            self._selector.unregister(exchange.sock)
            exchange.fail(err)
        except OSError as err:
            self._selector.unregister(exchange.sock)
            exchange.fail(MonitorError(
                f"Reading from QMP socket {exchange.path} failed: {err}; "
                "check whether the instance is still running"))
        else:
            if exchange.done:
                self._selector.unregister(exchange.sock)
                exchange.close()


def execute_each(paths: Sequence[str], command: str,
                 timeout: float) -> list[Any | MonitorError]:
    """Run the argument-less QMP ``command`` on every socket in ``paths`` at once.

    Returns what :meth:`Batch.answers` returns, in the order of ``paths``.
    """
    with Batch(command, timeout) as batch:
        for path in paths:
            batch.ask(path)
        return batch.answers()


def _receive(sock: socket.socket) -> bytes:
    """What QEMU sent; b"" once it closed (a reset with our request unread is a close too)."""
    try:
        return sock.recv(_RECV_SIZE)
    except ConnectionResetError:
        return b""
