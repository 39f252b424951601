"""The uid pool of security model ``pool``: one unused user id per running instance.

The pool is a list of inclusive uid ranges, written like ``"1000-1010, 2000"``
(items separated by commas or newlines).  :class:`UidPool` hands out uids,
recording each allocation as a small file ``<pool_dir>/<uid>`` that holds the
owner's name.  Requests and releases are serialised by an exclusive ``flock``
on ``<pool_dir>/.lock``, so threads and processes never get the same uid.
A uid is free when it has no record and no running process uses it (any of
its real, effective, saved or filesystem uids).
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

from ganeti_kvm import errors
from ganeti_kvm.host import fsutil, locking

log = logging.getLogger(__name__)

UID_MAX = 2**32 - 2
"""The largest valid uid ((uid_t)-1 means "no uid")."""

LOCK_NAME = ".lock"
"""Name of the lock file inside the pool directory."""

LOCK_TIMEOUT = 30.0
"""Seconds to wait for the pool's lock."""

_OWNER_LIMIT = 4096


def parse_uid_pool(text: str) -> list[tuple[int, int]]:
    """Parse ``"1000-1010, 2000"`` into ``[(1000, 1010), (2000, 2000)]``.

    Items are separated by commas and/or newlines; whitespace around items
    and around the ``-`` is ignored, and empty items are skipped.  Ranges are
    inclusive.  uid 0 (root), negative or too large uids, and ranges whose
    start exceeds their end raise :class:`errors.HypervisorError` naming the
    text.
    """
    if not isinstance(text, str):
        raise errors.HypervisorError(
            f"The uid pool must be text such as '1000-1010, 2000', not {type(text).__name__}")
    ranges: list[tuple[int, int]] = []
    for item in text.replace("\n", ",").split(","):
        item = item.strip()
        if not item:
            continue
        low_text, dash, high_text = item.partition("-")
        low = _parse_uid(low_text, item, text)
        high = _parse_uid(high_text, item, text) if dash else low
        if low > high:
            raise errors.HypervisorError(
                f"Invalid uid pool {text!r}: range {item!r} starts above its end; "
                f"write it as {high}-{low}")
        ranges.append((low, high))
    return ranges


def _parse_uid(value: str, item: str, text: str) -> int:
    value = value.strip()
    if not value.isdigit() or not value.isascii():
        raise errors.HypervisorError(
            f"Invalid uid pool {text!r}: {item!r} is not a uid or a range like "
            f"'1000-1010'; use comma or newline separated uids and ranges")
    uid = int(value)
    if uid == 0:
        raise errors.HypervisorError(
            f"Invalid uid pool {text!r}: uid 0 (root) cannot be in the pool; "
            f"use unprivileged uids")
    if uid > UID_MAX:
        raise errors.HypervisorError(
            f"Invalid uid pool {text!r}: uid {uid} is above the largest uid {UID_MAX}")
    return uid


def expand_uid_pool(ranges: Iterable[tuple[int, int]]) -> list[int]:
    """Every uid of ``ranges``, sorted, each once."""
    uids: set[int] = set()
    for low, high in ranges:
        uids.update(range(low, high + 1))
    return sorted(uids)


def format_uid_pool(ranges: Iterable[tuple[int, int]]) -> str:
    """``[(1000, 1010), (2000, 2000)]`` as ``"1000-1010, 2000"``."""
    return ", ".join(str(low) if low == high else f"{low}-{high}" for low, high in ranges)


def uids_in_use() -> set[int]:
    """Uids (real, effective, saved and filesystem) of the processes running now.

    Reads the ``Uid:`` line of every ``/proc/<pid>/status``; processes that
    exit while being read, and zombies (exited, not yet reaped), are skipped.
    """
    used: set[int] = set()
    try:
        entries = os.listdir("/proc")
    except OSError as err:
        raise errors.HypervisorError(
            f"Cannot list /proc to find the uids in use: {err}; mount procfs") from None
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status", encoding="ascii", errors="replace") as handle:
                for line in handle:
                    if line.startswith("State:") and line.split()[1:2] in (["Z"], ["X"]):
                        break  # a zombie runs nothing; it only waits to be reaped
                    if line.startswith("Uid:"):
                        used.update(int(field) for field in line.split()[1:])
                        break
        except (OSError, ValueError):
            continue  # gone, or unreadable: nothing to learn
    return used


class UidPool:
    """Allocates uids of ``ranges`` to owners, with records in ``pool_dir``.

    ``pool_dir`` is created (mode 0700) on first use.  Safe across threads
    and processes: every change happens under an exclusive ``flock``.
    """

    def __init__(self, pool_dir: str, ranges: Sequence[tuple[int, int]]) -> None:
        self.pool_dir = pool_dir
        self.ranges = list(ranges)
        self.uids = expand_uid_pool(self.ranges)

    def __repr__(self) -> str:
        return f"UidPool({self.pool_dir!r}, {format_uid_pool(self.ranges)!r})"

    # --- lock ------------------------------------------------------------------

    @contextmanager
    def _locked(self, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
        """Hold the pool's exclusive lock (a fresh descriptor, so threads exclude too)."""
        os.makedirs(self.pool_dir, mode=0o700, exist_ok=True)
        path = os.path.join(self.pool_dir, LOCK_NAME)
        with locking.file_lock(path, timeout, lambda: errors.HypervisorError(
                f"The uid pool lock {path} has been held for over {timeout:.0f} s; find "
                f"the stuck process holding it (fuser {path}) and retry")):
            yield

    # --- records ---------------------------------------------------------------

    def _record_path(self, uid: int) -> str:
        return os.path.join(self.pool_dir, str(uid))

    def _read_owner(self, uid: int) -> str | None:
        data = fsutil.read_small_file(self._record_path(uid), _OWNER_LIMIT)
        if data is None:
            return None
        return data.decode("utf-8", "replace").rstrip("\n")

    def _records(self) -> dict[int, str]:
        result: dict[int, str] = {}
        try:
            entries = os.listdir(self.pool_dir)
        except FileNotFoundError:
            return result
        for entry in entries:
            if not entry.isdigit() or not entry.isascii():
                continue
            owner = self._read_owner(int(entry))
            if owner is not None:
                result[int(entry)] = owner
        return result

    # --- public ----------------------------------------------------------------

    def request(self, owner: str) -> int:
        """Allocate a free uid to ``owner`` (e.g. an instance name) and return it.

        Picks at random among the uids that have no record and are not used by
        a running process.  Raises :class:`errors.HypervisorError` if none is
        free or ``owner`` is empty or contains a newline or NUL.
        """
        if not owner or "\n" in owner or "\0" in owner:
            raise errors.HypervisorError(
                f"Invalid uid pool owner {owner!r}: give a non-empty single-line name")
        with self._locked():
            records = self._records()
            busy = uids_in_use()
            free = [uid for uid in self.uids if uid not in records and uid not in busy]
            if not free:
                in_use = sum(1 for uid in self.uids if uid in records or uid in busy)
                raise errors.HypervisorError(
                    f"no free uid in pool {format_uid_pool(self.ranges) or '(empty)'} "
                    f"({in_use} in use); free one or widen the pool")
            uid = random.choice(free)
            fsutil.atomic_write(self._record_path(uid), owner + "\n", mode=0o600)
        log.info("Allocated uid %d from the pool to %s", uid, owner)
        return uid

    def release(self, uid: int) -> None:
        """Free ``uid``; releasing a free uid does nothing."""
        with self._locked():
            owner = self._read_owner(uid)
            removed = fsutil.remove_file(self._record_path(uid))
        if removed:
            log.info("Released uid %d (was %s)", uid, owner)

    def owner_of(self, uid: int) -> str | None:
        """The owner ``uid`` is allocated to, or None if it is free."""
        return self._read_owner(uid)

    def allocated(self) -> dict[int, str]:
        """Every recorded allocation as ``{uid: owner}`` (also uids outside the current ranges)."""
        return self._records()
