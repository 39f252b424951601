"""Device identities (ids, PCI slots, option ROMs) of NICs and disks, without QEMU.

Golden argv for a new instance, for a record that carries identities and
for an older record without them; the identities of upgraded (2011) and
adopted (Ganeti 3.0's bundled driver) instances; and what a record's
identity may not smuggle into QEMU's options.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from ganeti_kvm import constants as c
from ganeti_kvm import errors
from ganeti_kvm.core import hardware, runtime
from ganeti_kvm.ganeti3 import bundled, params
from ganeti_kvm.host.paths import RunDir
from ganeti_kvm.qemu import cmdline, devices
from ganeti_kvm.qemu.devices import DeviceId
from tests import legacy2011
from tests.test_cmdline import PATHS, Caps72, hvp, option_values

MAC0, MAC1 = "aa:00:00:00:00:01", "aa:00:00:00:00:02"
BUNDLED_NIC = {"backend": "nic-1234", "id": "nic-1234", "driver": "virtio-net-pci",
               "bus": "pci.0", "addr": "0xd", "romfile": None, "props": []}


def record(nics: list[dict[str, Any]], disks: list[dict[str, Any]],
           **overrides: Any) -> runtime.RuntimeRecord:
    return runtime.RuntimeRecord(
        name="web1", argv=["/usr/bin/kvm"], nics=nics, disks=disks,
        hvparams=hvp(**{"kernel_path": "/boot/vmlinuz", **overrides}),
        beparams={c.BE_MEMORY: 128, c.BE_VCPUS: 1})


def device_argv(rec: runtime.RuntimeRecord) -> tuple[list[str], list[str]]:
    """The disks' -drive/-device values and the NICs' -netdev/-device pairs of ``rec``."""
    disks = [cmdline.BlockDevice.from_dict(d) for d in rec.disks]
    argv = cmdline.build_argv(cmdline.MachineSpec("web1", 128, 1), disks, rec.hvparams,
                              Caps72(), PATHS)
    hvp_ = rec.hvparams
    nics = cmdline.build_nic_argv(
        [cmdline.NicSpec(cmdline.NIC_MODELS[hvp_[c.HV_NIC_TYPE]], n["mac"], 10 + i,
                         device=devices.identity_of(n, f"NIC {i}"))
         for i, n in enumerate(rec.nics)],
        boot_network=hvp_[c.HV_BOOT_ORDER] == c.HT_BO_NETWORK and not hvp_[c.HV_KERNEL_PATH],
        name="web1")
    return option_values(argv, "-device"), nics


def disk(path: str) -> dict[str, Any]:
    return cmdline.BlockDevice(path).to_dict()


def test_golden_new_instance_gets_ganeti_like_slots_disks_first() -> None:
    rec = record([{"mac": MAC0}, {"mac": MAC1}], [disk("/dev/vg/d0"), disk("/dev/vg/d1")])
    hardware.assign_devices(rec)
    disk_devices, nics = device_argv(rec)
    assert disk_devices == ["virtio-blk-pci,drive=disk0,id=disk0-dev,bus=pci.0,addr=0xc",
                            "virtio-blk-pci,drive=disk1,id=disk1-dev,bus=pci.0,addr=0xd"]
    assert nics == [
        "-netdev", "tap,id=net0,fd=10",
        "-device", f"virtio-net-pci,netdev=net0,id=nic0,mac={MAC0},bus=pci.0,addr=0xe,romfile=",
        "-netdev", "tap,id=net1,fd=11",
        "-device", f"virtio-net-pci,netdev=net1,id=nic1,mac={MAC1},bus=pci.0,addr=0xf,romfile="]
    # kept in the record, and so in the file a reboot or a migration target reads
    again = runtime.parse(rec.serialize(), "web1", "test")
    assert device_argv(again) == (disk_devices, nics)


def test_golden_network_boot_keeps_the_option_rom_and_ide_disks_stay_on_their_bus() -> None:
    rec = record([{"mac": MAC0}], [disk("/dev/vg/d0")], disk_type="ide",
                 boot_order="network", kernel_path="", nic_type="e1000")
    hardware.assign_devices(rec)
    disk_devices, nics = device_argv(rec)
    assert disk_devices == ["ide-hd,drive=disk0,id=disk0-dev,bus=ide.0,unit=0"]
    assert nics[3] == f"e1000,netdev=net0,id=nic0,mac={MAC0},bus=pci.0,addr=0xc"


def test_golden_record_with_identities_is_started_as_it_says() -> None:
    rec = record([{"mac": MAC0, "device": BUNDLED_NIC}],
                 [dict(disk("/dev/vg/d0"), device={
                     "backend": "disk-1", "id": "disk-1", "driver": "virtio-blk-pci",
                     "bus": "pci.0", "addr": "0xc", "romfile": None, "props": []})])
    hardware.assign_devices(rec)  # a reboot: nothing changes
    assert rec.nics[0]["device"] == BUNDLED_NIC
    disk_devices, nics = device_argv(rec)
    assert disk_devices == ["virtio-blk-pci,drive=disk-1,id=disk-1,bus=pci.0,addr=0xc"]
    assert nics == ["-netdev", "tap,id=nic-1234,fd=10",
                    "-device", f"virtio-net-pci,netdev=nic-1234,id=nic-1234,mac={MAC0},"
                               "bus=pci.0,addr=0xd"]


def test_golden_old_record_without_identities_keeps_the_names_by_position() -> None:
    old = {"kind": runtime.RECORD_KIND, "version": 1, "name": "web1", "argv": ["/usr/bin/kvm"],
           "nics": [{"mac": MAC0, "tap": "tap0"}, {"mac": MAC1, "tap": "tap1"}],
           "disks": [{"path": "/dev/vg/d0", "readonly": False, "uri": None}],
           "hvparams": hvp(kernel_path="/boot/vmlinuz"),
           "beparams": {"memory": 128, "vcpus": 1}}
    rec = runtime.parse(json.dumps(old), "web1", "test")
    assert rec.nics == old["nics"]  # loaded as it is; the names by position apply
    disk_devices, nics = device_argv(rec)
    assert disk_devices == ["virtio-blk-pci,drive=disk0,id=disk0-dev"]
    assert nics == ["-netdev", "tap,id=net0,fd=10",
                    "-device", f"virtio-net-pci,netdev=net0,id=nic0,mac={MAC0},romfile=",
                    "-netdev", "tap,id=net1,fd=11",
                    "-device", f"virtio-net-pci,netdev=net1,id=nic1,mac={MAC1},romfile="]


def test_allocation_keeps_slots_taken_and_extends_after_them() -> None:
    held = DeviceId(backend="nic-1234", id="nic-1234", bus="pci.0", addr="0xc")
    nics, disks = devices.allocate([held, None], [None], nic_on_pci=True, disk_on_pci=True,
                                   rom=False, disk_type="paravirtual")
    assert nics[0] is held
    assert [d.addr for d in disks] == ["0xd"] and nics[1].addr == "0xe"
    assert nics[1].backend == "net0" and disks[0].backend == "disk0"
    with pytest.raises(errors.HypervisorError, match="Instance big has more NICs and disks"):
        devices.allocate([None] * 21, [], True, True, False, "paravirtual", name="big")


@pytest.mark.parametrize("field, value", [
    ("addr", "0xc,romfile=/etc/shadow"), ("id", "nic0,addr=0x3"), ("backend", "a b"),
    ("romfile", "/x,y=z\n"), ("bus", ""), ("addr", "0x40"), ("driver", "e1000,x=y"),
    ("props", [["mac", "aa:00:00:00:00:09"]]), ("props", [["mq", "on,romfile=/x"]])])
def test_an_identity_that_would_add_options_is_refused_on_load(field: str, value: Any) -> None:
    bad = dict(BUNDLED_NIC, **{field: value})
    text = json.dumps({"kind": runtime.RECORD_KIND, "version": 1, "name": "web1",
                       "argv": ["/usr/bin/kvm"], "nics": [{"mac": MAC0, "device": bad}]})
    with pytest.raises(errors.RuntimeStateError, match="NIC 0 of instance web1"):
        runtime.parse(text, "web1", "test")
    with pytest.raises(errors.HypervisorError, match="identity"):
        cmdline.build_nic_argv([cmdline.NicSpec("e1000", MAC0, 3, device=DeviceId(
            **{k: tuple(map(tuple, v)) if k == "props" else v for k, v in bad.items()}))],
            False, name="web1")


def test_a_2011_nic_keeps_the_2011_spelling_and_its_option_rom() -> None:
    hvp_ = legacy2011.hvparams_2011(kernel_path="/boot/vmlinuz")
    cmd = legacy2011.kvm_cmd_2011("/usr/bin/kvm", "/r", "old1", hvp_, 64, 1, ["/dev/vg/d0"])
    rec = runtime.parse(legacy2011.record_2011(cmd, [legacy2011.nic_2011(MAC0)], hvp_),
                        "old1", "test")
    nic = devices.identity_of(rec.nics[0], "NIC 0")
    assert nic == DeviceId(backend="netdev0")
    # As the 2011 driver added it: no id, no address, QEMU's default option ROM.
    assert cmdline.build_nic_argv([cmdline.NicSpec("virtio-net-pci", MAC0, 7, device=nic)],
                                  False, name="old1") == [
        "-netdev", "tap,id=netdev0,fd=7", "-device", f"virtio-net-pci,netdev=netdev0,mac={MAC0}"]


def _bundled_live_argv(run: str) -> list[str]:
    from tests.test_switch import _bundled_argv

    return _bundled_argv(run, "c1")


def test_an_adopted_bundled_instance_keeps_its_ids_slots_and_rom(tmp_path: Any) -> None:
    ipaths = RunDir(str(tmp_path)).instance("c1")
    live = _bundled_live_argv(str(tmp_path))
    nic = {"mac": MAC0, "uuid": "1234", "nicparams": {"mode": "bridged", "link": "br0"},
           "hvinfo": {"driver": "virtio-net-pci"}}
    text = json.dumps([live[:17], [nic], dict(params.DEFAULTS, kvm_path="/usr/bin/kvm"),
                       [[{"mode": "rw", "uuid": "1"}, "/dev/vg/d0", None]]])
    parsed = bundled.parse(text, "c1", "t")
    assert parsed is not None
    rec = bundled.record_from_bundled("c1", parsed, live, ipaths)
    assert rec.nics[0]["device"] == BUNDLED_NIC
    assert rec.disks[0]["device"]["id"] == "disk-1" and rec.disks[0]["device"]["addr"] == "0xc"
    loaded = runtime.parse(rec.serialize(), "c1", "test")
    (ident,) = [devices.identity_of(n, "NIC") for n in loaded.nics]
    mine = cmdline.build_nic_argv([cmdline.NicSpec("virtio-net-pci", MAC0, 9, device=ident)],
                                  False, name="c1")[3]
    theirs = next(v for v in live if v.startswith("virtio-net-pci,"))
    assert set(mine.split(",")) == set(theirs.split(","))  # the same device, to the letter
    # Handed back, the bundled driver spells it the same way from hvinfo.
    (exported,) = bundled.bundled_from_record(loaded).nics
    assert exported["hvinfo"] == {"driver": "virtio-net-pci", "id": "nic-1234",
                                  "bus": "pci.0", "addr": "0xd"}


def test_a_bundled_nic_or_disk_this_library_cannot_spell_is_named_by_position() -> None:
    live = ["/usr/bin/kvm", "-netdev", "type=tap,id=nic-1,fd=9",
            "-device", "weird-nic,id=nic-1,netdev=nic-1,mac=aa:00:00:00:00:01",
            "-drive", "file=/dev/vg/d0,format=raw,if=none,id=disk-1",
            "-device", "scsi-hd,id=disk-1,bus=scsi.0,channel=0,scsi-id=0,lun=0,drive=disk-1"]
    nics, disks = bundled._identities(live, 1, 1, {c.HV_DISK_TYPE: c.HT_DISK_PARAVIRTUAL})
    assert nics == [None] and disks == [None]


def test_an_isa_nic_gets_neither_a_slot_nor_a_rom_setting() -> None:
    rec = record([{"mac": MAC0}], [], nic_type="ne2k_isa")
    hardware.assign_devices(rec)
    assert device_argv(rec)[1][3] == f"ne2k_isa,netdev=net0,id=nic0,mac={MAC0}"
