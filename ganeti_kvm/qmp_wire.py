"""QMP's wire format: request lines, reply lines, and the errors they become.

Shared by the connection-per-client :mod:`ganeti_kvm.qmp` and the
many-monitors-at-once :mod:`ganeti_kvm.qmp_batch`, so both send the same
bytes and explain a failure in the same words.
"""

from __future__ import annotations

import json
from typing import Any

from ganeti_kvm.errors import MonitorError, QmpCommandError

__all__ = ["encode_request", "decode_message", "connect_error", "command_error"]


def encode_request(command: str, arguments: dict[str, Any] | None = None,
                   msg_id: int | None = None) -> bytes:
    """One QMP request line: ``{"execute": ..., "id": ..., "arguments": ...}``."""
    request: dict[str, Any] = {"execute": command}
    if msg_id is not None:
        request["id"] = msg_id
    if arguments is not None:
        request["arguments"] = arguments
    return json.dumps(request, separators=(",", ":")).encode("utf-8") + b"\n"


def connect_error(path: str, err: OSError) -> MonitorError:
    """The error for a failed connect to QMP socket ``path``, with what to do about it."""
    if isinstance(err, FileNotFoundError):
        return MonitorError(
            f"QMP socket {path} does not exist; the instance is not running "
            "(start it, or check the runtime directory)")
    if isinstance(err, ConnectionRefusedError):
        return MonitorError(
            f"Nothing listens on QMP socket {path} (connection refused); "
            "QEMU has exited, start the instance again")
    return MonitorError(
        f"Cannot connect to QMP socket {path}: {err.strerror or err}; "
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
