"""Migrations keep each NIC's device identity, on real QEMU inside a test network namespace.

A migration target must add exactly the source's NIC devices (PCI slot,
option ROM), or QEMU refuses the stream.  Here the source runs NICs that
are not what a new start of ours gives: one with a Ganeti 3.0-style id,
slot ``0xd`` and QEMU's default option ROM, and one the 2011 driver added
to its own command line.  The guest must go on running on the target.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from ganeti_kvm.core import node as lifecycle
from ganeti_kvm.core import params
from ganeti_kvm.host import netdev, process
from ganeti_kvm.hv_kvm import KVMHypervisor
from ganeti_kvm.qemu import devices
from tests import legacy2011
from tests.guestimage import make_disk
from tests.helpers import (
    SerialReader,
    free_port,
    guest_hvparams,
    make_instance,
    node_hypervisors,
)
from tests.netns import bridged_netns

MAC = "52:54:00:12:35:01"
BUNDLED_STYLE = {"backend": "nic-3c5c7a6e", "id": "nic-3c5c7a6e", "driver": "virtio-net-pci",
                 "bus": "pci.0", "addr": "0xd", "romfile": None, "props": []}


@pytest.fixture
def ns() -> Iterator[str]:
    with bridged_netns("gk-dev") as name:
        yield name


@pytest.fixture
def pair(short_dir: str, ns: str) -> Iterator[tuple[KVMHypervisor, KVMHypervisor]]:
    with node_hypervisors(KVMHypervisor, short_dir, "a", "b", netns=ns) as (source, target):
        yield source, target


def nic_device(hv: KVMHypervisor, name: str) -> str:
    """The ``-device`` value of the NIC of ``name``'s running QEMU."""
    argv = process.cmdline(hv.GetInstanceInfo(name)[1]) or []
    (value,) = [argv[i + 1] for i, a in enumerate(argv[:-1])
                if a == "-device" and f"mac={MAC}" in argv[i + 1].split(",")]
    return value


def pci_slots(hv: KVMHypervisor, name: str) -> dict[int, str]:
    """Slot -> QOM path of every device on bus 0, as QEMU places them."""
    (bus,) = hv.node.qmp(name, "query-pci")
    return {d["slot"]: d.get("qdev_id", "") for d in bus["devices"]}


def migrate(source: KVMHypervisor, target: KVMHypervisor, inst: Any) -> None:
    info = source.MigrationInfo(inst)
    target.AcceptInstance(inst, info, "127.0.0.1")
    source.MigrateInstance(inst, "127.0.0.1", True)
    target.FinalizeMigration(inst, info, True)


def check_went_on(serial: SerialReader, target: KVMHypervisor, name: str, guest: Any) -> None:
    """The guest counts on on the target from where it was: it did not boot again."""
    before = serial.counters()
    serial.close()
    reader = SerialReader(target.node.paths(name).serial_socket)
    reader.read_until(r"COUNTER \d+\s+COUNTER \d+", timeout=60)
    assert reader.counters()[0] >= before[-1]
    assert guest.first_line not in reader.text
    reader.close()


def test_a_nic_with_a_slot_and_rom_of_its_own_migrates_with_them(pair, qemu_bin,
                                                                  guest) -> None:
    source, target = pair
    hvp = guest_hvparams(qemu_bin, guest, migration_port=free_port(), migration_bandwidth=1000)
    inst = make_instance("dev1", hvp)
    nic = {"mac": MAC, "ip": None, "nicparams": {"mode": "bridged", "link": "br0"},
           devices.DEVICE_KEY: dict(BUNDLED_STYLE)}
    source.node.start(lifecycle.InstanceSpec(name="dev1", hvparams=params.fill(hvp),
                                             memory=128, vcpus=1, nics=[nic]))
    serial = SerialReader(source.node.paths("dev1").serial_socket)
    serial.read_until(r"COUNTER \d+")
    expected = {"virtio-net-pci", "netdev=nic-3c5c7a6e", "id=nic-3c5c7a6e", f"mac={MAC}",
                "bus=pci.0", "addr=0xd"}  # no romfile=: QEMU's default option ROM
    assert set(nic_device(source, "dev1").split(",")) == expected
    assert pci_slots(source, "dev1")[13] == "nic-3c5c7a6e"

    migrate(source, target, inst)
    assert source.ListInstances() == [] and target.ListInstances() == ["dev1"]
    assert set(nic_device(target, "dev1").split(",")) == expected
    assert pci_slots(target, "dev1")[13] == "nic-3c5c7a6e"
    check_went_on(serial, target, "dev1", guest)
    # kept for the next start: a reboot on the target puts the NIC where it was
    record = target.node.load_record("dev1")
    assert record is not None and record.nics[0][devices.DEVICE_KEY] == BUNDLED_STYLE
    target.RebootInstance(inst)
    assert pci_slots(target, "dev1")[13] == "nic-3c5c7a6e"


def test_a_new_instance_keeps_its_allocated_slots_across_a_migration(pair, qemu_bin,
                                                                     guest) -> None:
    source, target = pair
    from ganeti_kvm import objects

    hvp = guest_hvparams(qemu_bin, guest, migration_port=free_port(), migration_bandwidth=1000)
    inst = make_instance("dev2", hvp, nics=[objects.NIC(
        mac=MAC, nicparams={"mode": "bridged", "link": "br0"})])
    source.StartInstance(inst, [])
    serial = SerialReader(source.node.paths("dev2").serial_socket)
    serial.read_until(r"COUNTER \d+")
    assert "addr=0xc" in nic_device(source, "dev2").split(",")
    assert pci_slots(source, "dev2")[12] == "nic0"
    migrate(source, target, inst)
    assert pci_slots(target, "dev2")[12] == "nic0"
    check_went_on(serial, target, "dev2", guest)


def test_a_2011_qemu_with_a_nic_migrates(pair, ns, qemu_bin, guest, short_dir) -> None:
    source, target = pair
    disk = make_disk(os.path.join(short_dir, "disk0.raw"), "dev-2011-marker")
    source.node.ensure_dirs()
    root = source.node.layout.root
    hvp = legacy2011.hvparams_2011(
        kernel_path=guest.kernel, initrd_path=guest.initrd, root_path="/dev/vda1",
        kernel_args="panic=-1 quiet", kvm_flag="disabled", serial_console=True,
        vnc_bind_address=short_dir, migration_port=free_port(), migration_bandwidth=1000)
    cmd = legacy2011.kvm_cmd_2011(qemu_bin, root, "old9", hvp, 160, 1, [disk])
    with open(os.path.join(root, "conf", "old9.runtime"), "w") as handle:
        handle.write(legacy2011.record_2011(cmd, [legacy2011.nic_2011(MAC)], hvp))
    # Started as the 2011 driver did with QEMU 0.12 or later: the NIC after its
    # command line, no id, no address, QEMU's default option ROM.
    fd, _ = netdev.open_tap(vnet_hdr=True, netns=ns)
    started = [str(a) for a in cmd] + [
        "-netdev", f"type=tap,id=netdev0,fd={fd}",
        "-device", f"virtio-net-pci,mac={MAC},netdev=netdev0"]
    flag = started.index("-disable-kvm")
    started[flag:flag + 1] = ["-machine", "accel=tcg"]
    try:
        result = subprocess.run(started, capture_output=True, text=True, timeout=60,
                                check=False, pass_fds=[fd])
    finally:
        os.close(fd)
    assert result.returncode == 0, result.stderr
    serial = SerialReader(source.node.paths("old9").serial_socket)
    serial.read_until(r"COUNTER \d+")
    inst = make_instance("old9", dict(hvp, kvm_path=qemu_bin))
    migrate(source, target, inst)
    assert source.ListInstances() == [] and target.ListInstances() == ["old9"]
    assert set(nic_device(target, "old9").split(",")) == {
        "virtio-net-pci", "netdev=netdev0", f"mac={MAC}"}
    check_went_on(serial, target, "old9", guest)
