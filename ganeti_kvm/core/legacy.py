"""Instances started by the 2011 driver: their runtime record and command line.

The 2011 driver (Ganeti 2.5) saved ``[kvm_cmd, [nic dicts], hvparams]``.
Memory and vCPUs are only in ``kvm_cmd`` (``-m``, ``-smp``), and so are the
disks (``-drive file=PATH,format=raw,...``) and the VNC display; its
hvparams have no ``kvm_path`` (the binary is ``kvm_cmd[0]``) and carry keys
this library does not know (``keymap``, ``spice_bind``, ...).
:func:`fields_from_2011` turns such a record into the fields of a current
record, so that a reboot rebuilds today's command line from parameters.

A QEMU that still runs a 2011 command line can only migrate to a QEMU with
the same devices: :func:`target_argv` rewrites the 2011 command line for
the target node's paths, in spellings today's QEMU accepts, and adds the
QMP monitors the library needs; its NICs are added after it as the 2011
driver added them (:func:`nic_device_2011`, kept in the record as each
NIC's device identity).  Such a QEMU has only the human monitor,
so its source side is driven through :mod:`ganeti_kvm.qmp.hmp`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from ganeti_kvm import errors
from ganeti_kvm.core import names as c
from ganeti_kvm.host.paths import InstancePaths
from ganeti_kvm.qemu import cmdline, devices

log = logging.getLogger(__name__)

# The chardev ids of the QMP monitors added to a 2011 command line.
_QMP_CHARDEVS = ("qmp", "qmpl")


class LegacyCaps(Protocol):
    """What :func:`target_argv` needs to know about the target's QEMU."""

    @property
    def has_no_acpi(self) -> bool: ...
    @property
    def has_localtime(self) -> bool: ...
    @property
    def has_usbdevice(self) -> bool: ...
    @property
    def has_chroot(self) -> bool: ...
    @property
    def has_run_with_chroot(self) -> bool: ...
    @property
    def has_runas(self) -> bool: ...
    @property
    def has_run_with_user(self) -> bool: ...


def option_values(argv: Sequence[str], option: str) -> list[str]:
    """The values of every ``option`` in a QEMU command line, in order."""
    return [argv[i + 1] for i in range(len(argv) - 1) if argv[i] == option]


def _whole_number(value: str, option: str, why: Any) -> int:
    try:
        number = int(value.split(",")[0].removeprefix("cpus=").rstrip("Mm"))
    except ValueError:
        raise why(f"its command line has {option} {value!r}, not a whole number") from None
    if number <= 0:
        raise why(f"its command line has {option} {value!r}, not a positive number")
    return number


def _drive_path(value: str) -> str | None:
    """The file of a 2011 data disk ``-drive`` value; None for CD-ROMs and floppies.

    The 2011 driver wrote ``file=PATH,format=raw,if=...`` without escaping
    commas, and nothing after ``,format=raw`` is a path, so the last
    ``,format=raw`` ends the path.
    """
    if not value.startswith("file=") or ",format=raw" not in value:
        return None
    path = value[len("file="):value.rindex(",format=raw")]
    options = value[value.rindex(",format=raw") + 1:].split(",")
    if "media=cdrom" in options or "if=floppy" in options:
        return None
    return path


def network_port(argv: Sequence[str]) -> int | None:
    """The VNC port of ``-vnc [HOST]:DISPLAY[,...]``; None for a unix socket or no VNC."""
    for value in option_values(argv, "-vnc"):
        target = value.split(",")[0]
        if target.startswith("unix:") or ":" not in target:
            continue
        display = target.rsplit(":", 1)[1]
        if display.isdigit():
            return c.VNC_BASE_PORT + int(display)
    return None


def _hvparams(old: Mapping[str, Any], kvm_path: str, name: str) -> dict[str, Any]:
    """Today's hvparams from the 2011 ones: known keys kept, the rest filled."""
    known = c.DEFAULTS
    hvparams = dict(known)
    hvparams.update({k: v for k, v in old.items() if k in known})
    hvparams[c.HV_KVM_PATH] = kvm_path
    dropped = sorted(k for k, v in old.items() if k not in known and v not in ("", None))
    if dropped:
        log.warning("The 2011 runtime record of instance %s sets parameters this library "
                    "does not have (%s); a reboot starts it without them", name,
                    ", ".join(dropped))
    return hvparams


def nic_device_2011(seq: int) -> devices.DeviceId:
    """NIC ``seq`` as the 2011 driver gave it to QEMU 0.12 and later.

    ``-netdev type=tap,id=netdevSEQ,fd=F -device MODEL,mac=MAC,netdev=netdevSEQ``
    after the whole saved command line: no device id, no PCI address (QEMU
    placed it), and QEMU's default option ROM.  A migration target must add
    the same, after the same command line (:func:`target_argv`), so QEMU
    places it on the same slot with the same ROM.  (Before 0.12 the driver
    wrote ``-net nic,vlan=N``, which today's QEMU refuses, and whose QEMU
    cannot migrate to today's.)
    """
    return devices.DeviceId(backend=f"netdev{seq}")


def fields_from_2011(data: list[Any], name: str, source: str) -> dict[str, Any]:
    """The fields of a current runtime record from a 2011 ``[argv, nics, hvparams]``.

    Raises :class:`errors.RuntimeStateError` naming ``source`` if the list
    is not such a record or its command line lacks what a restart needs.
    """
    def bad(why: str) -> errors.RuntimeStateError:
        return errors.RuntimeStateError(
            f"Runtime record {source} of instance {name} (2011 format) is not valid: {why}; "
            "stop the instance with force and start it again")

    if len(data) != 3 or not isinstance(data[0], list) or not isinstance(data[1], list) \
            or not isinstance(data[2], dict):
        raise bad("a list, but not the old [argv, nics, hvparams] form")
    if not data[0] or not all(isinstance(a, (str, int)) and not isinstance(a, bool)
                              for a in data[0]):
        raise bad("its command line is empty or not a list of strings")
    argv = [str(a) for a in data[0]]  # the 2011 driver put -m and -smp in as numbers
    if not all(isinstance(n, dict) and isinstance(n.get("mac"), str) for n in data[1]):
        raise bad("a NIC is not a dict with a MAC address")
    memory = option_values(argv, "-m")
    vcpus = option_values(argv, "-smp")
    if not memory or not vcpus:
        raise bad("its command line has no -m or no -smp")
    nics = [{"mac": n["mac"], "ip": n.get("ip"), "nicparams": dict(n.get("nicparams") or {}),
             devices.DEVICE_KEY: nic_device_2011(seq).to_dict()}
            for seq, n in enumerate(data[1])]
    disks = [{"path": path, "readonly": False, "uri": None}  # 2011 refused read-only disks
             for path in map(_drive_path, option_values(argv, "-drive")) if path]
    return {
        "argv": argv, "nics": nics,
        "hvparams": _hvparams(data[2], argv[0], name),
        "beparams": {c.BE_MEMORY: _whole_number(memory[-1], "-m", bad),
                     c.BE_VCPUS: _whole_number(vcpus[-1], "-smp", bad)},
        "disks": disks, "network_port": network_port(argv),
    }


def _unix_listener(path: str) -> str:
    """A listening unix socket at ``path``, in today's spelling of ``unix:P,server,nowait``."""
    return f"unix:{cmdline.qemu_escape(path)},server=on,wait=off"


def target_argv(argv: Sequence[str], paths: InstancePaths, caps: LegacyCaps,
                has_nics: bool, run_as: str | None = None) -> list[str]:
    """The 2011 command line ``argv`` for ``paths``' node, with the same guest devices.

    Paths of the node it ran on (pidfile, monitor, serial, chroot) become
    this node's; options today's QEMU refuses become their equivalents;
    ``-S`` is dropped (the caller adds the per-start flags); and two QMP
    monitors are added.  Without NICs the 2011 driver added ``-net none``
    at each start (else QEMU adds a NIC of its own), so this does too, and
    it added the user to run as (``run_as``, security models user and
    pool) at each start too.  Applying it again to its own result changes
    nothing.
    """
    result: list[str] = []
    machine: list[str] = []
    index = 0
    while index < len(argv):
        arg = argv[index]
        value = argv[index + 1] if index + 1 < len(argv) else None
        takes_value = arg in ("-pidfile", "-monitor", "-serial", "-chroot", "-drive",
                              "-usbdevice", "-chardev", "-mon", "-machine", "-net",
                              "-runas", "-run-with", "-qmp")
        index += 2 if takes_value and value is not None else 1
        if arg == "-pidfile":
            result += [arg, paths.pidfile]
        elif arg == "-monitor" and value is not None and value.startswith("unix:"):
            result += [arg, _unix_listener(paths.monitor_socket)]
        elif arg == "-serial" and value is not None and value.startswith("unix:"):
            result += [arg, _unix_listener(paths.serial_socket)]
        elif arg == "-chroot":
            result += _chroot(paths.chroot, caps)
        elif arg == "-drive" and value is not None:
            result += [arg, ",".join(o for o in value.split(",") if o != "boot=on")]
        elif arg == "-disable-kvm":
            machine.append("accel=tcg")
        elif arg == "-no-acpi" and not caps.has_no_acpi:
            machine.append("acpi=off")
        elif arg == "-localtime" and not caps.has_localtime:
            result += ["-rtc", "base=localtime"]
        elif arg == "-nographic":
            result += ["-display", "none"]  # -nographic is refused with -daemonize
        elif arg == "-usbdevice" and value is not None and not caps.has_usbdevice:
            result += ["-device", cmdline.MOUSE_DEVICES.get(value, "usb-" + value)]
        elif arg == "-machine" and value is not None:
            machine += [o for o in value.split(",") if o not in machine]
        elif _added_per_start(arg, value):
            continue
        else:
            result.append(arg)
            if takes_value and value is not None:
                result.append(value)
    if machine:
        result += ["-machine", ",".join(dict.fromkeys(machine))]
    if not has_nics:
        result += ["-net", "none"]
    if run_as:
        if caps.has_run_with_user:
            result += ["-run-with", f"user={cmdline.qemu_escape(run_as)}"]
        elif caps.has_runas:
            result += ["-runas", run_as]
        else:
            raise errors.HypervisorError("This QEMU can neither -runas nor -run-with user=")
    for chardev, path in zip(_QMP_CHARDEVS, (paths.qmp_socket, paths.qmp_long_socket),
                             strict=True):
        result += ["-chardev",
                   f"socket,id={chardev},path={cmdline.qemu_escape(path)},server=on,wait=off",
                   "-mon", f"chardev={chardev},mode=control"]
    return result


def _added_per_start(arg: str, value: str | None) -> bool:
    """Whether ``arg value`` is one that :func:`target_argv` adds itself (or drops)."""
    if arg in ("-S", "-runas", "-qmp"):  # a -qmp of another driver: ours replace it
        return True
    if value is None:
        return False
    return ((arg == "-chardev" and any(value.startswith(f"socket,id={i},")
                                       for i in _QMP_CHARDEVS))
            or (arg == "-mon" and value in (f"chardev={i},mode=control" for i in _QMP_CHARDEVS))
            or (arg == "-net" and value == "none")
            or (arg == "-run-with" and value.startswith("user=")))


def _chroot(path: str, caps: LegacyCaps) -> list[str]:
    if caps.has_chroot:
        return ["-chroot", path]
    if caps.has_run_with_chroot:
        return ["-run-with", f"chroot={cmdline.qemu_escape(path)}"]
    raise errors.HypervisorError("This QEMU can neither -chroot nor -run-with chroot=")


def leftovers(root: str, name: str) -> list[str]:
    """Files and directories the 2011 driver kept per instance under run dir ``root``.

    ``nic/NAME`` (the TAP names), ``keymap/NAME`` and ``uid/NAME`` (the
    uid it ran as, from the 2011 pool).  Today's layout has none of them.
    Today's uid pool keeps its records in ``uid/<uid>``, so an instance
    whose name is all digits has no 2011 uid file to remove there.
    """
    found = [os.path.join(root, "nic", name), os.path.join(root, "keymap", name)]
    if not name.isdigit():
        found.append(os.path.join(root, "uid", name))
    return found
