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
from tests.cluster import SYSRQ_ERROR, Cluster, machine_has_sysrq
from tests.guestimage import FIRST_LINE

DRIVER = os.environ.get("GANETI_KVM_E2E_DRIVER", "ours")
DRIVERS = ("ours", "bundled")
OURS = DRIVER == "ours"

E2E_INSTANCE = "gk-e2e1"
SWITCH_INSTANCES = ("gk-e2e-sw1", "gk-e2e-sw2")
NODE1, NODE2 = "node1", "node2"
MEMORY_MIB = 128
VCPUS = 1
BOOT_LINES = ["BOOT 1 kernel", "BOOT 2 modules loaded", "DISK BLANK", "NET NONE",
              "BOOT 3 acpid running", "READY", "COUNTER 1"]
STOP_TIMEOUT = 30
SWITCH_TIMEOUT = 300
PACKAGE = debpkg.PACKAGE
DPKG_LOCK_WAIT = 300.0
CYCLE_INSTANCES = ("gk-e2e-pkg1", "gk-e2e-pkg2")


def _bundled_leaves_it_paused(reason: str) -> Any:
    """Ganeti 3.0's own driver fails this step (measured); strict, so a fix shows."""
    return pytest.mark.xfail(not OURS, reason=reason, strict=True, raises=AssertionError)


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

    def add(self, name: str, node: str, *, start: bool = True, step: str | None = None) -> None:
        self.added.append(name)
        self.gnt("gnt-instance", "add", "-t", "sharedfile", "-o", "noop",
                 "--disk", "0:size=1G", "-B", f"memory={MEMORY_MIB}M,vcpus={VCPUS}",
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


@pytest.fixture(scope="module")
def e2e(ganeti_cluster: Cluster) -> Iterator[E2E]:
    """The module's state; at the end its instances are removed, Ganeti's driver is back."""
    if DRIVER not in DRIVERS:
        pytest.fail(f"GANETI_KVM_E2E_DRIVER={DRIVER!r}: use one of {', '.join(DRIVERS)}")
    deb = built_package() if OURS else ""
    with host_ganeti.host_driver_lock():
        assert set(install.status("/").values()) == {"bundled"}, \
            "this machine's Ganeti runs ganeti-kvm already; run 'ganeti-kvm ganeti remove'"
        assert package_status() == "not-installed", \
            f"the package {PACKAGE} is installed on this machine; purge it first"
        yield from _module_state(ganeti_cluster, deb)


def built_package() -> str:
    """The .deb of this tree (cached by its hash); skipped without the build tools."""
    missing = debpkg.missing_tools()
    if missing:
        message = f"{', '.join(missing)} not found: run 'make setup'"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return debpkg.build()


def _module_state(cluster: Cluster, deb: str) -> Iterator[E2E]:
    state = E2E(cluster, deb)
    try:
        yield state
        for name in list(state.added):
            state.remove(name)
    finally:
        try:
            if state.ours_installed or package_status() != "not-installed":
                state.cleanup_package()
        finally:
            _report(state)
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


@_bundled_leaves_it_paused("Ganeti 3.0 restarts QEMU with the -S of a --paused start")
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


@_bundled_leaves_it_paused("Ganeti 3.0 leaves the guest stopped after a non-live migration")
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
