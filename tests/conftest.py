"""Shared fixtures: the real QEMU binaries, socat, short run directories and a reaper.

Real-QEMU tests take the ``qemu_bin`` fixture, which runs them once per QEMU
version.  Outside CI a missing binary skips the test; with CI=true it fails.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from ganeti_kvm.host import paths, process
from ganeti_kvm.hv_kvm import KVMHypervisor
from tests.cluster import ganeti_cluster  # noqa: F401  (the session's Ganeti cluster)
from tests.fakeqmp import FakeQmp, Peer
from tests.helpers import node_hypervisors

CACHE_DIR = os.environ.get("GANETI_KVM_CACHE", "/var/cache/ganeti-kvm")
QEMU_BINARIES = {
    "7.2": os.environ.get("GANETI_KVM_QEMU72", "/usr/bin/qemu-system-x86_64"),
    "10.0": os.environ.get("GANETI_KVM_QEMU10",
                           os.path.join(CACHE_DIR, "qemu-10.0", "qemu-system-x86_64")),
}
IN_CI = os.environ.get("CI", "").lower() == "true"


@pytest.fixture(scope="session", autouse=True)
def session_run_dir() -> Iterator[str]:
    """Keep every test off the machine's own run directory.

    Calls made on the hypervisor classes (Ganeti calls ValidateParameters and
    GetInstanceConsole on them) use the default run directory, which is
    /var/run/ganeti/kvm-hypervisor unless GANETI_KVM_RUN_DIR says otherwise: on
    a node that is right, in a test run it would leave a directory on the
    machine (and the cluster tests check that nothing on the machine changes).
    """
    own = tempfile.mkdtemp(prefix="gk-run-", dir="/tmp")
    before = os.environ.get(paths.RUN_DIR_ENV)
    os.environ[paths.RUN_DIR_ENV] = own
    try:
        yield own
    finally:
        if before is None:
            os.environ.pop(paths.RUN_DIR_ENV, None)
        else:
            os.environ[paths.RUN_DIR_ENV] = before
        shutil.rmtree(own, ignore_errors=True)


def require(path: str, what: str) -> str:
    """Return ``path`` if it is an executable; skip (fail in CI) otherwise."""
    if os.access(path, os.X_OK):
        return path
    message = f"{what} not found at {path}; run 'make setup'"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)
    raise AssertionError("unreachable")


@pytest.fixture(params=sorted(QEMU_BINARIES), ids=lambda v: f"qemu{v}")
def qemu_bin(request: pytest.FixtureRequest) -> str:
    """Path of one real QEMU binary; the test runs once per supported version."""
    return require(QEMU_BINARIES[request.param], f"QEMU {request.param}")


@pytest.fixture(scope="session")
def qemu72() -> str:
    return require(QEMU_BINARIES["7.2"], "QEMU 7.2")


@pytest.fixture(scope="session")
def qemu10() -> str:
    return require(QEMU_BINARIES["10.0"], "QEMU 10.0")


@pytest.fixture(scope="session")
def socat_bin() -> str:
    return require(shutil.which("socat") or "/usr/bin/socat", "socat")


@pytest.fixture
def short_dir() -> Iterator[str]:
    """A fresh directory with a short path (unix socket paths are limited to 107 bytes)."""
    path = tempfile.mkdtemp(prefix="gk-", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class Reaper:
    """Remembers PIDs a test started and kills whatever is still alive at teardown."""

    def __init__(self) -> None:
        self.pids: list[int] = []

    def add(self, pid: int) -> int:
        self.pids.append(pid)
        return pid

    def add_pidfile(self, path: str) -> None:
        try:
            with open(path, encoding="ascii") as handle:
                self.add(int(handle.read().strip()))
        except (OSError, ValueError):
            pass

    def reap(self) -> None:
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            # wait_gone reaps our own children and treats a zombie as gone
            process.wait_gone(pid, 5)


@pytest.fixture
def reaper() -> Iterator[Reaper]:
    """Kill every registered process when the test ends, passed or failed."""
    r = Reaper()
    try:
        yield r
    finally:
        r.reap()


@pytest.fixture(scope="session")
def guest():  # type: ignore[no-untyped-def]
    """The tiny Linux test guest (built once, cached outside git)."""
    from tests.guestimage import build_guest

    return build_guest()


@pytest.fixture
def hv(short_dir: str) -> Iterator[KVMHypervisor]:
    """A hypervisor with its own run directory; its QEMUs are killed at teardown."""
    with node_hypervisors(KVMHypervisor, short_dir, "run") as (hypervisor,):
        yield hypervisor


@pytest.fixture
def nodes(short_dir: str) -> Iterator[tuple[KVMHypervisor, KVMHypervisor]]:
    """Two hypervisors with separate run directories: two nodes on this machine."""
    with node_hypervisors(KVMHypervisor, short_dir, "a", "b") as (source, target):
        yield source, target


@pytest.fixture
def g3(short_dir: str) -> Iterator[Any]:
    """:func:`hv` for the Ganeti 3.x contract (``ganeti_kvm.ganeti3.KVMHypervisor``)."""
    from ganeti_kvm.ganeti3 import KVMHypervisor as Ganeti3Hypervisor

    with node_hypervisors(Ganeti3Hypervisor, short_dir, "run") as (hypervisor,):
        yield hypervisor


@pytest.fixture
def g3_nodes(short_dir: str) -> Iterator[tuple[Any, Any]]:
    """:func:`nodes` for the Ganeti 3.x contract."""
    from ganeti_kvm.ganeti3 import KVMHypervisor as Ganeti3Hypervisor

    with node_hypervisors(Ganeti3Hypervisor, short_dir, "a", "b") as (source, target):
        yield source, target


@pytest.fixture
def fake(short_dir: str) -> Iterator[Callable[..., FakeQmp]]:
    """Factory: ``fake(script)`` starts a fake QMP server on a socket in short_dir."""
    servers: list[FakeQmp] = []

    def start(script: Callable[[Peer], None], connections: int = 1) -> FakeQmp:
        server = FakeQmp(os.path.join(short_dir, f"qmp{len(servers)}"), script, connections)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.release.set()
        server.listener.close()
        server.thread.join(10)
