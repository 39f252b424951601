"""Per-instance locks, so that concurrent operations on one instance are safe.

The lock is an ``flock`` on a file under the run directory.  Each
acquisition opens the file anew, so two threads of one process exclude each
other just like two processes do.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

from ganeti_kvm import errors


@contextmanager
def instance_lock(path: str, name: str, operation: str, timeout: float = 120.0) -> Iterator[None]:
    """Hold the exclusive lock of instance ``name`` for ``operation``.

    Waits at most ``timeout`` seconds, then raises :class:`errors.InstanceBusy`.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + timeout
        delay = 0.002
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise errors.InstanceBusy(
                        f"Cannot {operation} instance {name}: another operation has held "
                        f"its lock ({path}) for over {timeout:.0f} s; retry later") from None
                time.sleep(delay)
                delay = min(delay * 2, 0.05)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock
