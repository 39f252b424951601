"""Ganeti 3.x's KVM parameters and their mapping onto the core's.

``PARAMETERS`` has exactly the kvm keys of the Ganeti version this runs
under, with Ganeti's own checks (built from Ganeti's ``hv_base`` helpers and
value sets) and Ganeti's defaults.  Every key is accepted; the keys the core
implements under the same name and meaning (:data:`CORE_KEYS`: the 2011 set
and the Ganeti 3 keys the core has since gained)
pass straight through to the core's checks, and every other key is accepted
only at its Ganeti default: any other value is refused, naming the key, so
a setting is never silently ignored.

Without Ganeti (no ``ganeti`` package to import) the keys and defaults are
Ganeti 3.0's, the core keys keep the core's checks and the other keys need
none, since only their default passes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ganeti_kvm import errors
from ganeti_kvm.core import names
from ganeti_kvm.core import params as core_params
from ganeti_kvm.ganeti3 import _ganeti

# The keys whose effect the core has, under the same name and meaning: those
# its parameter table checks.
CORE_KEYS = frozenset(core_params.PARAMETERS)

# Ganeti 3.0's defaults (constants.HVC_DEFAULTS["kvm"]), used without Ganeti.
FALLBACK_DEFAULTS: dict[str, Any] = {
    'acpi': True,
    'boot_order': 'disk',
    'cdrom2_image_path': '',
    'cdrom_disk_type': '',
    'cdrom_image_path': '',
    'cpu_cores': 0,
    'cpu_mask': 'all',
    'cpu_sockets': 0,
    'cpu_threads': 0,
    'cpu_type': '',
    'disk_aio': 'threads',
    'disk_cache': 'default',
    'disk_discard': 'default',
    'disk_type': 'paravirtual',
    'floppy_image_path': '',
    'initrd_path': '',
    'kernel_args': 'ro',
    'kernel_path': '/boot/vmlinuz-3-kvmU',
    'keymap': '',
    'kvm_extra': '',
    'kvm_flag': '',
    'kvm_path': '/usr/bin/kvm',
    'kvm_pci_reservations': 12,
    'machine_version': '',
    'mem_path': '',
    'migration_bandwidth': 32,
    'migration_caps': '',
    'migration_downtime': 30,
    'migration_mode': 'live',
    'migration_port': 8102,
    'nic_type': 'paravirtual',
    'reboot_behavior': 'reboot',
    'root_path': '/dev/vda1',
    'scsi_controller_type': 'lsi',
    'security_domain': '',
    'security_model': 'none',
    'serial_console': True,
    'serial_speed': 38400,
    'soundhw': '',
    'spice_bind': '',
    'spice_image_compression': '',
    'spice_ip_version': 0,
    'spice_jpeg_wan_compression': '',
    'spice_password_file': '',
    'spice_playback_compression': True,
    'spice_streaming_video': '',
    'spice_tls_ciphers': 'HIGH:-DES:-3DES:-EXPORT:-DH',
    'spice_use_tls': False,
    'spice_use_vdagent': True,
    'spice_zlib_glz_wan_compression': '',
    'usb_devices': '',
    'usb_mouse': '',
    'use_chroot': False,
    'use_guest_agent': False,
    'use_localtime': False,
    'user_shutdown': False,
    'vga': '',
    'vhost_net': False,
    'virtio_net_queues': 1,
    'vnc_bind_address': '',
    'vnc_password_file': '',
    'vnc_tls': False,
    'vnc_x509_path': '',
    'vnc_x509_verify': False,
    'vnet_hdr': True,
}


def _ganeti_checks(hvb: Any, gc: Any) -> dict[str, Any]:
    """Ganeti 3's check of each kvm key, expressed with Ganeti's own helpers and sets."""
    def in_set(required: bool, name: str) -> Any:
        return hvb.ParamInSet(required, getattr(gc, name))

    spice_ip = (False, lambda x: x == gc.IFACE_NO_IP_VERSION_SPECIFIED
                or x in gc.VALID_IP_VERSIONS,
                "The SPICE IP version should be 4 or 6", None, None)
    pci = (False, lambda x: 0 <= x <= gc.QEMU_PCI_SLOTS,
           f"The number of PCI slots managed by QEMU (max: {gc.QEMU_PCI_SLOTS})", None, None)
    return {
        "kvm_path": hvb.REQ_FILE_CHECK,
        "kernel_path": hvb.OPT_FILE_CHECK,
        "initrd_path": hvb.OPT_FILE_CHECK,
        "root_path": hvb.NO_CHECK,
        "kernel_args": hvb.NO_CHECK,
        "acpi": hvb.NO_CHECK,
        "serial_console": hvb.NO_CHECK,
        "serial_speed": hvb.NO_CHECK,
        "vnc_bind_address": hvb.NO_CHECK,
        "vnc_tls": hvb.NO_CHECK,
        "vnc_x509_path": hvb.OPT_DIR_CHECK,
        "vnc_x509_verify": hvb.NO_CHECK,
        "vnc_password_file": hvb.OPT_FILE_CHECK,
        "spice_bind": hvb.NO_CHECK,
        "spice_ip_version": spice_ip,
        "spice_password_file": hvb.OPT_FILE_CHECK,
        "spice_image_compression":
            in_set(False, "HT_KVM_SPICE_VALID_LOSSLESS_IMG_COMPR_OPTIONS"),
        "spice_jpeg_wan_compression":
            in_set(False, "HT_KVM_SPICE_VALID_LOSSY_IMG_COMPR_OPTIONS"),
        "spice_zlib_glz_wan_compression":
            in_set(False, "HT_KVM_SPICE_VALID_LOSSY_IMG_COMPR_OPTIONS"),
        "spice_streaming_video":
            in_set(False, "HT_KVM_SPICE_VALID_VIDEO_STREAM_DETECTION_OPTIONS"),
        "spice_playback_compression": hvb.NO_CHECK,
        "spice_use_tls": hvb.NO_CHECK,
        "spice_tls_ciphers": hvb.NO_CHECK,
        "spice_use_vdagent": hvb.NO_CHECK,
        "floppy_image_path": hvb.OPT_FILE_CHECK,
        "cdrom_image_path": hvb.OPT_FILE_OR_URL_CHECK,
        "cdrom2_image_path": hvb.OPT_FILE_OR_URL_CHECK,
        "boot_order": in_set(True, "HT_KVM_VALID_BO_TYPES"),
        "nic_type": in_set(True, "HT_KVM_VALID_NIC_TYPES"),
        "disk_type": in_set(True, "HT_KVM_VALID_DISK_TYPES"),
        "scsi_controller_type": in_set(True, "HT_KVM_VALID_SCSI_CONTROLLER_TYPES"),
        "disk_discard": in_set(False, "HT_VALID_DISCARD_TYPES"),
        "cdrom_disk_type": in_set(False, "HT_KVM_VALID_DISK_TYPES"),
        "usb_mouse": in_set(False, "HT_KVM_VALID_MOUSE_TYPES"),
        "keymap": hvb.NO_CHECK,
        "migration_port": hvb.REQ_NET_PORT_CHECK,
        "migration_bandwidth": hvb.REQ_NONNEGATIVE_INT_CHECK,
        "migration_downtime": hvb.REQ_NONNEGATIVE_INT_CHECK,
        "migration_mode": hvb.MIGRATION_MODE_CHECK,
        "use_guest_agent": hvb.NO_CHECK,
        "use_localtime": hvb.NO_CHECK,
        "disk_cache": in_set(True, "HT_VALID_CACHE_TYPES"),
        "disk_aio": in_set(False, "HT_KVM_VALID_AIO_TYPES"),
        "security_model": in_set(True, "HT_KVM_VALID_SM_TYPES"),
        "security_domain": hvb.NO_CHECK,
        "kvm_flag": in_set(False, "HT_KVM_FLAG_VALUES"),
        "vhost_net": hvb.NO_CHECK,
        "virtio_net_queues": hvb.OPT_VIRTIO_NET_QUEUES_CHECK,
        "use_chroot": hvb.NO_CHECK,
        "user_shutdown": hvb.NO_CHECK,
        "mem_path": hvb.OPT_DIR_CHECK,
        "reboot_behavior": in_set(True, "REBOOT_BEHAVIORS"),
        "cpu_mask": hvb.OPT_MULTI_CPU_MASK_CHECK,
        "cpu_type": hvb.NO_CHECK,
        "cpu_cores": hvb.OPT_NONNEGATIVE_INT_CHECK,
        "cpu_threads": hvb.OPT_NONNEGATIVE_INT_CHECK,
        "cpu_sockets": hvb.OPT_NONNEGATIVE_INT_CHECK,
        "soundhw": hvb.NO_CHECK,
        "usb_devices": hvb.NO_CHECK,
        "vga": hvb.NO_CHECK,
        "kvm_extra": hvb.NO_CHECK,
        "machine_version": hvb.NO_CHECK,
        "migration_caps": hvb.NO_CHECK,
        "kvm_pci_reservations": pci,
        "vnet_hdr": hvb.NO_CHECK,
    }


def _build() -> tuple[dict[str, Any], dict[str, Any]]:
    """``(PARAMETERS, DEFAULTS)`` for the Ganeti this runs under (or 3.0's)."""
    if _ganeti.HAVE_GANETI:
        gc = _ganeti.ganeti_constants
        defaults = dict(gc.HVC_DEFAULTS[gc.HT_KVM])
        checks = _ganeti_checks(_ganeti.ganeti_hv_base, gc)
        no_check = _ganeti.ganeti_hv_base.NO_CHECK
    else:
        defaults = dict(FALLBACK_DEFAULTS)
        checks = dict(core_params.PARAMETERS)
        no_check = core_params.NO_CHECK
    # A key of a later Ganeti that this table does not know yet is still
    # accepted at its default (see check_implemented).
    table = {key: checks.get(key, no_check) for key in sorted(defaults)}
    return table, defaults


PARAMETERS, DEFAULTS = _build()
# Keys Ganeti has and the core does not implement yet: only their default passes.
UNIMPLEMENTED = frozenset(DEFAULTS) - CORE_KEYS


def _unspecified(value: Any) -> bool:
    return value is None or value == ""


def is_default(key: str, value: Any) -> bool:
    """Whether ``value`` is Ganeti's default for ``key`` (an empty value matches an empty one)."""
    default = DEFAULTS[key]
    if _unspecified(default) or _unspecified(value):
        return _unspecified(default) and _unspecified(value)
    return type(value) is type(default) and value == default


def check_implemented(hvparams: Mapping[str, Any]) -> None:
    """Refuse a non-default value of a key whose feature the core lacks, naming the key."""
    for key in sorted(UNIMPLEMENTED):
        if key in hvparams and not is_default(key, hvparams[key]):
            raise errors.ParameterError(
                f"Parameter '{key}' is set to {hvparams[key]!r}, but ganeti-kvm does not "
                f"implement {key} yet; only its default {DEFAULTS[key]!r} is accepted. "
                f"Reset it (e.g. gnt-instance modify -H {key}=default)", key, hvparams[key])


def apply_table_syntax(table: Mapping[str, Any], hvparams: Mapping[str, Any]) -> None:
    """The generic syntax check of a parameter table, for use without Ganeti.

    No unknown key, every key present, required ones set, each check passed
    (the core's check tuples, so an empty optional value is not checked).
    """
    for key in hvparams:
        if key not in table:
            raise errors.ParameterError(f"Parameter '{key}' is not supported", key)
    for key, (required, check_fn, message, _, _) in table.items():
        if key not in hvparams:
            raise errors.ParameterError(f"Parameter '{key}' is missing", key)
        value = hvparams[key]
        if not required and not value:  # the core's tables skip any empty optional value
            continue
        if _unspecified(value):
            raise errors.ParameterError(
                f"Parameter '{key}' is required but is currently not defined", key)
        if check_fn is not None and not check_fn(value):
            raise errors.ParameterError(
                f"Parameter '{key}' fails syntax check: {message} (current value: {value!r})",
                key, value)


def fill(hvparams: Mapping[str, Any] | None) -> dict[str, Any]:
    """Ganeti's defaults overlaid with ``hvparams`` (Ganeti passes them filled already)."""
    filled = dict(DEFAULTS)
    filled.update(hvparams or {})
    return filled


def to_core(hvparams: Mapping[str, Any] | None) -> dict[str, Any]:
    """The core's hvparams for Ganeti 3 ``hvparams``: the shared keys, unchanged.

    Callers run :func:`check_implemented` first, so nothing dropped here has
    an effect.
    """
    filled = fill(hvparams)
    core_defaults = names.DEFAULTS
    return {key: filled[key] if key in filled else core_defaults[key] for key in CORE_KEYS}
