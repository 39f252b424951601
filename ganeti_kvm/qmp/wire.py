"""QMP's wire format: request lines, reply lines, and the errors they become.

Shared by the connection-per-client :mod:`ganeti_kvm.qmp.client` and the
many-monitors-at-once :mod:`ganeti_kvm.qmp.batch`, so both send the same
bytes and explain a failure in the same words.

Why commands carry ids: QEMU's QMP monitor is one object shared by the
connections it accepts one after the other.  When a client gives up (a
timeout, typically on a QEMU that was stopped) and QEMU later catches up,
the request it was dispatching at that moment is answered on the *next*
connection, possibly before that connection's greeting, and its
``qmp_capabilities`` may leave negotiation mode for the next client.  So a
reply counts only if it carries an id this client sent, ids start at a
random number so that another client's cannot match, and "negotiation is
already complete" counts as negotiated.

Why the ids are short: QEMU reads a monitor one byte per main-loop
iteration, and every byte of a request delays its answer by about 5 us
(measured on 7.2: ten more bytes, 0.05 ms more per call).  Five digits,
above the small numbers other tools count from, are enough.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterator
from typing import Any

from ganeti_kvm.errors import MonitorError, QmpCommandError

__all__ = ["encode_request", "decode_message", "connect_error", "command_error",
           "request_ids", "is_reply", "already_negotiated"]


def request_ids() -> Iterator[int]:
    """Ids for one client's requests: consecutive, from a random five-digit start."""
    return itertools.count(random.randrange(10_000, 100_000))


def is_reply(message: dict[str, Any]) -> bool:
    """Whether ``message`` answers a request (``return`` or ``error``).

    One that comes before the greeting, or without an id this client sent,
    answers another client and is dropped.
    """
    return "return" in message or "error" in message


def already_negotiated(error_class: str) -> bool:
    """Whether QEMU refused ``qmp_capabilities`` (with ``error_class``) because
    the monitor already left negotiation mode (see the module's note): the
    client may go on."""
    return error_class == "CommandNotFound"


def encode_request(command: str, arguments: dict[str, Any] | None = None,
                   msg_id: int | None = None) -> bytes:
    """One QMP request line: ``{"execute": ..., "id": ..., "arguments": ...}``."""
    request: dict[str, Any] = {"execute": command}
    if msg_id is not None:
        request["id"] = msg_id
    if arguments is not None:
        request["arguments"] = arguments
    return json.dumps(request, separators=(",", ":")).encode("utf-8") + b"\n"


def connect_error(path: str, err: OSError, kind: str = "QMP socket") -> MonitorError:
    """The error for a failed connect to monitor ``path`` (a ``kind``), with what to do."""
    if isinstance(err, FileNotFoundError):
        return MonitorError(
            f"{kind} {path} does not exist; the instance is not running "
            "(start it, or check the runtime directory)")
    if isinstance(err, ConnectionRefusedError):
        return MonitorError(
            f"Nothing listens on {kind} {path} (connection refused); "
            "QEMU has exited, start the instance again")
    return MonitorError(
        f"Cannot connect to {kind} {path}: {err.strerror or err}; "
        "check the path (at most 107 bytes) and its permissions")


def command_error(path: str, command: str, error: Any) -> QmpCommandError:
    """The error for QEMU's ``{"error": ...}`` answer to ``command`` on ``path``."""
    details = error if isinstance(error, dict) else {}
    error_class = str(details.get("class", ""))
    desc = str(details.get("desc", error))
    return QmpCommandError(f"QMP command {command} on {path} failed: {error_class}: {desc}",
                           error_class=error_class, desc=desc)


def decode_message(path: str, line: bytes, what: str) -> dict[str, Any]:
    """Parse one line of QMP output read from ``path`` while ``what``."""
    try:
        message = json.loads(line)
    except ValueError as err:
        raise MonitorError(
            f"QMP socket {path} sent invalid JSON while {what}: "
            f"{err}: {line[:200]!r}; is this a QMP socket?") from None
    if not isinstance(message, dict):
        raise MonitorError(
            f"QMP socket {path} sent {message!r} while {what}; "
            "expected a JSON object, is this a QMP socket?")
    return message
