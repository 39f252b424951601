"""The core's hypervisor parameters: the checks, the table, the node checks.

A parameter table is data: it maps every key to a five-tuple
``(required, check_fn, check_msg, prereq_fn, prereq_msg)``.  ``check_fn`` is
a pure syntax check (run anywhere, touches nothing); ``prereq_fn`` is checked
on the node (a file exists, a directory exists).  The generic code here
applies a table; the check helpers (``ParamInSet``, ``OPT_FILE_CHECK``...)
keep the cluster manager's names, and :mod:`ganeti_kvm.hv_base` offers them
under those names to the 2011 contract.

``PARAMETERS`` is the core's table: one check per key the core implements
(:mod:`ganeti_kvm.core.names`).  :func:`check_syntax` adds the checks that
involve several keys (pure); :func:`check_node` checks what only the node
can know: users, devices and what the QEMU binary supports.  Each contract
derives its own table from this one.
"""

from __future__ import annotations

import ipaddress
import os
import pwd
import re
import shlex
import ssl
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ganeti_kvm import errors
from ganeti_kvm.core import names as c
from ganeti_kvm.core import pinning
from ganeti_kvm.host import affinity, ifaddr
from ganeti_kvm.qemu import cmdline, peripherals, spice
from ganeti_kvm.qemu import cpu as qemu_cpu
from ganeti_kvm.qemu.caps import is_machine_name

Check = tuple[bool, Callable[[Any], bool] | None, str | None,
              Callable[[Any], bool] | None, str | None]


MAX_PATH_BYTES = 4095  # PATH_MAX less the final NUL
MAX_TEXT_BYTES = 4096  # a text value for QEMU's command line (cmdline.MAX_VALUE_BYTES)


def _fits(value: str, limit: int) -> bool:
    """Whether ``value`` is at most ``limit`` bytes in the file system encoding."""
    try:
        return len(os.fsencode(value)) <= limit
    except UnicodeError:
        return False  # not text a path or an argument can carry


def _is_clean_abs_path(value: Any) -> bool:
    """An absolute, normalised path without characters that break QEMU options."""
    return (isinstance(value, str) and not any(c in value for c in ",\n\r\0")
            and _fits(value, MAX_PATH_BYTES) and os.path.isabs(value)
            and os.path.normpath(value) == value)


_ABS_PATH_MSG = (f"must be an absolute, normalised path of at most {MAX_PATH_BYTES} bytes "
                 "without commas or newlines")

NO_CHECK: Check = (False, None, None, None, None)
REQUIRED_CHECK: Check = (True, None, None, None, None)
OPT_FILE_CHECK: Check = (False, _is_clean_abs_path, _ABS_PATH_MSG,
                         os.path.isfile, "must be an existing file")
REQ_FILE_CHECK: Check = (True, _is_clean_abs_path, _ABS_PATH_MSG,
                         os.path.isfile, "must be an existing file")
OPT_DIR_CHECK: Check = (False, _is_clean_abs_path, _ABS_PATH_MSG,
                        os.path.isdir, "must be an existing directory")
REQ_DIR_CHECK: Check = (True, _is_clean_abs_path, _ABS_PATH_MSG,
                        os.path.isdir, "must be an existing directory")


def _is_port(value: Any) -> bool:
    return isinstance(value, int) and 0 < value < 65536


NET_PORT_CHECK: Check = (True, _is_port, "must be a port number from 1 to 65535",
                         None, None)
# The 2011 names of the port checks
REQ_NET_PORT_CHECK: Check = NET_PORT_CHECK
OPT_NET_PORT_CHECK: Check = (False, _is_port, NET_PORT_CHECK[2], None, None)


def parse_cpu_mask(cpu_mask: str) -> list[int]:
    """The CPU numbers of a mask such as ``"0-2,5"`` (``[0, 1, 2, 5]``); empty for ``""``.

    Raises :class:`errors.ParameterError` for anything else.
    """
    if not cpu_mask:
        return []
    cpus: list[int] = []
    for item in cpu_mask.split(","):
        bounds = item.split("-")
        if len(bounds) > 2 or not all(b.strip().isdigit() for b in bounds):
            raise errors.ParameterError(
                f"Invalid CPU mask item {item!r} in {cpu_mask!r}: use CPU numbers and "
                "ranges such as 0-2,5")
        lower, higher = int(bounds[0]), int(bounds[-1])
        if lower > higher:
            raise errors.ParameterError(
                f"Invalid CPU range {item!r} in {cpu_mask!r}: {lower} > {higher}")
        cpus.extend(range(lower, higher + 1))
    return cpus


def _is_cpu_mask_well_formed(cpu_mask: Any) -> bool:
    if not isinstance(cpu_mask, str):
        return False
    try:
        return len(parse_cpu_mask(cpu_mask)) > 0
    except errors.ParameterError:
        return False


_CPU_MASK_MSG = "must be CPU numbers and ranges such as 0-2,5"
REQ_CPU_MASK_CHECK: Check = (True, _is_cpu_mask_well_formed, _CPU_MASK_MSG, None, None)
OPT_CPU_MASK_CHECK: Check = (False, _is_cpu_mask_well_formed, _CPU_MASK_MSG, None, None)
MIGRATION_MODE_CHECK: Check = (
    True, lambda value: value in c.HT_MIGRATION_MODES,
    "must be one of " + ", ".join(sorted(c.HT_MIGRATION_MODES)),
    None, None)


def parse_migration_caps(value: str) -> list[str]:
    """The QEMU capability names of a ``migration_caps`` value (``"xbzrle:postcopy-ram"``)."""
    return [cap for cap in value.split(c.MIGRATION_CAPS_SEP) if cap] if value else []


def _is_migration_caps(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    caps = parse_migration_caps(value)
    return (c.MIGRATION_CAPS_SEP.join(caps) == value and len(set(caps)) == len(caps)
            and all(cap in c.HT_KVM_VALID_MIGRATION_CAPS for cap in caps))


MIGRATION_CAPS_CHECK: Check = (
    False, _is_migration_caps,
    "must be QEMU migration capabilities separated by colons, each once, from "
    + ", ".join(sorted(c.HT_KVM_VALID_MIGRATION_CAPS)), None, None)


def ParamInSet(required: bool, my_set: Iterable[Any]) -> Check:
    """A check that accepts only the values of ``my_set``."""
    allowed = frozenset(my_set)
    return (required, allowed.__contains__,
            "must be one of " + ", ".join(sorted(map(str, allowed))), None, None)


def PositiveInt(required: bool = True) -> Check:
    """A check for a whole number greater than zero."""
    return (required, lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
            "must be a whole number greater than zero", None, None)


_TYPE_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    c.VTYPE_STRING: (lambda v: isinstance(v, str), "a string"),
    c.VTYPE_MAYBE_STRING: (lambda v: v is None or isinstance(v, str),
                                   "a string or null"),
    c.VTYPE_BOOL: (lambda v: isinstance(v, bool), "true or false"),
    c.VTYPE_INT: (lambda v: isinstance(v, int) and not isinstance(v, bool),
                          "a whole number"),
}


def check_types(hvparams: Mapping[str, Any], types: Mapping[str, str]) -> None:
    """Raise :class:`errors.ParameterError` for an unknown key or a value of the wrong type."""
    if not isinstance(hvparams, Mapping):
        raise errors.ParameterError(
            f"hypervisor parameters must be a mapping, not {type(hvparams).__name__}")
    for name, value in hvparams.items():
        if name not in types:
            raise errors.ParameterError(
                f"Parameter '{name}' is not supported (known: see c.HVS_PARAMETERS)",
                name, value)
        check, what = _TYPE_CHECKS[types[name]]
        if not check(value):
            raise errors.ParameterError(
                f"Parameter '{name}' must be {what}, not {type(value).__name__} ({value!r})",
                name, value)


def apply_syntax_checks(table: Mapping[str, Check], types: Mapping[str, str],
                        hvparams: Mapping[str, Any]) -> None:
    """Apply the syntax half of a parameter table (types, presence, ``check_fn``)."""
    check_types(hvparams, types)
    for name, (required, check_fn, errstr, _, _) in table.items():
        if name not in hvparams:
            raise errors.ParameterError(f"Parameter '{name}' is missing", name)
        value = hvparams[name]
        if not required and not value:
            continue
        if value is None or value == "":
            raise errors.ParameterError(
                f"Parameter '{name}' is required but is currently not defined", name, value)
        if check_fn is not None and not check_fn(value):
            raise errors.ParameterError(
                f"Parameter '{name}' fails syntax check: {errstr} "
                f"(current value: {value!r})", name, value)


def _node_check_passes(check_fn: Callable[[Any], bool], value: Any) -> bool:
    """``check_fn(value)``; a value of a type the check cannot take fails it."""
    try:
        return bool(check_fn(value))
    except (TypeError, ValueError):
        return False


def apply_node_checks(table: Mapping[str, Check], hvparams: Mapping[str, Any]) -> None:
    """Apply the node half of a parameter table (``prereq_fn``: files, directories)."""
    for name, (required, _, _, check_fn, errstr) in table.items():
        value = hvparams.get(name)
        if not required and not value:
            continue
        if check_fn is not None and not _node_check_passes(check_fn, value):
            raise errors.ParameterError(
                f"Parameter '{name}' fails validation on this node: {errstr} "
                f"(current value: {value!r})", name, value)


def check_present(table: Mapping[str, Check], hvparams: Mapping[str, Any]) -> None:
    """Raise :class:`errors.ParameterError` unless ``hvparams`` is a mapping with every key."""
    if not isinstance(hvparams, Mapping):
        raise errors.ParameterError(
            f"hypervisor parameters must be a mapping, not {type(hvparams).__name__}")
    missing = sorted(set(table) - set(hvparams))
    if missing:
        raise errors.ParameterError(
            f"Parameter '{missing[0]}' is missing (missing: {', '.join(missing)}); "
            "pass the filled parameters (c.HVC_DEFAULTS overlaid with the "
            "instance's)", missing[0])


def _is_ipv4(value: str) -> bool:
    try:
        ipaddress.IPv4Address(value)
    except ValueError:
        return False
    return True


def _is_vnc_address(value: Any) -> bool:
    return isinstance(value, str) and (_is_ipv4(value) or _is_clean_abs_path(value))


def _is_cmdline_text(value: Any) -> bool:
    return (isinstance(value, str) and not any(ch in value for ch in "\n\r\0")
            and _fits(value, MAX_TEXT_BYTES))


_CMDLINE_TEXT_MSG = f"must be text of at most {MAX_TEXT_BYTES} bytes without newlines"


def _is_user_name(value: Any) -> bool:
    return (isinstance(value, str) and bool(value) and not value.startswith("-")
            and all(ch.isalnum() or ch in "._-" for ch in value))


def _is_keymap(value: Any) -> bool:
    """A keyboard layout name as QEMU's -k takes it (en-us, de-ch, pt-br, ...)."""
    return (isinstance(value, str) and 0 < len(value) <= 32 and value[0].isalpha()
            and all(ch.isascii() and (ch.isalnum() or ch in "-_") for ch in value))


def _parses(parse: Callable[[Any], Any]) -> Callable[[Any], bool]:
    """A check that ``parse`` accepts the value (raises no ParameterError)."""
    def check(value: Any) -> bool:
        try:
            parse(value)
        except errors.ParameterError:
            return False
        return True
    return check


def _kvm_extra_words(value: Any) -> list[str]:
    """The words of ``kvm_extra`` before the reserved options are looked at."""
    if not isinstance(value, str):
        raise errors.ParameterError("not a string")
    try:
        words = shlex.split(value)
    except ValueError as err:
        raise errors.ParameterError(str(err)) from None
    return [peripherals.check_word(word, value) for word in words]


def _is_pci_reservations(value: Any) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)
            and c.MIN_PCI_RESERVATIONS <= value <= c.QEMU_PCI_SLOTS)


_TOPOLOGY_MSG = (f"must be a whole number from 0 (QEMU's choice) to "
                 f"{qemu_cpu.MAX_TOPOLOGY}")


PARAMETERS: dict[str, Check] = {
    c.HV_KVM_PATH: REQ_FILE_CHECK,
    c.HV_KERNEL_PATH: OPT_FILE_CHECK,
    c.HV_INITRD_PATH: OPT_FILE_CHECK,
    c.HV_ROOT_PATH: (False, _is_cmdline_text, _CMDLINE_TEXT_MSG, None, None),
    c.HV_KERNEL_ARGS: (False, _is_cmdline_text, _CMDLINE_TEXT_MSG, None, None),
    c.HV_ACPI: NO_CHECK,
    c.HV_SERIAL_CONSOLE: NO_CHECK,
    c.HV_SERIAL_SPEED: ParamInSet(True, c.VALID_SERIAL_SPEEDS),
    c.HV_VNC_BIND_ADDRESS: (False, _is_vnc_address,
                            "the VNC bind address must be either a valid IPv4 address or "
                            "an absolute pathname", None, None),
    c.HV_VNC_TLS: NO_CHECK,
    c.HV_VNC_X509: OPT_DIR_CHECK,
    c.HV_VNC_X509_VERIFY: NO_CHECK,
    c.HV_VNC_PASSWORD_FILE: OPT_FILE_CHECK,
    # SPICE (see ganeti_kvm.qemu.spice); the node checks QEMU's -spice keys
    c.HV_KVM_SPICE_BIND: (False, spice.is_bind,
                          "must be an IP address or the name of a network interface", None,
                          None),
    c.HV_KVM_SPICE_IP_VERSION: (False, lambda v: v in c.VALID_IP_VERSIONS,
                                "must be 4 or 6 (or 0: any)", None, None),
    c.HV_KVM_SPICE_PASSWORD_FILE: OPT_FILE_CHECK,
    c.HV_KVM_SPICE_LOSSLESS_IMG_COMPR: ParamInSet(
        False, c.HT_KVM_SPICE_VALID_LOSSLESS_IMG_COMPR_OPTIONS),
    c.HV_KVM_SPICE_JPEG_IMG_COMPR: ParamInSet(False, c.HT_KVM_SPICE_VALID_LOSSY_IMG_COMPR_OPTIONS),
    c.HV_KVM_SPICE_ZLIB_GLZ_IMG_COMPR: ParamInSet(
        False, c.HT_KVM_SPICE_VALID_LOSSY_IMG_COMPR_OPTIONS),
    c.HV_KVM_SPICE_STREAMING_VIDEO_DETECTION: ParamInSet(
        False, c.HT_KVM_SPICE_VALID_VIDEO_STREAM_DETECTION_OPTIONS),
    c.HV_KVM_SPICE_AUDIO_COMPR: NO_CHECK,
    c.HV_KVM_SPICE_USE_TLS: NO_CHECK,
    c.HV_KVM_SPICE_TLS_CIPHERS: (False, spice.is_tls_ciphers,
                                 "must be an OpenSSL cipher list (e.g. HIGH:-DES:-3DES) of "
                                 "letters, digits and : + ! @ = _ . , - and spaces", None, None),
    c.HV_KVM_SPICE_USE_VDAGENT: NO_CHECK,
    c.HV_KVM_FLOPPY_IMAGE_PATH: OPT_FILE_CHECK,
    c.HV_CDROM_IMAGE_PATH: OPT_FILE_CHECK,
    c.HV_KVM_CDROM2_IMAGE_PATH: OPT_FILE_CHECK,
    c.HV_BOOT_ORDER: ParamInSet(True, c.HT_KVM_VALID_BO_TYPES),
    c.HV_NIC_TYPE: ParamInSet(True, c.HT_KVM_VALID_NIC_TYPES),
    c.HV_DISK_TYPE: ParamInSet(True, c.HT_KVM_VALID_DISK_TYPES),
    c.HV_KVM_CDROM_DISK_TYPE: ParamInSet(False, c.HT_KVM_VALID_DISK_TYPES),
    c.HV_USB_MOUSE: ParamInSet(False, c.HT_KVM_VALID_MOUSE_TYPES),
    c.HV_KEYMAP: (False, _is_keymap, "must be a keyboard layout name such as en-us or de-ch "
                  "(letters, digits, - and _)", None, None),
    c.HV_MIGRATION_PORT: NET_PORT_CHECK,
    c.HV_MIGRATION_BANDWIDTH: PositiveInt(True),
    c.HV_MIGRATION_DOWNTIME: PositiveInt(True),
    c.HV_MIGRATION_MODE: MIGRATION_MODE_CHECK,
    c.HV_KVM_MIGRATION_CAPS: MIGRATION_CAPS_CHECK,
    c.HV_USE_LOCALTIME: NO_CHECK,
    c.HV_DISK_CACHE: ParamInSet(True, c.HT_VALID_CACHE_TYPES),
    c.HV_SECURITY_MODEL: ParamInSet(True, c.HT_KVM_VALID_SM_TYPES),
    c.HV_SECURITY_DOMAIN: (False, _is_user_name, "must be a user name", None, None),
    c.HV_KVM_FLAG: ParamInSet(False, c.HT_KVM_FLAG_VALUES),
    c.HV_VHOST_NET: NO_CHECK,
    c.HV_KVM_USE_CHROOT: NO_CHECK,
    c.HV_MEM_PATH: OPT_DIR_CHECK,
    c.HV_REBOOT_BEHAVIOR: ParamInSet(True, c.REBOOT_BEHAVIORS),
    c.HV_CPU_MASK: (False, pinning.is_multi_cpu_mask,
                    f"must be CPU lists or '{c.CPU_PINNING_ALL}' separated by "
                    f"'{c.CPU_PINNING_SEP}', one entry for all vCPUs or one per vCPU "
                    "(e.g. 0-1:2:all)", None, None),
    c.HV_CPU_TYPE: (False, qemu_cpu.is_cpu_type,
                    "must be a CPU model of the node's QEMU with optional features "
                    "(e.g. qemu64 or host,+x2apic)", None, None),
    c.HV_CPU_CORES: (False, qemu_cpu.is_topology_value, _TOPOLOGY_MSG, None, None),
    c.HV_CPU_THREADS: (False, qemu_cpu.is_topology_value, _TOPOLOGY_MSG, None, None),
    c.HV_CPU_SOCKETS: (False, qemu_cpu.is_topology_value, _TOPOLOGY_MSG, None, None),
    c.HV_KVM_MACHINE_VERSION: (False, is_machine_name,
                               "must be a machine type of the node's QEMU of the i440fx "
                               "PC family: pc or pc-i440fx-*", None, None),
    c.HV_VGA: ParamInSet(False, c.HT_KVM_VALID_VGA_TYPES),
    c.HV_SOUNDHW: (False, _parses(peripherals.parse_soundhw),
                   "must be a comma-separated list of sound cards, each once, from "
                   + ", ".join(sorted(c.HT_KVM_VALID_SOUND_TYPES)), None, None),
    c.HV_USB_DEVICES: (False, _parses(peripherals.parse_usb_devices),
                       "must be a space- or comma-separated list of "
                       + ", ".join(sorted(c.HT_KVM_VALID_USB_TYPES))
                       + ", host:BUS.ADDR or host:VENDOR:PRODUCT", None, None),
    c.HV_KVM_EXTRA: (False, _parses(_kvm_extra_words),
                     "must split into words as a POSIX shell would (quotes and backslashes "
                     "work, no shell runs), without newlines; options the library sets "
                     "itself are refused: -" + ", -".join(sorted(peripherals.RESERVED_OPTIONS))
                     + ", -chardev with its ids, -serial with serial_console", None, None),
    c.HV_VNET_HDR: NO_CHECK,
    c.HV_USE_GUEST_AGENT: NO_CHECK,
    c.HV_KVM_USER_SHUTDOWN: NO_CHECK,
    c.HV_VIRTIO_NET_QUEUES: (True, lambda v: isinstance(v, int) and not isinstance(v, bool)
                             and 0 < v <= c.MAX_VIRTIO_NET_QUEUES,
                             f"must be a whole number from 1 to {c.MAX_VIRTIO_NET_QUEUES}",
                             None, None),
    c.HV_KVM_PCI_RESERVATIONS: (True, _is_pci_reservations,
                                f"must be a whole number from {c.MIN_PCI_RESERVATIONS} to "
                                f"{c.QEMU_PCI_SLOTS}: the PCI slots left to QEMU's own "
                                "devices before the NICs' and disks'", None, None),
    c.HV_KVM_DISK_AIO: ParamInSet(False, c.HT_KVM_VALID_AIO_TYPES),
    c.HV_DISK_DISCARD: ParamInSet(False, c.HT_VALID_DISCARD_TYPES),
    c.HV_KVM_SCSI_CONTROLLER_TYPE: ParamInSet(True, c.HT_KVM_VALID_SCSI_CONTROLLER_TYPES),
}

# Disk types QEMU has no meaning for as data disks on a PC machine.
_UNSUPPORTED_DISK_TYPES = {
    c.HT_DISK_MTD: "QEMU has no MTD device on x86 machines",
    c.HT_DISK_PFLASH: "a pflash drive on a PC machine replaces the firmware",
}
_UNSUPPORTED_CDROM_TYPES = {
    c.HT_DISK_SD: "an SD card cannot hold a CD-ROM",
    c.HT_DISK_MTD: "QEMU has no MTD device on x86 machines",
    c.HT_DISK_PFLASH: "a pflash drive cannot hold a CD-ROM",
}
X509_FILES = ("ca-cert.pem", "server-cert.pem", "server-key.pem")


def fill(hvparams: Mapping[str, Any] | None) -> dict[str, Any]:
    """The cluster defaults overlaid with ``hvparams`` (unknown keys are kept, to be refused)."""
    if hvparams is not None and not isinstance(hvparams, Mapping):
        raise errors.ParameterError(
            f"hypervisor parameters must be a mapping, not {type(hvparams).__name__}")
    filled = dict(c.DEFAULTS)
    filled.update(hvparams or {})
    return filled


def check_all_syntax(hvparams: Mapping[str, Any]) -> None:
    """The whole syntax check: the table, then the checks between keys."""
    apply_syntax_checks(PARAMETERS, c.PARAMETER_TYPES, hvparams)
    check_syntax(hvparams)


def check_all_node(hvparams: Mapping[str, Any], caps: Any,
                   spice_tls: spice.TlsFiles | None = None) -> None:
    """The whole node check: the table's files and directories, then :func:`check_node`."""
    apply_node_checks(PARAMETERS, hvparams)
    check_node(hvparams, caps, spice_tls=spice_tls)


def _others(allowed: frozenset[str], but: str) -> str:
    """The values of ``allowed`` other than ``but``, sorted: "a, b or c"."""
    rest = sorted(allowed - {but})
    return ", ".join(rest[:-1]) + " or " + rest[-1] if len(rest) > 1 else "".join(rest)


def check_syntax(hvparams: Mapping[str, Any]) -> None:
    """The checks between keys (the 2011 driver's, plus what modern QEMU needs).

    Each message keeps the 2011 driver's words where it had some, then names
    the keys involved, their values, and the values that would be accepted.
    """
    def fail(key: str, message: str) -> None:
        raise errors.ParameterError(message, key, hvparams[key])

    if hvparams[c.HV_KERNEL_PATH] and not hvparams[c.HV_ROOT_PATH]:
        fail(c.HV_ROOT_PATH,
             "Need a root partition for the instance, if a kernel is defined: "
             f"{c.HV_KERNEL_PATH} is {hvparams[c.HV_KERNEL_PATH]!r} but {c.HV_ROOT_PATH} "
             f"is empty; set {c.HV_ROOT_PATH} to the guest's root device (e.g. /dev/vda1), "
             f"or set {c.HV_KERNEL_PATH} to \"\" to boot from the disk")
    if hvparams[c.HV_INITRD_PATH] and not hvparams[c.HV_KERNEL_PATH]:
        fail(c.HV_INITRD_PATH,
             f"{c.HV_INITRD_PATH} is {hvparams[c.HV_INITRD_PATH]!r} but {c.HV_KERNEL_PATH} "
             f"is empty; an initrd is loaded only with a kernel: set {c.HV_KERNEL_PATH} "
             f"to a kernel file, or set {c.HV_INITRD_PATH} to \"\"")
    if hvparams[c.HV_VNC_X509_VERIFY] and not hvparams[c.HV_VNC_X509]:
        fail(c.HV_VNC_X509,
             f"{c.HV_VNC_X509} must be defined, if {c.HV_VNC_X509_VERIFY} is: "
             f"{c.HV_VNC_X509_VERIFY} is true but {c.HV_VNC_X509} is empty; set "
             f"{c.HV_VNC_X509} to the directory holding the certificates, or set "
             f"{c.HV_VNC_X509_VERIFY} to false")
    if hvparams[c.HV_VNC_X509] and not hvparams[c.HV_VNC_TLS]:
        fail(c.HV_VNC_X509,
             f"{c.HV_VNC_X509} is {hvparams[c.HV_VNC_X509]!r} but {c.HV_VNC_TLS} is false; "
             f"the certificates are used only with TLS: set {c.HV_VNC_TLS} to true, or "
             f"set {c.HV_VNC_X509} to \"\"")
    for key, off in ((c.HV_VNC_TLS, "false"), (c.HV_VNC_PASSWORD_FILE, '""')):
        if hvparams[key] and not hvparams[c.HV_VNC_BIND_ADDRESS]:
            shown = "true" if hvparams[key] is True else repr(hvparams[key])
            fail(key,
                 f"{key} is {shown} but {c.HV_VNC_BIND_ADDRESS} is empty, so "
                 f"there is no VNC server: set {c.HV_VNC_BIND_ADDRESS} to an IPv4 address "
                 f"or an absolute socket path, or set {key} to {off}")
    boot_order = hvparams[c.HV_BOOT_ORDER]
    if boot_order == c.HT_BO_CDROM and not hvparams[c.HV_CDROM_IMAGE_PATH]:
        fail(c.HV_BOOT_ORDER,
             f"Cannot boot from cdrom without an ISO path: {c.HV_BOOT_ORDER} is "
             f"{boot_order!r} but {c.HV_CDROM_IMAGE_PATH} is empty; set "
             f"{c.HV_CDROM_IMAGE_PATH} to an ISO image file, or {c.HV_BOOT_ORDER} to "
             f"{_others(c.HT_KVM_VALID_BO_TYPES, boot_order)}")
    if boot_order == c.HT_BO_FLOPPY and not hvparams[c.HV_KVM_FLOPPY_IMAGE_PATH]:
        fail(c.HV_BOOT_ORDER,
             f"Cannot boot from floppy without a floppy image path: {c.HV_BOOT_ORDER} is "
             f"{boot_order!r} but {c.HV_KVM_FLOPPY_IMAGE_PATH} is empty; set "
             f"{c.HV_KVM_FLOPPY_IMAGE_PATH} to a floppy image file, or {c.HV_BOOT_ORDER} "
             f"to {_others(c.HT_KVM_VALID_BO_TYPES, boot_order)}")
    if hvparams[c.HV_KVM_CDROM2_IMAGE_PATH] and not hvparams[c.HV_CDROM_IMAGE_PATH]:
        fail(c.HV_KVM_CDROM2_IMAGE_PATH,
             f"{c.HV_KVM_CDROM2_IMAGE_PATH} is {hvparams[c.HV_KVM_CDROM2_IMAGE_PATH]!r} but "
             f"{c.HV_CDROM_IMAGE_PATH} is empty; the second CD-ROM needs the first: set "
             f"{c.HV_CDROM_IMAGE_PATH} to an ISO image file (or move this image there), or "
             f"set {c.HV_KVM_CDROM2_IMAGE_PATH} to \"\"")
    model = hvparams[c.HV_SECURITY_MODEL]
    if model == c.HT_SM_USER and not hvparams[c.HV_SECURITY_DOMAIN]:
        fail(c.HV_SECURITY_DOMAIN,
             "A security domain (user to run kvm as) must be specified: "
             f"{c.HV_SECURITY_MODEL} is {model!r} but {c.HV_SECURITY_DOMAIN} is empty; set "
             f"{c.HV_SECURITY_DOMAIN} to the user QEMU runs as, or {c.HV_SECURITY_MODEL} to "
             f"{_others(c.HT_KVM_VALID_SM_TYPES, model)}")
    if model in (c.HT_SM_NONE, c.HT_SM_POOL) and hvparams[c.HV_SECURITY_DOMAIN]:
        fail(c.HV_SECURITY_DOMAIN,
             "Cannot have a security domain when the security model is 'none' or 'pool': "
             f"{c.HV_SECURITY_MODEL} is {model!r} but {c.HV_SECURITY_DOMAIN} is "
             f"{hvparams[c.HV_SECURITY_DOMAIN]!r}; set {c.HV_SECURITY_DOMAIN} to \"\", or "
             f"{c.HV_SECURITY_MODEL} to {c.HT_SM_USER!r} to run QEMU as that user")
    spice.check_syntax(hvparams)
    # the reserved options, naming the one found (serial_console decides -serial)
    peripherals.kvm_extra_argv(hvparams[c.HV_KVM_EXTRA], bool(hvparams[c.HV_SERIAL_CONSOLE]))
    nic_type = hvparams[c.HV_NIC_TYPE]
    queues = hvparams[c.HV_VIRTIO_NET_QUEUES]
    if queues > 1 and nic_type != c.HT_NIC_PARAVIRTUAL:
        fail(c.HV_VIRTIO_NET_QUEUES,
             f"{c.HV_VIRTIO_NET_QUEUES} is {queues} but {c.HV_NIC_TYPE} is {nic_type!r}; "
             f"only virtio NICs have several queues: set {c.HV_NIC_TYPE} to "
             f"{c.HT_NIC_PARAVIRTUAL!r}, or {c.HV_VIRTIO_NET_QUEUES} to 1")
    if hvparams[c.HV_VHOST_NET] and nic_type != c.HT_NIC_PARAVIRTUAL:
        fail(c.HV_VHOST_NET,
             f"{c.HV_VHOST_NET} is true but {c.HV_NIC_TYPE} is {nic_type!r}; vhost "
             f"accelerates only virtio NICs: set {c.HV_NIC_TYPE} to "
             f"{c.HT_NIC_PARAVIRTUAL!r}, or {c.HV_VHOST_NET} to false")


def check_node(hvparams: Mapping[str, Any], caps: Any, vhost_device: str = "/dev/vhost-net",
               kvm_device: str = "/dev/kvm", spice_tls: spice.TlsFiles | None = None) -> None:
    """What only this node can tell: users, devices, files and QEMU's abilities.

    ``spice_tls`` are the node's SPICE certificate files, if its cluster
    manager keeps some (see :class:`ganeti_kvm.qemu.spice.TlsFiles`).
    """
    def fail(message: str) -> None:
        raise errors.ParameterError(message)

    disk_type = hvparams[c.HV_DISK_TYPE]
    if disk_type in _UNSUPPORTED_DISK_TYPES:
        fail(f"disk_type {disk_type} cannot be used: {_UNSUPPORTED_DISK_TYPES[disk_type]}; "
             f"use {c.HT_DISK_PARAVIRTUAL}, {c.HT_DISK_IDE}, {c.HT_DISK_SCSI} or {c.HT_DISK_SD}")
    cd_type = hvparams[c.HV_KVM_CDROM_DISK_TYPE]
    if hvparams[c.HV_CDROM_IMAGE_PATH] and cd_type in _UNSUPPORTED_CDROM_TYPES:
        usable = sorted(c.HT_KVM_VALID_DISK_TYPES - set(_UNSUPPORTED_CDROM_TYPES))
        fail(f"{c.HV_KVM_CDROM_DISK_TYPE} {cd_type} cannot be used with "
             f"{c.HV_CDROM_IMAGE_PATH}: {_UNSUPPORTED_CDROM_TYPES[cd_type]}; set "
             f"{c.HV_KVM_CDROM_DISK_TYPE} to {', '.join(usable)} or \"\" (ide)")
    if hvparams[c.HV_SECURITY_MODEL] == c.HT_SM_USER:
        user = hvparams[c.HV_SECURITY_DOMAIN]
        try:
            pwd.getpwnam(user)
        except KeyError:
            fail(f"Unknown security domain user {user}: {c.HV_SECURITY_MODEL} is "
                 f"{c.HT_SM_USER!r} but {c.HV_SECURITY_DOMAIN} {user!r} is no user on this "
                 f"node; create the user, or set {c.HV_SECURITY_DOMAIN} to an existing one")
        if not (caps.has_runas or caps.has_run_with_user):
            fail(f"QEMU {caps.path} cannot drop privileges (no -runas or -run-with user=), "
                 f"which {c.HV_SECURITY_MODEL} {c.HT_SM_USER!r} needs; set {c.HV_KVM_PATH} "
                 f"to a QEMU that can, or {c.HV_SECURITY_MODEL} to {c.HT_SM_NONE} or "
                 f"{c.HT_SM_POOL}")
    if hvparams[c.HV_KVM_USE_CHROOT] and not (caps.has_chroot or caps.has_run_with_chroot):
        fail(f"QEMU {caps.path} cannot chroot (no -chroot or -run-with chroot=), which "
             f"{c.HV_KVM_USE_CHROOT} true needs; set {c.HV_KVM_PATH} to a QEMU that can, "
             f"or {c.HV_KVM_USE_CHROOT} to false")
    if hvparams[c.HV_VHOST_NET] and not os.path.exists(vhost_device):
        fail(f"{c.HV_VHOST_NET} is on but {vhost_device} does not exist on this node; "
             "load the vhost_net kernel module or turn vhost_net off")
    if hvparams[c.HV_KVM_FLAG] == c.HT_KVM_ENABLED:
        if not os.access(kvm_device, os.R_OK | os.W_OK):
            fail(f"{c.HV_KVM_FLAG} is enabled but {kvm_device} is not usable on this node; "
                 f"load the kvm module, or set {c.HV_KVM_FLAG} to {c.HT_KVM_DISABLED} "
                 "or \"\" (KVM when available)")
        if not caps.has_accel("kvm"):
            fail(f"QEMU {caps.path} has no KVM accelerator, which {c.HV_KVM_FLAG} "
                 f"{c.HT_KVM_ENABLED} needs; set {c.HV_KVM_PATH} to a QEMU with KVM, or "
                 f"{c.HV_KVM_FLAG} to {c.HT_KVM_DISABLED} or \"\"")
    if hvparams[c.HV_VNC_TLS] and hvparams[c.HV_VNC_X509]:
        directory = hvparams[c.HV_VNC_X509]
        missing = [f for f in X509_FILES if not os.path.isfile(os.path.join(directory, f))]
        if hvparams[c.HV_VNC_X509_VERIFY] is False and "ca-cert.pem" in missing:
            missing.remove("ca-cert.pem")
        if missing:
            fail(f"{c.HV_VNC_X509} {directory} lacks {', '.join(missing)}, which "
                 f"{c.HV_VNC_TLS} true needs; put them there, or set {c.HV_VNC_X509} to "
                 "another directory (or \"\" for TLS without certificates)")
    password_file = hvparams[c.HV_VNC_PASSWORD_FILE]
    if password_file:
        read_vnc_password(password_file)
    check_node_spice(hvparams, caps, spice_tls)
    check_node_cpu(hvparams, caps)
    if hvparams.get(c.HV_KVM_DISK_AIO) == c.HT_KVM_AIO_IO_URING:
        check_io_uring(caps)
    needed_devices = _needed_devices(hvparams) | peripherals.needed_devices(hvparams)
    vga_device = peripherals.VGA_DEVICES.get(hvparams.get(c.HV_VGA) or "")
    if vga_device and not caps.has_device(vga_device):
        usable = sorted(k for k, d in peripherals.VGA_DEVICES.items()
                        if d is None or caps.has_device(d))
        fail(f"QEMU {caps.path} has no {vga_device} device, which {c.HV_VGA} "
             f"{hvparams[c.HV_VGA]!r} needs; set {c.HV_VGA} to {', '.join(usable)} or \"\"")
    if hvparams.get(c.HV_SOUNDHW) and not (caps.has_audiodev or caps.has_soundhw):
        fail(f"QEMU {caps.path} has neither -audiodev nor -soundhw, which {c.HV_SOUNDHW} "
             f"{hvparams[c.HV_SOUNDHW]!r} needs; set {c.HV_KVM_PATH} to a QEMU with sound, "
             f"or {c.HV_SOUNDHW} to \"\"")
    absent = sorted(d for d in needed_devices if not caps.has_device(d))
    if absent:
        fail(f"QEMU {caps.path} lacks the device(s) {', '.join(absent)} that these "
             "parameters need")


IO_URING_SYSCTL = "/proc/sys/kernel/io_uring_disabled"


def check_io_uring(caps: Any, sysctl: str = IO_URING_SYSCTL) -> None:
    """Refuse ``disk_aio`` io_uring unless QEMU opened an io_uring disk and the kernel allows it.

    The probe (:attr:`QemuCaps.aio_modes`) tried it once per binary; the
    kernel's ``io_uring_disabled`` is read every time, since it can change.
    """
    use = (f"set {c.HV_KVM_DISK_AIO} to {c.HT_KVM_AIO_THREADS} (or {c.HT_KVM_AIO_NATIVE} "
           f"with {c.HV_DISK_CACHE} none)")
    if not caps.has_aio(c.HT_KVM_AIO_IO_URING):
        raise errors.ParameterError(
            f"{c.HV_KVM_DISK_AIO} is {c.HT_KVM_AIO_IO_URING} but QEMU {caps.path} cannot open "
            f"a disk with aio=io_uring (not built with it, or the kernel refused it when it "
            f"was probed); {use}, or set {c.HV_KVM_PATH} to a QEMU with io_uring",
            c.HV_KVM_DISK_AIO, c.HT_KVM_AIO_IO_URING)
    try:
        with open(sysctl, encoding="ascii") as handle:
            disabled = handle.read().strip()
    except (OSError, UnicodeDecodeError):
        disabled = "0"  # a kernel before 6.6 has no such switch: io_uring is on
    if disabled == "2":
        raise errors.ParameterError(
            f"{c.HV_KVM_DISK_AIO} is {c.HT_KVM_AIO_IO_URING} but this node's kernel has "
            f"io_uring disabled ({sysctl} is 2); {use}, or set {sysctl} to 0",
            c.HV_KVM_DISK_AIO, c.HT_KVM_AIO_IO_URING)


# The machine types whose root bus is the i440fx PC's pci.0 (pc-i440fx-7.2, and
# the old pc-0.15 and pc-1.3)
_I440FX_RE = re.compile(r"pc|pc-i440fx-\d+\.\d+|pc-[01]\.\d+")


def check_node_cpu(hvparams: Mapping[str, Any], caps: Any,
                   online: frozenset[int] | None = None) -> None:
    """The CPU and machine keys against this node: its QEMU's models and types, its CPUs."""
    cpu_type = hvparams.get(c.HV_CPU_TYPE) or ""
    model = qemu_cpu.cpu_model(cpu_type)
    if cpu_type and not caps.has_cpu_model(model):
        known = sorted(caps.cpu_models)
        examples = [m for m in ("host", "max", "qemu64", "kvm64", "Skylake-Server")
                    if m in caps.cpu_models] or known[:5]
        raise errors.ParameterError(
            f"Parameter {c.HV_CPU_TYPE} is {cpu_type!r} but QEMU {caps.path} has no CPU model "
            f"{model!r} ({len(known)} models, e.g. {', '.join(examples) or 'none reported'}; "
            f"see {caps.path} -cpu help); set {c.HV_CPU_TYPE} to one of them, or to \"\" "
            "for QEMU's default", c.HV_CPU_TYPE, cpu_type)
    machine = hvparams.get(c.HV_KVM_MACHINE_VERSION) or ""
    if machine:
        reason = caps.missing_machine(machine)
        if reason is not None:
            raise errors.ParameterError(
                f"Parameter {c.HV_KVM_MACHINE_VERSION} is {machine!r} but {reason}; set "
                f"{c.HV_KVM_MACHINE_VERSION} to a machine type of {caps.path} -machine help, "
                "or to \"\" for its pc type", c.HV_KVM_MACHINE_VERSION, machine)
        resolved = caps.resolve_machine(machine)
        if not _I440FX_RE.fullmatch(resolved):
            raise errors.ParameterError(
                f"Parameter {c.HV_KVM_MACHINE_VERSION} is {machine!r} ({resolved}), which "
                "ganeti-kvm cannot run: it places NICs, disks and the balloon on fixed slots "
                "of the i440fx PC's PCI bus pci.0, which other machine types lack (q35 has "
                f"pcie.0 with its chipset on slot 0x1f); set {c.HV_KVM_MACHINE_VERSION} to pc "
                "or a pc-i440fx-* type, or to \"\"", c.HV_KVM_MACHINE_VERSION, machine)
    cpu_mask = hvparams.get(c.HV_CPU_MASK) or c.CPU_PINNING_ALL
    pinning.check_node_cpus(cpu_mask, affinity.online_cpus() if online is None else online)


def _needed_devices(hvparams: Mapping[str, Any]) -> set[str]:
    devices = set(cmdline.disk_devices(hvparams))
    devices.add(cmdline.NIC_MODELS[hvparams[c.HV_NIC_TYPE]])
    if hvparams[c.HV_CDROM_IMAGE_PATH]:
        devices.update(cmdline.CDROM_DEVICES.get(
            hvparams[c.HV_KVM_CDROM_DISK_TYPE] or c.HT_DISK_IDE, ()))
    mouse = hvparams[c.HV_USB_MOUSE] or (c.HT_MOUSE_TABLET if hvparams[c.HV_VNC_BIND_ADDRESS]
                                         else "")
    if mouse:
        devices.add(cmdline.MOUSE_DEVICES[mouse])
    return devices


def read_vnc_password(path: str, what: str = "VNC") -> str:
    """The VNC password: the first line of ``path``; never logged or put in errors.

    ``what`` names the display in errors (the SPICE password is read alike).
    """
    try:
        with open(path, encoding="utf-8") as handle:
            password = handle.readline().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as err:
        raise errors.ParameterError(
            f"Cannot read the {what} password file {path}: "
            f"{err.strerror if isinstance(err, OSError) else 'not UTF-8 text'}") from None
    if not password:
        raise errors.ParameterError(f"The {what} password file {path} is empty")
    return password


def read_spice_password(path: str) -> str:
    """The SPICE password: the first line of ``path``; never logged or put in errors."""
    return read_vnc_password(path, "SPICE")


def resolve_spice_bind(hvparams: Mapping[str, Any]) -> str | None:
    """The IP address QEMU's SPICE server listens on for ``spice_bind`` on this node.

    None without SPICE; ``spice_bind`` itself if it is an address; else the
    address of that interface of the version ``spice_ip_version`` asks for
    (ParameterError naming the key if the node has no such interface or
    address).
    """
    bind = hvparams.get(c.HV_KVM_SPICE_BIND) or ""
    if not bind:
        return None
    if spice.ip_literal(bind) is not None:
        return str(bind)
    version = hvparams.get(c.HV_KVM_SPICE_IP_VERSION) or c.IFACE_NO_IP_VERSION_SPECIFIED
    return ifaddr.interface_address(bind, version, c.HV_KVM_SPICE_BIND)[0]


def check_node_spice(hvparams: Mapping[str, Any], caps: Any,
                     tls: spice.TlsFiles | None = None) -> None:
    """SPICE against this node: QEMU's -spice keys (asked over QMP when probed), the
    agent's chardev and devices, the interface, the certificates, the password file."""
    if not spice.enabled(hvparams):
        return
    bind = hvparams[c.HV_KVM_SPICE_BIND]

    def fail(key: str, message: str) -> None:
        raise errors.ParameterError(message, key, hvparams.get(key))

    if not caps.has_spice:
        fail(c.HV_KVM_SPICE_BIND,
             f"{c.HV_KVM_SPICE_BIND} is {bind!r} but QEMU {caps.path} cannot run a SPICE "
             "server (it refused -spice when probed: built without SPICE, or its SPICE "
             f"module is not installed); set {c.HV_KVM_SPICE_BIND} to \"\" (and use "
             f"{c.HV_VNC_BIND_ADDRESS}), or set {c.HV_KVM_PATH} to a QEMU with SPICE")
    for qemu_key, key in spice.spice_keys(hvparams).items():
        if not caps.has_spice_key(qemu_key):
            fail(key, f"{key} needs QEMU's -spice {qemu_key}=, which QEMU {caps.path} does "
                      f"not have (its -spice keys: {', '.join(sorted(caps.spice_keys))}); "
                      f"reset {key}, or set {c.HV_KVM_PATH} to a QEMU that has it")
    if spice.wants_agent(hvparams):
        lacking = [d for d in (spice.VIRTIO_SERIAL_DEVICE, spice.PORT_DEVICE)
                   if not caps.has_device(d)]
        if not caps.has_chardev_backend(spice.SPICEVMC_BACKEND):
            lacking.append(f"the {spice.SPICEVMC_BACKEND} chardev")
        if lacking:
            fail(c.HV_KVM_SPICE_USE_VDAGENT,
                 f"{c.HV_KVM_SPICE_USE_VDAGENT} is true but QEMU {caps.path} lacks "
                 f"{', '.join(lacking)}; set {c.HV_KVM_SPICE_USE_VDAGENT} to false")
    if not hvparams.get(c.HV_VGA) and not caps.has_device(peripherals.VGA_DEVICES[c.HT_VGA_QXL]):
        fail(c.HV_VGA, f"SPICE gets a qxl adapter when {c.HV_VGA} is empty, but QEMU "
                       f"{caps.path} has no {peripherals.VGA_DEVICES[c.HT_VGA_QXL]} device; "
                       f"set {c.HV_VGA} to another adapter (e.g. std)")
    resolve_spice_bind(hvparams)
    if hvparams.get(c.HV_KVM_SPICE_USE_TLS):
        if tls is None:
            fail(c.HV_KVM_SPICE_USE_TLS,
                 f"{c.HV_KVM_SPICE_USE_TLS} is true but this node has no SPICE certificate "
                 "files (the cluster manager's adapter passes them); set it to false")
        else:
            missing = sorted({p for p in (tls.cacert, tls.cert, tls.key)
                              if not os.path.isfile(p)})
            if missing:
                fail(c.HV_KVM_SPICE_USE_TLS,
                     f"{c.HV_KVM_SPICE_USE_TLS} is true but this node lacks the SPICE "
                     f"certificate file(s) {', '.join(missing)}; create them (gnt-cluster "
                     "renew-crypto --new-spice-certificate) or set it to false")
        _check_ciphers(hvparams.get(c.HV_KVM_SPICE_TLS_CIPHERS) or "")
    password_file = hvparams.get(c.HV_KVM_SPICE_PASSWORD_FILE)
    if password_file:
        read_spice_password(password_file)


def _check_ciphers(ciphers: str) -> None:
    """Refuse a cipher list that this node's OpenSSL matches no cipher with."""
    if not ciphers:
        return
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).set_ciphers(ciphers)
    except ssl.SSLError as err:
        raise errors.ParameterError(
            f"{c.HV_KVM_SPICE_TLS_CIPHERS} {ciphers!r} selects no cipher of this node's "
            f"OpenSSL ({err}); give an OpenSSL cipher list such as "
            f"{c.SPICE_DEFAULT_TLS_CIPHERS}", c.HV_KVM_SPICE_TLS_CIPHERS, ciphers) from None
