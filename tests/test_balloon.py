"""Ballooning through virtio-balloon: BalloonInstanceMemory (Ganeti 3.x) on QEMU 7.2 and 10.0.

The guest test boots the tiny Linux guest under TCG with the virtio_balloon
module added (:mod:`tests.balloonguest`) and reads ``MemTotal`` on its
serial shell while the instance is ballooned down and back, as
``gnt-instance modify -m`` does on a running instance.  The guest-less
tests cover the listing, the refusals and the records of earlier versions.
"""

from __future__ import annotations

import itertools
import os
import time
from typing import Any

import pytest

from ganeti_kvm import errors
from ganeti_kvm.core import hardware, runtime
from ganeti_kvm.core import node as core_node
from ganeti_kvm.ganeti3 import KVMHypervisor, _ganeti, params
from tests import balloonguest
from tests.helpers import SerialReader, free_port, g3_instance, kill_instances, live_migrate

MIB = 1024 * 1024
WAIT_BOUND = 90.0  # seconds the guest has at most to give back or take the memory
_tags = itertools.count()


def instance(name: str, hvparams: dict[str, Any], maxmem: int) -> dict[str, Any]:
    return g3_instance(name, hvparams, maxmem=maxmem, minmem=maxmem // 2)


def guestless(qemu_bin: str) -> dict[str, Any]:
    return dict(params.DEFAULTS, kvm_path=qemu_bin, kernel_path="", kvm_flag="disabled",
                serial_console=False)


def memory_of(g3: KVMHypervisor, name: str) -> int:
    info = g3.GetInstanceInfo(name)
    assert info is not None
    (listed,) = [i for i in g3.GetAllInstancesInfo() if i[0] == name]
    assert listed[2] == info[2]  # the listing and the single call agree
    return int(info[2])


# --- guest-less ----------------------------------------------------------------------


def test_balloon_sets_qemus_target_and_the_listing(g3: KVMHypervisor, qemu_bin: str) -> None:
    inst = instance("bl1", guestless(qemu_bin), 128)
    g3.StartInstance(inst, [], True)
    assert memory_of(g3, "bl1") == 128
    g3.BalloonInstanceMemory(inst, 96)
    # QEMU holds the target (a guest without a driver never reaches it)
    assert g3.node.qmp("bl1", "query-balloon") == {"actual": 128 * MIB}
    assert memory_of(g3, "bl1") == 96
    g3.BalloonInstanceMemory(inst, 128)
    assert memory_of(g3, "bl1") == 128
    record = g3.node.load_record("bl1")
    assert record is not None and record.balloon_memory is None


def test_a_restart_starts_with_all_memory(g3: KVMHypervisor, qemu_bin: str) -> None:
    inst = instance("bl2", guestless(qemu_bin), 128)
    g3.StartInstance(inst, [], True)
    g3.BalloonInstanceMemory(inst, 64)
    assert memory_of(g3, "bl2") == 64
    g3.RebootInstance(inst)  # a new QEMU from the record
    assert memory_of(g3, "bl2") == 128


def test_refusals_name_the_instance(g3: KVMHypervisor, qemu_bin: str) -> None:
    inst = instance("bl3", guestless(qemu_bin), 64)
    with pytest.raises(_ganeti.HypervisorError, match="bl3.*not running"):
        g3.BalloonInstanceMemory(inst, 32)
    g3.StartInstance(inst, [], True)
    with pytest.raises(_ganeti.HypervisorError, match="bl3 to 65 MiB.*64 MiB"):
        g3.BalloonInstanceMemory(inst, 65)
    for bad in (0, -1, True, "32"):
        with pytest.raises(_ganeti.HypervisorError, match="bl3"):
            g3.BalloonInstanceMemory(inst, bad)
    assert memory_of(g3, "bl3") == 64


def test_an_instance_started_without_a_balloon(
        short_dir: str, qemu_bin: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Started by the previous version (no balloon): refused, migrates as it is, and gets a
    balloon at its next fresh start."""
    source = KVMHypervisor(run_dir=os.path.join(short_dir, "a"))
    target = KVMHypervisor(run_dir=os.path.join(short_dir, "b"))
    try:
        inst = instance("bl4", dict(guestless(qemu_bin), migration_port=free_port()), 64)
        with monkeypatch.context() as patch:
            patch.setattr(hardware, "assign_balloon", lambda *args: None)
            source.StartInstance(inst, [], False)
        record = source.node.load_record("bl4")
        assert record is not None and record.balloon is None
        with pytest.raises(errors.QmpCommandError):
            source.node.qmp("bl4", "query-balloon")  # QEMU: no balloon device
        with pytest.raises(_ganeti.HypervisorError, match="bl4.*without a balloon device"):
            source.BalloonInstanceMemory(inst, 32)
        assert memory_of(source, "bl4") == 64
        migrate(source, target, inst)
        moved = target.node.load_record("bl4")
        assert moved is not None and moved.balloon is None  # the target matched the source
        # A fresh QEMU (a guest-less one ignores the ACPI button: no need to wait)
        target.node.reboot("bl4", acpi_timeout=0.1)
        rebooted = target.node.load_record("bl4")
        assert rebooted is not None and rebooted.balloon is not None
        target.BalloonInstanceMemory(inst, 32)
        assert memory_of(target, "bl4") == 32
    finally:
        kill_instances(source.node.layout.root)
        kill_instances(target.node.layout.root)


def balloon_slot(g3: KVMHypervisor, name: str) -> int:
    (bus,) = g3.node.qmp(name, "query-pci")
    (slot,) = [d["slot"] for d in bus["devices"] if d.get("qdev_id") == "balloon0"]
    return int(slot)


def migrate(source: KVMHypervisor, target: KVMHypervisor, inst: dict[str, Any]) -> None:
    live_migrate(source, target, inst)
    assert source.ListInstances() == [] and target.ListInstances() == [inst["name"]]


def test_the_balloon_and_its_setting_migrate(short_dir: str, qemu_bin: str) -> None:
    source = KVMHypervisor(run_dir=os.path.join(short_dir, "a"))
    target = KVMHypervisor(run_dir=os.path.join(short_dir, "b"))
    try:
        inst = instance("blm", dict(guestless(qemu_bin), migration_port=free_port()), 128)
        source.StartInstance(inst, [], False)
        source.BalloonInstanceMemory(inst, 96)
        slot = balloon_slot(source, "blm")
        migrate(source, target, inst)
        assert balloon_slot(target, "blm") == slot
        assert memory_of(target, "blm") == 96
        target.BalloonInstanceMemory(inst, 128)
        assert memory_of(target, "blm") == 128
    finally:
        kill_instances(source.node.layout.root)
        kill_instances(target.node.layout.root)


def test_the_balloon_comes_after_the_nics_and_disks() -> None:
    def new_record(disks: int) -> runtime.RuntimeRecord:
        return runtime.RuntimeRecord(
            name="x", argv=["kvm"], hvparams=params.to_core({}),
            disks=[{"path": f"/dev/vg/d{i}"} for i in range(disks)],
            nics=[{"mac": "aa:00:00:00:00:01"}])
    record = new_record(2)
    hardware.assign_devices(record)
    assert [d["device"]["addr"] for d in record.disks] == ["0xc", "0xd"]  # as before
    assert record.nics[0]["device"]["addr"] == "0xe"
    assert record.balloon is not None and record.balloon["addr"] == "0x1f"
    full = new_record(19)  # 20 PCI devices fill slots 12-31: they keep them, no balloon
    hardware.assign_devices(full)
    assert full.nics[0]["device"]["addr"] == "0x1f" and full.balloon is None


def test_the_balloon_slot_avoids_held_slots() -> None:
    record = runtime.RuntimeRecord(name="x", argv=["kvm"])
    held = core_node.devices.DeviceId(backend="disk0", bus="pci.0", addr="0x1f")
    hardware.assign_balloon(record, [held, None])
    assert record.balloon is not None and record.balloon["addr"] == "0x1e"
    assert record.balloon["id"] == "balloon0"


# --- the guest sees it ------------------------------------------------------------------


def mem_total(serial: SerialReader) -> int:
    """The guest's MemTotal (KiB), read on its serial shell."""
    tag = f"MT{next(_tags)}"
    serial.send(f"echo {tag}=$(sed -n 's/^MemTotal: *\\([0-9]*\\).*/\\1/p' /proc/meminfo)\n")
    return int(serial.read_until(rf"{tag}=(\d+)\n", timeout=30).group(1))


def wait_mem_total(serial: SerialReader, done: Any) -> int:
    deadline = time.monotonic() + WAIT_BOUND
    while True:
        value = mem_total(serial)
        if done(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.5)


def test_guest_memtotal_follows_the_balloon(g3: KVMHypervisor, qemu_bin: str,
                                            guest: Any) -> None:
    initrd = balloonguest.build(guest)
    hvp = dict(params.DEFAULTS, kvm_path=qemu_bin, kernel_path=guest.kernel,
               initrd_path=initrd, root_path="/dev/vda1",
               kernel_args="panic=-1 quiet", kvm_flag="disabled", serial_console=True)
    inst = instance("blg", hvp, 256)
    g3.StartInstance(inst, [], False)
    serial = SerialReader(g3.node.paths("blg").serial_socket)
    try:
        serial.read_until("READY", timeout=120)
        serial.send(f"\ninsmod {balloonguest.MODULE_PATH} && echo BALLOON$((6*7))\n")
        serial.read_until("BALLOON42", timeout=30)
        full = mem_total(serial)
        g3.BalloonInstanceMemory(inst, 128)  # gnt-instance modify -m 128
        down = wait_mem_total(serial, lambda kib: kib <= full - 120 * 1024)
        assert full - 136 * 1024 <= down <= full - 120 * 1024  # 128 MiB given back
        assert memory_of(g3, "blg") == 128
        actual = g3.node.qmp("blg", "query-balloon")["actual"]
        assert actual == 128 * MIB
        g3.BalloonInstanceMemory(inst, 256)
        back = wait_mem_total(serial, lambda kib: kib >= full)
        assert back == full
        assert memory_of(g3, "blg") == 256
    finally:
        serial.close()


def test_the_listing_reads_only_the_balloon_of_a_record() -> None:
    record = runtime.RuntimeRecord(name="x", argv=["kvm"])
    assert runtime.balloon_memory_of(record.serialize().encode(), "x") is None
    record.balloon_memory = 96
    raw = record.serialize().encode()
    assert runtime.balloon_memory_of(raw, "x") == 96
    assert runtime.balloon_memory_of(raw, "y") is None  # another instance's record
    for bad in (b"{not json", b"[1]", b"\xff", raw.replace(b"96", b"true"),
                raw.replace(b"96", b"-5"), raw.replace(b"96", b'"96"')):
        assert runtime.balloon_memory_of(bad, "x") is None
