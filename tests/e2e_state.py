"""The shared state of the end-to-end modules: the cluster, the driver under test, timings.

Each end-to-end module (:mod:`tests.test_e2e`, :mod:`tests.test_e2e_features`)
takes a module-scoped :class:`E2E` from :func:`driver_session`: the driver
under test is installed by the first step that needs it (``E2E.use_driver``)
and, at the module's end, its instances are removed and Ganeti's own driver
is back, byte for byte.  ``GANETI_KVM_E2E_DRIVER`` picks the driver (see
:mod:`tests.test_e2e`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from ganeti_kvm.ganeti3 import install
from tests import debpkg, host_ganeti
from tests import ganeti_observe as obs
from tests.cluster import Cluster

DRIVER = os.environ.get("GANETI_KVM_E2E_DRIVER", "ours")
DRIVERS = ("ours", "bundled")
OURS = DRIVER == "ours"

NODE1, NODE2 = "node1", "node2"
MEMORY_MIB = 128
VCPUS = 1
STOP_TIMEOUT = 30
SWITCH_TIMEOUT = 300
PACKAGE = debpkg.PACKAGE
DPKG_LOCK_WAIT = 300.0


class E2E:
    """The shared state of the module: the cluster, the driver, the timings."""

    def __init__(self, cluster: Cluster, deb: str = "") -> None:
        self.cluster = cluster
        self.deb = deb  # the package to install (driver "ours")
        # Ganeti's own drivers as found at the start, to compare byte for byte.
        self.bundled = host_ganeti.driver_digests()
        self.timings: dict[str, float] = {}
        self.added: list[str] = []
        self.ours_installed = False
        self.paused_pid = 0  # the QEMU of the last --paused start
        self.switched_back = False  # test_switch_back_to_bundled ran: stay with Ganeti's

    def fqdn(self, node: str) -> str:
        return self.cluster.nodes[node].fqdn

    def gnt(self, *argv: str, node: str = NODE1, step: str | None = None) -> str:
        """Run a Ganeti command on ``node`` (the master by default); time it as ``step``."""
        started = time.monotonic()
        result = self.cluster.gnt(node, *argv)
        if step is not None:
            self.timings[step] = self.timings.get(step, 0.0) + time.monotonic() - started
        return result.stdout

    def timed(self, step: str, func: Callable[[], Any]) -> Any:
        started = time.monotonic()
        try:
            return func()
        finally:
            self.timings[step] = self.timings.get(step, 0.0) + time.monotonic() - started

    # --- instances ----------------------------------------------------------

    def add(self, name: str, node: str, *options: str, start: bool = True,
            step: str | None = None) -> None:
        """``gnt-instance add`` on ``node``: a 1G sharedfile disk, the noop OS, ``options``."""
        self.added.append(name)
        backend = [] if "-B" in options else ["-B", f"memory={MEMORY_MIB}M,vcpus={VCPUS}"]
        self.gnt("gnt-instance", "add", "-t", "sharedfile", "-o", "noop",
                 "--disk", "0:size=1G", *backend, *options,
                 "--no-name-check", "--no-ip-check", *([] if start else ["--no-start"]),
                 "-n", self.fqdn(node), name, step=step)

    def remove(self, name: str) -> None:
        self.cluster.gnt(NODE1, "gnt-instance", "remove", "-f", "--shutdown-timeout=0", name,
                         check=False)
        if name in self.added and name not in self.listed():
            self.added.remove(name)

    def listed(self) -> list[str]:
        return self.gnt("gnt-instance", "list", "--no-headers", "-o", "name").split()

    def fields(self, name: str, *fields: str) -> dict[str, str]:
        """``gnt-instance list`` fields of ``name`` (memory in MiB)."""
        out = self.gnt("gnt-instance", "list", "--no-headers", "--units=m", "--separator=|",
                       "-o", ",".join(fields), name)
        return dict(zip(fields, out.strip().split("|"), strict=True))

    def primary(self, name: str) -> str:
        """The short name of ``name``'s primary node, as Ganeti has it."""
        pnode = self.fields(name, "pnode")["pnode"]
        return next(n for n, node in self.cluster.nodes.items() if node.fqdn == pnode)

    def ensure_running(self, name: str, node: str) -> None:
        """Bring ``name`` to ``node`` and running, whatever an earlier step left."""
        if self.primary(name) != node:
            self.gnt("gnt-instance", "failover", "-f", "--shutdown-timeout=0",
                     "-n", self.fqdn(node), name)
        state = self.fields(name, "status")["status"]
        if state != "running":
            self.cluster.gnt(NODE1, "gnt-instance", "shutdown", "--timeout=0", name,
                             check=False)
            self.gnt("gnt-instance", "startup", name)
        qemu = obs.assert_runs_only_on(self.cluster, name, node)
        if obs.qmp_status(self.cluster, node, name) != obs.RUNNING:
            # e.g. Ganeti's driver after a non-live migration: a fresh start.
            self.gnt("gnt-instance", "shutdown", "--timeout=0", name)
            self.gnt("gnt-instance", "startup", name)
            qemu = obs.assert_runs_only_on(self.cluster, name, node)
        assert qemu.pid

    def check_running(self, name: str, node: str) -> obs.Qemu:
        """Ganeti and the node agree: ``name`` runs on ``node`` and its guest counts."""
        qemu = obs.assert_runs_only_on(self.cluster, name, node)
        assert obs.qmp_status(self.cluster, node, name) == obs.RUNNING
        fields = self.fields(name, "pnode", "status", "oper_state")
        assert fields == {"pnode": self.fqdn(node), "status": "running", "oper_state": "Y"}
        obs.guest_counter(self.cluster, node, name)
        return qemu

    # --- the driver ---------------------------------------------------------

    def dpkg(self, node: str, *args: str) -> str:
        """``dpkg ARGS`` inside ``node``; waits (bounded) while another dpkg holds its lock."""
        deadline = time.monotonic() + DPKG_LOCK_WAIT
        while True:
            result = self.cluster.run(node, "env", "DEBIAN_FRONTEND=noninteractive", "dpkg",
                                      *args, check=False, timeout=SWITCH_TIMEOUT)
            if result.returncode == 0:
                return result.stdout + result.stderr
            locked = "lock" in result.stderr and "locked" in result.stderr
            if not locked or time.monotonic() > deadline:
                raise AssertionError(f"dpkg {' '.join(args)} in {node} exited with "
                                     f"{result.returncode}:\n{result.stdout}{result.stderr}")
            time.sleep(1)

    def marker(self, node: str) -> str:
        """Host path of the file saying ``node``'s daemon runs ganeti-kvm."""
        return self.cluster.host_path(node, install.marker(obs.KVM_RUN_DIR))

    def packaged(self, node: str, action: str) -> str:
        """What the package's maintainer scripts run on a node: ``ganeti-kvm ganeti ACTION``."""
        return self.cluster.run(node, "ganeti-kvm", "ganeti", action, "--packaged",
                                timeout=SWITCH_TIMEOUT).stdout

    def use_driver(self) -> None:
        """Make the driver under test Ganeti's (install ganeti-kvm once, for ``ours``)."""
        if OURS and not self.ours_installed and not self.switched_back:
            self.install_ours()

    def install_ours(self, step: str = "install") -> None:
        """Install the package: ``dpkg -i`` in node1, its postinst's command in node2."""
        self.ours_installed = True  # the teardown removes even a half-done install
        first, *others = self.cluster.nodes
        outputs = {first: self.timed(f"{step} ({first}, dpkg -i)",
                                     lambda: self.dpkg(first, "-i", self.deb))}
        for node in others:
            outputs[node] = self.timed(f"{step} ({node})",
                                       functools.partial(self.packaged, node, "install"))
        for node, out in outputs.items():
            assert "restarted the node daemon" in out, f"{node}: {out}"
            assert os.path.exists(self.marker(node)), f"{node} was not switched: {out}"
        assert driver_status() == "ganeti-kvm"

    def remove_ours(self, step: str = "remove", purge: bool = False) -> None:
        """Remove the package (``dpkg -r``, or ``-P``): Ganeti's own drivers back, byte for byte.

        node2 first (its prerm's command, while the package is still there),
        then dpkg in node1, whose prerm finds the files restored already and
        switches node1 by its marker.
        """
        first, *others = self.cluster.nodes
        outputs = {}
        for node in others:
            outputs[node] = self.timed(f"{step} ({node})",
                                       functools.partial(self.packaged, node, "remove"))
        option = "-P" if purge else "-r"
        outputs[first] = self.timed(f"{step} ({first}, dpkg {option})",
                                    lambda: self.dpkg(first, option, PACKAGE))
        self.ours_installed = False
        for node, out in outputs.items():
            assert "restarted the node daemon" in out, f"{node}: {out}"
            assert not os.path.exists(self.marker(node)), f"{node} was not switched back"
        assert driver_status() == "bundled"
        assert host_ganeti.driver_digests() == self.bundled

    def cleanup_package(self) -> None:
        """After a failure: switch back both nodes if needed, and purge the package."""
        first, *others = self.cluster.nodes
        if package_status() != "not-installed":
            for node in others:
                self.cluster.run(node, "ganeti-kvm", "ganeti", "remove", "--packaged",
                                 check=False, timeout=SWITCH_TIMEOUT)
            self.dpkg(first, "-P", PACKAGE)
        self.ours_installed = False


def package_status() -> str:
    """dpkg's status of the package on the machine (and so on every node)."""
    result = subprocess.run(["dpkg-query", "-W", "-f=${db:Status-Status}", PACKAGE],
                            capture_output=True, text=True, check=False,
                            env={"PATH": debpkg.BUILD_ENV_PATH, "LC_ALL": "C.UTF-8"})
    return result.stdout.strip() if result.returncode == 0 else "not-installed"


def driver_status() -> str:
    """``ganeti-kvm`` or ``bundled`` for every installed Ganeti 3.x (the nodes share /usr)."""
    found = set(install.status("/").values())
    assert len(found) == 1, f"the Ganeti versions here have different drivers: {found}"
    return found.pop()


def bundled_fails(reason: str) -> Any:
    """Ganeti 3.0's own driver fails this step (measured); strict, so a fix shows."""
    return pytest.mark.xfail(not OURS, reason=reason, strict=True, raises=AssertionError)


def driver_session(cluster: Cluster) -> Iterator[E2E]:
    """A module's :class:`E2E`; at the end its instances are removed, Ganeti's driver is back."""
    if DRIVER not in DRIVERS:
        pytest.fail(f"GANETI_KVM_E2E_DRIVER={DRIVER!r}: use one of {', '.join(DRIVERS)}")
    deb = built_package() if OURS else ""
    with host_ganeti.host_driver_lock():
        assert set(install.status("/").values()) == {"bundled"}, \
            "this machine's Ganeti runs ganeti-kvm already; run 'ganeti-kvm ganeti remove'"
        assert package_status() == "not-installed", \
            f"the package {PACKAGE} is installed on this machine; purge it first"
        yield from _module_state(cluster, deb)


def built_package() -> str:
    """The .deb of this tree (cached by its hash); skipped without the build tools."""
    missing = debpkg.missing_tools()
    if missing:
        message = f"{', '.join(missing)} not found: run 'make setup'"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return debpkg.build()


@contextlib.contextmanager
def left_clean(state: E2E, finish: Callable[[E2E], None]) -> Iterator[E2E]:
    """``state`` for a block; then its instances are removed and the package is
    purged (the driver switched back), also when the block failed; ``finish`` last."""
    try:
        yield state
        for name in list(state.added):
            state.remove(name)
    finally:
        try:
            if state.ours_installed or package_status() != "not-installed":
                state.cleanup_package()
        finally:
            finish(state)


def _module_state(cluster: Cluster, deb: str) -> Iterator[E2E]:
    with left_clean(E2E(cluster, deb), _report) as state:
        yield state
    assert not state.added, f"instances left on the cluster: {state.added}"
    assert host_ganeti.driver_digests() == state.bundled


def _report(state: E2E) -> None:
    """Print the step times; write them to $GANETI_KVM_E2E_TIMINGS if set."""
    report = "\n".join(f"  {step:36} {seconds:6.1f} s"
                       for step, seconds in state.timings.items())
    version = state.cluster.version
    print(f"\nend-to-end step times, Ganeti {version}, driver {DRIVER}:\n{report}")
    path = os.environ.get("GANETI_KVM_E2E_TIMINGS")
    if path:
        try:
            with open(path, encoding="utf-8") as handle:
                runs = json.load(handle).get("runs", {})
        except (OSError, ValueError):
            runs = {}
        runs[version] = {"driver": DRIVER, "timings": state.timings}
        with open(path, "w", encoding="utf-8") as handle:
            json.dump({"runs": runs}, handle, indent=1)
