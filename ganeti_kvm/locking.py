"""File locks: per-instance locks and the locks of shared node state.

A lock is an ``flock`` on a file.  Each acquisition opens the file anew, so
two threads of one process exclude each other just like two processes do.
Every wait is bounded.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

from ganeti_kvm import errors


@contextmanager
def file_lock(path: str, timeout: float,
              on_timeout: Callable[[], errors.HypervisorError]) -> Iterator[None]:
    """Hold an exclusive flock on ``path``; raise ``on_timeout()`` after ``timeout`` s."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as err:
        raise errors.HypervisorError(
            f"Cannot open the lock file {path}: {err}; check the directory's "
            "permissions") from None
    try:
        deadline = time.monotonic() + timeout
        delay = 0.002
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise on_timeout() from None
                time.sleep(delay)
                delay = min(delay * 2, 0.05)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def instance_lock(path: str, name: str, operation: str,
                  timeout: float = 120.0) -> AbstractContextManager[None]:
    """Hold the exclusive lock of instance ``name`` for ``operation``.

    Waits at most ``timeout`` seconds, then raises :class:`errors.InstanceBusy`.
    """
    return file_lock(path, timeout, lambda: errors.InstanceBusy(
        f"Cannot {operation} instance {name}: another operation has held its lock "
        f"({path}) for over {timeout:.0f} s; retry later"))
