"""Smoke tests of the benchmark's harness (bench/), so that it cannot rot unnoticed.

Speed is never asserted here: only that the side-by-side worker (bench/peer.py)
starts both drivers' VMs, answers with timings, reaps its QEMUs as a child
subreaper, and that bench/run.py still imports.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from bench.peer_client import PeerNode
from tests import ganeti_trees

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVERS = ("ours", "peer")


@pytest.fixture
def peer_node(short_dir: str) -> Iterator[PeerNode]:
    tree = ganeti_trees.require_tree("3.0")
    if os.geteuid() != 0:
        pytest.skip("the side-by-side worker needs root (mount namespaces)")
    node = PeerNode(os.path.join(short_dir, "peer.log"), tree=tree)
    try:
        yield node
    finally:
        node.close()


def _ppid(pid: int) -> int | None:
    """The parent of ``pid`` (None if gone), from /proc/PID/stat."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            fields = handle.read().rpartition(")")[2].split()
    except FileNotFoundError:
        return None
    return int(fields[1])


def _reaped(pid: int, parent: int, timeout: float = 10.0) -> bool:
    """Whether ``pid`` stops being a child (even a zombie one) of ``parent`` in time."""
    deadline = time.monotonic() + timeout
    while _ppid(pid) == parent:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_peer_worker_starts_lists_and_stops_with_both_drivers(peer_node: PeerNode,
                                                              qemu72: str) -> None:
    peer_node("define", name="smoke", qemu=qemu72)
    for driver in DRIVERS:
        assert peer_node("start", driver=driver, name="smoke", paused=True)["t"] > 0
    pids = peer_node("pids")
    assert sorted(pids) == ["ours/smoke", "peer/smoke"]
    for pid in pids.values():
        # Reparented to the worker when QEMU daemonized: it is a child subreaper.
        assert _ppid(pid) == peer_node.proc.pid
    for driver in DRIVERS:
        assert peer_node("info", driver=driver, name="smoke")["t"] > 0
        assert peer_node("all", driver=driver, count=1)["t"] > 0
        assert peer_node("qmp", driver=driver, name="smoke")["status"] == "prelaunch"
        assert peer_node("stop", driver=driver, name="smoke")["t"] > 0
    assert peer_node("pids") == {}
    for pid in pids.values():
        # Reaped by the worker, not left behind as its zombie.
        assert _reaped(pid, peer_node.proc.pid)


def test_peer_worker_reports_a_failed_call(peer_node: PeerNode, qemu72: str) -> None:
    peer_node("define", name="smoke", qemu=qemu72)
    with pytest.raises(RuntimeError, match="GetInstanceInfo"):
        peer_node("info", driver="peer", name="smoke")  # not started


def test_bench_run_imports_and_parses_its_options() -> None:
    result = subprocess.run([sys.executable, os.path.join(REPO, "bench", "run.py"), "--help"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert "--quick" in result.stdout and "--only" in result.stdout
