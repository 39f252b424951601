"""Hotplug of disks and NICs (Ganeti 3.x's HotAddDevice, HotDelDevice, HotModDevice).

The unit tests check the QMP arguments and sequences (against
:mod:`tests.fakeqmp` where QMP talks); the real-QEMU tests, on 7.2 and
10.0, hotplug into a paused guest-less instance (QEMU's view: ``query-pci``,
``query-block``, the TAP device), keep the devices across reboots, and
boot the tiny test guest under TCG where the guest must take part (a
removal needs the guest's OS to release the device) or be seen to go on
(a migration with hotplugged devices).
"""

from __future__ import annotations

import array
import itertools
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from ganeti_kvm import errors
from ganeti_kvm.core import hardware, hotplug, runtime
from ganeti_kvm.ganeti3 import KVMHypervisor, _ganeti, params
from ganeti_kvm.host import netdev
from ganeti_kvm.qemu import cmdline, devices
from ganeti_kvm.qmp.client import QmpClient
from tests.fakeqmp import Peer
from tests.guestimage import make_disk
from tests.helpers import SerialReader, free_port, g3_instance, live_migrate, node_hypervisors
from tests.netns import bridged_netns, ns_ip

WAIT_BOUND = 60.0
_tags = itertools.count()


# --- unit: arguments -------------------------------------------------------------------


def core_hvp(**overrides: Any) -> dict[str, Any]:
    return dict(params.to_core(params.fill({})), **overrides)


def test_a_hotplugged_disk_gets_the_modes_a_start_gives() -> None:
    disk = cmdline.BlockDevice(path="/dev/vg/d1", readonly=True)
    options = hotplug.blockdev_options("disk1", disk, "host_device", "none",
                                       core_hvp(disk_aio="native", disk_discard="unmap"))
    assert options == {
        "driver": "raw", "node-name": "disk1", "read-only": True, "discard": "unmap",
        "cache": {"direct": True, "no-flush": False},
        "file": {"driver": "host_device", "filename": "/dev/vg/d1", "read-only": True,
                 "discard": "unmap", "aio": "native",
                 "cache": {"direct": True, "no-flush": False}}}
    plain = hotplug.blockdev_options("disk2", cmdline.BlockDevice(path="/srv/d2"), "file",
                                     "default", core_hvp())
    assert "discard" not in plain and "aio" not in plain["file"]
    assert plain["cache"]["direct"] is False and plain["read-only"] is False
    ident = devices.DeviceId(backend="disk1", id="disk1-dev", bus="pci.0", addr="0xd")
    device = hotplug.disk_device_options(ident, "virtio-blk-pci", "writethrough")
    assert device == {"driver": "virtio-blk-pci", "id": "disk1-dev", "drive": "disk1",
                      "bus": "pci.0", "addr": "0xd", "write-cache": "off"}
    assert "write-cache" not in hotplug.disk_device_options(ident, "virtio-blk-pci", "none")


def test_a_shared_disk_is_never_cached() -> None:
    disk = cmdline.BlockDevice(path="/dev/drbd1", shared=True)
    hvp = core_hvp(disk_cache="writeback")
    assert hotplug._cache_mode(hvp, disk, "x") == "none"


def test_the_nic_options() -> None:
    assert hotplug.netdev_options("net1", ["net1-fd0"], []) == {
        "type": "tap", "id": "net1", "fd": "net1-fd0"}
    assert hotplug.netdev_options("net1", ["a", "b"], ["v", "w"]) == {
        "type": "tap", "id": "net1", "fds": "a:b", "vhost": True, "vhostfds": "v:w"}
    ident = devices.DeviceId(backend="net1", id="nic1", bus="pci.0", addr="0xe", romfile="")
    assert hotplug.nic_device_options(ident, "virtio-net-pci", "aa:00:00:00:00:01", 2) == {
        "driver": "virtio-net-pci", "id": "nic1", "netdev": "net1", "mac": "aa:00:00:00:00:01",
        "bus": "pci.0", "addr": "0xe", "romfile": "", "mq": True, "vectors": 6}


def record_with(nics: int = 1, disks: int = 1, **hvp: Any) -> runtime.RuntimeRecord:

    record = runtime.RuntimeRecord(
        name="x", argv=["kvm"], hvparams=core_hvp(**hvp),
        nics=[{"mac": f"aa:00:00:00:00:0{i}", "uuid": f"n{i}"} for i in range(nics)],
        disks=[{"path": f"/dev/vg/d{i}", "uuid": f"d{i}"} for i in range(disks)])
    hardware.assign_devices(record)
    return record


def test_a_new_device_takes_a_free_slot_and_name() -> None:
    record = record_with()  # disk0 on 0xc, net0 on 0xd, the balloon on 0x1f
    ident = hotplug.new_identity(record, hotplug.DISK, {0, 1, 2, 14}, {"disk1"})
    assert (ident.backend, ident.id, ident.bus, ident.addr) == ("disk2", "disk2-dev",
                                                                "pci.0", "0xf")
    nic = hotplug.new_identity(record, hotplug.NIC, set(), set())
    assert (nic.backend, nic.id, nic.addr, nic.romfile) == ("net1", "nic1", "0xe", "")
    # never below kvm_pci_reservations, never on the balloon's slot
    reserved = record_with(kvm_pci_reservations=20)
    assert reserved.balloon is not None
    held = {int(reserved.balloon["addr"], 16)} | set(range(20, 31))
    with pytest.raises(errors.HypervisorError, match="more NICs and disks"):
        hotplug.new_identity(reserved, hotplug.NIC, held, set())


def test_only_hotpluggable_device_types_pass() -> None:
    hvp = core_hvp()
    assert hotplug.device_type_problem(hvp, "disk", "add") is None
    assert hotplug.device_type_problem(hvp, "nic", "modify") is None
    ide = hotplug.device_type_problem(core_hvp(disk_type="ide"), "disk", "add")
    assert ide is not None and "disk_type is ide" in ide
    isa = hotplug.device_type_problem(core_hvp(nic_type="ne2k_isa"), "nic", "add")
    assert isa is not None and "nic_type is ne2k_isa" in isa
    assert "only add, remove" in str(hotplug.device_type_problem(hvp, "disk", "modify"))
    assert "device kind" in str(hotplug.device_type_problem(hvp, "cpu", "add"))


def test_a_device_is_found_by_uuid_else_by_index() -> None:
    entries = [{"uuid": "a"}, {"uuid": "b"}, {}]
    assert hotplug.find_entry(entries, "b", 0, "disk", "x") == 1
    assert hotplug.find_entry(entries, None, 2, "disk", "x") == 2
    assert hotplug.find_entry(entries, "z", 2, "disk", "x") == 2  # an entry without uuid
    with pytest.raises(errors.HotplugError, match="Cannot find disk z of instance x"):
        hotplug.find_entry(entries, "z", 0, "disk", "x")  # index 0 is another's
    with pytest.raises(errors.HotplugError, match="restart the instance"):
        hotplug.find_entry(entries, None, 3, "disk", "x")


def test_a_fresh_start_drops_what_was_being_unplugged() -> None:
    record = record_with(nics=2, disks=2)
    record.nics[1][hotplug.UNPLUG_KEY] = True
    record.disks[0][hotplug.UNPLUG_KEY] = True
    hotplug.drop_unplugged(record)
    assert [n["uuid"] for n in record.nics] == ["n0"]
    assert [d["uuid"] for d in record.disks] == ["d1"]


def test_the_disk_uuid_is_kept_in_the_record() -> None:
    disk = cmdline.BlockDevice(path="/dev/vg/d0", uuid="u-1")
    assert cmdline.BlockDevice.from_dict(disk.to_dict()) == disk
    assert "uuid" not in cmdline.BlockDevice(path="/dev/vg/d0").to_dict()


# --- unit: QMP sequences (fake QMP) ------------------------------------------------------


def test_pass_fd_sends_the_descriptor_with_getfd(fake: Any, short_dir: str) -> None:
    received: list[int] = []

    def script(peer: Peer) -> None:
        peer.handshake()
        data, ancillary, _, _ = peer.conn.recvmsg(4096, socket.CMSG_SPACE(4))
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                received.extend(array.array("i", payload[:4]))
        peer.buffer = data
        request = peer.recv()
        assert request["execute"] == "getfd"
        assert request["arguments"] == {"fdname": "net1-fd0"}
        peer.reply(request, {})

    server = fake(script)
    path = os.path.join(short_dir, "file")
    with open(path, "w", encoding="ascii") as handle:
        with QmpClient(server.path, timeout=5) as client:
            client.pass_fd("net1-fd0", handle.fileno())
        server.stop()
        assert len(received) == 1
        assert os.fstat(received[0]).st_ino == os.fstat(handle.fileno()).st_ino
        os.close(received[0])


def unplug_script(events: list[dict[str, Any]]) -> Any:
    """Answer qom-list (the device is there) and device_del, then send ``events``."""
    def script(peer: Peer) -> None:
        peer.handshake()
        request = peer.recv()
        assert request["execute"] == "qom-list"
        peer.reply(request, [{"name": "nic1", "type": "child<virtio-net-pci>"}])
        request = peer.recv()
        assert request == {"execute": "device_del", "arguments": {"id": "nic1"},
                           "id": request["id"]}
        peer.reply(request, {})
        for event in events:
            peer.send(event)
        request = peer.recv()  # the timeout path asks whether it went after all
        assert request["execute"] == "qom-list"
        peer.reply(request, [{"name": "nic1", "type": "child<virtio-net-pci>"}])
    return script


def test_unplug_waits_for_the_devices_own_deleted_event(fake: Any, short_dir: str) -> None:
    backend_gone = {"event": "DEVICE_DELETED", "data": {"path": "/machine/peripheral/nic1/"
                                                         "virtio-backend"}}
    gone = {"event": "DEVICE_DELETED", "data": {"device": "nic1",
                                                "path": "/machine/peripheral/nic1"}}
    server = fake(unplug_script([backend_gone, gone]))
    record = record_with()
    ident = devices.DeviceId(backend="net1", id="nic1")
    runtime_file = os.path.join(short_dir, "record")
    with QmpClient(server.path, timeout=5) as client:
        hotplug._unplug(client, record, record.nics[0], ident, runtime_file, "x", "remove",
                        5.0)
    assert hotplug.UNPLUG_KEY not in record.nics[0]
    assert not os.path.exists(runtime_file)


def test_a_guest_that_keeps_the_device_gets_a_clear_error(fake: Any, short_dir: str) -> None:
    server = fake(unplug_script([]))
    record = record_with()
    ident = devices.DeviceId(backend="net1", id="nic1")
    runtime_file = os.path.join(short_dir, "record")
    with QmpClient(server.path, timeout=5) as client, \
            pytest.raises(errors.HotplugError, match=r"instance x: the guest did not release "
                          r"device nic1 within 0.2 s.*retry the removal later.*or reboot"):
        hotplug._unplug(client, record, record.nics[0], ident, runtime_file, "x",
                        "hot-remove NIC n0", 0.2)
    saved = runtime.load(runtime_file, "x")
    assert saved is not None and saved.nics[0][hotplug.UNPLUG_KEY] is True


# --- real QEMU ---------------------------------------------------------------------------


@pytest.fixture
def ns() -> Iterator[str]:
    with bridged_netns("gk-hp") as name:
        ns_ip(name, "link", "add", "br1", "type", "bridge")
        ns_ip(name, "link", "set", "br1", "up")
        yield name


@pytest.fixture
def g3n(short_dir: str, ns: str) -> Iterator[KVMHypervisor]:
    with node_hypervisors(KVMHypervisor, short_dir, "run", netns=ns) as (hypervisor,):
        yield hypervisor


@pytest.fixture
def g3n_pair(short_dir: str, ns: str) -> Iterator[tuple[KVMHypervisor, KVMHypervisor]]:
    with node_hypervisors(KVMHypervisor, short_dir, "a", "b", netns=ns) as pair:
        yield pair


def guestless(qemu_bin: str, **overrides: Any) -> dict[str, Any]:
    return dict(params.DEFAULTS, kvm_path=qemu_bin, kernel_path="", kvm_flag="disabled",
                serial_console=False, **overrides)


def booting(qemu_bin: str, guest: Any, **overrides: Any) -> dict[str, Any]:
    return dict(params.DEFAULTS, kvm_path=qemu_bin, kernel_path=guest.kernel,
                initrd_path=guest.initrd, root_path="/dev/vda1",
                kernel_args="panic=-1 quiet", kvm_flag="disabled", serial_console=True,
                **overrides)


def nic_object(number: int, link: str = "br0") -> dict[str, Any]:
    return {"mac": f"52:54:00:12:36:{number:02x}", "ip": None, "uuid": f"nic-uuid-{number}",
            "nicparams": {"mode": "bridged", "link": link}}


def disk_object(number: int) -> dict[str, Any]:
    return {"uuid": f"disk-uuid-{number}", "mode": "rw", "dev_type": "plain"}


def pci(g3: KVMHypervisor, name: str) -> dict[int, str]:
    """Slot -> qdev id of every device on bus 0, as QEMU has them."""
    (bus,) = g3.node.qmp(name, "query-pci")
    return {int(d["slot"]): d.get("qdev_id", "") for d in bus["devices"]}


def peripherals(g3: KVMHypervisor, name: str) -> set[str]:
    """The ids of the devices QEMU has."""
    return {p["name"] for p in g3.node.qmp(name, "qom-list", {"path": "/machine/peripheral"})}


def block_files(g3: KVMHypervisor, name: str) -> list[str]:
    """The files of the disks QEMU has (query-block: -drive and blockdev-add ones)."""
    answer = g3.node.qmp(name, "query-block")
    files = [b["inserted"]["file"] for b in answer if "inserted" in b]
    nodes = g3.node.qmp(name, "query-named-block-nodes")
    return sorted(set(files) | {n["file"] for n in nodes if n.get("drv") == "raw"})


def entry_slot(entry: dict[str, Any]) -> int:
    return int(entry[devices.DEVICE_KEY]["addr"], 16)


def taps_of(g3: KVMHypervisor, name: str) -> list[str]:
    record = g3.node.load_record(name)
    assert record is not None
    return [n["tap"] for n in record.nics]


def master_of(ns: str, tap: str) -> str:
    link = ns_ip(ns, "-o", "link", "show", "dev", tap).stdout
    return link.split(" master ", 1)[1].split()[0] if " master " in link else ""


def tun_devices(ns: str) -> list[str]:
    """The TAP devices in namespace ``ns``."""
    lines = ns_ip(ns, "-o", "link", "show", "type", "tun").stdout.splitlines()
    return sorted(line.split(":")[1].strip().split("@")[0] for line in lines if line.strip())


def wait_taps(ns: str, wanted: list[str]) -> None:
    """Wait until the namespace's TAP devices are ``wanted`` (a closed one goes soon)."""
    deadline = time.monotonic() + 10
    while tun_devices(ns) != sorted(wanted):
        assert time.monotonic() < deadline, f"TAP devices {tun_devices(ns)}, not {wanted}"
        time.sleep(0.05)


def check_devices(g3: KVMHypervisor, name: str, ns: str, disk_path: str) -> None:
    """The record's hotplugged disk and NIC are in QEMU, on their recorded slots."""
    record = g3.node.load_record(name)
    assert record is not None
    slots = pci(g3, name)
    (disk,) = [d for d in record.disks if d["path"] == disk_path]
    (nic,) = [n for n in record.nics if n["uuid"] == "nic-uuid-1"]
    assert slots[entry_slot(disk)] == disk[devices.DEVICE_KEY]["id"]
    assert slots[entry_slot(nic)] == nic[devices.DEVICE_KEY]["id"]
    assert disk_path in block_files(g3, name)
    assert master_of(ns, nic["tap"]) == "br0"


def test_hotplugged_devices_stay_across_reboots(g3n: KVMHypervisor, qemu_bin: str, ns: str,
                                                short_dir: str) -> None:
    g3 = g3n
    first = make_disk(os.path.join(short_dir, "d0.img"), "first")
    added = make_disk(os.path.join(short_dir, "d1.img"), "added")
    inst = dict(g3_instance("hp1", guestless(qemu_bin)), nics=[nic_object(0)])
    g3.StartInstance(inst, [(disk_object(0), first, None)], True)
    before = pci(g3, "hp1")
    g3.HotplugSupported(inst)
    g3.VerifyHotplugSupport(inst, "hotadd", "disk")
    g3.VerifyHotplugSupport(inst, "hotadd", "nic")
    assert g3.HotAddDevice(inst, "disk", disk_object(1), [added, None], 1) is None
    g3.HotAddDevice(inst, "nic", nic_object(1), None, 1)
    record = g3.node.load_record("hp1")
    assert record is not None
    assert [d["uuid"] for d in record.disks] == ["disk-uuid-0", "disk-uuid-1"]
    assert [n["uuid"] for n in record.nics] == ["nic-uuid-0", "nic-uuid-1"]
    new_slots = {entry_slot(record.disks[1]), entry_slot(record.nics[1])}
    assert not new_slots & set(before)  # free slots: not the NIC's, disk's, balloon's
    assert min(new_slots) >= devices.FIRST_FREE_SLOT
    check_devices(g3, "hp1", ns, added)

    g3.RebootInstance(inst)  # stop, then start from the record
    check_devices(g3, "hp1", ns, added)
    with pytest.raises(_ganeti.HotplugError, match="Cannot find nic nic-uuid-3 of instance hp1"):
        g3.HotDelDevice(inst, "nic", nic_object(3), None, 5)
    saved = g3.node.load_record("hp1")
    assert saved is not None
    g3.node.stop("hp1", acpi=False, force=True)  # a stop and a start from the record
    with g3.node.locked("hp1", "start"):
        g3.node.start_from_record(saved, paused=True)
    check_devices(g3, "hp1", ns, added)

    # This guest-less QEMU never releases a device: a clear error, the device kept
    (tap,) = [n["tap"] for n in (g3.node.load_record("hp1") or record).nics
              if n["uuid"] == "nic-uuid-1"]
    with pytest.raises(errors.HotplugError, match="hp1.*did not release device nic.*reboot"):
        hotplug.remove_nic(g3.node, "hp1", "nic-uuid-1", 1, timeout=0.5)
    marked = g3.node.load_record("hp1")
    assert marked is not None and marked.nics[1][hotplug.UNPLUG_KEY] is True
    assert netdev.tap_exists(tap, netns=ns)
    assert len(tun_devices(ns)) == 2
    g3.RebootInstance(inst)  # a fresh QEMU starts without it
    wait_taps(ns, taps_of(g3, "hp1"))
    rebooted = g3.node.load_record("hp1")
    assert rebooted is not None and [n["uuid"] for n in rebooted.nics] == ["nic-uuid-0"]
    assert entry_slot(marked.nics[1]) not in pci(g3, "hp1")
    check_slot = entry_slot(rebooted.disks[1])
    assert pci(g3, "hp1")[check_slot] == rebooted.disks[1][devices.DEVICE_KEY]["id"]


def test_refusals_name_the_instance_and_what_to_do(g3: KVMHypervisor, qemu_bin: str,
                                                   short_dir: str) -> None:
    inst = g3_instance("hp2", guestless(qemu_bin, disk_type="ide", nic_type="ne2k_isa"))
    with pytest.raises(_ganeti.HotplugError, match="hp2: it is not running"):
        g3.HotplugSupported(inst)
    g3.StartInstance(inst, [], True)
    g3.HotplugSupported(inst)
    with pytest.raises(_ganeti.HotplugError, match="hp2.*disk_type is ide.*restart"):
        g3.VerifyHotplugSupport(inst, "hotadd", "disk")
    with pytest.raises(_ganeti.HotplugError, match="hp2.*nic_type is ne2k_isa"):
        g3.VerifyHotplugSupport(inst, "hotadd", "nic")
    with pytest.raises(_ganeti.HotplugError, match="hp2.*disk_type is ide"):
        g3.HotAddDevice(inst, "disk", disk_object(1),
                        [make_disk(os.path.join(short_dir, "d.img"), "x"), None], 0)
    with pytest.raises(_ganeti.HotplugError, match="hp2.*restart"):
        g3.HotModDevice(inst, "disk", disk_object(1), None, 0)
    with pytest.raises(_ganeti.HotplugError, match="unknown action 'hotswap'"):
        g3.VerifyHotplugSupport(inst, "hotswap", "disk")
    with pytest.raises(_ganeti.HotplugError, match="remove NIC nic-uuid-3 of instance hp2.*"
                       "ne2k_isa"):
        g3.HotDelDevice(inst, "nic", nic_object(3), None, 0)


def test_a_grown_disk_is_told_to_qemu(g3: KVMHypervisor, qemu_bin: str,
                                      short_dir: str) -> None:
    """ResizeDisk (Ganeti 3.1's grow-disk): a -drive disk and a hotplugged one take their
    grown size in QEMU; a smaller size and an unknown disk are refused."""
    first = make_disk(os.path.join(short_dir, "d0.img"), "first")
    added = make_disk(os.path.join(short_dir, "d1.img"), "added")
    inst = g3_instance("hpr", guestless(qemu_bin))
    g3.StartInstance(inst, [(disk_object(0), first, None)], True)
    g3.HotAddDevice(inst, "disk", disk_object(1), [added, None], 1)

    def sizes() -> dict[str, int]:
        found = {b["inserted"]["file"]: b["inserted"]["image"]["virtual-size"]
                 for b in g3.node.qmp("hpr", "query-block") if "inserted" in b}
        found.update({n["file"]: n["image"]["virtual-size"]
                      for n in g3.node.qmp("hpr", "query-named-block-nodes")
                      if n.get("drv") == "raw"})
        return found

    mib = 1 << 20
    assert sizes() == {first: 4 * mib, added: 4 * mib}
    for path in (first, added):
        os.truncate(path, 12 * mib)  # Ganeti grows the storage first
    g3.ResizeDisk(inst, {"uuid": "disk-uuid-0", "iv_name": "disk/0"}, 12 * mib)
    g3.ResizeDisk(inst, {"uuid": None, "iv_name": "disk/1"}, 12 * mib)  # by its index
    assert sizes() == {first: 12 * mib, added: 12 * mib}
    with pytest.raises(_ganeti.HotplugError, match="hpr.*less than.*only grows"):
        g3.ResizeDisk(inst, disk_object(0), 8 * mib)
    with pytest.raises(_ganeti.HotplugError, match="Cannot find disk disk-uuid-7 of instance"):
        g3.ResizeDisk(inst, disk_object(7), 16 * mib)
    assert os.path.getsize(first) == 12 * mib  # nothing was cut


def test_a_failed_add_leaves_nothing_behind(g3n: KVMHypervisor, qemu_bin: str, ns: str,
                                            short_dir: str) -> None:
    g3 = g3n
    inst = g3_instance("hp3", guestless(qemu_bin))
    g3.StartInstance(inst, [], True)
    before = pci(g3, "hp3")
    lost = dict(nic_object(1), nicparams={"mode": "bridged", "link": "nosuch"})
    with pytest.raises(_ganeti.HotplugError, match="hp3.*bridge 'nosuch' does not exist"):
        g3.HotAddDevice(inst, "nic", lost, None, 0)
    with pytest.raises(_ganeti.HotplugError, match="hp3.*/nonexistent.img cannot be read"):
        g3.HotAddDevice(inst, "disk", disk_object(1), ["/nonexistent.img", None], 0)
    record = g3.node.load_record("hp3")
    assert record is not None and record.nics == [] and record.disks == []
    assert pci(g3, "hp3") == before
    wait_taps(ns, [])  # the netdev was deleted and QEMU closed the TAP
    g3.HotAddDevice(inst, "nic", nic_object(1), None, 0)  # its names are free again
    assert pci(g3, "hp3")[entry_slot((g3.node.load_record("hp3") or record).nics[0])] == "nic0"


def test_a_multiqueue_nic_is_hotplugged_with_its_queues(g3n: KVMHypervisor, qemu_bin: str,
                                                         ns: str) -> None:
    inst = g3_instance("hp4", guestless(qemu_bin, virtio_net_queues=2))
    g3n.StartInstance(inst, [], True)
    g3n.HotAddDevice(inst, "nic", nic_object(1), None, 0)
    (tap,) = taps_of(g3n, "hp4")
    assert "multi_queue" in ns_ip(ns, "-d", "-o", "link", "show", "dev", tap).stdout
    queues = g3n.node.qmp("hp4", "qom-get", {"path": "/machine/peripheral/nic0",
                                             "property": "mq"})
    assert queues is True


def test_vhost_needs_its_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hotplug, "VHOST_NET", "/nonexistent/vhost-net")
    with pytest.raises(errors.HotplugError, match="instance x: cannot open /nonexistent/"
                       "vhost-net.*load the vhost_net module, or set vhost_net off"):
        hotplug._open_vhost("x", "hotplug a NIC")


# --- the guest's view --------------------------------------------------------------------


def shell(serial: SerialReader, command: str, timeout: float = 30) -> str:
    """The output of ``command`` on the guest's serial shell (one line)."""
    tag = f"T{next(_tags)}"
    serial.send(f"echo \"{tag}$((1))<$({command})>\"\n")
    return serial.read_until(rf"{tag}1<([^>\n]*)>", timeout=timeout).group(1).strip()


def wait_shell(serial: SerialReader, command: str, wanted: str) -> str:
    deadline = time.monotonic() + WAIT_BOUND
    while True:
        seen = shell(serial, command)
        if seen == wanted or time.monotonic() > deadline:
            return seen
        time.sleep(0.5)


def test_the_guest_sees_devices_come_and_go(g3n: KVMHypervisor, qemu_bin: str, guest: Any,
                                            ns: str, short_dir: str) -> None:
    g3 = g3n
    added = make_disk(os.path.join(short_dir, "d1.img"), "hotdisk")
    inst = g3_instance("hpg", booting(qemu_bin, guest), maxmem=128)
    g3.StartInstance(inst, [], False)
    serial = SerialReader(g3.node.paths("hpg").serial_socket)
    try:
        serial.read_until("READY", timeout=120)
        assert shell(serial, "ls /dev/vd* 2>/dev/null") == ""
        nets = "ls /sys/class/net | grep -v lo | tr '\\n' ' '"
        assert shell(serial, nets) == ""
        g3.HotAddDevice(inst, "disk", disk_object(0), [added, None], 0)
        assert wait_shell(serial, "ls /dev/vd*", "/dev/vda") == "/dev/vda"
        assert shell(serial, "head -c 15 /dev/vda") == "MARKER=hotdisk"
        g3.HotAddDevice(inst, "nic", nic_object(1), None, 0)
        assert wait_shell(serial, nets, "eth0") == "eth0"
        assert shell(serial, "cat /sys/class/net/eth0/address") == nic_object(1)["mac"]
        (tap,) = taps_of(g3, "hpg")
        assert master_of(ns, tap) == "br0"
        assert tun_devices(ns) == [tap]

        # a changed link: the NIC goes and comes back on its slot, on the new bridge
        moved = dict(nic_object(1), nicparams={"mode": "bridged", "link": "br1"})
        slot = entry_slot((g3.node.load_record("hpg") or runtime.RuntimeRecord("", [])).nics[0])
        g3.HotModDevice(inst, "nic", moved, None, 0)
        (new_tap,) = taps_of(g3, "hpg")
        assert master_of(ns, new_tap) == "br1"
        wait_taps(ns, [new_tap])  # the old TAP went with its netdev
        assert pci(g3, "hpg")[slot] == "nic0"
        assert wait_shell(serial, nets, "eth0") == "eth0"

        g3.HotDelDevice(inst, "nic", moved, None, 0)
        assert shell(serial, nets) == ""
        wait_taps(ns, [])

        # A guest that is slow to release: the removal fails and keeps the disk,
        # marked; once the guest let go, settle (before a migration) finishes it.
        g3.node.qmp("hpg", "stop")
        with pytest.raises(errors.HotplugError, match="hpg.*did not release device disk0-dev"):
            hotplug.remove_disk(g3.node, "hpg", "disk-uuid-0", 0, timeout=0.5)
        marked = g3.node.load_record("hpg")
        assert marked is not None and marked.disks[0][hotplug.UNPLUG_KEY] is True
        g3.node.qmp("hpg", "cont")
        assert wait_shell(serial, "ls /dev/vd* 2>/dev/null", "") == ""
        deadline = time.monotonic() + WAIT_BOUND
        while "disk0-dev" in peripherals(g3, "hpg"):  # QEMU deletes it once ejected
            assert time.monotonic() < deadline, "the guest never ejected disk0-dev"
            time.sleep(0.05)
        hotplug.settle(g3.node, "hpg")
        record = g3.node.load_record("hpg")
        assert record is not None and record.nics == [] and record.disks == []
        assert block_files(g3, "hpg") == []
        assert set(pci(g3, "hpg").values()) <= {"", "balloon0"}
    finally:
        serial.close()


def test_hotplugged_devices_migrate(g3n_pair: tuple[KVMHypervisor, KVMHypervisor],
                                    qemu_bin: str, guest: Any, ns: str,
                                    short_dir: str) -> None:
    source, target = g3n_pair
    added = make_disk(os.path.join(short_dir, "d1.img"), "moved")
    inst = g3_instance("hpm", booting(qemu_bin, guest, migration_port=free_port()),
                       maxmem=128)
    source.StartInstance(inst, [], False)
    serial = SerialReader(source.node.paths("hpm").serial_socket)
    try:
        serial.read_until("READY", timeout=120)
        source.HotAddDevice(inst, "disk", disk_object(0), [added, None], 0)
        source.HotAddDevice(inst, "nic", nic_object(1), None, 0)
        assert wait_shell(serial, "ls /dev/vd*", "/dev/vda") == "/dev/vda"
        slots = pci(source, "hpm")
        counter = serial.counters()[-1]
    finally:
        serial.close()
    live_migrate(source, target, inst)
    assert target.ListInstances() == ["hpm"]
    assert pci(target, "hpm") == slots
    assert added in block_files(target, "hpm")
    (tap,) = taps_of(target, "hpm")
    assert master_of(ns, tap) == "br0"
    reader = SerialReader(target.node.paths("hpm").serial_socket)
    try:
        reader.read_until(r"COUNTER \d+\s+COUNTER \d+", timeout=60)
        assert reader.counters()[0] >= counter  # it went on, no new boot
        assert guest.first_line not in reader.text
        assert shell(reader, "head -c 13 /dev/vda") == "MARKER=moved"
        # the target can remove what the source added
        target.HotDelDevice(inst, "disk", disk_object(0), None, 0)
        assert shell(reader, "ls /dev/vd* 2>/dev/null") == ""
    finally:
        reader.close()
