"""``gnt-cluster upgrade --to 3.1`` of a Ganeti 3.0 cluster that runs ganeti-kvm (issue 14).

Debian installs Ganeti versions side by side (scripts/setup.sh puts 3.1
next to 3.0), and ``gnt-cluster upgrade`` stops every node's daemons,
points each node's ``/etc/ganeti/share`` and ``lib`` at the new version,
upgrades the configuration and starts the daemons again; instances are not
touched.  The package ganeti-kvm diverts the driver of every installed
version, so the 3.1 daemons load ganeti-kvm too: the instances it started
under 3.0 keep their QEMU and obey it under 3.1, and after the package is
removed they obey Ganeti 3.1's own driver.

The test builds a cluster of its own (a 3.0 one, about 10 s) and takes
about two minutes; ``make cluster-upgrade-test`` runs it alone.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests import cluster as gc
from tests import ganeti_observe as obs
from tests import host_ganeti
from tests.cluster import Cluster
from tests.e2e_state import E2E, built_package, driver_status, left_clean, package_status

FROM_VERSION, TO_VERSION = "3.0", "3.1"
UPGRADE_TIMEOUT = 600.0
INSTANCES = {"gk-up1": "node1", "gk-up2": "node2"}


@pytest.fixture
def upgrade_state(guest: Any) -> Iterator[E2E]:
    """A fresh Ganeti 3.0 cluster with the package installed; all removed afterwards."""
    gc.require_ganeti(FROM_VERSION)
    gc.require_ganeti(TO_VERSION)
    deb = built_package()
    gc.remove_stale_clusters()
    before = gc.host_snapshot()
    with host_ganeti.host_driver_lock():
        assert driver_status() == "bundled"
        assert package_status() == "not-installed"
        cluster = Cluster(kernel=guest.kernel, initrd=guest.initrd, version=FROM_VERSION)

        def finish(state: E2E) -> None:
            cluster.down()
            print("\nupgrade test step times:\n" + "\n".join(
                f"  {step:36} {seconds:6.1f} s" for step, seconds in state.timings.items()))

        with left_clean(E2E(cluster, deb), finish) as state:
            cluster.up()
            yield state
        assert cluster.leftovers() == []
        assert host_ganeti.driver_digests() == state.bundled
    changed = [path for path, digest in gc.host_snapshot().items() if before[path] != digest]
    assert not changed, f"the upgraded cluster changed host paths: {changed}"
    assert not state.added, f"instances left: {state.added}"


def _check_upgrade_result(returncode: int, output: str) -> None:
    """The upgrade went through; its last step, a cluster verify, may fail for sysrq alone.

    On a machine without /proc/sysrq-trigger the verify reports one node setup
    error per node (:data:`tests.cluster.SYSRQ_ERROR`), and the upgrade exits 1
    after having done everything.
    """
    assert "Unpausing the watcher." in output, output
    if returncode == 0:
        return
    assert not gc.machine_has_sysrq(), output
    verify = output[output.index("Verifying cluster."):]
    errors = [line for line in verify.splitlines() if "ERROR:" in line]
    assert errors and all(gc.SYSRQ_ERROR.search(line) for line in errors), output
    assert "Command ['gnt-cluster', 'verify'] failed" in verify, output


def test_upgrade_to_3_1_keeps_instances_under_ganeti_kvm(upgrade_state: E2E) -> None:
    """The instances ganeti-kvm runs under 3.0 keep their QEMU across the upgrade and obey it.

    Then the package goes: Ganeti 3.1's own driver takes them over, still
    without a restart, and stops them.
    """
    state = upgrade_state
    cluster = state.cluster
    state.install_ours()
    for name, node in INSTANCES.items():
        state.add(name, node, step="add")
    qemus = {name: state.check_running(name, node) for name, node in INSTANCES.items()}
    counters = {name: obs.guest_counter(cluster, node, name) for name, node in INSTANCES.items()}

    started = time.monotonic()
    result = cluster.gnt(cluster.master, "gnt-cluster", "upgrade", f"--to={TO_VERSION}",
                         timeout=UPGRADE_TIMEOUT, check=False)
    state.timings["gnt-cluster upgrade"] = time.monotonic() - started
    output = result.stdout + result.stderr
    _check_upgrade_result(result.returncode, output)
    assert {node: cluster.node_version(node) for node in cluster.nodes} == \
        dict.fromkeys(cluster.nodes, TO_VERSION), output
    for node in cluster.nodes:
        version = cluster.gnt(node, "gnt-cluster", "--version").stdout
        assert f"(ganeti {TO_VERSION}." in version.splitlines()[0], version
    assert driver_status() == "ganeti-kvm"

    for name, node in INSTANCES.items():
        assert obs.assert_runs_only_on(cluster, name, node) == qemus[name], output
        assert obs.qmp_status(cluster, node, name) == obs.RUNNING
        assert obs.guest_counter(cluster, node, name) > counters[name]
        assert state.fields(name, "status", "oper_state") == {"status": "running",
                                                               "oper_state": "Y"}
    # Ganeti 3.1 with ganeti-kvm: migrate one, both ways.
    moved = "gk-up1"
    state.gnt("gnt-instance", "migrate", "-f", "-n", state.fqdn("node2"), moved,
              step="migrate (3.1, ganeti-kvm)")
    qemus[moved] = state.check_running(moved, "node2")
    state.gnt("gnt-instance", "migrate", "-f", "-n", state.fqdn("node1"), moved,
              step="migrate back (3.1, ganeti-kvm)")
    qemus[moved] = state.check_running(moved, "node1")

    state.remove_ours()
    for name, node in INSTANCES.items():
        assert obs.assert_runs_only_on(cluster, name, node) == qemus[name]
        assert state.fields(name, "status", "oper_state") == {"status": "running",
                                                               "oper_state": "Y"}
    for name in INSTANCES:
        state.gnt("gnt-instance", "shutdown", "--timeout=30", name,
                  step="stop (3.1, bundled)")
        obs.assert_runs_nowhere(cluster, name)
        state.remove(name)
    assert state.listed() == []
