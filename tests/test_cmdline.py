"""The command line as a pure function: golden argv and option spellings."""

from __future__ import annotations

from typing import Any

import pytest

from ganeti_kvm import constants as c
from ganeti_kvm import errors
from ganeti_kvm.host.paths import RunDir
from ganeti_kvm.qemu import cmdline

PATHS = RunDir("/run/gk").instance("web1")
SPEC = cmdline.MachineSpec(name="web1", memory=256, vcpus=2, network_port=5901)


class Caps72:
    has_runas = True
    has_chroot = True
    has_run_with_user = False
    has_run_with_chroot = False
    has_audiodev = True  # -soundhw went in QEMU 7.1
    has_soundhw = False

    def has_device(self, name: str) -> bool:
        return True


class Caps10(Caps72):
    has_runas = False
    has_chroot = False
    has_run_with_user = True
    has_run_with_chroot = True


def hvp(**overrides: Any) -> dict[str, Any]:
    result = dict(c.HVC_DEFAULTS[c.HT_KVM])
    result.update(kernel_path="", root_path="")
    result.update(overrides)
    return result


def option_values(argv: list[str], option: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == option]


def test_golden_kernel_boot_with_serial_console() -> None:
    argv = cmdline.build_argv(
        SPEC, [cmdline.BlockDevice("/dev/vg/web1-disk0")],
        hvp(kernel_path="/boot/vmlinuz", initrd_path="/boot/initrd", root_path="/dev/vda1",
            kernel_args="ro quiet", kvm_flag="disabled"),
        Caps72(), PATHS)
    assert argv == [
        "/usr/bin/kvm", "-name", "web1", "-no-user-config", "-nodefaults", "-daemonize",
        "-pidfile", "/run/gk/pid/web1", "-D", "/run/gk/ctrl/web1.log",
        "-machine", "pc,accel=tcg",
        "-m", "256", "-smp", "2",
        "-chardev", "socket,id=qmp,path=/run/gk/ctrl/web1.qmp,server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
        "-chardev", "socket,id=qmpl,path=/run/gk/ctrl/web1.qmpl,server=on,wait=off",
        "-mon", "chardev=qmpl,mode=control",
        "-chardev", "socket,id=hmp,path=/run/gk/ctrl/web1.monitor,server=on,wait=off",
        "-mon", "chardev=hmp,mode=readline",
        "-drive", "file=/dev/vg/web1-disk0,format=raw,if=none,id=disk0",
        "-device", "virtio-blk-pci,drive=disk0,id=disk0-dev",
        "-kernel", "/boot/vmlinuz", "-initrd", "/boot/initrd",
        "-append", "root=/dev/vda1 ro quiet console=ttyS0,38400",
        "-chardev", "socket,id=serial0,path=/run/gk/ctrl/web1.serial,server=on,wait=off",
        "-serial", "chardev:serial0",
        "-display", "none",
    ]


def test_golden_disk_boot_with_vnc_and_everything_else() -> None:
    argv = cmdline.build_argv(
        cmdline.MachineSpec(name="web1", memory=512, vcpus=1, network_port=5905,
                            uuid="5bd2a3b4-1c3e-4f4a-9a0e-3a8f3c9d0c11", run_as="qemu-user"),
        [cmdline.BlockDevice("/img/a,b.raw", readonly=True)],
        hvp(serial_console=False, acpi=False, vnc_bind_address="0.0.0.0", vnc_tls=True,
            vnc_x509_path="/etc/x509", vnc_x509_verify=True, vnc_password_file="/etc/pw",
            disk_cache="writeback", use_localtime=True, mem_path="/hugepages",
            kvm_flag="enabled", security_model="user", security_domain="qemu-user",
            use_chroot=True),
        Caps72(), PATHS)
    assert option_values(argv, "-machine") == ["pc,accel=kvm,acpi=off"]
    assert option_values(argv, "-uuid") == ["5bd2a3b4-1c3e-4f4a-9a0e-3a8f3c9d0c11"]
    assert option_values(argv, "-boot") == ["order=c"]
    assert option_values(argv, "-drive") == [
        "file=/img/a,,b.raw,format=raw,if=none,id=disk0,readonly=on,cache=writeback"]
    assert option_values(argv, "-device") == [
        "virtio-blk-pci,drive=disk0,id=disk0-dev,bootindex=1", "usb-tablet,id=pointer0"]
    assert option_values(argv, "-object") == [
        "tls-creds-x509,id=vnc-tls0,dir=/etc/x509,endpoint=server,verify-peer=on"]
    assert option_values(argv, "-vnc") == [":5,tls-creds=vnc-tls0,password=on"]
    assert option_values(argv, "-rtc") == ["base=localtime"]
    assert option_values(argv, "-mem-path") == ["/hugepages"]
    assert "-mem-prealloc" in argv and "-usb" in argv
    assert option_values(argv, "-runas") == ["qemu-user"]
    assert option_values(argv, "-chroot") == ["/run/gk/chroot/web1"]
    assert "-serial" not in argv and "-kernel" not in argv
    assert not any("/etc/pw" in a for a in argv)


def test_qemu10_uses_run_with() -> None:
    argv = cmdline.build_argv(
        cmdline.MachineSpec(name="web1", memory=128, vcpus=1, run_as="1005:1005"), [],
        hvp(security_model="pool", use_chroot=True), Caps10(), PATHS)
    assert option_values(argv, "-run-with") == ["user=1005:1005,chroot=/run/gk/chroot/web1"]
    assert "-runas" not in argv and "-chroot" not in argv


@pytest.mark.parametrize("flag, accel", [("enabled", "kvm"), ("disabled", "tcg"),
                                         ("", "kvm:tcg")])
def test_kvm_flag_selects_the_accelerator(flag: str, accel: str) -> None:
    argv = cmdline.build_argv(SPEC, [], hvp(kvm_flag=flag), Caps72(), PATHS)
    assert option_values(argv, "-machine") == [f"pc,accel={accel}"]
    assert "-enable-kvm" not in argv and "-disable-kvm" not in argv


def test_no_removed_options_ever() -> None:
    argv = cmdline.build_argv(SPEC, [cmdline.BlockDevice("/d")],
                              hvp(use_localtime=True, acpi=False), Caps10(), PATHS)
    for gone in ("-localtime", "-disable-kvm", "-balloon", "-no-acpi", "-usbdevice"):
        assert gone not in argv
    assert not any("vlan=" in a or "boot=on" in a for a in argv)


@pytest.mark.parametrize("disk_type, devices", [
    ("ide", ["ide-hd,drive=disk0,id=disk0-dev,bus=ide.0,unit=0,bootindex=1",
             "ide-hd,drive=disk1,id=disk1-dev,bus=ide.0,unit=1"]),
    ("scsi", ["lsi53c895a,id=scsi0",
              "scsi-hd,drive=disk0,id=disk0-dev,bus=scsi0.0,scsi-id=0,bootindex=1",
              "scsi-hd,drive=disk1,id=disk1-dev,bus=scsi0.0,scsi-id=1"]),
])
def test_disk_types(disk_type: str, devices: list[str]) -> None:
    argv = cmdline.build_argv(SPEC, [cmdline.BlockDevice("/d0"), cmdline.BlockDevice("/d1")],
                              hvp(disk_type=disk_type), Caps72(), PATHS)
    assert option_values(argv, "-device") == devices


def test_cdroms_and_floppy() -> None:
    argv = cmdline.build_argv(
        SPEC, [cmdline.BlockDevice("/d0")],
        hvp(cdrom_image_path="/iso/a.iso", cdrom2_image_path="/iso/b.iso",
            floppy_image_path="/fd.img", boot_order="cdrom"), Caps72(), PATHS)
    assert option_values(argv, "-boot") == ["order=d"]
    assert "ide-cd,drive=cdrom0,id=cdrom0-dev,bus=ide.1,unit=0,bootindex=0" in argv
    assert "ide-cd,drive=cdrom1,id=cdrom1-dev,bus=ide.1,unit=1" in argv
    assert "file=/iso/a.iso,format=raw,if=none,id=cdrom0,media=cdrom,readonly=on" in argv
    assert "file=/fd.img,format=raw,if=floppy,index=0" in argv


def test_too_many_ide_devices() -> None:
    with pytest.raises(errors.HypervisorError, match="IDE slots"):
        cmdline.build_argv(SPEC, [cmdline.BlockDevice(f"/d{i}") for i in range(3)],
                           hvp(disk_type="ide", cdrom_image_path="/a.iso",
                               cdrom2_image_path="/b.iso"), Caps72(), PATHS)


def test_vnc_on_a_directory_and_without_port() -> None:
    argv = cmdline.build_argv(SPEC, [], hvp(vnc_bind_address="/var/run/vnc"), Caps72(), PATHS)
    assert option_values(argv, "-vnc") == ["vnc=unix:/var/run/vnc/web1.vnc"]
    with pytest.raises(errors.HypervisorError, match="network_port"):
        cmdline.build_argv(cmdline.MachineSpec(name="web1", memory=128, vcpus=1), [],
                           hvp(vnc_bind_address="127.0.0.1"), Caps72(), PATHS)


def test_nic_argv() -> None:
    argv = cmdline.build_nic_argv([
        cmdline.NicSpec("virtio-net-pci", "aa:00:00:00:00:01", 5, vhost=True),
        cmdline.NicSpec("e1000", "aa:00:00:00:00:02", 6)], boot_network=False)
    assert argv == [
        "-netdev", "tap,id=net0,fd=5,vhost=on",
        "-device", "virtio-net-pci,netdev=net0,id=nic0,mac=aa:00:00:00:00:01,romfile=",
        "-netdev", "tap,id=net1,fd=6",
        "-device", "e1000,netdev=net1,id=nic1,mac=aa:00:00:00:00:02,romfile="]


def test_block_devices_pairs_and_triples() -> None:
    class Disk:
        mode = "ro"
    devices = cmdline.normalize_block_devices([(Disk(), "/dev/a"), ({"mode": "rw"}, "/dev/b",
                                                                    "rbd:pool/b")])
    assert devices == [cmdline.BlockDevice("/dev/a", True),
                       cmdline.BlockDevice("/dev/b", False, "rbd:pool/b")]
    with pytest.raises(errors.HypervisorError, match="absolute"):
        cmdline.normalize_block_devices([(Disk(), "dev/a")])
    with pytest.raises(errors.HypervisorError, match="pair"):
        cmdline.normalize_block_devices(["/dev/a"])


def test_escape_refuses_newlines() -> None:
    assert cmdline.qemu_escape("a,b") == "a,,b"
    with pytest.raises(errors.HypervisorError):
        cmdline.qemu_escape("a\nb")


@pytest.mark.parametrize("disk_type", ["ide", "sd"])
def test_read_only_disks_where_qemu_cannot(disk_type: str) -> None:
    with pytest.raises(errors.HypervisorError, match="read-only"):
        cmdline.build_argv(SPEC, [cmdline.BlockDevice("/d0", readonly=True)],
                           hvp(disk_type=disk_type), Caps72(), PATHS)
