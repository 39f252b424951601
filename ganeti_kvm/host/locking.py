"""File locks: per-instance locks and the locks of shared node state.

A lock is an ``flock`` on a file.  Each acquisition opens the file anew, so
two threads of one process exclude each other just like two processes do.
Every wait is bounded.  An instance's lock file is removed when its lock
is released, so none stays for every instance name ever used.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

from ganeti_kvm import errors
from ganeti_kvm.host import fsutil


def _open_lock(path: str) -> int:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as err:
        hint = ("something else is in its place: remove it"
                if err.errno in (errno.EISDIR, errno.ELOOP) else
                "check the directory's permissions")
        raise errors.HypervisorError(
            f"Cannot open the lock file {path}: {err.strerror}; {hint}") from None
    return fd


def _still_linked(fd: int, path: str) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (not removed or replaced)."""
    try:
        current = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    except OSError as err:
        raise errors.HypervisorError(f"Cannot check the lock file {path}: {err}") from None
    held = os.fstat(fd)
    return (current.st_dev, current.st_ino) == (held.st_dev, held.st_ino)


@contextmanager
def file_lock(path: str, timeout: float,
              on_timeout: Callable[[], errors.HypervisorError],
              remove: bool = False) -> Iterator[None]:
    """Hold an exclusive flock on ``path``; raise ``on_timeout()`` after ``timeout`` s.

    With ``remove`` the file is unlinked when the lock is released, while it
    is still held, so that no lock file stays behind.  A waiter that locked
    the unlinked file then sees that ``path`` no longer names it, and starts
    over on the file now at ``path``: two holders never hold different files.
    """
    deadline = time.monotonic() + timeout
    delay = 0.002
    fd = _open_lock(path)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise on_timeout() from None
                time.sleep(delay)
                delay = min(delay * 2, 0.05)
                continue
            if _still_linked(fd, path):
                break
            os.close(fd)  # the holder before us removed it: lock the file there now
            fd = -1
            fd = _open_lock(path)
        try:
            yield
        finally:
            if remove:
                # Still held: a waiter on this file starts over on a new one.
                with contextlib.suppress(OSError, errors.HypervisorError):
                    fsutil.remove_file(path)
    finally:
        if fd >= 0:
            os.close(fd)  # closing the descriptor releases the flock


def instance_lock(path: str, name: str, operation: str,
                  timeout: float = 120.0) -> AbstractContextManager[None]:
    """Hold the exclusive lock of instance ``name`` for ``operation``.

    Waits at most ``timeout`` seconds, then raises :class:`errors.InstanceBusy`.
    The lock file exists only while someone holds or waits for the lock.
    """
    return file_lock(path, timeout, lambda: errors.InstanceBusy(
        f"Cannot {operation} instance {name}: another operation has held its lock "
        f"({path}) for over {timeout:.0f} s; retry later"), remove=True)
