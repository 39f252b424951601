"""The uid pool: parsing, allocation records, exhaustion and concurrency."""

from __future__ import annotations

import multiprocessing
import multiprocessing.synchronize
import os
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ganeti_kvm import errors
from ganeti_kvm.host import uidpool
from ganeti_kvm.host.uidpool import UidPool, expand_uid_pool, format_uid_pool, parse_uid_pool

# High uids no process on a test machine uses.
BASE = 3_900_000_000


@pytest.mark.parametrize("text, expected", [
    ("1000-1010, 2000", [(1000, 1010), (2000, 2000)]),
    (" 1000 - 1010 ,2000 ", [(1000, 1010), (2000, 2000)]),
    ("1000-1010\n2000\n\n3000-3000,", [(1000, 1010), (2000, 2000), (3000, 3000)]),
    ("", []),
    ("5", [(5, 5)]),
])
def test_parse(text: str, expected: list[tuple[int, int]]) -> None:
    assert parse_uid_pool(text) == expected


@pytest.mark.parametrize("text", [
    "abc", "10-5", "0", "0-10", "-5", "1000-", "1-2-3", "1 000", "4294967295",
    "1000;2000", "١٢٣",
])
def test_parse_invalid_names_the_text(text: str) -> None:
    with pytest.raises(errors.HypervisorError) as info:
        parse_uid_pool(text)
    assert repr(text) in str(info.value)


def test_expand_and_format() -> None:
    ranges = [(5, 7), (6, 8), (20, 20)]
    assert expand_uid_pool(ranges) == [5, 6, 7, 8, 20]
    assert format_uid_pool([(1000, 1010), (2000, 2000)]) == "1000-1010, 2000"


@pytest.fixture
def pool_dir(tmp_path: Path) -> str:
    return str(tmp_path / "uid")


def test_request_records_owner(pool_dir: str) -> None:
    pool = UidPool(pool_dir, [(BASE, BASE + 4)])
    uid = pool.request("inst1")
    assert BASE <= uid <= BASE + 4
    record = os.path.join(pool_dir, str(uid))
    assert Path(record).read_text() == "inst1\n"
    assert stat.S_IMODE(os.stat(record).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(pool_dir).st_mode) == 0o700
    assert pool.owner_of(uid) == "inst1"
    assert pool.allocated() == {uid: "inst1"}
    assert [n for n in os.listdir(pool_dir) if n.startswith(".") and n != ".lock"] == []


def test_release_is_idempotent(pool_dir: str) -> None:
    pool = UidPool(pool_dir, [(BASE, BASE)])
    uid = pool.request("a")
    pool.release(uid)
    pool.release(uid)
    pool.release(BASE + 12345)
    assert pool.owner_of(uid) is None
    assert pool.allocated() == {}
    assert pool.request("b") == uid


def test_exhausted_pool(pool_dir: str) -> None:
    pool = UidPool(pool_dir, [(BASE, BASE + 2)])
    got = {pool.request(f"i{n}") for n in range(3)}
    assert got == {BASE, BASE + 1, BASE + 2}
    with pytest.raises(errors.HypervisorError) as info:
        pool.request("one-too-many")
    assert str(info.value) == (f"no free uid in pool {BASE}-{BASE + 2} (3 in use); "
                               "free one or widen the pool")


def test_empty_pool(pool_dir: str) -> None:
    with pytest.raises(errors.HypervisorError, match="no free uid"):
        UidPool(pool_dir, []).request("x")


def test_bad_owner(pool_dir: str) -> None:
    pool = UidPool(pool_dir, [(BASE, BASE)])
    for owner in ("", "a\nb", "a\0b"):
        with pytest.raises(errors.HypervisorError, match="Invalid uid pool owner"):
            pool.request(owner)


def test_allocated_survives_pool_change(pool_dir: str) -> None:
    UidPool(pool_dir, [(BASE + 7, BASE + 7)]).request("old")
    assert UidPool(pool_dir, [(BASE, BASE)]).allocated() == {BASE + 7: "old"}


@pytest.fixture
def sleeper_as() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes started by the test under some uid; killed by PID at teardown."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def test_skips_uid_used_by_a_process(pool_dir: str,
                                     sleeper_as: list[subprocess.Popen[bytes]]) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to run a process under another uid")
    busy = BASE + 1
    proc = subprocess.Popen(["sleep", "60"], user=busy, group=busy, extra_groups=[],
                            stdin=subprocess.DEVNULL)
    sleeper_as.append(proc)
    deadline = time.monotonic() + 10
    while busy not in uidpool.uids_in_use():
        assert time.monotonic() < deadline, "the helper process never ran as its uid"
        time.sleep(0.01)
    pool = UidPool(pool_dir, [(BASE, BASE + 1)])
    assert pool.request("a") == BASE
    with pytest.raises(errors.HypervisorError, match=r"\(2 in use\)"):
        pool.request("b")
    assert pool.allocated() == {BASE: "a"}


def test_threads_never_share_a_uid(pool_dir: str) -> None:
    size = 40
    pool_ranges = [(BASE, BASE + size - 1)]
    results: list[int] = []
    failures: list[BaseException] = []
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def worker(n: int) -> None:
        pool = UidPool(pool_dir, pool_ranges)
        barrier.wait(10)
        for k in range(size // 8):
            try:
                uid = pool.request(f"t{n}-{k}")
            except BaseException as err:  # reported below
                with lock:
                    failures.append(err)
                return
            with lock:
                results.append(uid)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not failures
    assert sorted(results) == list(range(BASE, BASE + size))
    assert len(UidPool(pool_dir, pool_ranges).allocated()) == size


def _process_worker(pool_dir: str, ranges: list[tuple[int, int]], count: int,
                    name: str, start: multiprocessing.synchronize.Event,
                    queue: multiprocessing.Queue[list[int] | str]) -> None:
    try:
        start.wait(30)
        pool = UidPool(pool_dir, ranges)
        queue.put([pool.request(f"{name}-{k}") for k in range(count)])
    except BaseException as err:
        queue.put(f"{type(err).__name__}: {err}")


def test_processes_never_share_a_uid(pool_dir: str) -> None:
    workers, each = 6, 5
    ranges = [(BASE, BASE + workers * each - 1)]
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    queue: multiprocessing.Queue[list[int] | str] = ctx.Queue()
    procs = [ctx.Process(target=_process_worker,
                         args=(pool_dir, ranges, each, f"p{n}", start, queue))
             for n in range(workers)]
    for proc in procs:
        proc.start()
    try:
        start.set()
        answers = [queue.get(timeout=60) for _ in procs]
    finally:
        for proc in procs:
            proc.join(30)
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.join(10)
    errors_seen = [a for a in answers if isinstance(a, str)]
    assert not errors_seen
    uids = [uid for answer in answers for uid in answer]
    assert sorted(uids) == list(range(BASE, BASE + workers * each))
    allocated = UidPool(pool_dir, ranges).allocated()
    assert sorted(allocated) == sorted(uids)
    assert len(set(allocated.values())) == workers * each


def test_concurrent_request_and_release(pool_dir: str) -> None:
    """Churn: a small pool, many threads taking and giving back; no uid is ever doubled."""
    pool_ranges = [(BASE, BASE + 3)]
    held: dict[int, str] = {}
    problems: list[str] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        pool = UidPool(pool_dir, pool_ranges)
        for k in range(25):
            owner = f"w{n}-{k}"
            try:
                uid = pool.request(owner)
            except errors.HypervisorError:
                continue  # momentarily exhausted
            with lock:
                if uid in held:
                    problems.append(f"{uid} given to {owner} while held by {held[uid]}")
                held[uid] = owner
            time.sleep(0.001)  # hold it a moment so that a double grant would overlap
            with lock:
                del held[uid]
            pool.release(uid)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert problems == []
    assert UidPool(pool_dir, pool_ranges).allocated() == {}
