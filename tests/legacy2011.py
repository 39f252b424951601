"""Runtime records as the 2011 driver (Ganeti 2.5's hv_kvm.py) wrote them.

:func:`kvm_cmd_2011` follows ``_GenerateKVMRuntime`` for the parameters
this library has (written anew from the facts, not copied), and
:func:`record_2011` serialises ``(kvm_cmd, [nic.ToDict()], hvparams)`` the
way its ``serializer.Dump`` did: sorted keys, indented, a final newline,
``-m`` and ``-smp`` as numbers, NIC attributes that are None left out.
"""

from __future__ import annotations

import json
import os
from typing import Any

from ganeti_kvm import constants as c

# Keys of the 2011 cluster defaults that this library does not have.
EXTRA_2011_DEFAULTS = {"spice_bind": "", "spice_ip_version": 0, "keymap": "",
                       "reboot_behavior": "reboot"}


def hvparams_2011(**overrides: Any) -> dict[str, Any]:
    """A 2011 instance's filled hvparams: no kvm_path, no serial_speed, spice and keymap keys."""
    hvp = {k: v for k, v in c.HVC_DEFAULTS[c.HT_KVM].items()
           if k not in (c.HV_KVM_PATH, c.HV_SERIAL_SPEED)}
    hvp.update(EXTRA_2011_DEFAULTS)
    hvp.update(overrides)
    return hvp


def kvm_cmd_2011(kvm: str, root: str, name: str, hvp: dict[str, Any], memory: int, vcpus: int,
                 disks: list[str], network_port: int | None = None,
                 startup_paused: bool = False, boot_flag: bool = False) -> list[Any]:
    """The saved command line of a 2011 start (``boot_flag``: a QEMU older than 0.14)."""
    cmd: list[Any] = [kvm, "-name", name, "-m", memory, "-smp", vcpus,
                      "-pidfile", os.path.join(root, "pid", name), "-daemonize"]
    if not hvp[c.HV_ACPI]:
        cmd.append("-no-acpi")
    if startup_paused:
        cmd.append("-S")
    kernel = hvp[c.HV_KERNEL_PATH]
    boot_disk = not kernel and hvp[c.HV_BOOT_ORDER] == c.HT_BO_DISK
    if hvp[c.HV_KVM_FLAG] == c.HT_KVM_ENABLED:
        cmd.append("-enable-kvm")
    elif hvp[c.HV_KVM_FLAG] == c.HT_KVM_DISABLED:
        cmd.append("-disable-kvm")
    if not kernel and hvp[c.HV_BOOT_ORDER] == c.HT_BO_NETWORK:
        cmd += ["-boot", "n"]
    if_val = "virtio" if hvp[c.HV_DISK_TYPE] == c.HT_DISK_PARAVIRTUAL else hvp[c.HV_DISK_TYPE]
    cache = "" if hvp[c.HV_DISK_CACHE] == c.HT_CACHE_DEFAULT else f",cache={hvp[c.HV_DISK_CACHE]}"
    for path in disks:
        boot = ""
        if boot_disk:
            cmd += ["-boot", "c"]
            boot_disk = False
            if boot_flag and hvp[c.HV_DISK_TYPE] != c.HT_DISK_IDE:
                boot = ",boot=on"
        cmd += ["-drive", f"file={path},format=raw,if={if_val}{boot}{cache}"]
    if hvp[c.HV_CDROM_IMAGE_PATH]:
        cmd += ["-drive", f"file={hvp[c.HV_CDROM_IMAGE_PATH]},format=raw,media=cdrom,if=ide"]
    if hvp[c.HV_KVM_FLOPPY_IMAGE_PATH]:
        cmd += ["-drive",
                f"file={hvp[c.HV_KVM_FLOPPY_IMAGE_PATH]},format=raw,media=disk,if=floppy"]
    if kernel:
        cmd += ["-kernel", kernel]
        if hvp[c.HV_INITRD_PATH]:
            cmd += ["-initrd", hvp[c.HV_INITRD_PATH]]
        append = [f"root={hvp[c.HV_ROOT_PATH]}", hvp[c.HV_KERNEL_ARGS]]
        if hvp[c.HV_SERIAL_CONSOLE]:
            append.append("console=ttyS0,38400")
        cmd += ["-append", " ".join(append)]
    if hvp[c.HV_MEM_PATH]:
        cmd += ["-mem-path", hvp[c.HV_MEM_PATH], "-mem-prealloc"]
    cmd += ["-monitor", f"unix:{os.path.join(root, 'ctrl', name + '.monitor')},server,nowait"]
    if hvp[c.HV_SERIAL_CONSOLE]:
        cmd += ["-serial", f"unix:{os.path.join(root, 'ctrl', name + '.serial')},server,nowait"]
    else:
        cmd += ["-serial", "none"]
    vnc = hvp[c.HV_VNC_BIND_ADDRESS]
    if hvp[c.HV_USB_MOUSE]:
        cmd += ["-usb", "-usbdevice", hvp[c.HV_USB_MOUSE]]
    elif vnc:
        cmd += ["-usbdevice", c.HT_MOUSE_TABLET]
    if vnc and not vnc.startswith("/"):
        assert network_port is not None and network_port > c.VNC_BASE_PORT
        display = network_port - c.VNC_BASE_PORT
        cmd += ["-vnc", (f":{display}" if vnc == c.IP4_ADDRESS_ANY else f"{vnc}:{display}")
                + (",password" if hvp[c.HV_VNC_PASSWORD_FILE] else "")]
    elif vnc:
        cmd += ["-vnc", f"unix:{vnc}/{name}.vnc"]
    else:
        cmd.append("-nographic")
    if hvp[c.HV_USE_LOCALTIME]:
        cmd.append("-localtime")
    if hvp[c.HV_KVM_USE_CHROOT]:
        cmd += ["-chroot", os.path.join(root, "chroot", name)]
    return cmd


def nic_2011(mac: str, ip: str | None = None, mode: str = "bridged",
             link: str = "br0") -> dict[str, Any]:
    """``objects.NIC.ToDict()`` of 2011: attributes that are None are left out."""
    nic: dict[str, Any] = {"mac": mac, "nicparams": {"mode": mode, "link": link}}
    if ip is not None:
        nic["ip"] = ip
    return nic


def record_2011(kvm_cmd: list[Any], nics: list[dict[str, Any]], hvp: dict[str, Any]) -> str:
    """The runtime file's text, as ``serializer.Dump((kvm_cmd, nics, hvparams))`` wrote it."""
    return json.dumps([kvm_cmd, nics, hvp], sort_keys=True, indent=4) + "\n"
