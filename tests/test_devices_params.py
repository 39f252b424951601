"""Ganeti 3.x's display, device and networking keys: vga, soundhw, usb_devices,
kvm_extra, vnet_hdr, virtio_net_queues and kvm_pci_reservations.

Golden command lines on the capabilities of QEMU 7.2 and 10.0 (the probe's
fixtures), the checks, and real QEMU asked over QMP what it built.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from ganeti_kvm import errors
from ganeti_kvm.core import names as c
from ganeti_kvm.core import params
from ganeti_kvm.ganeti3 import KVMHypervisor as G3Hypervisor
from ganeti_kvm.ganeti3 import params as g3params
from ganeti_kvm.host import netdev
from ganeti_kvm.host.paths import RunDir
from ganeti_kvm.qemu import caps as qemu_caps
from ganeti_kvm.qemu import cmdline, devices, peripherals
from tests.helpers import g3_instance, node_hypervisors
from tests.netns import bridged_netns, ns_read
from tests.test_ganeti3 import g3_hvparams
from tests.test_qemu_caps import outputs

PATHS = RunDir("/run/gk").instance("web1")
SPEC = cmdline.MachineSpec(name="web1", memory=256, vcpus=1, network_port=5901)
VERSIONS = ("7.2", "10.0")
MAC = "52:54:00:12:34:56"


def caps_of(version: str) -> qemu_caps.QemuCaps:
    return qemu_caps.build_caps("/usr/bin/kvm", outputs(version))


def hvp(**overrides: Any) -> dict[str, Any]:
    return params.fill(dict(kernel_path="", root_path="", **overrides))


def argv(version: str = "10.0", **overrides: Any) -> list[str]:
    return cmdline.build_argv(SPEC, [], hvp(**overrides), caps_of(version), PATHS)


def after(argv_: list[str], option: str) -> list[str]:
    return argv_[argv_.index(option):]


def refused(key: str, **overrides: Any) -> str:
    with pytest.raises(errors.ParameterError) as info:
        params.check_all_syntax(hvp(**overrides))
    assert key in str(info.value)
    return str(info.value)


# --- the table ---------------------------------------------------------------------------


def test_new_keys_have_ganeti_30_defaults_and_pass_the_ganeti3_contract() -> None:
    for key in (c.HV_VGA, c.HV_SOUNDHW, c.HV_USB_DEVICES, c.HV_KVM_EXTRA, c.HV_VNET_HDR,
                c.HV_VIRTIO_NET_QUEUES, c.HV_KVM_PCI_RESERVATIONS):
        assert key in params.PARAMETERS and key not in g3params.UNIMPLEMENTED
        assert c.DEFAULTS[key] == g3params.FALLBACK_DEFAULTS[key]
    g3params.check_implemented({"vga": "cirrus", "soundhw": "hda", "usb_devices": "tablet",
                                "kvm_extra": "-no-hpet", "vnet_hdr": False,
                                "virtio_net_queues": 4, "kvm_pci_reservations": 8})
    params.check_all_syntax(params.fill(g3params.to_core(None)))


# --- vga ---------------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_vga_golden(version: str) -> None:
    assert after(argv(version, vga="cirrus"), "-display")[:4] == [
        "-display", "none", "-vga", "cirrus"]
    assert "-vga" not in argv(version)
    vnc = argv(version, vnc_bind_address="127.0.0.1")
    assert vnc[vnc.index("-vga") + 1] == "std"  # the 2011 driver's adapter stays
    vnc = argv(version, vnc_bind_address="127.0.0.1", vga="virtio")
    assert vnc[vnc.index("-vga"):vnc.index("-vga") + 3] == ["-vga", "virtio", "-vnc"]


def test_vga_checks() -> None:
    refused(c.HV_VGA, vga="matrox")
    with pytest.raises(errors.ParameterError, match="vga"):
        peripherals.vga_argv("xenfb")
    # QEMU 10.0 here is built without qxl: the node check says so, naming the key
    with pytest.raises(errors.ParameterError, match=r"qxl-vga.*vga 'qxl'.*cirrus"):
        params.check_node(hvp(vga="qxl"), caps_of("10.0"))
    params.check_node(hvp(vga="qxl"), caps_of("7.2"))


# --- soundhw -----------------------------------------------------------------------------

SOUND = ["-audiodev", "none,id=snd0",
         "-device", "intel-hda,id=snd-hda",
         "-device", "hda-duplex,id=snd-hda-codec,bus=snd-hda.0,audiodev=snd0",
         "-device", "AC97,id=snd-ac97,audiodev=snd0",
         "-machine", "pcspk-audiodev=snd0"]


@pytest.mark.parametrize("version", VERSIONS)
def test_soundhw_golden_on_audiodev(version: str) -> None:
    caps = caps_of(version)
    assert caps.has_audiodev and not caps.has_soundhw  # -soundhw left in QEMU 7.1
    result = argv(version, soundhw="hda, ac97,pcspk")
    assert after(result, "-audiodev")[:len(SOUND)] == SOUND
    assert "-audiodev" not in argv(version)
    params.check_node(hvp(soundhw="hda,ac97,es1370,sb16,cs4231a,adlib,gus,pcspk"), caps)


class LegacyCaps:
    has_audiodev = False
    has_soundhw = True


def test_soundhw_on_a_qemu_with_soundhw_only() -> None:
    assert peripherals.sound_argv("hda,ac97", LegacyCaps()) == ["-soundhw", "hda,ac97"]
    LegacyCaps.has_soundhw = False
    try:
        with pytest.raises(errors.ParameterError, match="soundhw"):
            peripherals.sound_argv("hda", LegacyCaps())
    finally:
        LegacyCaps.has_soundhw = True


@pytest.mark.parametrize("value, why", [("all", "all"), ("hda,beeper", "beeper"),
                                        ("hda,hda", "twice"), ("hda,", "''")])
def test_soundhw_refused(value: str, why: str) -> None:
    refused(c.HV_SOUNDHW, soundhw=value)
    with pytest.raises(errors.ParameterError, match=why):
        peripherals.parse_soundhw(value)


# --- usb_devices -------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_usb_devices_golden(version: str) -> None:
    result = argv(version, usb_devices="tablet keyboard,host:046D:C52B  host:1.12")
    assert after(result, "-usb")[:9] == [
        "-usb", "-device", "usb-tablet,id=usbdev0", "-device", "usb-kbd,id=usbdev1",
        "-device", "usb-host,id=usbdev2,vendorid=0x046d,productid=0xc52b",
        "-device", "usb-host,id=usbdev3,hostbus=1,hostaddr=12"]
    both = argv(version, usb_mouse="mouse", usb_devices="wacom-tablet")
    assert both.count("-usb") == 1
    assert after(both, "-usb")[:5] == ["-usb", "-device", "usb-mouse,id=pointer0",
                                       "-device", "usb-wacom-tablet,id=usbdev0"]
    params.check_node(hvp(usb_devices="mouse tablet keyboard wacom-tablet host:1.2"),
                      caps_of(version))


@pytest.mark.parametrize("value", ["disk:/tmp/x", "braille", "host:1", "host:zz:12",
                                   "net:nic", "tablet,-device"])
def test_usb_devices_refused(value: str) -> None:
    assert "host:BUS.ADDR" in refused(c.HV_USB_DEVICES, usb_devices=value)


# --- kvm_extra ---------------------------------------------------------------------------


def test_kvm_extra_words_go_last_as_written_and_no_shell_runs() -> None:
    value = "-device 'virtio-rng-pci,id=rng0' -global kvm-pit.lost_tick_policy=delay $(reboot)"
    result = argv(kvm_extra=value)
    assert result[-5:] == ["-device", "virtio-rng-pci,id=rng0", "-global",
                           "kvm-pit.lost_tick_policy=delay", "$(reboot)"]
    params.check_all_syntax(hvp(kvm_extra=value))


@pytest.mark.parametrize("option", sorted(peripherals.RESERVED_OPTIONS))
def test_kvm_extra_refuses_the_librarys_own_options(option: str) -> None:
    message = refused(c.HV_KVM_EXTRA, kvm_extra=f"-no-hpet -{option} x")
    assert f"-{option}" in message and peripherals.RESERVED_OPTIONS[option] in message
    refused(c.HV_KVM_EXTRA, kvm_extra=f"--{option}")


def test_kvm_extra_between_keys() -> None:
    message = refused(c.HV_KVM_EXTRA, kvm_extra="-serial pty")
    assert c.HV_SERIAL_CONSOLE in message
    params.check_all_syntax(hvp(kvm_extra="-serial pty", serial_console=False))
    refused(c.HV_KVM_EXTRA, kvm_extra="-chardev socket,id=hmp,path=/tmp/x")
    params.check_all_syntax(hvp(kvm_extra="-chardev socket,id=mine,path=/tmp/x"))
    refused(c.HV_KVM_EXTRA, kvm_extra="-device 'unbalanced")
    refused(c.HV_KVM_EXTRA, kvm_extra="-device 'a\nb'")


# --- NICs: vnet_hdr and virtio_net_queues ------------------------------------------------


def test_multiqueue_nic_golden() -> None:
    spec = cmdline.NicSpec(model="virtio-net-pci", mac=MAC, fd=7, queue_fds=(7, 8, 9, 10))
    assert cmdline.build_nic_argv([spec], False) == [
        "-netdev", "tap,id=net0,fds=7:8:9:10",  # QEMU reads vnet_hdr from the fds
        "-device", f"virtio-net-pci,netdev=net0,id=nic0,mac={MAC},romfile=,mq=on,vectors=10"]
    e1000 = cmdline.NicSpec(model="e1000", mac=MAC, fd=7, queue_fds=(7, 8))
    with pytest.raises(errors.ParameterError, match="virtio_net_queues"):
        cmdline.build_nic_argv([e1000], False)


def test_virtio_net_queues_checks() -> None:
    params.check_all_syntax(hvp(virtio_net_queues=8))
    for bad in (0, 9, True):
        refused(c.HV_VIRTIO_NET_QUEUES, virtio_net_queues=bad)
    message = refused(c.HV_VIRTIO_NET_QUEUES, virtio_net_queues=2, nic_type="e1000")
    assert c.HV_NIC_TYPE in message
    with pytest.raises(errors.HypervisorError, match="1 to 8 queues"):
        netdev.open_tap_queues(queues=9)


# --- kvm_pci_reservations ----------------------------------------------------------------


def test_pci_reservations_place_new_devices() -> None:
    nics, disks = devices.allocate([None], [None], nic_on_pci=True, disk_on_pci=True,
                                   rom=False, disk_type="paravirtual", first_slot=5)
    assert (disks[0].addr, nics[0].addr) == ("0x5", "0x6")
    kept = devices.DeviceId(backend="disk0", id="disk0-dev", bus="pci.0", addr="0xc")
    _, disks = devices.allocate([], [kept, None], nic_on_pci=True, disk_on_pci=True,
                                rom=False, disk_type="paravirtual", first_slot=3)
    assert [d.addr for d in disks] == ["0xc", "0x3"]  # a kept slot never moves
    with pytest.raises(errors.HypervisorError, match="kvm_pci_reservations"):
        devices.allocate([None], [], nic_on_pci=True, disk_on_pci=True, rom=False,
                         disk_type="paravirtual", first_slot=32)
    for bad in (2, 33, -1):
        refused(c.HV_KVM_PCI_RESERVATIONS, kvm_pci_reservations=bad)
    params.check_all_syntax(hvp(kvm_pci_reservations=3))


# --- real QEMU, through the Ganeti 3 contract --------------------------------------------


def _instance(name: str, qemu_bin: str, nics: list[dict[str, Any]] | None = None,
              **overrides: Any) -> dict[str, Any]:
    instance = g3_instance(name, g3_hvparams(qemu_bin, **overrides))
    instance["nics"] = nics or []
    return instance


def _peripherals(hv: G3Hypervisor, name: str) -> set[str]:
    return {p["name"] for p in hv.node.qmp(name, "qom-list", {"path": "/machine/peripheral"})}


def _pci(hv: G3Hypervisor, name: str) -> list[dict[str, Any]]:
    return [d for bus in hv.node.qmp(name, "query-pci") for d in bus["devices"]]


def test_devices_on_real_qemu(g3, qemu_bin, short_dir) -> None:
    disk = os.path.join(short_dir, "disk0")
    with open(disk, "wb") as handle:
        handle.truncate(1 << 20)
    hvp = g3_hvparams(qemu_bin, vga="cirrus", soundhw="hda,ac97,pcspk",
                      usb_devices="tablet keyboard", kvm_pci_reservations=5,
                      kvm_extra="-device 'virtio-rng-pci,id=rng0'")
    G3Hypervisor.CheckParameterSyntax(hvp)
    g3.ValidateParameters(hvp)
    g3.StartInstance(g3_instance("dev1", hvp), [({"mode": "rw"}, disk, None)], True)
    assert g3.node.qmp("dev1", "query-status")["status"] == "prelaunch"
    assert {"snd-hda", "snd-hda-codec", "snd-ac97", "usbdev0", "usbdev1",
            "rng0"} <= _peripherals(g3, "dev1")
    assert g3.node.qmp("dev1", "qom-get", {"path": "/machine/peripheral/snd-ac97",
                                           "property": "audiodev"}) == "snd0"
    assert g3.node.qmp("dev1", "qom-get", {"path": "/machine",
                                           "property": "pcspk-audiodev"}) == "snd0"
    commands = {cmd["name"] for cmd in g3.node.qmp("dev1", "query-commands")}
    if "query-audiodevs" in commands:  # QEMU 8.0 on
        assert [a["id"] for a in g3.node.qmp("dev1", "query-audiodevs")] == ["snd0"]
    pci = _pci(g3, "dev1")
    vga = [d for d in pci if d["class_info"]["class"] == 0x0300]
    assert [(d["slot"], d["id"]["vendor"]) for d in vga] == [(2, 0x1013)]  # Cirrus Logic
    assert [d["slot"] for d in pci if d.get("qdev_id") == "disk0-dev"] == [5]
    # the slot is the record's from now on, whatever the key says later
    assert g3.node.load_record("dev1").disks[0][devices.DEVICE_KEY]["addr"] == "0x5"


def test_kvm_extra_that_qemu_refuses_fails_the_start_with_its_words(g3, qemu_bin) -> None:
    instance = _instance("dev2", qemu_bin, kvm_extra="-device no-such-device")
    with pytest.raises(errors.HypervisorError, match="no-such-device"):
        g3.StartInstance(instance, [], True)
    assert g3.ListInstances() == []


def test_reserved_kvm_extra_is_refused_before_qemu_runs(g3, qemu_bin) -> None:
    hvp = g3_hvparams(qemu_bin, kvm_extra="-monitor stdio")
    with pytest.raises(errors.HypervisorError, match="kvm_extra cannot hold -monitor"):
        G3Hypervisor.CheckParameterSyntax(hvp)


@pytest.fixture
def ns() -> Iterator[str]:
    with bridged_netns("gk-dev") as name:
        yield name


@pytest.fixture
def nshv(short_dir: str, ns: str) -> Iterator[G3Hypervisor]:
    with node_hypervisors(G3Hypervisor, short_dir, "nsrun", netns=ns) as (hypervisor,):
        yield hypervisor


def _link(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""  # closed meanwhile


@pytest.mark.parametrize("vnet_hdr, queues", [(True, 4), (False, 1)])
def test_vnet_hdr_and_queues_on_real_qemu(nshv, ns, qemu_bin, vnet_hdr: bool,
                                          queues: int) -> None:
    nic = {"mac": MAC, "ip": None, "nicparams": {"mode": "bridged", "link": "br0"}}
    instance = _instance("mq1", qemu_bin, nics=[nic], vnet_hdr=vnet_hdr,
                         virtio_net_queues=queues)
    nshv.StartInstance(instance, [], True)
    (tap,) = [n["tap"] for n in nshv.node.load_record("mq1").nics]
    flags = int(ns_read(ns, f"/sys/class/net/{tap}/tun_flags").strip(), 16)
    assert bool(flags & netdev.IFF_VNET_HDR) == vnet_hdr
    assert bool(flags & netdev.IFF_MULTI_QUEUE) == (queues > 1)
    nic_path = "/machine/peripheral/nic0"
    assert nshv.node.qmp("mq1", "qom-get", {"path": nic_path, "property": "mq"}) is (queues > 1)
    vectors = nshv.node.qmp("mq1", "qom-get", {"path": nic_path, "property": "vectors"})
    assert vectors == 2 * queues + 2  # QEMU's own choice for one queue, ours for more
    pid = nshv.GetInstanceInfo("mq1")[1]
    fds = os.listdir(f"/proc/{pid}/fd")
    tun = [fd for fd in fds if _link(f"/proc/{pid}/fd/{fd}") == netdev.TUN_DEVICE]
    assert len(tun) == queues  # QEMU holds every queue's descriptor, and only those


def test_value_sets_match_the_device_tables() -> None:
    assert set(peripherals.VGA_DEVICES) == c.HT_KVM_VALID_VGA_TYPES
    assert set(peripherals.SOUND_DEVICES) == c.HT_KVM_VALID_SOUND_TYPES
    assert set(peripherals.USB_DEVICES) == c.HT_KVM_VALID_USB_TYPES
