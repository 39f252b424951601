"""End to end: the Ganeti 3 features an operator drives with ``gnt-instance modify`` (issue 13).

Each step goes through Ganeti's own commands on the two-node test cluster
(:mod:`tests.cluster`), with the driver under test installed as in
:mod:`tests.test_e2e` (``GANETI_KVM_E2E_DRIVER``), and is checked outside
Ganeti: QEMU's monitor on the node, ``/proc`` of its vCPU threads, a TCP
connection inside the node's network namespace, and the guest's own view
through its serial shell.  The steps share one instance (``INSTANCE``), in
file order; each first brings it to the state it needs.  The module runs once
per Ganeti version.  Under Ganeti 3.0's own driver
(``GANETI_KVM_E2E_DRIVER=bundled``) two steps fail, as strict xfails:
``cpu_mask=0`` leaves the vCPU thread on every CPU, and ``oper_ram`` stays
the command line's after ballooning.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from ganeti_kvm.qmp.client import qmp_execute
from tests import balloonguest, guestimage
from tests import ganeti_observe as obs
from tests.cluster import Cluster
from tests.e2e_state import E2E, NODE1, NODE2, STOP_TIMEOUT, bundled_fails, driver_session
from tests.helpers import SerialReader

INSTANCE = "gk-feat1"
RENAMED = "gk-feat2"
# The cluster's instance policy wants at least 128 MiB.
MAXMEM_MIB = 256
MINMEM_MIB = 128
BALLOONED_MIB = 192
QMP_TIMEOUT = 10.0
GUEST_TIMEOUT = 60.0
MIB = 1 << 20


@pytest.fixture(scope="module")
def e2e(ganeti_cluster: Cluster) -> Iterator[E2E]:
    """The module's state (:func:`tests.e2e_state.driver_session`)."""
    yield from driver_session(ganeti_cluster)


# --- seeing it from outside Ganeti -----------------------------------------------------


def qmp(e2e: E2E, node: str, name: str, command: str,
        arguments: dict[str, Any] | None = None) -> Any:
    """QEMU's answer to ``command`` on ``name``'s QMP socket on ``node``."""
    return qmp_execute(obs.ctrl_path(e2e.cluster, node, name, "qmp"), command, arguments,
                       timeout=QMP_TIMEOUT)


def in_guest(e2e: E2E, node: str, name: str, command: str,
             timeout: float = GUEST_TIMEOUT) -> str:
    """What ``command`` prints in the guest's serial shell (its lines, counter lines left out).

    The command's output is framed by two markers that its echo cannot
    contain (the shell computes them), so only what it printed comes back.
    """
    reader = SerialReader(obs.ctrl_path(e2e.cluster, node, name, "serial"))
    try:
        _wait_for_prompt(reader, timeout)
        reader.send(f"echo BEGIN-$((40+2)); {command}; echo END-$((40+2))\n")
        match = reader.read_until(r"BEGIN-42\n(?s:(.*?))END-42\n", timeout)
    finally:
        reader.close()
    return "\n".join(line for line in match.group(1).splitlines()
                     if not re.fullmatch(r"COUNTER \d+", line.strip()))


def _wait_for_prompt(reader: SerialReader, timeout: float) -> None:
    """Press Enter until the guest's shell prompts (it may not run yet just after a boot)."""
    deadline = time.monotonic() + timeout
    while True:
        seen = len(reader.text)
        reader.send("\n")
        try:
            reader.read_until(r"/ # ", 2.0)
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            continue
        if "/ # " in reader.text[seen:]:
            return


def vcpu_affinities(e2e: E2E, node: str, name: str) -> list[str]:
    """``Cpus_allowed_list`` of each vCPU thread of ``name``'s QEMU (ids from query-cpus-fast)."""
    qemu = obs.assert_runs_only_on(e2e.cluster, name, node)
    cpus = sorted(qmp(e2e, node, name, "query-cpus-fast"), key=lambda cpu: cpu["cpu-index"])
    found = []
    for cpu in cpus:
        with open(f"/proc/{qemu.pid}/task/{cpu['thread-id']}/status", encoding="ascii") as f:
            found += [line.split(":", 1)[1].strip() for line in f
                      if line.startswith("Cpus_allowed_list:")]
    return found


def balloon_mib(e2e: E2E, node: str, name: str) -> int:
    return int(qmp(e2e, node, name, "query-balloon")["actual"]) // MIB


def wait_for(what: str, probe: Any, timeout: float = GUEST_TIMEOUT) -> Any:
    """Poll ``probe()`` until it returns something true (bounded); return it."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not seen within {timeout} s")
        time.sleep(0.2)


def guest_memtotal_mib(e2e: E2E, node: str, name: str) -> int:
    text = in_guest(e2e, node, name, "grep MemTotal /proc/meminfo")
    return int(re.search(r"MemTotal:\s+(\d+) kB", text).group(1)) // 1024  # type: ignore[union-attr]


def _need_instance(e2e: E2E) -> str:
    e2e.use_driver()
    if INSTANCE not in e2e.added:
        pytest.skip(f"instance {INSTANCE} was not added (see test_add)")
    return INSTANCE


def _hotplug(e2e: E2E) -> list[str]:
    """``modify``'s option for a change by hotplug: Ganeti 3.1 hotplugs by default."""
    return [] if e2e.cluster.version == "3.1" else ["--hotplug"]


def _unchecked_rename(e2e: E2E) -> list[str]:
    """``rename``'s options for a name no DNS knows: Ganeti 3.1 checks none by default."""
    return [] if e2e.cluster.version == "3.1" else ["-f", "--no-ip-check", "--no-name-check"]


def _restart(e2e: E2E, name: str, step: str) -> obs.Qemu:
    """``reboot --type=hard``: a new QEMU from Ganeti's configuration (new hvparams)."""
    e2e.gnt("gnt-instance", "reboot", "--type=hard", f"--shutdown-timeout={STOP_TIMEOUT}",
            name, step=step)
    return e2e.check_running(name, e2e.primary(name))


# --- the steps -----------------------------------------------------------------------


def test_add(e2e: E2E) -> None:
    """An instance with memory for ballooning and the guest that has the balloon driver."""
    e2e.use_driver()
    initrd = e2e.cluster.add_file(balloonguest.build(guestimage.build_guest()),
                                  "initrd-balloon")
    e2e.add(INSTANCE, NODE1, "-B", f"maxmem={MAXMEM_MIB}M,minmem={MINMEM_MIB}M,vcpus=1",
            "-H", f"kvm:initrd_path={initrd}", step="features: add")
    e2e.check_running(INSTANCE, NODE1)


@bundled_fails("Ganeti 3.0 reports the command line's memory as oper_ram, not the balloon's")
def test_balloon_down_and_back(e2e: E2E) -> None:
    """``modify -m``: QEMU's balloon, the guest's memory and Ganeti's oper_ram follow."""
    name = _need_instance(e2e)
    e2e.ensure_running(name, NODE1)
    node = e2e.primary(name)
    in_guest(e2e, node, name, f"insmod {balloonguest.MODULE_PATH}")
    full = guest_memtotal_mib(e2e, node, name)
    e2e.gnt("gnt-instance", "modify", "-m", f"{BALLOONED_MIB}M", name, step="balloon down")
    wait_for(f"the balloon at {BALLOONED_MIB} MiB",
             lambda: balloon_mib(e2e, node, name) == BALLOONED_MIB)
    shrunk = guest_memtotal_mib(e2e, node, name)
    assert full - shrunk >= MAXMEM_MIB - BALLOONED_MIB - 1, (full, shrunk)
    assert e2e.fields(name, "oper_ram") == {"oper_ram": str(BALLOONED_MIB)}
    e2e.gnt("gnt-instance", "modify", "-m", f"{MAXMEM_MIB}M", name, step="balloon up")
    wait_for(f"the balloon back at {MAXMEM_MIB} MiB",
             lambda: balloon_mib(e2e, node, name) == MAXMEM_MIB)
    assert guest_memtotal_mib(e2e, node, name) == full
    assert e2e.fields(name, "oper_ram") == {"oper_ram": str(MAXMEM_MIB)}
    obs.guest_counter(e2e.cluster, node, name)


@bundled_fails("Ganeti 3.0 pins QEMU's main thread only; the vCPU thread stays on 0-1")
def test_cpu_mask_single(e2e: E2E) -> None:
    """``-H cpu_mask=0``: the vCPU thread runs on CPU 0 only."""
    name = _need_instance(e2e)
    e2e.ensure_running(name, NODE1)
    e2e.gnt("gnt-instance", "modify", "-H", "cpu_mask=0", name)
    _restart(e2e, name, "cpu_mask single")
    assert vcpu_affinities(e2e, NODE1, name) == ["0"]


def test_cpu_mask_per_vcpu(e2e: E2E) -> None:
    """``-B vcpus=2 -H cpu_mask=1:0``: each vCPU thread on its own CPU; the guest sees 2."""
    name = _need_instance(e2e)
    e2e.ensure_running(name, NODE1)
    e2e.gnt("gnt-instance", "modify", "-B", "vcpus=2", "-H", "cpu_mask=1:0", name)
    _restart(e2e, name, "cpu_mask per vCPU")
    assert vcpu_affinities(e2e, NODE1, name) == ["1", "0"]
    assert in_guest(e2e, NODE1, name, "grep -c ^processor /proc/cpuinfo").strip() == "2"


def test_pinning_kept_over_migration_and_reboot(e2e: E2E) -> None:
    """The per-vCPU pinning holds on the migration target and after a soft reboot there."""
    name = _need_instance(e2e)
    e2e.ensure_running(name, NODE1)
    if vcpu_affinities(e2e, NODE1, name) != ["1", "0"]:
        pytest.skip("the per-vCPU pinning step did not leave the instance pinned")
    counter = obs.guest_counter(e2e.cluster, NODE1, name)
    e2e.gnt("gnt-instance", "migrate", "-f", "-n", e2e.fqdn(NODE2), name,
            step="features: migrate")
    e2e.check_running(name, NODE2)
    assert obs.guest_counter(e2e.cluster, NODE2, name) > counter
    assert vcpu_affinities(e2e, NODE2, name) == ["1", "0"]
    e2e.gnt("gnt-instance", "reboot", "--type=soft", name, step="features: reboot soft")
    e2e.check_running(name, NODE2)
    assert vcpu_affinities(e2e, NODE2, name) == ["1", "0"]


def pci_ids(e2e: E2E, node: str, name: str) -> dict[str, int]:
    """The slot of each PCI device QEMU knows by id (``query-pci``)."""
    devices = qmp(e2e, node, name, "query-pci")[0]["devices"]
    return {d["qdev_id"]: d["slot"] for d in devices if d.get("qdev_id")}


def guest_devices(e2e: E2E, node: str, name: str) -> list[str]:
    """The guest's NICs (``/sys/class/net``) and virtio disks (``/dev/vd?``), sorted."""
    text = in_guest(e2e, node, name, "ls /sys/class/net /dev | grep -E '^(eth[0-9]+|vd[a-z])$'")
    return sorted(text.split())


def test_hotplug_kept_over_migration_and_reboots_then_removed(e2e: E2E) -> None:
    """``modify --hotplug --net add / --disk add``: the guest sees each device appear.

    QEMU on the migration target has them at the same slots, and so has the
    QEMU of a soft reboot (from the runtime record); a hard reboot starts
    them from Ganeti's configuration.  The guest still sees them and goes
    on.  ``--net 1:remove`` / ``--disk 1:remove`` take them away again.
    """
    name = _need_instance(e2e)
    e2e.ensure_running(name, NODE1)
    before_ids = pci_ids(e2e, NODE1, name)
    before_guest = guest_devices(e2e, NODE1, name)
    assert "vdb" not in before_guest and "eth1" not in before_guest, before_guest
    e2e.gnt("gnt-instance", "modify", *_hotplug(e2e), "--net", "add", name,
            step="hotplug: nic add")
    e2e.gnt("gnt-instance", "modify", *_hotplug(e2e), "--disk", "add:size=1G", name,
            step="hotplug: disk add")
    added = pci_ids(e2e, NODE1, name)
    new = {dev: slot for dev, slot in added.items() if dev not in before_ids}
    assert len(new) == 2, (before_ids, added)
    wanted = sorted([*before_guest, "eth1", "vdb"])
    wait_for("the guest sees eth1 and vdb",
             lambda: guest_devices(e2e, NODE1, name) == wanted)

    counter = obs.guest_counter(e2e.cluster, NODE1, name)
    e2e.gnt("gnt-instance", "migrate", "-f", "-n", e2e.fqdn(NODE2), name,
            step="hotplug: migrate")
    e2e.check_running(name, NODE2)
    assert obs.guest_counter(e2e.cluster, NODE2, name) > counter
    assert pci_ids(e2e, NODE2, name) == added
    assert guest_devices(e2e, NODE2, name) == wanted
    for kind in ("soft", "hard"):
        before = obs.assert_runs_only_on(e2e.cluster, name, NODE2)
        e2e.gnt("gnt-instance", "reboot", f"--type={kind}",
                f"--shutdown-timeout={STOP_TIMEOUT}", name, step=f"hotplug: reboot {kind}")
        assert obs.assert_runs_only_on(e2e.cluster, name, NODE2).pid != before.pid
        e2e.check_running(name, NODE2)
        if kind == "soft":  # the same QEMU devices, from the runtime record
            assert pci_ids(e2e, NODE2, name) == added
        else:  # a new start from Ganeti's configuration, which has them too
            assert len(pci_ids(e2e, NODE2, name)) == len(added)
        wait_for(f"the guest sees eth1 and vdb after a {kind} reboot",
                 lambda: guest_devices(e2e, NODE2, name) == wanted)

    e2e.gnt("gnt-instance", "modify", *_hotplug(e2e), "--net", "1:remove", name,
            step="hotplug: nic remove")
    e2e.gnt("gnt-instance", "modify", *_hotplug(e2e), "--disk", "1:remove", name,
            step="hotplug: disk remove")
    # the ids of before (the hard reboot laid the slots out afresh)
    assert set(pci_ids(e2e, NODE2, name)) == set(before_ids)
    wait_for("the guest no longer sees eth1 and vdb",
             lambda: guest_devices(e2e, NODE2, name) == before_guest)
    obs.guest_counter(e2e.cluster, NODE2, name)


def test_grow_disk_reaches_the_running_guest(e2e: E2E) -> None:
    """``grow-disk`` on Ganeti 3.1 tells QEMU (ResizeDisk): the running guest sees the size."""
    if e2e.cluster.version == "3.0":
        pytest.skip("Ganeti 3.0's grow-disk does not tell the hypervisor (it has no ResizeDisk)")
    name = _need_instance(e2e)
    e2e.ensure_running(name, NODE1)
    node = e2e.primary(name)
    before = int(in_guest(e2e, node, name, "cat /sys/block/vda/size").strip()) * 512
    e2e.gnt("gnt-instance", "grow-disk", name, "0", "1G", step="grow-disk")
    grown = before + (1 << 30)
    drives = {b["device"]: b["inserted"]["image"]["virtual-size"]
              for b in qmp(e2e, node, name, "query-block") if "inserted" in b}
    assert grown in drives.values(), drives
    wait_for("the guest seeing the grown disk", lambda: int(
        in_guest(e2e, node, name, "cat /sys/block/vda/size").strip()) * 512 == grown)
    obs.guest_counter(e2e.cluster, node, name)


def status_becomes(e2e: E2E, name: str, wanted: str) -> None:
    wait_for(f"gnt-instance list showing {name} {wanted}",
             lambda: e2e.fields(name, "status")["status"] == wanted)


def test_user_shutdown_told_apart_from_admin_stop_and_crash(e2e: E2E) -> None:
    """``user_shutdown``: the guest's own poweroff is USER_down; an admin stop and a crash not.

    Ganeti's kvmd reads the instance's events; the instance starts again
    after each.
    """
    name = _need_instance(e2e)
    e2e.ensure_running(name, NODE1)
    e2e.gnt("gnt-cluster", "modify", "--user-shutdown=yes")
    e2e.gnt("gnt-instance", "modify", "-H", "user_shutdown=true", name)
    try:
        _restart(e2e, name, "user_shutdown on")
        reader = SerialReader(obs.ctrl_path(e2e.cluster, NODE1, name, "serial"))
        try:
            _wait_for_prompt(reader, GUEST_TIMEOUT)
            reader.send("poweroff -f\n")
            reader.read_until(r"Power down", GUEST_TIMEOUT)  # the kernel's last words
        finally:
            reader.close()
        obs.assert_runs_nowhere(e2e.cluster, name, timeout=GUEST_TIMEOUT)
        status_becomes(e2e, name, "USER_down")
        e2e.gnt("gnt-instance", "startup", name, step="start after USER_down")
        e2e.check_running(name, NODE1)

        e2e.gnt("gnt-instance", "shutdown", f"--timeout={STOP_TIMEOUT}", name)
        assert e2e.fields(name, "status")["status"] == "ADMIN_down"
        e2e.gnt("gnt-instance", "startup", name)
        qemu = e2e.check_running(name, NODE1)
        os.kill(qemu.pid, signal.SIGKILL)  # a crash: the test's own instance
        obs.assert_runs_nowhere(e2e.cluster, name)
        status_becomes(e2e, name, "ERROR_down")
        e2e.gnt("gnt-instance", "startup", name)
        e2e.check_running(name, NODE1)
    finally:
        e2e.gnt("gnt-instance", "modify", "-H", "user_shutdown=default", name)
        e2e.gnt("gnt-cluster", "modify", "--user-shutdown=no")


def test_vnc_on_an_address(e2e: E2E) -> None:
    """``-H vnc_bind_address=ADDRESS``: QEMU's VNC server answers there, on the instance's port."""
    name = _need_instance(e2e)
    e2e.ensure_running(name, NODE1)
    address = e2e.cluster.nodes[NODE1].address
    e2e.gnt("gnt-instance", "modify", "-H", f"vnc_bind_address={address}", name)
    _restart(e2e, name, "vnc on an address")
    port = e2e.fields(name, "network_port")["network_port"]
    vnc = qmp(e2e, NODE1, name, "query-vnc")
    assert (vnc["enabled"], vnc["host"], vnc["service"]) == (True, address, port), vnc
    probe = (f"import socket; s = socket.create_connection(({address!r}, {port}), 10); "
             "print(s.recv(12).decode())")
    assert e2e.cluster.run(NODE1, "python3", "-c", probe).stdout.strip() == "RFB 003.008"
    e2e.gnt("gnt-instance", "modify", "-H", "vnc_bind_address=default", name)


def test_spice_on_an_address(e2e: E2E) -> None:
    """``-H spice_bind=ADDRESS`` without a serial console: SPICE there, and the console says so."""
    name = _need_instance(e2e)
    e2e.ensure_running(name, NODE1)
    address = e2e.cluster.nodes[NODE1].address
    e2e.gnt("gnt-instance", "modify", "-H", f"spice_bind={address},serial_console=false", name)
    try:
        e2e.gnt("gnt-instance", "reboot", "--type=hard", f"--shutdown-timeout={STOP_TIMEOUT}",
                name, step="spice on an address")
        obs.assert_runs_only_on(e2e.cluster, name, NODE1)
        port = int(e2e.fields(name, "network_port")["network_port"])
        spice = qmp(e2e, NODE1, name, "query-spice")
        assert (spice["enabled"], spice["host"], int(spice["port"])) == (True, address, port)
        assert spice["auth"] == "none", spice
        probe = (f"import socket; socket.create_connection(({address!r}, {port}), 10); "
                 "print('connected')")
        assert e2e.cluster.run(NODE1, "python3", "-c", probe).stdout.strip() == "connected"
        shown = e2e.gnt("gnt-instance", "console", "--show-cmd", name)
        assert f"{address}:{port}" in shown and "SPICE" in shown.upper(), shown
    finally:
        e2e.gnt("gnt-instance", "modify", "-H", "spice_bind=default,serial_console=default",
                name)
        e2e.gnt("gnt-instance", "reboot", "--type=hard", f"--shutdown-timeout={STOP_TIMEOUT}",
                name)
    e2e.check_running(name, NODE1)


def test_console_show_cmd(e2e: E2E) -> None:
    """``console --show-cmd``: the command reaches the primary node's serial socket by ssh."""
    name = _need_instance(e2e)
    e2e.ensure_running(name, NODE1)
    shown = e2e.gnt("gnt-instance", "console", "--show-cmd", name, step="console --show-cmd")
    assert "ssh" in shown and e2e.fqdn(NODE1) in shown, shown
    assert f"{obs.KVM_RUN_DIR}/ctrl/{name}.serial" in shown, shown


def test_reinstall_and_rename(e2e: E2E) -> None:
    """reinstall, then rename: it starts under its new name, nothing of the old is left."""
    name = _need_instance(e2e)
    e2e.ensure_running(name, NODE1)
    e2e.gnt("gnt-instance", "shutdown", f"--timeout={STOP_TIMEOUT}", name)
    e2e.gnt("gnt-instance", "reinstall", "-f", name, step="reinstall")
    e2e.gnt("gnt-instance", "startup", name)
    e2e.check_running(name, NODE1)
    e2e.gnt("gnt-instance", "shutdown", f"--timeout={STOP_TIMEOUT}", name)
    e2e.gnt("gnt-instance", "rename", *_unchecked_rename(e2e), name, RENAMED, step="rename")
    e2e.added[e2e.added.index(name)] = RENAMED
    e2e.gnt("gnt-instance", "startup", RENAMED)
    e2e.check_running(RENAMED, NODE1)
    obs.assert_runs_nowhere(e2e.cluster, name)
    left = {node: obs.instance_files(e2e.cluster, node, name) for node in e2e.cluster.nodes}
    assert left == {node: [] for node in e2e.cluster.nodes}
    e2e.gnt("gnt-instance", "remove", "-f", f"--shutdown-timeout={STOP_TIMEOUT}", RENAMED,
            step="features: remove")
    e2e.added.remove(RENAMED)
    obs.assert_runs_nowhere(e2e.cluster, RENAMED)
