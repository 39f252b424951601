"""The QEMU command line, as a pure function of the instance, its parameters
and the capabilities of the QEMU binary.

Nothing here touches the node: the caller resolves users, opens TAP devices
and checks that files exist.  Which spelling of an option to use is decided
by asking :class:`~ganeti_kvm.qemu.caps.QemuCaps` by name, never by comparing
versions.

No value reaches QEMU's option parser unchecked.  QEMU reads most options
as ``key=value,...`` lists, where a comma starts the next option: values
in such lists (paths in ``file=``, ``path=``, ``dir=``, ``user=``) go
through :func:`qemu_escape`, which doubles commas so QEMU sees one value.
Values QEMU takes whole (``-pidfile``, ``-mem-path``, ``-kernel``,
``-append``, ``-runas``) go through :func:`check_value`.  Values that are
neither paths nor text (the instance name, a MAC, a VNC address, a cache
mode) are checked against their exact form.  Every value is refused if it
holds a NUL (the kernel cannot pass it), a newline, or more than
:data:`MAX_VALUE_BYTES` bytes (the kernel refuses an argument past 128 KiB
with E2BIG); the :class:`errors.ParameterError` names the parameter.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import re
import uuid as _uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ganeti_kvm import errors
from ganeti_kvm.core import names as c
from ganeti_kvm.host.paths import InstancePaths, check_instance_name
from ganeti_kvm.qemu import cpu, devices, macaddr, peripherals, spice
from ganeti_kvm.qemu.caps import DEFAULT_MACHINE, is_machine_name
from ganeti_kvm.qemu.devices import DeviceId

log = logging.getLogger(__name__)

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
# QEMU device models of the SCSI controllers of disk_type scsi (scsi_controller_type)
SCSI_CONTROLLERS = {
    c.HT_SCSI_CONTROLLER_LSI: "lsi53c895a",
    c.HT_SCSI_CONTROLLER_MEGASAS: "megasas",
    c.HT_SCSI_CONTROLLER_VIRTIO: "virtio-scsi-pci",
}
BALLOON_DEVICE = "virtio-balloon-pci"
# The QEMU guest agent's channel (use_guest_agent): a virtio-serial controller
# of its own with one port of the name qemu-ga looks for, on a socket chardev.
GUEST_AGENT_BUS_DEVICE = "virtio-serial-pci"
GUEST_AGENT_CHARDEV = "qga0"
GUEST_AGENT_PORT_NAME = "org.qemu.guest_agent.0"
GUEST_AGENT_PORT_ID = "qga0-port"
# The chardev of ganeti-kvmd's QMP monitor (user_shutdown)
KVMD_CHARDEV = "kvmd"


def disk_devices(hvp: Mapping[str, Any]) -> tuple[str, ...]:
    """The QEMU devices the data disks of ``hvp`` need (the SCSI controller chosen by it)."""
    disk_type = hvp[c.HV_DISK_TYPE]
    if disk_type == c.HT_DISK_SCSI:
        controller = hvp.get(c.HV_KVM_SCSI_CONTROLLER_TYPE, c.HT_SCSI_CONTROLLER_LSI)
        return (SCSI_CONTROLLERS.get(controller, str(controller)), "scsi-hd")
    return DISK_DEVICES.get(disk_type, ())


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
    @property
    def has_audiodev(self) -> bool: ...
    @property
    def has_soundhw(self) -> bool: ...


MAX_VALUE_BYTES = 4096
"""The longest value (in bytes) that goes into QEMU's command line: a path
(PATH_MAX) or the kernel command line, far below the kernel's 128 KiB limit
for one argument."""


def _shown(value: object) -> str:
    """``value`` for an error message, cut short if it is long."""
    text = repr(value)
    return text if len(text) <= 100 else text[:100] + "..."


def check_value(param: str, value: object, forbidden: str = "") -> str:
    """``value`` if it can be one argv element as it is, else ParameterError naming ``param``.

    Refused: a non-string, a NUL, a newline or carriage return, text the
    file system encoding cannot carry, more than :data:`MAX_VALUE_BYTES`
    bytes, and any character of ``forbidden``.
    """
    def fail(why: str) -> errors.ParameterError:
        return errors.ParameterError(
            f"Parameter {param} {why} ({_shown(value)}); fix the value", param, value)

    if not isinstance(value, str):
        raise fail(f"must be a string, not {type(value).__name__}")
    if "\0" in value:
        raise fail("contains a NUL byte")
    if "\n" in value or "\r" in value:
        raise fail("contains a newline")
    try:
        size = len(os.fsencode(value))
    except UnicodeError:
        raise fail("is not valid text") from None
    if size > MAX_VALUE_BYTES:
        raise fail(f"is {size} bytes long, more than the {MAX_VALUE_BYTES} QEMU is given")
    bad = sorted({ch for ch in value if ch in forbidden})
    if bad:
        raise fail(f"contains {' '.join(repr(ch) for ch in bad)}, which QEMU would misread")
    return value


def qemu_escape(value: str, param: str = "value") -> str:
    """Escape a value for QEMU's ``key=value,...`` option parser (commas are doubled).

    The value is first checked by :func:`check_value`; ``param`` names it
    in the error.
    """
    return check_value(param, value).replace(",", ",,")


def _path(param: str, value: object) -> str:
    """An absolute path for a ``key=value`` list, escaped (see :func:`qemu_escape`).

    Absolute, because QEMU reads ``file=PROTOCOL:...`` (``nbd:``, ``json:``)
    as a protocol when a colon comes before the first slash.
    """
    check_value(param, value)
    assert isinstance(value, str)
    if not value.startswith("/"):
        raise errors.ParameterError(
            f"Parameter {param} must be an absolute path, not {_shown(value)}", param, value)
    return qemu_escape(value, param)


def _choice(hvp: Mapping[str, Any], key: str, table: Mapping[Any, Any]) -> Any:
    """``table[hvp[key]]``, or ParameterError naming ``key`` if the value is not a key."""
    value = hvp[key]
    try:
        return table[value]
    except (KeyError, TypeError):
        raise errors.ParameterError(
            f"Parameter {key} must be one of {', '.join(sorted(map(str, table)))}, "
            f"not {_shown(value)}", key, value) from None


def _count(param: str, value: object) -> str:
    """A whole number greater than zero, as text."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise errors.ParameterError(
            f"Parameter {param} must be a whole number greater than zero, not "
            f"{_shown(value)}", param, value)
    return str(value)


@dataclass(frozen=True)
class BlockDevice:
    """A disk as handed to StartInstance: where it is and whether it is read-only."""

    path: str
    readonly: bool = False
    uri: str | None = None
    # How the guest sees it (see :mod:`ganeti_kvm.qemu.devices`); None: by position.
    device: DeviceId | None = None
    # On storage other nodes reach too (the cluster manager's externally
    # mirrored disks): QEMU must not cache it, or a migration corrupts it.
    shared: bool = False
    # The cluster manager's id of the disk (Ganeti's uuid), by which a later
    # hotplug removal finds it; None if it has none.
    uuid: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"path": self.path, "readonly": self.readonly, "uri": self.uri}
        if self.device is not None:
            data[devices.DEVICE_KEY] = self.device.to_dict()
        if self.shared:
            data["shared"] = True
        if self.uuid is not None:
            data["uuid"] = self.uuid
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BlockDevice:
        uuid = data.get("uuid")
        return cls(path=str(data["path"]), readonly=bool(data.get("readonly")),
                   uri=data.get("uri"), device=devices.identity_of(data, f"disk {data['path']}"),
                   shared=data.get("shared") is True,
                   uuid=uuid if isinstance(uuid, str) else None)


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
            raise errors.ParameterError(
                f"Block device #{index} path must be an absolute path, not {_shown(path)}",
                f"block device #{index} path", path)
        check_value(f"block device #{index} path", path)
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
    # The versioned machine type pinned when the instance first started
    # ("pc-i440fx-7.2"); None leaves the binary's "pc" alias to QEMU.
    machine: str | None = None
    # The virtio-balloon device's identity, kept in the record; None (a
    # record written before it existed): no balloon, as the instance runs.
    balloon: DeviceId | None = None
    # The guest agent's virtio-serial controller (use_guest_agent), kept in the
    # record like the balloon; None: no guest agent channel.
    guest_agent: DeviceId | None = None
    # SPICE (see ganeti_kvm.qemu.spice): the address the node resolved
    # spice_bind to (None: spice_bind is an address), the node's certificate
    # files, and the virtio-serial controller of the SPICE agent's channel
    # (kept in the record; None: QEMU places it).
    spice_address: str | None = None
    spice_tls: spice.TlsFiles | None = None
    spice_agent: DeviceId | None = None


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
    try:
        return _build_argv(spec, disks, hvp, caps, paths)
    except errors.ParameterError as err:
        raise errors.ParameterError(f"Instance {_shown(spec.name)[1:-1]}: {err}",
                                    err.name, err.value) from None


def _build_argv(spec: MachineSpec, disks: Sequence[BlockDevice], hvp: Mapping[str, Any],
                caps: Caps, paths: InstancePaths) -> list[str]:
    try:
        # -name is a key=value list (``-name foo,debug-threads=on``): only a
        # valid instance name (no comma, no '=') goes there as it is.
        check_instance_name(spec.name)
    except errors.HypervisorError as err:
        raise errors.ParameterError(str(err), "name", spec.name) from None
    argv: list[str] = [check_value(c.HV_KVM_PATH, hvp[c.HV_KVM_PATH]), "-name", spec.name,
                       "-no-user-config", "-nodefaults", "-daemonize",
                       "-pidfile", check_value("run_dir", paths.pidfile)]
    argv += log_flags(paths)
    argv += _machine(spec, hvp)
    argv += ["-m", _count("memory", spec.memory), "-smp", cpu.smp_value(spec.vcpus, hvp)]
    argv += cpu.cpu_args(hvp)
    if spec.uuid:
        # the cluster manager's uuid is informational; never fail a start on it
        with contextlib.suppress(ValueError):
            argv += ["-uuid", str(_uuid.UUID(str(spec.uuid)))]
    argv += _monitors(paths)
    argv += kvmd_monitor(hvp, paths)
    argv += _boot(hvp)
    argv += _disks(disks, hvp, caps, spec.name)
    ide_disks = len(disks) if hvp[c.HV_DISK_TYPE] == c.HT_DISK_IDE else 0
    argv += _removable_media(hvp, ide_disks)
    argv += _kernel(hvp)
    if hvp[c.HV_MEM_PATH]:
        argv += ["-mem-path", check_value(c.HV_MEM_PATH, hvp[c.HV_MEM_PATH]), "-mem-prealloc"]
    if hvp[c.HV_USE_LOCALTIME]:
        argv += ["-rtc", "base=localtime"]
    # .get: records written before these keys existed lack them.
    if hvp.get(c.HV_REBOOT_BEHAVIOR) == c.INSTANCE_REBOOT_EXIT:
        argv += ["-no-reboot"]  # a guest reboot ends QEMU, as the 2011 driver's "exit"
    argv += _serial(hvp, paths)
    argv += _display(spec, hvp, paths)
    if hvp.get(c.HV_KEYMAP) and hvp[c.HV_VNC_BIND_ADDRESS]:
        argv += ["-k", check_value(c.HV_KEYMAP, hvp[c.HV_KEYMAP])]
    argv += _usb(hvp)
    argv += peripherals.sound_argv(hvp.get(c.HV_SOUNDHW) or "", caps)
    argv += _balloon(spec)
    argv += guest_agent_argv(spec, hvp, paths)
    argv += _isolation(spec, hvp, caps, paths)
    # last, as Ganeti's: the operator's own options (see peripherals.kvm_extra_argv)
    argv += peripherals.kvm_extra_argv(hvp.get(c.HV_KVM_EXTRA) or "",
                                       bool(hvp[c.HV_SERIAL_CONSOLE]))
    return argv


def _machine(spec: MachineSpec, hvp: Mapping[str, Any]) -> list[str]:
    # the pinned type, else machine_version (a new start pins it), else "pc"
    wanted = hvp.get(c.HV_KVM_MACHINE_VERSION) or ""
    if not spec.machine and wanted and not is_machine_name(wanted):
        raise errors.ParameterError(
            f"Parameter {c.HV_KVM_MACHINE_VERSION} must be a machine type name such as "
            f"pc-i440fx-7.2, not {_shown(wanted)}", c.HV_KVM_MACHINE_VERSION, wanted)
    machine = spec.machine or wanted or DEFAULT_MACHINE
    if not is_machine_name(machine):
        raise errors.HypervisorError(
            f"Instance {spec.name} has an invalid machine type {machine!r} in its runtime "
            "record; stop it and start it again to pin this node's type")
    flag = hvp[c.HV_KVM_FLAG]
    accel = {c.HT_KVM_ENABLED: "kvm", c.HT_KVM_DISABLED: "tcg"}.get(flag, "kvm:tcg")
    options = [machine, f"accel={accel}"]
    if not hvp[c.HV_ACPI]:
        options.append("acpi=off")
    return ["-machine", ",".join(options)]


def log_flags(paths: InstancePaths) -> list[str]:
    """``-D LOG``: QEMU's own output goes to the instance's log, also once daemonized.

    ``-D`` takes its value whole, but reads ``%d`` in it as its PID and
    refuses any other ``%``; see :mod:`ganeti_kvm.qemu.log`.
    """
    return ["-D", check_value("run_dir", paths.qemu_log, forbidden="%")]


def _socket_chardev(chardev_id: str, path: str) -> str:
    return f"socket,id={chardev_id},path={qemu_escape(path, 'run_dir')},server=on,wait=off"


def _monitors(paths: InstancePaths) -> list[str]:
    return ["-chardev", _socket_chardev("qmp", paths.qmp_socket),
            "-mon", "chardev=qmp,mode=control",
            "-chardev", _socket_chardev("qmpl", paths.qmp_long_socket),
            "-mon", "chardev=qmpl,mode=control",
            "-chardev", _socket_chardev("hmp", paths.monitor_socket),
            "-mon", "chardev=hmp,mode=readline"]


def kvmd_monitor(hvp: Mapping[str, Any], paths: InstancePaths) -> list[str]:
    """ganeti-kvmd's QMP monitor at ``ctrl/NAME.kvmd`` when ``user_shutdown`` is on.

    kvmd reads QEMU's events there to tell a guest's own power-off from an
    administrator's stop (see :attr:`InstancePaths.kvmd_socket`).  Only then:
    an instance without it costs nothing, and its power-off stays an error.
    QEMU creates it under another name, linked to this one once QEMU
    listens (see :attr:`InstancePaths.kvmd_bind_socket`).
    ``.get``: records written before the key existed lack it.
    """
    if not hvp.get(c.HV_KVM_USER_SHUTDOWN):
        return []
    return ["-chardev", _socket_chardev(KVMD_CHARDEV, paths.kvmd_bind_socket),
            "-mon", f"chardev={KVMD_CHARDEV},mode=control"]


def guest_agent_argv(spec: MachineSpec, hvp: Mapping[str, Any],
                     paths: InstancePaths) -> list[str]:
    """The guest agent's channel when ``use_guest_agent`` is on and the record gave
    its controller an identity: the socket ``ctrl/NAME.qga``, a virtio-serial
    controller on its kept PCI slot and the port qemu-ga opens."""
    if not hvp.get(c.HV_USE_GUEST_AGENT) or spec.guest_agent is None:
        return []
    ident = spec.guest_agent
    problem = ident.problem()
    if problem or ident.id is None:
        raise errors.HypervisorError(
            f"Instance {spec.name}'s guest agent channel has an identity QEMU cannot take: "
            f"{problem or 'it has no id'}; stop the instance and start it again")
    return ["-chardev", _socket_chardev(GUEST_AGENT_CHARDEV, paths.guest_agent_socket),
            "-device", ",".join([GUEST_AGENT_BUS_DEVICE, *ident.options()]),
            "-device", ",".join(["virtserialport", f"bus={ident.id}.0",
                                 f"chardev={GUEST_AGENT_CHARDEV}", f"id={GUEST_AGENT_PORT_ID}",
                                 f"name={GUEST_AGENT_PORT_NAME}"])]


def _boot(hvp: Mapping[str, Any]) -> list[str]:
    if hvp[c.HV_KERNEL_PATH]:
        return []  # QEMU boots the given kernel whatever the order says
    return ["-boot", "order=" + _choice(hvp, c.HV_BOOT_ORDER, BOOT_LETTERS)]


def _balloon(spec: MachineSpec) -> list[str]:
    if spec.balloon is None:
        return []
    problem = spec.balloon.problem()
    if problem:
        raise errors.HypervisorError(f"Instance {spec.name}'s balloon device has an identity "
                                     f"QEMU cannot take: {problem}")
    return ["-device", ",".join([BALLOON_DEVICE, *spec.balloon.options()])]


def _drive(drive_id: str, path: str, readonly: bool, cache: str | None,
           media: str = "disk", param: str = "disk path", aio: str | None = None,
           discard: str | None = None) -> list[str]:
    options = [f"file={_path(param, path)}", "format=raw", "if=none", f"id={drive_id}"]
    if media == "cdrom":
        options.append("media=cdrom")
    if readonly or media == "cdrom":
        options.append("readonly=on")
    if cache and cache != c.HT_CACHE_DEFAULT:
        options.append(f"cache={cache}")
    if aio and aio != c.HT_KVM_AIO_THREADS:  # threads is QEMU's default: left out, as before
        options.append(f"aio={aio}")
    if discard and discard != c.HT_DISCARD_DEFAULT:
        options.append(f"discard={discard}")
    return ["-drive", ",".join(options)]


def disk_cache(name: str, disk: BlockDevice, cache: str, aio: str) -> str:
    """The cache mode of ``disk``: ``none`` where it must be, logged when that overrides ``cache``.

    Shared storage is never cached, so a migration cannot corrupt it (the
    target reads what the source wrote, not a stale page cache), and
    aio=native needs O_DIRECT, which only cache=none gives; otherwise
    ``cache`` as configured.
    """
    why = ("it is on shared storage (no host cache, so a migration cannot corrupt it)"
           if disk.shared else
           f"{c.HV_KVM_DISK_AIO} {c.HT_KVM_AIO_NATIVE} needs O_DIRECT"
           if aio == c.HT_KVM_AIO_NATIVE else None)
    if why is None or cache == c.HT_CACHE_NONE:
        return cache
    log.warning("Instance %s: disk %s gets cache=none instead of %s %s: %s", name,
                disk.path, c.HV_DISK_CACHE, cache, why)
    return c.HT_CACHE_NONE


def _ide_address(slot: int) -> str:
    return f"bus=ide.{slot // 2},unit={slot % 2}"


def _disks(disks: Sequence[BlockDevice], hvp: Mapping[str, Any], caps: Caps,
           name: str = "(unnamed)") -> list[str]:
    disk_type = hvp[c.HV_DISK_TYPE]
    cache = _choice(hvp, c.HV_DISK_CACHE, {v: v for v in c.HT_VALID_CACHE_TYPES})
    # .get: records written before these keys existed lack them.
    aio = _choice({c.HV_KVM_DISK_AIO: hvp.get(c.HV_KVM_DISK_AIO) or c.HT_KVM_AIO_THREADS},
                  c.HV_KVM_DISK_AIO, {v: v for v in c.HT_KVM_VALID_AIO_TYPES})
    discard = _choice({c.HV_DISK_DISCARD: hvp.get(c.HV_DISK_DISCARD) or c.HT_DISCARD_DEFAULT},
                      c.HV_DISK_DISCARD, {v: v for v in c.HT_VALID_DISCARD_TYPES})
    boot_disk = hvp[c.HV_BOOT_ORDER] == c.HT_BO_DISK and not hvp[c.HV_KERNEL_PATH]
    argv: list[str] = []
    if disk_type == c.HT_DISK_SCSI and disks:
        controller = _choice(
            {c.HV_KVM_SCSI_CONTROLLER_TYPE: hvp.get(c.HV_KVM_SCSI_CONTROLLER_TYPE)
             or c.HT_SCSI_CONTROLLER_LSI}, c.HV_KVM_SCSI_CONTROLLER_TYPE, SCSI_CONTROLLERS)
        argv += ["-device", f"{controller},id=scsi0"]
    if disk_type == c.HT_DISK_SD and disks:
        if len(disks) > 1:
            raise errors.HypervisorError("disk_type sd supports a single disk only")
        argv += ["-device", "sdhci-pci,id=sdhci0"]
    if disk_type == c.HT_DISK_IDE and len(disks) > IDE_SLOTS:
        raise errors.HypervisorError(
            f"disk_type ide supports at most {IDE_SLOTS} disks, not {len(disks)}")
    driver = {c.HT_DISK_PARAVIRTUAL: "virtio-blk-pci", c.HT_DISK_IDE: "ide-hd",
              c.HT_DISK_SCSI: "scsi-hd", c.HT_DISK_SD: "sd-card"}.get(disk_type)
    if driver is None and disks:
        raise errors.HypervisorError(f"disk_type {disk_type} cannot be used with QEMU on x86")
    for index, disk in enumerate(disks):
        ident = disk.device or devices.positional_disk(index, disk_type)
        problem = ident.problem()
        if problem:
            raise errors.HypervisorError(f"Disk #{index} ({disk.path}) has a device identity "
                                         f"QEMU cannot take: {problem}")
        if disk.readonly and disk_type in READONLY_UNSUPPORTED:
            raise errors.HypervisorError(
                f"Disk #{index} ({disk.path}) is read-only, which QEMU's {disk_type} disks "
                f"cannot be; use disk_type {c.HT_DISK_PARAVIRTUAL} or {c.HT_DISK_SCSI}")
        argv += _drive(ident.backend, disk.path, disk.readonly,
                       disk_cache(name, disk, cache, aio),
                       param=f"block device #{index} path", aio=aio, discard=discard)
        device = ",".join([ident.driver or str(driver), f"drive={ident.backend}",
                           *ident.options()])
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
            argv += _drive(drive_id, path, True, None, media="cdrom",
                           param=(c.HV_CDROM_IMAGE_PATH, c.HV_KVM_CDROM2_IMAGE_PATH)[index])
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
        argv += ["-drive", f"file={_path(c.HV_KVM_FLOPPY_IMAGE_PATH, floppy)},format=raw,"
                           "if=floppy,index=0"]
    return argv


def _kernel(hvp: Mapping[str, Any]) -> list[str]:
    kernel = hvp[c.HV_KERNEL_PATH]
    if not kernel:
        return []
    # -kernel, -initrd and -append are taken whole (commas are literal), but
    # QEMU splits -initrd at commas for multiboot kernels: no commas there.
    argv = ["-kernel", check_value(c.HV_KERNEL_PATH, kernel)]
    if hvp[c.HV_INITRD_PATH]:
        argv += ["-initrd", check_value(c.HV_INITRD_PATH, hvp[c.HV_INITRD_PATH], ",")]
    append = []
    if hvp[c.HV_ROOT_PATH]:
        append.append(f"root={check_value(c.HV_ROOT_PATH, hvp[c.HV_ROOT_PATH])}")
    if hvp[c.HV_KERNEL_ARGS]:
        append.append(check_value(c.HV_KERNEL_ARGS, hvp[c.HV_KERNEL_ARGS]))
    if hvp[c.HV_SERIAL_CONSOLE]:
        speed = _choice(hvp, c.HV_SERIAL_SPEED, {v: v for v in c.VALID_SERIAL_SPEEDS})
        append.append(f"console=ttyS0,{speed}")
    if append:
        argv += ["-append", check_value(c.HV_KERNEL_ARGS, " ".join(append))]
    return argv


def _serial(hvp: Mapping[str, Any], paths: InstancePaths) -> list[str]:
    if not hvp[c.HV_SERIAL_CONSOLE]:
        return []
    return ["-chardev", _socket_chardev("serial0", paths.serial_socket),
            "-serial", "chardev:serial0"]


def _display(spec: MachineSpec, hvp: Mapping[str, Any], paths: InstancePaths) -> list[str]:
    address = hvp[c.HV_VNC_BIND_ADDRESS]
    if spice.enabled(hvp) and not address:
        # Ganeti's qxl adapter unless vga names another
        return [*peripherals.vga_argv(hvp.get(c.HV_VGA) or c.HT_VGA_QXL),
                *spice.spice_argv(hvp, spec.name, spec.network_port, spec.spice_address,
                                  spec.spice_tls, spec.spice_agent)]
    if not address:
        return ["-display", "none", *peripherals.vga_argv(hvp.get(c.HV_VGA) or "")]
    if not isinstance(address, str):
        raise errors.ParameterError(
            f"Parameter {c.HV_VNC_BIND_ADDRESS} must be a string, not {_shown(address)}",
            c.HV_VNC_BIND_ADDRESS, address)
    if address.startswith("/"):
        # The key is explicit: an implied first key ends at the first '=', so
        # QEMU would read "unix:/a=b/x.vnc" as a parameter named "unix:/a".
        target = "vnc=unix:" + _path(c.HV_VNC_BIND_ADDRESS, paths.vnc_socket(address))
    else:
        try:
            ipaddress.IPv4Address(address)
        except ValueError:
            raise errors.ParameterError(
                f"Parameter {c.HV_VNC_BIND_ADDRESS} must be an IPv4 address or an absolute "
                f"path, not {_shown(address)}", c.HV_VNC_BIND_ADDRESS, address) from None
        display = vnc_display(spec.network_port, spec.name)
        host = "" if address == c.IP4_ADDRESS_ANY else address
        target = f"{host}:{display}"
    argv: list[str] = []
    options = [target]
    if hvp[c.HV_VNC_TLS]:
        x509 = hvp[c.HV_VNC_X509]
        if x509:
            verify = "on" if hvp[c.HV_VNC_X509_VERIFY] else "off"
            argv += ["-object", f"tls-creds-x509,id={VNC_TLS_ID},"
                                f"dir={_path(c.HV_VNC_X509, x509)},"
                                f"endpoint=server,verify-peer={verify}"]
        else:
            argv += ["-object", f"tls-creds-anon,id={VNC_TLS_ID},endpoint=server"]
        options.append(f"tls-creds={VNC_TLS_ID}")
    if hvp[c.HV_VNC_PASSWORD_FILE]:
        options.append("password=on")
    # the 2011 driver's std adapter, unless vga names another
    vga = peripherals.vga_argv(hvp.get(c.HV_VGA) or c.HT_VGA_STD)
    return argv + vga + ["-vnc", ",".join(options)]


def _usb(hvp: Mapping[str, Any]) -> list[str]:
    mouse = hvp[c.HV_USB_MOUSE]
    if not mouse and hvp[c.HV_VNC_BIND_ADDRESS]:
        mouse = c.HT_MOUSE_TABLET  # absolute pointer, so the VNC cursor stays in sync
    others = peripherals.usb_argv(hvp.get(c.HV_USB_DEVICES) or "")
    if not mouse:
        return ["-usb", *others] if others else []
    device = MOUSE_DEVICES.get(mouse) if isinstance(mouse, str) else None
    if device is None:
        raise errors.ParameterError(
            f"Parameter {c.HV_USB_MOUSE} must be one of {', '.join(sorted(MOUSE_DEVICES))}, "
            f"not {_shown(mouse)}", c.HV_USB_MOUSE, mouse)
    return ["-usb", "-device", f"{device},id=pointer0", *others]


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
            run_with.append(f"user={qemu_escape(user, c.HV_SECURITY_DOMAIN)}")
        elif caps.has_runas:
            argv += ["-runas", check_value(c.HV_SECURITY_DOMAIN, user)]
        else:
            raise errors.HypervisorError("This QEMU can neither -runas nor -run-with user=")
    if chroot:
        if caps.has_run_with_chroot:
            run_with.append(f"chroot={qemu_escape(chroot, 'run_dir')}")
        elif caps.has_chroot:
            argv += ["-chroot", check_value("run_dir", chroot)]
        else:
            raise errors.HypervisorError("This QEMU can neither -chroot nor -run-with chroot=")
    if run_with:
        argv += ["-run-with", ",".join(run_with)]
    return argv


@dataclass(frozen=True)
class NicSpec:
    """One NIC as QEMU gets it: the model, the MAC, the open TAP fd and its identity.

    ``device`` None gives the identity by position (``net0``/``nic0``, no
    PCI address, an option ROM only for a network boot), which is what
    instances started before identities were kept run with.
    """

    model: str
    mac: str
    fd: int
    vhost: bool = False
    device: DeviceId | None = None
    # Every queue's fd of a multiqueue TAP (virtio_net_queues > 1; ``fd`` is
    # the first); empty for a TAP with one queue.
    queue_fds: tuple[int, ...] = ()


def build_nic_argv(nics: Sequence[NicSpec], boot_network: bool,
                   name: str = "(unnamed)") -> list[str]:
    """``-netdev``/``-device`` pairs for the NICs, their TAP fds inherited by QEMU.

    ``name`` (the instance) is for errors: a MAC is checked again here, the
    last step before QEMU's option parser (see :mod:`ganeti_kvm.qemu.macaddr`),
    and so is each identity.
    """
    argv: list[str] = []
    models = frozenset(NIC_MODELS.values())
    for index, nic in enumerate(nics):
        mac = macaddr.check_mac(name, index, nic.mac)
        ident = nic.device or devices.positional_nic(index, boot_network)
        problem = ident.problem()
        if problem:
            raise errors.HypervisorError(
                f"Instance {name}: NIC {index} has a device identity QEMU cannot take: "
                f"{problem}; stop the instance and start it again")
        model = ident.driver or nic.model
        if model not in models:
            raise errors.ParameterError(
                f"Instance {name}: NIC {index} has an unknown model {_shown(model)} "
                f"(parameter {c.HV_NIC_TYPE})",
                c.HV_NIC_TYPE, model)
        # No vnet_hdr= here: QEMU refuses it with fd= and fds= and reads the
        # TAP's IFF_VNET_HDR (Ganeti's vnet_hdr, see host.netdev) from the fd.
        fds = list(nic.queue_fds) or [nic.fd]
        if not all(isinstance(fd, int) and not isinstance(fd, bool) and fd >= 0 for fd in fds):
            raise errors.HypervisorError(
                f"Instance {name}: NIC {index} has no open TAP device ({_shown(nic.fd)})")
        if len(fds) > 1 and model != NIC_MODELS[c.HT_NIC_PARAVIRTUAL]:
            raise errors.ParameterError(
                f"Instance {name}: NIC {index} is a {model}, which has one queue only; set "
                f"{c.HV_VIRTIO_NET_QUEUES} to 1", c.HV_VIRTIO_NET_QUEUES, len(fds))
        if len(fds) > 1:
            netdev = f"tap,id={ident.backend},fds={':'.join(map(str, fds))}"
        else:
            netdev = f"tap,id={ident.backend},fd={nic.fd}"
        if nic.vhost:
            netdev += ",vhost=on"
        options = ident.options()
        # id= first, as before identities were kept
        head = options[:1] if ident.id is not None else []
        device = ",".join([model, f"netdev={ident.backend}", *head, f"mac={mac}",
                           *options[len(head):]])
        if len(fds) > 1:
            # one MSI-X vector per queue and direction, plus config and control
            device += f",mq=on,vectors={2 * len(fds) + 2}"
        argv += ["-netdev", netdev, "-device", device]
    return argv


_HOST_NAME_RE = re.compile(r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                           r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")


def uri_host(target: object) -> str:
    """``target`` as the host of a ``tcp:HOST:PORT`` migration URI.

    QEMU reads options after the port (``tcp:h:p,to=...,ipv6``), and the
    URI also goes into monitor commands, so only an IP address (IPv6 in
    brackets) or a plain host name passes; ParameterError otherwise.
    """
    if isinstance(target, str):
        bare = target[1:-1] if target.startswith("[") and target.endswith("]") else target
        try:
            address = ipaddress.ip_address(bare)
        except ValueError:
            if bare == target and _HOST_NAME_RE.fullmatch(target):
                return target
        else:
            return f"[{address}]" if address.version == 6 else str(address)
    raise errors.ParameterError(
        f"Invalid migration target {_shown(target)}: give the target node's IP address",
        "target", target)


def start_flags(paused: bool = True, incoming: str | None = None) -> list[str]:
    """Per-start flags: ``-S`` (the library continues the guest itself) and ``-incoming``."""
    argv = ["-S"] if paused else []
    if incoming:
        scheme, _, rest = check_value("incoming", incoming).partition(":")
        host, _, port = rest.rpartition(":")
        try:
            valid = scheme == "tcp" and port.isdigit() and uri_host(host) == host
        except errors.ParameterError:
            valid = False
        if not valid:
            raise errors.ParameterError(
                f"Parameter incoming must be tcp:HOST:PORT, not {_shown(incoming)}",
                "incoming", incoming)
        argv += ["-incoming", incoming]
    return argv
