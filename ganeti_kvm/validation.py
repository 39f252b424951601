"""The KVM hypervisor's parameters: the table, the cross-checks, the node checks.

``PARAMETERS`` is data: one check per key, applied by the generic code of
:mod:`ganeti_kvm.hv_base`.  :func:`check_syntax` adds the checks that involve
several keys (pure); :func:`check_node` checks what only the node can know:
users, devices and what the QEMU binary supports.
"""

from __future__ import annotations

import ipaddress
import os
import pwd
from collections.abc import Mapping
from typing import Any

from ganeti_kvm import cmdline, errors, hv_base
from ganeti_kvm import constants as c


def _is_ipv4(value: str) -> bool:
    try:
        ipaddress.IPv4Address(value)
    except ValueError:
        return False
    return True


def _is_vnc_address(value: Any) -> bool:
    return isinstance(value, str) and (_is_ipv4(value) or hv_base._is_clean_abs_path(value))


def _is_cmdline_text(value: Any) -> bool:
    return isinstance(value, str) and not any(ch in value for ch in "\n\r\0")


def _is_user_name(value: Any) -> bool:
    return (isinstance(value, str) and bool(value) and not value.startswith("-")
            and all(ch.isalnum() or ch in "._-" for ch in value))


PARAMETERS: dict[str, hv_base.Check] = {
    c.HV_KVM_PATH: hv_base.REQ_FILE_CHECK,
    c.HV_KERNEL_PATH: hv_base.OPT_FILE_CHECK,
    c.HV_INITRD_PATH: hv_base.OPT_FILE_CHECK,
    c.HV_ROOT_PATH: (False, _is_cmdline_text, "must be text without newlines", None, None),
    c.HV_KERNEL_ARGS: (False, _is_cmdline_text, "must be text without newlines", None, None),
    c.HV_ACPI: hv_base.NO_CHECK,
    c.HV_SERIAL_CONSOLE: hv_base.NO_CHECK,
    c.HV_SERIAL_SPEED: hv_base.ParamInSet(True, c.VALID_SERIAL_SPEEDS),
    c.HV_VNC_BIND_ADDRESS: (False, _is_vnc_address,
                            "the VNC bind address must be either a valid IPv4 address or "
                            "an absolute pathname", None, None),
    c.HV_VNC_TLS: hv_base.NO_CHECK,
    c.HV_VNC_X509: hv_base.OPT_DIR_CHECK,
    c.HV_VNC_X509_VERIFY: hv_base.NO_CHECK,
    c.HV_VNC_PASSWORD_FILE: hv_base.OPT_FILE_CHECK,
    c.HV_KVM_FLOPPY_IMAGE_PATH: hv_base.OPT_FILE_CHECK,
    c.HV_CDROM_IMAGE_PATH: hv_base.OPT_FILE_CHECK,
    c.HV_KVM_CDROM2_IMAGE_PATH: hv_base.OPT_FILE_CHECK,
    c.HV_BOOT_ORDER: hv_base.ParamInSet(True, c.HT_KVM_VALID_BO_TYPES),
    c.HV_NIC_TYPE: hv_base.ParamInSet(True, c.HT_KVM_VALID_NIC_TYPES),
    c.HV_DISK_TYPE: hv_base.ParamInSet(True, c.HT_KVM_VALID_DISK_TYPES),
    c.HV_KVM_CDROM_DISK_TYPE: hv_base.ParamInSet(False, c.HT_KVM_VALID_DISK_TYPES),
    c.HV_USB_MOUSE: hv_base.ParamInSet(False, c.HT_KVM_VALID_MOUSE_TYPES),
    c.HV_MIGRATION_PORT: hv_base.NET_PORT_CHECK,
    c.HV_MIGRATION_BANDWIDTH: hv_base.PositiveInt(True),
    c.HV_MIGRATION_DOWNTIME: hv_base.PositiveInt(True),
    c.HV_MIGRATION_MODE: hv_base.MIGRATION_MODE_CHECK,
    c.HV_USE_LOCALTIME: hv_base.NO_CHECK,
    c.HV_DISK_CACHE: hv_base.ParamInSet(True, c.HT_VALID_CACHE_TYPES),
    c.HV_SECURITY_MODEL: hv_base.ParamInSet(True, c.HT_KVM_VALID_SM_TYPES),
    c.HV_SECURITY_DOMAIN: (False, _is_user_name, "must be a user name", None, None),
    c.HV_KVM_FLAG: hv_base.ParamInSet(False, c.HT_KVM_FLAG_VALUES),
    c.HV_VHOST_NET: hv_base.NO_CHECK,
    c.HV_KVM_USE_CHROOT: hv_base.NO_CHECK,
    c.HV_MEM_PATH: hv_base.OPT_DIR_CHECK,
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
    filled = dict(c.HVC_DEFAULTS[c.HT_KVM])
    filled.update(hvparams or {})
    return filled


def check_all_syntax(hvparams: Mapping[str, Any]) -> None:
    """The whole syntax check: the table, then the checks between keys."""
    hv_base.apply_syntax_checks(PARAMETERS, c.HVS_PARAMETER_TYPES, hvparams)
    check_syntax(hvparams)


def check_all_node(hvparams: Mapping[str, Any], caps: Any) -> None:
    """The whole node check: the table's files and directories, then :func:`check_node`."""
    hv_base.apply_node_checks(PARAMETERS, hvparams)
    check_node(hvparams, caps)


def check_syntax(hvparams: Mapping[str, Any]) -> None:
    """The checks between keys (the 2011 driver's, plus what modern QEMU needs)."""
    def fail(message: str) -> None:
        raise errors.ParameterError(message)

    if hvparams[c.HV_KERNEL_PATH] and not hvparams[c.HV_ROOT_PATH]:
        fail("Need a root partition for the instance, if a kernel is defined "
             f"(set {c.HV_ROOT_PATH})")
    if hvparams[c.HV_INITRD_PATH] and not hvparams[c.HV_KERNEL_PATH]:
        fail(f"{c.HV_INITRD_PATH} needs {c.HV_KERNEL_PATH}")
    if hvparams[c.HV_VNC_X509_VERIFY] and not hvparams[c.HV_VNC_X509]:
        fail(f"{c.HV_VNC_X509} must be defined, if {c.HV_VNC_X509_VERIFY} is")
    if hvparams[c.HV_VNC_X509] and not hvparams[c.HV_VNC_TLS]:
        fail(f"{c.HV_VNC_X509} is only used with {c.HV_VNC_TLS}; enable it or clear the path")
    vnc_needed = (c.HV_VNC_TLS, c.HV_VNC_PASSWORD_FILE)
    for key in vnc_needed:
        if hvparams[key] and not hvparams[c.HV_VNC_BIND_ADDRESS]:
            fail(f"{key} needs {c.HV_VNC_BIND_ADDRESS}")
    boot_order = hvparams[c.HV_BOOT_ORDER]
    if boot_order == c.HT_BO_CDROM and not hvparams[c.HV_CDROM_IMAGE_PATH]:
        fail("Cannot boot from cdrom without an ISO path")
    if boot_order == c.HT_BO_FLOPPY and not hvparams[c.HV_KVM_FLOPPY_IMAGE_PATH]:
        fail("Cannot boot from floppy without a floppy image path")
    if hvparams[c.HV_KVM_CDROM2_IMAGE_PATH] and not hvparams[c.HV_CDROM_IMAGE_PATH]:
        fail(f"{c.HV_KVM_CDROM2_IMAGE_PATH} needs {c.HV_CDROM_IMAGE_PATH}")
    model = hvparams[c.HV_SECURITY_MODEL]
    if model == c.HT_SM_USER and not hvparams[c.HV_SECURITY_DOMAIN]:
        fail("A security domain (user to run kvm as) must be specified")
    if model in (c.HT_SM_NONE, c.HT_SM_POOL) and hvparams[c.HV_SECURITY_DOMAIN]:
        fail("Cannot have a security domain when the security model is 'none' or 'pool'")
    if hvparams[c.HV_VHOST_NET] and hvparams[c.HV_NIC_TYPE] != c.HT_NIC_PARAVIRTUAL:
        fail(f"{c.HV_VHOST_NET} needs {c.HV_NIC_TYPE} {c.HT_NIC_PARAVIRTUAL}")


def check_node(hvparams: Mapping[str, Any], caps: Any, vhost_device: str = "/dev/vhost-net",
               kvm_device: str = "/dev/kvm") -> None:
    """What only this node can tell: users, devices, files and QEMU's abilities."""
    def fail(message: str) -> None:
        raise errors.ParameterError(message)

    disk_type = hvparams[c.HV_DISK_TYPE]
    if disk_type in _UNSUPPORTED_DISK_TYPES:
        fail(f"disk_type {disk_type} cannot be used: {_UNSUPPORTED_DISK_TYPES[disk_type]}; "
             f"use {c.HT_DISK_PARAVIRTUAL}, {c.HT_DISK_IDE}, {c.HT_DISK_SCSI} or {c.HT_DISK_SD}")
    cd_type = hvparams[c.HV_KVM_CDROM_DISK_TYPE]
    if hvparams[c.HV_CDROM_IMAGE_PATH] and cd_type in _UNSUPPORTED_CDROM_TYPES:
        fail(f"cdrom_disk_type {cd_type} cannot be used: {_UNSUPPORTED_CDROM_TYPES[cd_type]}")
    if hvparams[c.HV_SECURITY_MODEL] == c.HT_SM_USER:
        user = hvparams[c.HV_SECURITY_DOMAIN]
        try:
            pwd.getpwnam(user)
        except KeyError:
            fail(f"Unknown security domain user {user}; create the user or pick another")
        if not (caps.has_runas or caps.has_run_with_user):
            fail(f"QEMU {caps.path} cannot drop privileges (no -runas or -run-with user=)")
    if hvparams[c.HV_KVM_USE_CHROOT] and not (caps.has_chroot or caps.has_run_with_chroot):
        fail(f"QEMU {caps.path} cannot chroot (no -chroot or -run-with chroot=)")
    if hvparams[c.HV_VHOST_NET] and not os.path.exists(vhost_device):
        fail(f"{c.HV_VHOST_NET} is on but {vhost_device} does not exist on this node; "
             "load the vhost_net kernel module or turn vhost_net off")
    if hvparams[c.HV_KVM_FLAG] == c.HT_KVM_ENABLED:
        if not os.access(kvm_device, os.R_OK | os.W_OK):
            fail(f"{c.HV_KVM_FLAG} is enabled but {kvm_device} is not usable on this node")
        if not caps.has_accel("kvm"):
            fail(f"QEMU {caps.path} has no KVM accelerator")
    if hvparams[c.HV_VNC_TLS] and hvparams[c.HV_VNC_X509]:
        directory = hvparams[c.HV_VNC_X509]
        missing = [f for f in X509_FILES if not os.path.isfile(os.path.join(directory, f))]
        if hvparams[c.HV_VNC_X509_VERIFY] is False and "ca-cert.pem" in missing:
            missing.remove("ca-cert.pem")
        if missing:
            fail(f"{c.HV_VNC_X509} {directory} lacks {', '.join(missing)}")
    password_file = hvparams[c.HV_VNC_PASSWORD_FILE]
    if password_file:
        read_vnc_password(password_file)
    needed_devices = _needed_devices(hvparams)
    absent = sorted(d for d in needed_devices if not caps.has_device(d))
    if absent:
        fail(f"QEMU {caps.path} lacks the device(s) {', '.join(absent)} that these "
             "parameters need")


def _needed_devices(hvparams: Mapping[str, Any]) -> set[str]:
    devices = set(cmdline.DISK_DEVICES.get(hvparams[c.HV_DISK_TYPE], ()))
    devices.add(cmdline.NIC_MODELS[hvparams[c.HV_NIC_TYPE]])
    if hvparams[c.HV_CDROM_IMAGE_PATH]:
        devices.update(cmdline.CDROM_DEVICES.get(
            hvparams[c.HV_KVM_CDROM_DISK_TYPE] or c.HT_DISK_IDE, ()))
    mouse = hvparams[c.HV_USB_MOUSE] or (c.HT_MOUSE_TABLET if hvparams[c.HV_VNC_BIND_ADDRESS]
                                         else "")
    if mouse:
        devices.add(cmdline.MOUSE_DEVICES[mouse])
    return devices


def read_vnc_password(path: str) -> str:
    """The VNC password: the first line of ``path``; never logged or put in errors."""
    try:
        with open(path, encoding="utf-8") as handle:
            password = handle.readline().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as err:
        raise errors.ParameterError(
            f"Cannot read the VNC password file {path}: "
            f"{err.strerror if isinstance(err, OSError) else 'not UTF-8 text'}") from None
    if not password:
        raise errors.ParameterError(f"The VNC password file {path} is empty")
    return password
