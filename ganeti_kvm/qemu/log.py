"""The per-instance QEMU log: what QEMU said before and after it daemonized.

A daemonizing QEMU points its standard error at ``/dev/null`` once it is in
the background, unless logging is on: with ``-D FILE`` it opens ``FILE``
while it parses its options (truncating it) and points its standard error
there, so every later word goes to the file instead (QEMU 7.2 and 10.0
alike).  The library passes ``-D`` with a file in the run directory,
creates that file itself with mode 0600 before QEMU opens it (QEMU keeps
the mode of an existing file), and quotes its tail when QEMU fails to
start or is found dead later.

The file starts empty at every start, so it holds one run's output only;
it is removed with the instance's other runtime files.
"""

from __future__ import annotations

import errno
import logging
import os

log = logging.getLogger(__name__)

TAIL_BYTES = 4096
"""At most this much of the end of the log is read, whatever its size."""

TAIL_LINES = 20
"""At most this many of the last lines are quoted."""


def prepare(path: str) -> None:
    """Create ``path`` empty with mode 0600 (truncating an old log); refuses symlinks."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def tail(path: str, max_bytes: int = TAIL_BYTES, max_lines: int = TAIL_LINES) -> str:
    """The last lines QEMU wrote to ``path``, stripped; empty if there is no log.

    Reads at most ``max_bytes`` from the end, so a large log costs nothing;
    never raises.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as err:
        if err.errno not in (errno.ENOENT, errno.ENOTDIR):
            log.warning("Cannot read the QEMU log %s: %s", path, err.strerror)
        return ""
    try:
        size = os.fstat(fd).st_size
        start = max(0, size - max_bytes)
        raw = os.pread(fd, max_bytes, start)
    except OSError as err:
        log.warning("Cannot read the QEMU log %s: %s", path, err.strerror)
        return ""
    finally:
        os.close(fd)
    text = raw.decode("utf-8", "replace")
    lines = [line.rstrip() for line in text.splitlines() if line.strip()]
    if start > 0 and len(lines) > 1:
        lines = lines[1:]  # the first line may be cut
    return "\n".join(lines[-max_lines:])


def quote(path: str) -> str:
    """``" QEMU said: ..."`` with the log's tail, or an empty string if it has none."""
    text = tail(path)
    return f" QEMU said: {text}" if text else ""
