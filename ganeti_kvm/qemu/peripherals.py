"""The display adapter, sound cards, USB devices and extra options on QEMU's command line.

Ganeti 3.x's ``vga``, ``soundhw``, ``usb_devices`` and ``kvm_extra`` as
pure functions of the parameter value (and, for sound, the binary's
capabilities, asked by name).  Ganeti 3.0 passed the first three to QEMU's
``-vga``, ``-soundhw`` and ``-usbdevice``; ``-soundhw`` is gone since QEMU
7.1 and ``-usbdevice`` knows only a few names, so each value here is
checked against the names Ganeti's QEMU took and spelled as today's
``-device``/``-audiodev`` options:

* ``vga``: ``-vga MODEL`` (still in QEMU 7.2 and 10.0; the machine creates
  the adapter in slot 2 of a PC, as it did for the 2011 driver's ``-vga std``).
* ``soundhw=hda,ac97``: one ``-audiodev none`` backend (a node has no
  speakers; the guest sees working cards) and a ``-device`` per card with
  ``audiodev=``; ``pcspk`` is the machine's own speaker, given the backend
  by ``-machine pcspk-audiodev=``.  A QEMU with ``-soundhw`` but no
  ``-audiodev`` gets ``-soundhw`` as Ganeti wrote it.
* ``usb_devices=tablet host:046d:c52b``: ``-device usb-tablet``,
  ``-device usb-host,vendorid=...`` on the ``-usb`` controller.
* ``kvm_extra``: split like a POSIX shell would (:func:`shlex.split`, no
  shell runs), each word checked by :func:`check_word` and passed as it
  is, except the options that would take over what the library runs itself
  (:data:`RESERVED_OPTIONS`): those are refused, naming the reason.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from ganeti_kvm import errors
from ganeti_kvm.core import names as c

# The device each -vga model creates (None: no adapter at all)
VGA_DEVICES: dict[str, str | None] = {
    c.HT_VGA_STD: "VGA",
    c.HT_VGA_CIRRUS: "cirrus-vga",
    c.HT_VGA_VMWARE: "vmware-svga",
    c.HT_VGA_QXL: "qxl-vga",
    c.HT_VGA_VIRTIO: "virtio-vga",
    c.HT_VGA_NONE: None,
}

AUDIODEV_ID = "snd0"
HDA_ID = "snd-hda"
# The -device models of each sound card; "pcspk" is the machine's own.
SOUND_DEVICES: dict[str, tuple[str, ...]] = {
    c.HT_SOUND_HDA: ("intel-hda", "hda-duplex"),  # what -soundhw hda created
    "ac97": ("AC97",),
    "es1370": ("ES1370",),
    "sb16": ("sb16",),
    "cs4231a": ("cs4231a",),
    "adlib": ("adlib",),
    "gus": ("gus",),
    "pcspk": (),
}
PCSPK = "pcspk"

# The device of each name QEMU's -usbdevice took (braille needs a chardev
# -usbdevice made up itself: use kvm_extra for it)
USB_DEVICES: dict[str, str] = {
    "mouse": "usb-mouse",
    "tablet": "usb-tablet",
    "keyboard": "usb-kbd",
    "wacom-tablet": "usb-wacom-tablet",
}
USB_HOST = "usb-host"
_USB_HOST_ADDR_RE = re.compile(r"host:(\d{1,3})\.(\d{1,3})")
_USB_HOST_ID_RE = re.compile(r"host:(?:0x)?([0-9a-fA-F]{4}):(?:0x)?([0-9a-fA-F]{4})")

# The ids of the chardevs the library's command line defines (monitors, serial)
OWN_CHARDEVS = frozenset(["qmp", "qmpl", "hmp", "serial0", "kvmd", "qga0"])
_TAKES_OVER = "the library's monitors are the only ones; another could change the VM behind "
RESERVED_OPTIONS: dict[str, str] = {
    "daemonize": "the library daemonizes QEMU itself and waits for its pidfile",
    "pidfile": "the library finds QEMU by its own pidfile",
    "S": "every start is paused; the library continues the guest itself",
    "incoming": "migration gives QEMU the incoming address itself",
    "preconfig": "QEMU would wait for a QMP command the start never sends",
    "qmp": _TAKES_OVER + "its back",
    "qmp-pretty": _TAKES_OVER + "its back",
    "monitor": _TAKES_OVER + "its back",
    "mon": _TAKES_OVER + "its back",
    "name": "the instance's name identifies its QEMU (listing, console, migration)",
    "runas": "security_model and security_domain choose QEMU's user",
    "run-with": "security_model and use_chroot choose QEMU's user and chroot",
    "chroot": "use_chroot chooses QEMU's chroot",
    "D": "QEMU's log is the instance's log, which errors quote",
    "no-shutdown": "a guest's power-off must end QEMU so the instance counts as stopped",
}
SERIAL_REASON = ("with serial_console on, the first serial port is the console's; add "
                 "another port with -chardev and -device isa-serial,chardev=ID instead")


class Caps(Protocol):
    """What the sound cards need to know about a QEMU binary."""

    @property
    def has_audiodev(self) -> bool: ...
    @property
    def has_soundhw(self) -> bool: ...


def _fail(key: str, value: object, why: str) -> errors.ParameterError:
    shown = repr(value) if len(repr(value)) <= 100 else repr(value)[:100] + "..."
    return errors.ParameterError(f"Parameter {key} {why} (current value: {shown})", key, value)


# --- vga ---------------------------------------------------------------------------------


def vga_argv(value: str) -> list[str]:
    """``-vga MODEL`` for a ``vga`` value; nothing for ``""``."""
    if not value:
        return []
    if value not in VGA_DEVICES:
        raise _fail(c.HV_VGA, value, "must be one of " + ", ".join(sorted(VGA_DEVICES)))
    return ["-vga", value]


# --- soundhw -----------------------------------------------------------------------------


def parse_soundhw(value: object) -> list[str]:
    """The sound cards of a ``soundhw`` value (``"hda,ac97"``), in order; [] for ``""``."""
    if not isinstance(value, str):
        raise _fail(c.HV_SOUNDHW, value, "must be a string")
    if not value:
        return []
    cards = [card.strip() for card in value.split(",")]
    allowed = ", ".join(sorted(SOUND_DEVICES))
    for card in cards:
        if card not in SOUND_DEVICES:
            why = ("cannot be 'all' (QEMU has no -soundhw all any more)" if card == "all"
                   else f"names an unknown sound card {card!r}")
            raise _fail(c.HV_SOUNDHW, value,
                        f"{why}: give a comma-separated list of {allowed}")
    if len(set(cards)) != len(cards):
        raise _fail(c.HV_SOUNDHW, value, "names a sound card twice")
    return cards


def sound_devices(value: str) -> set[str]:
    """The ``-device`` models a ``soundhw`` value needs."""
    return {model for card in parse_soundhw(value) for model in SOUND_DEVICES[card]}


def sound_argv(value: str, caps: Caps) -> list[str]:
    """The options of a ``soundhw`` value on this QEMU (see the module documentation)."""
    cards = parse_soundhw(value)
    if not cards:
        return []
    if not caps.has_audiodev:
        if caps.has_soundhw:
            return ["-soundhw", ",".join(cards)]
        raise _fail(c.HV_SOUNDHW, value, "needs a QEMU with -audiodev or -soundhw")
    argv = ["-audiodev", f"none,id={AUDIODEV_ID}"]
    for card in cards:
        if card == PCSPK:
            argv += ["-machine", f"pcspk-audiodev={AUDIODEV_ID}"]
        elif card == c.HT_SOUND_HDA:
            argv += ["-device", f"intel-hda,id={HDA_ID}",
                     "-device", f"hda-duplex,id={HDA_ID}-codec,bus={HDA_ID}.0,"
                                f"audiodev={AUDIODEV_ID}"]
        else:
            model = SOUND_DEVICES[card][0]
            argv += ["-device", f"{model},id=snd-{card},audiodev={AUDIODEV_ID}"]
    return argv


# --- usb_devices -------------------------------------------------------------------------


@dataclass(frozen=True)
class UsbDevice:
    """One entry of ``usb_devices``: a QEMU device model and its properties."""

    model: str
    options: tuple[str, ...] = ()


def _usb_device(entry: str, value: str) -> UsbDevice:
    if entry in USB_DEVICES:
        return UsbDevice(USB_DEVICES[entry])
    match = _USB_HOST_ADDR_RE.fullmatch(entry)
    if match:
        return UsbDevice(USB_HOST, (f"hostbus={int(match.group(1))}",
                                    f"hostaddr={int(match.group(2))}"))
    match = _USB_HOST_ID_RE.fullmatch(entry)
    if match:
        return UsbDevice(USB_HOST, (f"vendorid=0x{match.group(1).lower()}",
                                    f"productid=0x{match.group(2).lower()}"))
    raise _fail(c.HV_USB_DEVICES, value,
                f"names an unknown USB device {entry!r}: give a space- or comma-separated "
                f"list of {', '.join(sorted(USB_DEVICES))}, host:BUS.ADDR (decimal) or "
                "host:VENDOR:PRODUCT (4 hex digits each)")


def parse_usb_devices(value: object) -> list[UsbDevice]:
    """The devices of a ``usb_devices`` value, in order; [] for ``""``.

    Ganeti's manual says space-separated and its driver split at commas;
    both separate entries here.
    """
    if not isinstance(value, str):
        raise _fail(c.HV_USB_DEVICES, value, "must be a string")
    return [_usb_device(entry, value) for entry in re.split(r"[\s,]+", value) if entry]


def usb_argv(value: str) -> list[str]:
    """``-device`` options for a ``usb_devices`` value (the caller adds ``-usb`` once)."""
    argv: list[str] = []
    for index, device in enumerate(parse_usb_devices(value)):
        argv += ["-device", ",".join([device.model, f"id=usbdev{index}", *device.options])]
    return argv


# --- kvm_extra ---------------------------------------------------------------------------

MAX_WORD_BYTES = 4096


def check_word(word: str, value: str) -> str:
    """``word`` of ``kvm_extra`` if it can be one argv element; ParameterError otherwise."""
    if "\0" in word or "\n" in word or "\r" in word:
        raise _fail(c.HV_KVM_EXTRA, value, "holds a NUL or a newline")
    try:
        size = len(word.encode("utf-8", "surrogateescape"))
    except UnicodeError:
        raise _fail(c.HV_KVM_EXTRA, value, "is not valid text") from None
    if size > MAX_WORD_BYTES:
        raise _fail(c.HV_KVM_EXTRA, value, f"has a word of more than {MAX_WORD_BYTES} bytes")
    return word


def _chardev_id(option_value: str) -> str | None:
    for item in re.split(r"(?<!,),(?!,)", option_value):
        key, sep, val = item.partition("=")
        if sep and key == "id":
            return val.replace(",,", ",")
    return None


def kvm_extra_argv(value: object, serial_console: bool) -> list[str]:
    """The words of a ``kvm_extra`` value, checked; [] for ``""``.

    Refused, naming the option and why: an option of :data:`RESERVED_OPTIONS`
    (also spelled with two dashes), ``-chardev`` with one of the library's
    ids, and ``-serial`` while ``serial_console`` is on.  A word is taken
    for an option wherever it stands: the check cannot know which options
    take a value.
    """
    if not isinstance(value, str):
        raise _fail(c.HV_KVM_EXTRA, value, "must be a string")
    if not value:
        return []
    try:
        words = shlex.split(value, comments=False, posix=True)
    except ValueError as err:
        raise _fail(c.HV_KVM_EXTRA, value, f"cannot be split into words: {err}") from None
    for index, word in enumerate(words):
        check_word(word, value)
        if not word.startswith("-"):
            continue
        option = word[2:] if word.startswith("--") else word[1:]
        reason = RESERVED_OPTIONS.get(option)
        if option == "serial" and serial_console:
            reason = SERIAL_REASON
        if option == "chardev" and index + 1 < len(words):
            chardev = _chardev_id(words[index + 1])
            if chardev in OWN_CHARDEVS:
                reason = f"the chardev id {chardev!r} is the library's own (use another id)"
        if reason:
            raise _fail(c.HV_KVM_EXTRA, value,
                        f"cannot hold {word}: {reason}; remove it from {c.HV_KVM_EXTRA}")
    return words


# --- all of them -------------------------------------------------------------------------


def needed_devices(hvp: Mapping[str, Any]) -> set[str]:
    """The ``-device`` models these parameters need (for the node check)."""
    devices = sound_devices(hvp.get(c.HV_SOUNDHW) or "")
    devices.update(d.model for d in parse_usb_devices(hvp.get(c.HV_USB_DEVICES) or ""))
    vga = VGA_DEVICES.get(hvp.get(c.HV_VGA) or "")
    if vga:
        devices.add(vga)
    return devices
