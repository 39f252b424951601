"""The QEMU command line, as a pure function of the instance, its parameters
and the capabilities of the QEMU binary.

Nothing here touches the node: the caller resolves users, opens TAP devices
and checks that files exist.  Which spelling of an option to use is decided
by asking :class:`~ganeti_kvm.qemu_caps.QemuCaps` by name, never by comparing
versions.  Values that QEMU parses as ``key=value,...`` lists go through
:func:`qemu_escape`, so a comma in a path cannot inject an option.
"""

from __future__ import annotations

import uuid as _uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ganeti_kvm import constants as c
from ganeti_kvm import errors
from ganeti_kvm.paths import InstancePaths

# QEMU device models for the cluster manager's NIC types
NIC_MODELS = {
    c.HT_NIC_PARAVIRTUAL: "virtio-net-pci",
    c.HT_NIC_RTL8139: "rtl8139",
    c.HT_NIC_NE2K_PCI: "ne2k_pci",
    c.HT_NIC_NE2K_ISA: "ne2k_isa",
    c.HT_NIC_I82551: "i82551",
    c.HT_NIC_I85557B: "i82557b",
    c.HT_NIC_I8259ER: "i82559er",
    c.HT_NIC_PCNET: "pcnet",
    c.HT_NIC_E1000: "e1000",
}

# Disk types QEMU can attach on a PC machine, with the devices they need.
# "mtd" and "pflash" have no meaning for data disks on x86 (pflash would
# replace the firmware), so validation refuses them.
DISK_DEVICES = {
    c.HT_DISK_PARAVIRTUAL: ("virtio-blk-pci",),
    c.HT_DISK_IDE: ("ide-hd",),
    c.HT_DISK_SCSI: ("lsi53c895a", "scsi-hd"),
    c.HT_DISK_SD: ("sdhci-pci", "sd-card"),
}
# QEMU refuses read-only drives on these ("Block node is read-only").
READONLY_UNSUPPORTED = frozenset([c.HT_DISK_IDE, c.HT_DISK_SD])
CDROM_DEVICES = {
    c.HT_DISK_PARAVIRTUAL: ("virtio-scsi-pci", "scsi-cd"),
    c.HT_DISK_IDE: ("ide-cd",),
    c.HT_DISK_SCSI: ("lsi53c895a", "scsi-cd"),
}
BOOT_LETTERS = {c.HT_BO_FLOPPY: "a", c.HT_BO_DISK: "c", c.HT_BO_CDROM: "d",
                c.HT_BO_NETWORK: "n"}
MOUSE_DEVICES = {c.HT_MOUSE_MOUSE: "usb-mouse", c.HT_MOUSE_TABLET: "usb-tablet"}
IDE_SLOTS = 4  # two buses with two units each on a PC machine
VNC_TLS_ID = "vnc-tls0"


class Caps(Protocol):
    """What the command line needs to know about a QEMU binary."""

    @property
    def has_run_with_user(self) -> bool: ...
    @property
    def has_run_with_chroot(self) -> bool: ...
    @property
    def has_runas(self) -> bool: ...
    @property
    def has_chroot(self) -> bool: ...
    def has_device(self, name: str) -> bool: ...


def qemu_escape(value: str) -> str:
    """Escape a value for QEMU's ``key=value,...`` option parser (commas are doubled)."""
    if "\n" in value or "\0" in value:
        raise errors.HypervisorError(f"Value {value!r} contains a newline or NUL byte")
    return value.replace(",", ",,")


@dataclass(frozen=True)
class BlockDevice:
    """A disk as handed to StartInstance: where it is and whether it is read-only."""

    path: str
    readonly: bool = False
    uri: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "readonly": self.readonly, "uri": self.uri}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "BlockDevice":
        return cls(path=str(data["path"]), readonly=bool(data.get("readonly")),
                   uri=data.get("uri"))


def normalize_block_devices(block_devices: Sequence[Any]) -> list[BlockDevice]:
    """Accept ``(disk, path)`` pairs and ``(disk, path, uri)`` triples."""
    result = []
    for index, entry in enumerate(block_devices or []):
        if not isinstance(entry, (tuple, list)) or len(entry) not in (2, 3):
            raise errors.HypervisorError(
                f"Block device #{index} must be a (disk, path) pair or a (disk, path, uri) "
                f"triple, not {entry!r}")
        disk, path = entry[0], entry[1]
        uri = entry[2] if len(entry) == 3 else None
        if not isinstance(path, str) or not path.startswith("/"):
            raise errors.HypervisorError(
                f"Block device #{index} path must be an absolute path, not {path!r}")
        mode = getattr(disk, "mode", None)
        if mode is None and isinstance(disk, Mapping):
            mode = disk.get("mode")
        result.append(BlockDevice(path=path, readonly=(mode == c.DISK_RDONLY), uri=uri))
    return result


@dataclass(frozen=True)
class MachineSpec:
    """Everything about an instance the command line depends on, besides hvparams."""

    name: str
    memory: int
    vcpus: int
    uuid: str | None = None
    network_port: int | None = None
    run_as: str | None = None  # user name or "uid:gid", for security models user/pool


def vnc_display(network_port: int | None, name: str) -> int:
    """The VNC display number of an instance listening on an IP address."""
    if not isinstance(network_port, int) or network_port < c.VNC_BASE_PORT:
        raise errors.HypervisorError(
            f"Instance {name} needs a network_port of at least {c.VNC_BASE_PORT} "
            f"for VNC, not {network_port!r}")
    return network_port - c.VNC_BASE_PORT


def build_argv(spec: MachineSpec, disks: Sequence[BlockDevice], hvp: Mapping[str, Any],
               caps: Caps, paths: InstancePaths) -> list[str]:
    """The QEMU command line for an instance, without NICs and per-start flags.

    ``hvp`` must be filled and checked.  The result is what the runtime
    record stores; :func:`build_nic_argv` and :func:`start_flags` add the
    parts that change with every start.
    """
    argv: list[str] = [hvp[c.HV_KVM_PATH], "-name", spec.name, "-no-user-config",
                       "-nodefaults", "-daemonize", "-pidfile", paths.pidfile]
    argv += _machine(hvp)
    argv += ["-m", str(spec.memory), "-smp", str(spec.vcpus)]
    if spec.uuid:
        try:
            argv += ["-uuid", str(_uuid.UUID(str(spec.uuid)))]
        except ValueError:
            pass  # the cluster manager's uuid is informational; never fail a start on it
    argv += _monitors(paths)
    argv += _boot(hvp)
    argv += _disks(disks, hvp, caps)
    ide_disks = len(disks) if hvp[c.HV_DISK_TYPE] == c.HT_DISK_IDE else 0
    argv += _removable_media(hvp, ide_disks)
    argv += _kernel(hvp)
    if hvp[c.HV_MEM_PATH]:
        argv += ["-mem-path", hvp[c.HV_MEM_PATH], "-mem-prealloc"]
    if hvp[c.HV_USE_LOCALTIME]:
        argv += ["-rtc", "base=localtime"]
    argv += _serial(hvp, paths)
    argv += _display(spec, hvp, paths)
    argv += _usb(hvp)
    argv += _isolation(spec, hvp, caps, paths)
    return argv


def _machine(hvp: Mapping[str, Any]) -> list[str]:
    flag = hvp[c.HV_KVM_FLAG]
    accel = {c.HT_KVM_ENABLED: "kvm", c.HT_KVM_DISABLED: "tcg"}.get(flag, "kvm:tcg")
    options = ["pc", f"accel={accel}"]
    if not hvp[c.HV_ACPI]:
        options.append("acpi=off")
    return ["-machine", ",".join(options)]


def _socket_chardev(chardev_id: str, path: str) -> str:
    return f"socket,id={chardev_id},path={qemu_escape(path)},server=on,wait=off"


def _monitors(paths: InstancePaths) -> list[str]:
    return ["-chardev", _socket_chardev("qmp", paths.qmp_socket),
            "-mon", "chardev=qmp,mode=control",
            "-chardev", _socket_chardev("qmpl", paths.qmp_long_socket),
            "-mon", "chardev=qmpl,mode=control",
            "-chardev", _socket_chardev("hmp", paths.monitor_socket),
            "-mon", "chardev=hmp,mode=readline"]


def _boot(hvp: Mapping[str, Any]) -> list[str]:
    if hvp[c.HV_KERNEL_PATH]:
        return []  # QEMU boots the given kernel whatever the order says
    return ["-boot", "order=" + BOOT_LETTERS[hvp[c.HV_BOOT_ORDER]]]


def _drive(drive_id: str, path: str, readonly: bool, cache: str | None,
           media: str = "disk") -> list[str]:
    options = [f"file={qemu_escape(path)}", "format=raw", "if=none", f"id={drive_id}"]
    if media == "cdrom":
        options.append("media=cdrom")
    if readonly or media == "cdrom":
        options.append("readonly=on")
    if cache and cache != c.HT_CACHE_DEFAULT:
        options.append(f"cache={cache}")
    return ["-drive", ",".join(options)]


def _ide_address(slot: int) -> str:
    return f"bus=ide.{slot // 2},unit={slot % 2}"


def _disks(disks: Sequence[BlockDevice], hvp: Mapping[str, Any], caps: Caps) -> list[str]:
    disk_type = hvp[c.HV_DISK_TYPE]
    cache = hvp[c.HV_DISK_CACHE]
    boot_disk = hvp[c.HV_BOOT_ORDER] == c.HT_BO_DISK and not hvp[c.HV_KERNEL_PATH]
    argv: list[str] = []
    if disk_type == c.HT_DISK_SCSI and disks:
        argv += ["-device", "lsi53c895a,id=scsi0"]
    if disk_type == c.HT_DISK_SD and disks:
        if len(disks) > 1:
            raise errors.HypervisorError("disk_type sd supports a single disk only")
        argv += ["-device", "sdhci-pci,id=sdhci0"]
    if disk_type == c.HT_DISK_IDE and len(disks) > IDE_SLOTS:
        raise errors.HypervisorError(
            f"disk_type ide supports at most {IDE_SLOTS} disks, not {len(disks)}")
    for index, disk in enumerate(disks):
        drive_id = f"disk{index}"
        if disk.readonly and disk_type in READONLY_UNSUPPORTED:
            raise errors.HypervisorError(
                f"Disk #{index} ({disk.path}) is read-only, which QEMU's {disk_type} disks "
                f"cannot be; use disk_type {c.HT_DISK_PARAVIRTUAL} or {c.HT_DISK_SCSI}")
        argv += _drive(drive_id, disk.path, disk.readonly, cache)
        device = {
            c.HT_DISK_PARAVIRTUAL: f"virtio-blk-pci,drive={drive_id},id={drive_id}-dev",
            c.HT_DISK_IDE: f"ide-hd,drive={drive_id},id={drive_id}-dev,{_ide_address(index)}",
            c.HT_DISK_SCSI: f"scsi-hd,drive={drive_id},id={drive_id}-dev,bus=scsi0.0,"
                            f"scsi-id={index}",
            c.HT_DISK_SD: f"sd-card,drive={drive_id},id={drive_id}-dev",
        }.get(disk_type)
        if device is None:
            raise errors.HypervisorError(f"disk_type {disk_type} cannot be used with QEMU on x86")
        if boot_disk and index == 0 and disk_type != c.HT_DISK_SD:
            device += ",bootindex=1"
        argv += ["-device", device]
    return argv


def _removable_media(hvp: Mapping[str, Any], ide_disks: int) -> list[str]:
    argv: list[str] = []
    cdroms = [p for p in (hvp[c.HV_CDROM_IMAGE_PATH], hvp[c.HV_KVM_CDROM2_IMAGE_PATH]) if p]
    if cdroms:
        cd_type = hvp[c.HV_KVM_CDROM_DISK_TYPE] or c.HT_DISK_IDE
        if cd_type not in CDROM_DEVICES:
            raise errors.HypervisorError(f"cdrom_disk_type {cd_type} cannot hold a CD-ROM")
        # IDE disks take the first slots; CD-ROMs prefer 2 and 3 as Ganeti's did
        free_ide = [s for s in (2, 3, 0, 1) if s >= ide_disks]
        if cd_type == c.HT_DISK_IDE and len(free_ide) < len(cdroms):
            raise errors.HypervisorError(
                f"{ide_disks} IDE disks and {len(cdroms)} IDE CD-ROMs do not fit the "
                f"{IDE_SLOTS} IDE slots; use disk_type paravirtual or fewer CD-ROMs")
        if cd_type == c.HT_DISK_PARAVIRTUAL:
            argv += ["-device", "virtio-scsi-pci,id=cdscsi0"]
        elif cd_type == c.HT_DISK_SCSI:
            argv += ["-device", "lsi53c895a,id=cdscsi0"]
        boot_cd = hvp[c.HV_BOOT_ORDER] == c.HT_BO_CDROM and not hvp[c.HV_KERNEL_PATH]
        for index, path in enumerate(cdroms):
            drive_id = f"cdrom{index}"
            argv += _drive(drive_id, path, True, None, media="cdrom")
            if cd_type == c.HT_DISK_IDE:
                device = (f"ide-cd,drive={drive_id},id={drive_id}-dev,"
                          f"{_ide_address(free_ide[index])}")
            else:
                device = f"scsi-cd,drive={drive_id},id={drive_id}-dev,bus=cdscsi0.0,scsi-id={index}"
            if boot_cd and index == 0:
                device += ",bootindex=0"
            argv += ["-device", device]
    floppy = hvp[c.HV_KVM_FLOPPY_IMAGE_PATH]
    if floppy:
        argv += ["-drive", f"file={qemu_escape(floppy)},format=raw,if=floppy,index=0"]
    return argv


def _kernel(hvp: Mapping[str, Any]) -> list[str]:
    kernel = hvp[c.HV_KERNEL_PATH]
    if not kernel:
        return []
    argv = ["-kernel", kernel]
    if hvp[c.HV_INITRD_PATH]:
        argv += ["-initrd", hvp[c.HV_INITRD_PATH]]
    append = []
    if hvp[c.HV_ROOT_PATH]:
        append.append(f"root={hvp[c.HV_ROOT_PATH]}")
    if hvp[c.HV_KERNEL_ARGS]:
        append.append(hvp[c.HV_KERNEL_ARGS])
    if hvp[c.HV_SERIAL_CONSOLE]:
        append.append(f"console=ttyS0,{hvp[c.HV_SERIAL_SPEED]}")
    if append:
        argv += ["-append", " ".join(append)]
    return argv


def _serial(hvp: Mapping[str, Any], paths: InstancePaths) -> list[str]:
    if not hvp[c.HV_SERIAL_CONSOLE]:
        return []
    return ["-chardev", _socket_chardev("serial0", paths.serial_socket),
            "-serial", "chardev:serial0"]


def _display(spec: MachineSpec, hvp: Mapping[str, Any], paths: InstancePaths) -> list[str]:
    address = hvp[c.HV_VNC_BIND_ADDRESS]
    if not address:
        return ["-display", "none"]
    if address.startswith("/"):
        target = "unix:" + qemu_escape(paths.vnc_socket(address))
    else:
        display = vnc_display(spec.network_port, spec.name)
        host = "" if address == c.IP4_ADDRESS_ANY else address
        target = f"{host}:{display}"
    argv: list[str] = []
    options = [target]
    if hvp[c.HV_VNC_TLS]:
        x509 = hvp[c.HV_VNC_X509]
        if x509:
            verify = "on" if hvp[c.HV_VNC_X509_VERIFY] else "off"
            argv += ["-object", f"tls-creds-x509,id={VNC_TLS_ID},dir={qemu_escape(x509)},"
                                f"endpoint=server,verify-peer={verify}"]
        else:
            argv += ["-object", f"tls-creds-anon,id={VNC_TLS_ID},endpoint=server"]
        options.append(f"tls-creds={VNC_TLS_ID}")
    if hvp[c.HV_VNC_PASSWORD_FILE]:
        options.append("password=on")
    return argv + ["-vga", "std", "-vnc", ",".join(options)]


def _usb(hvp: Mapping[str, Any]) -> list[str]:
    mouse = hvp[c.HV_USB_MOUSE]
    if not mouse and hvp[c.HV_VNC_BIND_ADDRESS]:
        mouse = c.HT_MOUSE_TABLET  # absolute pointer, so the VNC cursor stays in sync
    if not mouse:
        return []
    return ["-usb", "-device", f"{MOUSE_DEVICES[mouse]},id=pointer0"]


def _isolation(spec: MachineSpec, hvp: Mapping[str, Any], caps: Caps,
               paths: InstancePaths) -> list[str]:
    chroot = paths.chroot if hvp[c.HV_KVM_USE_CHROOT] else None
    user = spec.run_as
    if not chroot and not user:
        return []
    run_with: list[str] = []
    argv: list[str] = []
    if user:
        if caps.has_run_with_user:
            run_with.append(f"user={qemu_escape(user)}")
        elif caps.has_runas:
            argv += ["-runas", user]
        else:
            raise errors.HypervisorError("This QEMU can neither -runas nor -run-with user=")
    if chroot:
        if caps.has_run_with_chroot:
            run_with.append(f"chroot={qemu_escape(chroot)}")
        elif caps.has_chroot:
            argv += ["-chroot", chroot]
        else:
            raise errors.HypervisorError("This QEMU can neither -chroot nor -run-with chroot=")
    if run_with:
        argv += ["-run-with", ",".join(run_with)]
    return argv


@dataclass(frozen=True)
class NicSpec:
    """One NIC as QEMU gets it: the model, the MAC and the open TAP fd."""

    model: str
    mac: str
    fd: int
    vhost: bool = False


def build_nic_argv(nics: Sequence[NicSpec], boot_network: bool) -> list[str]:
    """``-netdev``/``-device`` pairs for the NICs, their TAP fds inherited by QEMU."""
    argv: list[str] = []
    for index, nic in enumerate(nics):
        netdev = f"tap,id=net{index},fd={nic.fd}"
        if nic.vhost:
            netdev += ",vhost=on"
        device = f"{nic.model},netdev=net{index},id=nic{index},mac={nic.mac}"
        if not boot_network:
            device += ",romfile="  # no option ROM: faster start, no ROM file needed
        argv += ["-netdev", netdev, "-device", device]
    return argv


def start_flags(paused: bool = True, incoming: str | None = None) -> list[str]:
    """Per-start flags: ``-S`` (the library continues the guest itself) and ``-incoming``."""
    argv = ["-S"] if paused else []
    if incoming:
        argv += ["-incoming", incoming]
    return argv
