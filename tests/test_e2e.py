"""End to end: ganeti-kvm as the KVM driver of a real Ganeti 3.0 and 3.1 cluster (issues 12, 14).

The steps an operator takes, each through Ganeti's own commands on the test
cluster (:mod:`tests.cluster`) and each checked again outside Ganeti
(:mod:`tests.ganeti_observe`): which node's namespaces the QEMU runs in,
what QEMU says on the instance's QMP socket, and the guest's counter on its
serial port.  The module runs once per Ganeti version (the cluster fixture
is parametrised, see :mod:`tests.cluster`).  The tests run in file order
and share one instance (``E2E_INSTANCE``); a step puts the instance into the state it needs when
an earlier step failed to leave it so.  The module removes every instance
it adds, and puts Ganeti's own driver back if it installed ganeti-kvm.

``GANETI_KVM_E2E_DRIVER`` picks the driver:

``ours`` (the default)
    The Debian package (``make deb``, :func:`tests.debpkg.build`) is
    installed first, where ``test_switch_to_ours`` checks that instances
    Ganeti's driver started run on and obey ours; the steps; then the package
    is removed in ``test_switch_back_to_bundled`` (the instance ours started
    runs on and obeys Ganeti's driver), which ``test_remove`` then removes.
    ``test_package_cycle`` installs, removes, reinstalls and purges it with
    instances running.

    The nodes share ``/usr`` and dpkg's database with the machine, and each
    node switches its own daemon and instances (its ``/run``): ``dpkg -i``
    runs inside node1's namespaces, so its postinst switches node1; node2
    then runs what its postinst would run on a node of its own,
    ``ganeti-kvm ganeti install --packaged`` (the files are switched
    already; its per-node marker makes it restart node2's daemon and adopt
    node2's instances).  Removing goes the other way round: node2's prerm
    command (``ganeti-kvm ganeti remove --packaged``) while the package is
    still there, then ``dpkg -r`` (or ``-P``) in node1.  Ganeti's own
    drivers are then back byte for byte.
``bundled``
    Ganeti's own KVM driver, as the baseline: the switch tests are skipped,
    and the two steps where Ganeti's driver leaves the guest paused are
    expected to fail (strict: a pass is reported).

Per-step wall times are printed at the end of the module (``-s`` shows
them) and, with ``GANETI_KVM_E2E_TIMINGS=FILE``, written to FILE as JSON.
"""

from __future__ import annotations

import functools
import os
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests import ganeti_observe as obs
from tests import host_ganeti
from tests.cluster import SYSRQ_ERROR, Cluster, machine_has_sysrq
from tests.e2e_state import (
    E2E,
    MEMORY_MIB,
    NODE1,
    NODE2,
    OURS,
    PACKAGE,
    STOP_TIMEOUT,
    VCPUS,
    bundled_fails,
    driver_session,
    driver_status,
    package_status,
)
from tests.guestimage import FIRST_LINE

E2E_INSTANCE = "gk-e2e1"
SWITCH_INSTANCES = ("gk-e2e-sw1", "gk-e2e-sw2")
BOOT_LINES = ["BOOT 1 kernel", "BOOT 2 modules loaded", "DISK BLANK", "NET NONE",
              "BOOT 3 acpid running", "READY", "COUNTER 1"]
CYCLE_INSTANCES = ("gk-e2e-pkg1", "gk-e2e-pkg2")


@pytest.fixture(scope="module")
def e2e(ganeti_cluster: Cluster) -> Iterator[E2E]:
    """The module's state (:func:`tests.e2e_state.driver_session`)."""
    yield from driver_session(ganeti_cluster)


def _need_instance(e2e: E2E) -> str:
    e2e.use_driver()
    if E2E_INSTANCE not in e2e.added:
        pytest.skip(f"instance {E2E_INSTANCE} was not added (see test_add)")
    return E2E_INSTANCE


def _typing_reaches_the_guest(term: obs.Terminal) -> None:
    """The guest's shell answers what is typed at the console, and Ctrl+] leaves it."""
    term.write(b"\r")
    term.read_until(r"/ # ")
    term.write(b"echo hello-$((6*7))\r")
    term.read_until(r"hello-42")
    term.write(b"\x1d")  # Ctrl+] leaves the console; the guest runs on
    assert term.proc.wait(30) == 0, term.text[-2000:]


def _other(node: str) -> str:
    return NODE2 if node == NODE1 else NODE1


# --- without a cluster ----------------------------------------------------------------


def test_host_driver_lock_serialises(short_dir: str) -> None:
    """A second holder waits for the first, within its bound."""
    with host_ganeti.host_driver_lock(short_dir), \
            pytest.raises(host_ganeti.HostLockTimeout, match=short_dir), \
            host_ganeti.host_driver_lock(short_dir, timeout=0.3):
        pass
    with host_ganeti.host_driver_lock(short_dir, timeout=0.3):
        pass


# --- switching from Ganeti's driver to ours -----------------------------------------


@pytest.mark.skipif(not OURS, reason="the driver switch is ganeti-kvm's")
def test_switch_to_ours(e2e: E2E) -> None:
    """Instances Ganeti's driver started run on (same PID) across install, and obey ours.

    One is listed, gets a console and is stopped; the other migrates.
    """
    cluster = e2e.cluster
    assert not e2e.ours_installed
    assert driver_status() == "bundled"
    stopped, migrated = SWITCH_INSTANCES
    for name in SWITCH_INSTANCES:
        e2e.add(name, NODE1)
    before = {name: e2e.check_running(name, NODE1) for name in SWITCH_INSTANCES}
    e2e.install_ours()
    for name, qemu in before.items():
        assert obs.assert_runs_only_on(cluster, name, NODE1) == qemu
        assert obs.qmp_status(cluster, NODE1, name) == obs.RUNNING
        fields = e2e.timed("switch: list", functools.partial(
            e2e.fields, name, "status", "oper_state", "oper_ram", "oper_vcpus"))
        assert fields == {"status": "running", "oper_state": "Y",
                          "oper_ram": str(MEMORY_MIB), "oper_vcpus": str(VCPUS)}
    started = time.monotonic()
    with obs.console(cluster, stopped) as term:
        term.read_until(r"COUNTER \d+\n")
        _typing_reaches_the_guest(term)
    e2e.timings["switch: console"] = time.monotonic() - started
    assert obs.assert_runs_only_on(cluster, stopped, NODE1) == before[stopped]
    e2e.gnt("gnt-instance", "shutdown", f"--timeout={STOP_TIMEOUT}", stopped,
            step="switch: stop")
    obs.assert_runs_nowhere(cluster, stopped)
    assert e2e.fields(stopped, "status")["status"] == "ADMIN_down"

    counter = obs.guest_counter(cluster, NODE1, migrated)
    e2e.gnt("gnt-instance", "migrate", "-f", "-n", e2e.fqdn(NODE2), migrated,
            step="switch: migrate")
    obs.assert_runs_only_on(cluster, migrated, NODE2)
    assert obs.guest_counter(cluster, NODE2, migrated) > counter
    e2e.check_running(migrated, NODE2)
    for name in SWITCH_INSTANCES:
        e2e.remove(name)
    assert not set(SWITCH_INSTANCES) & set(e2e.listed())
    for name in SWITCH_INSTANCES:
        obs.assert_runs_nowhere(cluster, name)
        left = {node: obs.instance_files(cluster, node, name) for node in cluster.nodes}
        assert left == {node: [] for node in cluster.nodes}, name


# --- the steps, with the driver under test -----------------------------------------


def test_add(e2e: E2E) -> None:
    """gnt-instance add: sharedfile disk, noop OS, the test guest under TCG, started."""
    e2e.use_driver()
    e2e.add(E2E_INSTANCE, NODE1, step="add")
    e2e.check_running(E2E_INSTANCE, NODE1)
    assert len(os.listdir(os.path.join(e2e.cluster.shared_dir, E2E_INSTANCE))) == 1


def test_start_paused(e2e: E2E) -> None:
    """startup --paused: QEMU runs in node1, its guest has not started."""
    name = _need_instance(e2e)
    e2e.ensure_running(name, NODE1)
    e2e.gnt("gnt-instance", "shutdown", "--timeout=0", name)
    obs.assert_runs_nowhere(e2e.cluster, name)
    e2e.gnt("gnt-instance", "startup", "--paused", name, step="start --paused")
    e2e.paused_pid = obs.assert_runs_only_on(e2e.cluster, name, NODE1).pid
    assert obs.qmp_status(e2e.cluster, NODE1, name) in obs.NOT_RUNNING_STATES
    assert e2e.fields(name, "status", "oper_state") == {"status": "running", "oper_state": "Y"}


def test_console(e2e: E2E) -> None:
    """gnt-instance console: the whole boot from its first line, then typing reaches the guest."""
    name = _need_instance(e2e)
    cluster = e2e.cluster
    if where := obs.where(cluster, name):
        fresh = where[0].node == NODE1 and \
            obs.qmp_status(cluster, NODE1, name) in obs.NOT_RUNNING_STATES
    else:
        fresh = False
    if not fresh:  # the paused start failed: do it again, it is not this step
        cluster.gnt(NODE1, "gnt-instance", "shutdown", "--timeout=0", name, check=False)
        e2e.gnt("gnt-instance", "startup", "--paused", name)
        e2e.paused_pid = obs.assert_runs_only_on(cluster, name, NODE1).pid
    started = time.monotonic()
    with obs.console(cluster, name) as term:
        text = term.read_until(r"COUNTER 2\b", timeout=120)
        positions = [text.index(FIRST_LINE)] + [text.index(line) for line in BOOT_LINES]
        assert positions == sorted(positions), text
        assert obs.qmp_status(cluster, NODE1, name) == obs.RUNNING
        _typing_reaches_the_guest(term)
    e2e.timings["console"] = time.monotonic() - started
    e2e.check_running(name, NODE1)


def test_list_and_info(e2e: E2E) -> None:
    """list with oper_state, oper_ram, oper_vcpus; info says where and that it runs."""
    name = _need_instance(e2e)
    e2e.ensure_running(name, NODE1)
    qemu = obs.assert_runs_only_on(e2e.cluster, name, NODE1)
    fields = e2e.timed("list", lambda: e2e.fields(
        name, "name", "pnode", "status", "oper_state", "oper_ram", "oper_vcpus"))
    assert fields == {"name": name, "pnode": e2e.fqdn(NODE1), "status": "running",
                      "oper_state": "Y", "oper_ram": str(MEMORY_MIB), "oper_vcpus": str(VCPUS)}
    info = e2e.gnt("gnt-instance", "info", name, step="info")
    assert f"Instance name: {name}" in info
    assert "actual state is up" in info, info
    assert f"primary: {e2e.fqdn(NODE1)}" in info, info
    assert obs.where(e2e.cluster, name) == [qemu]


def _check_rebooted(e2e: E2E, name: str, before: obs.Qemu) -> None:
    after = obs.assert_runs_only_on(e2e.cluster, name, NODE1)
    assert after.pid != before.pid, "the QEMU was not restarted"
    assert obs.qmp_status(e2e.cluster, NODE1, name) == obs.RUNNING
    e2e.check_running(name, NODE1)


@bundled_fails("Ganeti 3.0 restarts QEMU with the -S of a --paused start")
def test_reboot_soft(e2e: E2E) -> None:
    """reboot --type=soft of the instance started --paused: it comes back running."""
    name = _need_instance(e2e)
    e2e.ensure_running(name, NODE1)
    before = obs.assert_runs_only_on(e2e.cluster, name, NODE1)
    if before.pid != e2e.paused_pid:
        # An earlier step did not leave the QEMU of a paused start: make one,
        # and continue it as the console does.
        e2e.gnt("gnt-instance", "shutdown", "--timeout=0", name)
        e2e.gnt("gnt-instance", "startup", "--paused", name)
        before = obs.assert_runs_only_on(e2e.cluster, name, NODE1)
        obs.qmp_execute(obs.ctrl_path(e2e.cluster, NODE1, name, "qmp"), "cont")
    e2e.gnt("gnt-instance", "reboot", "--type=soft", name, step="reboot soft")
    _check_rebooted(e2e, name, before)


def test_reboot_hard(e2e: E2E) -> None:
    name = _need_instance(e2e)
    e2e.ensure_running(name, NODE1)
    before = obs.assert_runs_only_on(e2e.cluster, name, NODE1)
    e2e.gnt("gnt-instance", "reboot", "--type=hard", name, step="reboot hard")
    _check_rebooted(e2e, name, before)


def test_stop_and_start(e2e: E2E) -> None:
    """shutdown --timeout: the guest powers off (ACPI) and QEMU is gone; startup again."""
    name = _need_instance(e2e)
    e2e.ensure_running(name, NODE1)
    before = obs.assert_runs_only_on(e2e.cluster, name, NODE1)
    e2e.gnt("gnt-instance", "shutdown", f"--timeout={STOP_TIMEOUT}", name, step="stop")
    obs.assert_runs_nowhere(e2e.cluster, name)
    assert e2e.fields(name, "status", "oper_state") == {"status": "ADMIN_down",
                                                        "oper_state": "N"}
    e2e.gnt("gnt-instance", "startup", name, step="start")
    after = e2e.check_running(name, NODE1)
    assert after.pid != before.pid


def _migrate(e2e: E2E, step: str, source: str, target: str, *options: str) -> None:
    name = _need_instance(e2e)
    e2e.ensure_running(name, source)
    counter = obs.guest_counter(e2e.cluster, source, name)
    e2e.gnt("gnt-instance", "migrate", "-f", *options, "-n", e2e.fqdn(target), name, step=step)
    obs.assert_runs_only_on(e2e.cluster, name, target)
    assert obs.qmp_status(e2e.cluster, target, name) == obs.RUNNING
    # The guest went on counting where it was: it moved, it did not boot again.
    assert obs.guest_counter(e2e.cluster, target, name) > counter
    e2e.check_running(name, target)


def test_migrate_live(e2e: E2E) -> None:
    _migrate(e2e, "migrate live", NODE1, NODE2)


@bundled_fails("Ganeti 3.0 leaves the guest stopped after a non-live migration")
def test_migrate_non_live(e2e: E2E) -> None:
    _migrate(e2e, "migrate non-live", NODE2, NODE1, "--non-live")


def test_failover(e2e: E2E) -> None:
    """failover: shut down on the primary, started on the other node from the shared disk."""
    name = _need_instance(e2e)
    e2e.ensure_running(name, NODE1)
    before = obs.assert_runs_only_on(e2e.cluster, name, NODE1)
    e2e.gnt("gnt-instance", "failover", "-f", "-n", e2e.fqdn(NODE2), name, step="failover")
    after = e2e.check_running(name, NODE2)
    assert after.pid != before.pid


def test_cluster_verify(e2e: E2E) -> None:
    """gnt-cluster verify: only the node setup error of a machine without sysrq."""
    _need_instance(e2e)
    started = time.monotonic()
    result = e2e.cluster.gnt(NODE1, "gnt-cluster", "verify", check=False)
    e2e.timings["verify"] = time.monotonic() - started
    output = result.stdout + result.stderr
    errors = [line for line in result.stdout.splitlines() if "ERROR:" in line]
    assert [line for line in errors if not SYSRQ_ERROR.search(line)] == [], output
    if machine_has_sysrq():
        assert result.returncode == 0, output
    # nothing about the instance (e.g. "instance should not run on node2")
    assert [line for line in output.splitlines() if E2E_INSTANCE in line and
            ("ERROR" in line or "WARNING" in line)] == [], output


# --- switching back to Ganeti's driver ------------------------------------------------


@pytest.mark.skipif(not OURS, reason="the driver switch is ganeti-kvm's")
def test_switch_back_to_bundled(e2e: E2E) -> None:
    """An instance ours started runs on (same PID) across remove, and obeys Ganeti's driver.

    It is listed, gets a console, migrates and is stopped by Ganeti's driver.
    """
    name = _need_instance(e2e)
    cluster = e2e.cluster
    node = e2e.primary(name)
    e2e.ensure_running(name, node)
    qemu = obs.assert_runs_only_on(cluster, name, node)
    e2e.switched_back = True
    e2e.remove_ours()
    assert obs.assert_runs_only_on(cluster, name, node) == qemu
    assert obs.qmp_status(cluster, node, name) == obs.RUNNING
    fields = e2e.timed("switch back: list", lambda: e2e.fields(
        name, "status", "oper_state", "oper_ram", "oper_vcpus"))
    assert fields == {"status": "running", "oper_state": "Y",
                      "oper_ram": str(MEMORY_MIB), "oper_vcpus": str(VCPUS)}
    started = time.monotonic()
    with obs.console(cluster, name) as term:
        term.read_until(r"COUNTER \d+\n")
        _typing_reaches_the_guest(term)
    e2e.timings["switch back: console"] = time.monotonic() - started

    target = _other(node)
    counter = obs.guest_counter(cluster, node, name)
    e2e.gnt("gnt-instance", "migrate", "-f", "-n", e2e.fqdn(target), name,
            step="switch back: migrate")
    obs.assert_runs_only_on(cluster, name, target)
    assert obs.guest_counter(cluster, target, name) > counter
    e2e.check_running(name, target)
    e2e.gnt("gnt-instance", "shutdown", f"--timeout={STOP_TIMEOUT}", name,
            step="switch back: stop")
    obs.assert_runs_nowhere(cluster, name)


def test_remove(e2e: E2E) -> None:
    """gnt-instance remove: nothing of the instance is left on the nodes or the disk."""
    name = _need_instance(e2e)
    cluster = e2e.cluster
    e2e.gnt("gnt-instance", "remove", "-f", f"--shutdown-timeout={STOP_TIMEOUT}", name,
            step="remove")
    e2e.added.remove(name)
    assert name not in e2e.listed()
    obs.assert_runs_nowhere(cluster, name)
    assert not os.path.exists(os.path.join(cluster.shared_dir, name))
    left = {node: obs.instance_files(cluster, node, name) for node in cluster.nodes}
    assert left == {node: [] for node in cluster.nodes}


# --- the package on a cluster with instances running -----------------------------------


@pytest.mark.skipif(not OURS, reason="the package is ganeti-kvm's")
def test_package_cycle(e2e: E2E) -> None:
    """Install, remove, reinstall and purge the package while instances run.

    The instances keep their QEMU (same PID) through every step, and the
    driver installed at each step answers for them; the reinstalled
    package's migrates one, Ganeti's own (after the purge) stops one and
    migrates the other back.  The purge leaves nothing of the package.
    """
    cluster = e2e.cluster
    if e2e.ours_installed:  # an earlier step failed to switch back
        e2e.remove_ours()
    assert driver_status() == "bundled"
    assert package_status() in ("not-installed", "config-files")  # after -r, it has a postrm
    stopped, migrated = CYCLE_INSTANCES
    for name in CYCLE_INSTANCES:
        e2e.add(name, NODE1)
    qemus = {name: e2e.check_running(name, NODE1) for name in CYCLE_INSTANCES}

    def still_running(driver: str) -> None:
        assert driver_status() == driver
        for name, qemu in qemus.items():
            assert obs.assert_runs_only_on(cluster, name, qemu.node) == qemu, name
            assert obs.qmp_status(cluster, qemu.node, name) == obs.RUNNING
            assert e2e.fields(name, "pnode", "status", "oper_state", "oper_ram") == {
                "pnode": e2e.fqdn(qemu.node), "status": "running", "oper_state": "Y",
                "oper_ram": str(MEMORY_MIB)}, name

    e2e.install_ours("cycle: install")
    still_running("ganeti-kvm")
    e2e.remove_ours("cycle: remove")
    still_running("bundled")
    assert package_status() == "config-files"
    e2e.install_ours("cycle: reinstall")
    still_running("ganeti-kvm")
    e2e.gnt("gnt-instance", "migrate", "-f", "-n", e2e.fqdn(NODE2), migrated,
            step="cycle: migrate (ours)")
    qemus[migrated] = e2e.check_running(migrated, NODE2)
    e2e.remove_ours("cycle: purge", purge=True)
    still_running("bundled")
    assert package_status() == "not-installed"
    assert not os.path.exists("/usr/bin/ganeti-kvm")
    assert PACKAGE not in subprocess.run(["dpkg-divert", "--list"], capture_output=True,
                                         text=True, check=True).stdout

    e2e.gnt("gnt-instance", "shutdown", f"--timeout={STOP_TIMEOUT}", stopped,
            step="cycle: stop (bundled)")
    obs.assert_runs_nowhere(cluster, stopped)
    counter = obs.guest_counter(cluster, NODE2, migrated)
    e2e.gnt("gnt-instance", "migrate", "-f", "-n", e2e.fqdn(NODE1), migrated,
            step="cycle: migrate (bundled)")
    obs.assert_runs_only_on(cluster, migrated, NODE1)
    assert obs.guest_counter(cluster, NODE1, migrated) > counter
    for name in CYCLE_INSTANCES:
        e2e.remove(name)
        obs.assert_runs_nowhere(cluster, name)
    assert not set(CYCLE_INSTANCES) & set(e2e.listed())
