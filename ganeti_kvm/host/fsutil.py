"""Small filesystem helpers: atomic writes, private directories, careful removal."""

from __future__ import annotations

import errno
import os
import tempfile

from ganeti_kvm import errors


def ensure_dirs(paths: list[str], mode: int = 0o700) -> None:
    """Create each directory (and parents) with ``mode``, tightening existing ones."""
    for path in paths:
        os.makedirs(path, mode=mode, exist_ok=True)
        if os.stat(path).st_mode & 0o777 != mode:
            os.chmod(path, mode)


def atomic_write(path: str, data: bytes | str, mode: int = 0o600,
                 durable: bool = True) -> None:
    """Write ``data`` to ``path`` atomically: temp file, fsync, rename, fsync dir.

    A reader sees either the old content or the new one, never a mix, even
    if the node crashes in between.  ``durable=False`` skips both fsyncs,
    for state that means nothing after a crash of the node (what a running
    QEMU is doing): readers still never see a mix.
    """
    if isinstance(data, str):
        data = data.encode("utf-8")
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".")
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        if durable:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        remove_file(tmp)
        raise
    os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        remove_file(tmp)
        raise
    if not durable:
        return
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def remove_file(path: str) -> bool:
    """Remove ``path`` if it exists; return whether something was removed.

    Raises :class:`errors.HypervisorError` naming the path if it cannot be
    removed, for instance because a directory is in its place (a file of
    ours is never a directory, and a directory is not ours to delete).
    """
    try:
        os.unlink(path)
    except OSError as err:
        if err.errno in (errno.ENOENT, errno.ENOTDIR):
            return False
        raise errors.HypervisorError(_cannot("remove", path, err)) from None
    return True


def read_small_file(path: str, limit: int = 1 << 20) -> bytes | None:
    """Return the content of ``path`` (at most ``limit`` bytes), or None if it is missing.

    Raises :class:`errors.HypervisorError` naming the path if it cannot be
    read (a directory in its place, no permission, an I/O error).
    """
    try:
        with open(path, "rb") as handle:
            return handle.read(limit)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as err:
        raise errors.HypervisorError(_cannot("read", path, err)) from None


def _cannot(action: str, path: str, err: OSError) -> str:
    if err.errno in (errno.EISDIR, errno.EPERM) and os.path.isdir(path):
        return (f"Cannot {action} {path}: a directory is where a file of ganeti-kvm "
                "belongs; move it away and retry")
    return f"Cannot {action} {path}: {err.strerror or err}; check the file and its directory"
