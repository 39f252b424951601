"""Stable identities of an instance's NICs and disks: ids, PCI slots, option ROMs.

A migration target must present exactly the devices of its source (QEMU
matches device state by PCI address and device type, and option ROMs by
name), and a guest that reboots should find its NICs and disks where they
were (interface names follow PCI slots).  So each NIC and disk gets a
:class:`DeviceId` once, kept in the runtime record (``"device"`` in its
NIC or disk entry) and used by every later start on every node: reboot,
migration target.

Where identities come from:

* a new instance: :func:`allocate`, deterministically, as Ganeti's
  ``bus_manager`` does: disks, then NICs, each PCI device on the next free
  slot of ``pci.0`` from :data:`FIRST_FREE_SLOT` on (the slots below are
  left to QEMU's own devices and the controllers it places itself).  A
  device added later takes the next free slot, so hotplug extends it;
* a record written before identities existed: :func:`positional_nic` and
  :func:`positional_disk`, the names by position the instance runs with;
* an instance another driver started: :func:`parse_nic_devices` and
  :func:`parse_disk_devices` read them from its QEMU's real command line.

Nothing here touches the node.  Every field is checked against its exact
form when read (:meth:`DeviceId.from_dict`), so a record's identities can
go into a QEMU option as they are.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ganeti_kvm import errors

PCI_BUS = "pci.0"
PCI_SLOTS = 32
FIRST_FREE_SLOT = 12
"""Slots 0-11 of ``pci.0`` are QEMU's (host bridge, ISA bridge, VGA, the
controllers it places itself), as in Ganeti's ``_DEFAULT_PCI_RESERVATIONS``;
NICs and disks are placed from slot 12 (``0xc``) on."""

DEVICE_KEY = "device"  # the key of a NIC or disk entry of the record holding its identity

_ID_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")
_BUS_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")
_ADDR_RE = re.compile(r"(?:0x)?([0-9a-fA-F]{1,2})(?:\.([0-7]))?")
_DRIVER_RE = re.compile(r"[a-z][a-z0-9_-]{0,63}")
_PROP_KEY_RE = re.compile(r"[a-z][a-z0-9_-]{0,63}")
_PROP_VALUE_RE = re.compile(r"[A-Za-z0-9_.:/-]{0,255}")
_ROMFILE_RE = re.compile(r"(?:/[A-Za-z0-9_.+-]+)+|[A-Za-z0-9_.+-]+|")
# -device properties a DeviceId spells itself, or that change with every start
_OWN_PROPS = frozenset(["id", "bus", "addr", "romfile", "netdev", "drive", "mac",
                        "bootindex"])


@dataclass(frozen=True)
class DeviceId:
    """How one NIC or disk appears to the guest, kept for the instance's life.

    ``backend`` is the id of its ``-netdev`` (NIC) or ``-drive`` (disk);
    ``id`` the ``-device`` id (None: the device has none, as the 2011
    driver's NICs); ``driver`` the device model (None: from the
    parameters); ``addr`` the PCI slot on ``bus`` (None: QEMU picks one);
    ``romfile`` None for QEMU's default option ROM, ``""`` for none, or a
    ROM file; ``props`` further ``-device`` properties kept as they are
    (``unit``, ``scsi-id``, ``mq``...).
    """

    backend: str
    id: str | None = None
    driver: str | None = None
    bus: str | None = None
    addr: str | None = None
    romfile: str | None = None
    props: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    @property
    def slot(self) -> int | None:
        """The PCI slot number on :data:`PCI_BUS`, or None."""
        if self.addr is None or self.bus not in (None, PCI_BUS):
            return None
        match = _ADDR_RE.fullmatch(self.addr)
        return int(match.group(1), 16) if match else None

    def options(self) -> list[str]:
        """The ``-device`` options it spells (``id=``, ``bus=``, ``addr=``, props, ``romfile=``)."""
        options = [] if self.id is None else [f"id={self.id}"]
        if self.bus is not None:
            options.append(f"bus={self.bus}")
        if self.addr is not None:
            options.append(f"addr={self.addr}")
        options += [f"{k}={v}" for k, v in self.props]
        if self.romfile is not None:
            options.append(f"romfile={self.romfile.replace(',', ',,')}")
        return options

    def to_dict(self) -> dict[str, Any]:
        """The record's form."""
        return {"backend": self.backend, "id": self.id, "driver": self.driver,
                "bus": self.bus, "addr": self.addr, "romfile": self.romfile,
                "props": [list(p) for p in self.props]}

    @classmethod
    def from_dict(cls, data: Any, what: str) -> DeviceId:
        """Read and check a record's identity; RuntimeStateError naming ``what`` if invalid."""
        def bad(why: str) -> errors.RuntimeStateError:
            return errors.RuntimeStateError(
                f"The device identity of {what} in the runtime record is invalid: {why}; "
                "stop the instance and start it again")

        if not isinstance(data, Mapping):
            raise bad(f"not a mapping ({type(data).__name__})")
        props = data.get("props") or []
        if not isinstance(props, list) or not all(
                isinstance(p, (list, tuple)) and len(p) == 2 for p in props):
            raise bad("props is not a list of [key, value] pairs")
        ident = cls(backend=data.get("backend"), id=data.get("id"),  # type: ignore[arg-type]
                    driver=data.get("driver"), bus=data.get("bus"), addr=data.get("addr"),
                    romfile=data.get("romfile"),
                    props=tuple((p[0], p[1]) for p in props))
        problem = ident.problem()
        if problem:
            raise bad(problem)
        return ident

    def problem(self) -> str | None:
        """What is wrong with a field, or None: each must have its exact form."""
        checks: list[tuple[str, object, re.Pattern[str], bool]] = [
            ("backend", self.backend, _ID_RE, False), ("id", self.id, _ID_RE, True),
            ("driver", self.driver, _DRIVER_RE, True), ("bus", self.bus, _BUS_RE, True),
            ("addr", self.addr, _ADDR_RE, True), ("romfile", self.romfile, _ROMFILE_RE, True)]
        checks += [(f"property {k!r}", k, _PROP_KEY_RE, False) for k, _ in self.props]
        checks += [(f"property {k!r}", v, _PROP_VALUE_RE, False) for k, v in self.props]
        for name, value, pattern, optional in checks:
            if value is None and optional:
                continue
            if not isinstance(value, str) or not pattern.fullmatch(value):
                return f"{name} {value!r:.80} is not valid"
        if any(k in _OWN_PROPS for k, _ in self.props):
            return "props repeat a field of their own"
        slot = self.slot
        if slot is not None and slot >= PCI_SLOTS:
            return f"addr {self.addr} is past the last PCI slot"
        return None


def identity_of(entry: Mapping[str, Any], what: str) -> DeviceId | None:
    """The identity kept in a record's NIC or disk entry, or None if it has none."""
    data = entry.get(DEVICE_KEY) if isinstance(entry, Mapping) else None
    return None if data is None else DeviceId.from_dict(data, what)


# --- what records without identities run with ----------------------------------------


def positional_nic(index: int, rom: bool) -> DeviceId:
    """NIC ``index`` as named by position before identities were kept (``net0``/``nic0``).

    QEMU chose its PCI slot; ``rom`` says whether it got the default option
    ROM (a network boot) or none (``romfile=``).
    """
    return DeviceId(backend=f"net{index}", id=f"nic{index}", romfile=None if rom else "")


def positional_disk(index: int, disk_type: str) -> DeviceId:
    """Disk ``index`` as named by position before identities were kept (``disk0``).

    IDE disks sit on their bus and unit by position, SCSI ones on the
    controller's target by position; the others are placed by QEMU.
    """
    props: tuple[tuple[str, str], ...] = ()
    bus = None
    if disk_type == "ide":
        bus, props = f"ide.{index // 2}", (("unit", str(index % 2)),)
    elif disk_type == "scsi":
        bus, props = "scsi0.0", (("scsi-id", str(index)),)
    return DeviceId(backend=f"disk{index}", id=f"disk{index}-dev", bus=bus, props=props)


# --- new devices -------------------------------------------------------------------


def used_slots(identities: Iterable[DeviceId | None]) -> set[int]:
    """The ``pci.0`` slots the identities hold."""
    return {i.slot for i in identities if i is not None and i.slot is not None}


def free_slot(used: set[int], name: str, first: int = FIRST_FREE_SLOT) -> int:
    """The first slot from ``first`` (the slots QEMU keeps) on that is not in ``used``."""
    for slot in range(first, PCI_SLOTS):
        if slot not in used:
            return slot
    raise errors.HypervisorError(
        f"Instance {name} has more NICs and disks than the {PCI_SLOTS - first} PCI "
        f"slots it can give them (slots {first}-{PCI_SLOTS - 1}, after the "
        "kvm_pci_reservations slots QEMU keeps); remove some NICs or disks, or lower "
        "kvm_pci_reservations")


def _free_name(prefix: str, taken: set[str]) -> str:
    index = 0
    while f"{prefix}{index}" in taken:
        index += 1
    return f"{prefix}{index}"


def allocate(nics: Sequence[DeviceId | None], disks: Sequence[DeviceId | None],
             nic_on_pci: bool, disk_on_pci: bool, rom: bool, disk_type: str,
             name: str = "(unnamed)",
             first_slot: int = FIRST_FREE_SLOT) -> tuple[list[DeviceId], list[DeviceId]]:
    """Identities for every NIC and disk, keeping those given and filling the None ones.

    Deterministic: disks first, then NICs, each new one taking the first
    free name (``disk0``, ``nic0``...) and, if it is a PCI device
    (``disk_on_pci``, ``nic_on_pci``), the first free slot of ``pci.0``
    from ``first_slot`` on (the instance's kvm_pci_reservations), after
    those already held.  New PCI
    NICs get the default option ROM if ``rom`` (a network boot), else none.
    Non-PCI disks keep their place by position (see :func:`positional_disk`).
    """
    used = used_slots([*nics, *disks])
    disk_names = {i.backend for i in disks if i is not None}
    nic_names = {i.backend for i in nics if i is not None}
    new_disks: list[DeviceId] = []
    for index, ident in enumerate(disks):
        if ident is None:
            if disk_on_pci:
                backend = _free_name("disk", disk_names)
                slot = free_slot(used, name, first_slot)
                used.add(slot)
                ident = DeviceId(backend=backend, id=f"{backend}-dev", bus=PCI_BUS,
                                 addr=hex(slot))
            else:
                ident = positional_disk(index, disk_type)
            disk_names.add(ident.backend)
        new_disks.append(ident)
    new_nics: list[DeviceId] = []
    for ident in nics:
        if ident is None:
            backend = _free_name("net", nic_names)
            nic_id = "nic" + backend[len("net"):]
            if nic_on_pci:
                slot = free_slot(used, name, first_slot)
                used.add(slot)
                ident = DeviceId(backend=backend, id=nic_id, bus=PCI_BUS, addr=hex(slot),
                                 romfile=None if rom else "")
            else:  # an ISA NIC: no slot, and no option ROM property to set
                ident = DeviceId(backend=backend, id=nic_id)
            nic_names.add(ident.backend)
        new_nics.append(ident)
    return new_nics, new_disks


# --- devices of a QEMU another driver started -----------------------------------------


def _options(value: str) -> tuple[str, list[tuple[str, str]]]:
    """The driver (the implied first key) and the ``key=value`` pairs of a -device value."""
    parts = value.split(",")
    return parts[0], [tuple(p.split("=", 1)) for p in parts[1:] if "=" in p]  # type: ignore[misc]


def _from_device(value: str, backend: str) -> DeviceId | None:
    """The identity a ``-device`` value spells, or None if it is not one we can spell."""
    driver, pairs = _options(value)
    options = dict(pairs)
    ident = DeviceId(backend=backend, id=options.get("id"), driver=driver,
                     bus=options.get("bus"), addr=options.get("addr"),
                     romfile=options.get("romfile"),
                     props=tuple((k, v) for k, v in pairs if k not in _OWN_PROPS))
    return None if ident.problem() else ident


def _values(argv: Sequence[str], option: str) -> list[str]:
    return [argv[i + 1] for i in range(len(argv) - 1) if argv[i] == option]


def parse_nic_devices(argv: Sequence[str]) -> list[DeviceId | None]:
    """The identities of the NICs of a real QEMU command line, in ``-netdev tap`` order.

    Each ``-netdev`` of type tap, with the ``-device`` whose ``netdev=``
    names it; None for one that has no such device or one this library
    cannot spell again.
    """
    devices = _values(argv, "-device")
    found: list[DeviceId | None] = []
    for value in _values(argv, "-netdev"):
        parts = value.split(",")
        options = dict(p.split("=", 1) for p in parts if "=" in p)
        if "tap" not in (parts[0], options.get("type")):
            continue
        backend = options.get("id", "")
        device = next((d for d in devices if f"netdev={backend}" in d.split(",")[1:]), None)
        found.append(None if device is None else _from_device(device, backend))
    return found


def parse_disk_devices(argv: Sequence[str]) -> list[DeviceId | None]:
    """The identities of the data disks of a real QEMU command line, in ``-drive`` order.

    Each ``-drive ...,if=none,id=ID`` that is not a CD-ROM, with the
    ``-device`` whose ``drive=`` names it; None where there is none.
    """
    devices = _values(argv, "-device")
    found: list[DeviceId | None] = []
    for value in _values(argv, "-drive"):
        options = dict(p.split("=", 1) for p in value.split(",") if "=" in p)
        if options.get("if") != "none" or options.get("media") == "cdrom" \
                or "id" not in options:
            continue
        backend = options["id"]
        device = next((d for d in devices if f"drive={backend}" in d.split(",")[1:]), None)
        found.append(None if device is None else _from_device(device, backend))
    return found
