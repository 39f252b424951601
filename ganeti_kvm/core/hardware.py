"""The hardware an instance keeps in its runtime record, from its first start on.

Each NIC and disk gets a device identity (a QEMU id and a PCI slot), and
the controllers the library adds (the virtio-balloon, the guest agent's and
the SPICE agent's virtio-serial controllers) get theirs beside them; the
machine type is pinned.  All are kept in the record, so a reboot, a
migration target and a hotplug see the same hardware the guest first saw.
Pure functions of the record (and of a QEMU's capabilities), in place.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from ganeti_kvm import errors
from ganeti_kvm.core import names as c
from ganeti_kvm.core import runtime
from ganeti_kvm.qemu import caps as qemu_caps
from ganeti_kvm.qemu import cmdline, devices, spice

log = logging.getLogger(__name__)

BALLOON_ID = "balloon0"
GUEST_AGENT_ID = "qgaserial0"


def assign_devices(record: runtime.RuntimeRecord) -> None:
    """Give each NIC and disk of ``record`` without a device identity a new one, in place.

    For a new start: each gets a name and a PCI slot
    (:func:`ganeti_kvm.qemu.devices.allocate`).  Identities already there are
    kept and their slots avoided.
    """
    hvp = record.hvparams
    nics = [devices.identity_of(n, f"NIC {i} of {record.name}")
            for i, n in enumerate(record.nics)]
    disks = [devices.identity_of(d, f"disk {i} of {record.name}")
             for i, d in enumerate(record.disks)]
    first_slot = int(hvp.get(c.HV_KVM_PCI_RESERVATIONS, devices.FIRST_FREE_SLOT))
    if all(i is not None for i in nics + disks):
        assign_balloon(record, nics + disks, first_slot)
        return
    nic_ids, disk_ids = devices.allocate(
        nics, disks, nic_on_pci=hvp.get(c.HV_NIC_TYPE) != c.HT_NIC_NE2K_ISA,
        disk_on_pci=hvp.get(c.HV_DISK_TYPE) == c.HT_DISK_PARAVIRTUAL,
        rom=hvp.get(c.HV_BOOT_ORDER) == c.HT_BO_NETWORK and not hvp.get(c.HV_KERNEL_PATH),
        disk_type=str(hvp.get(c.HV_DISK_TYPE)), name=record.name,
        first_slot=first_slot)
    for entry, ident in [*zip(record.nics, nic_ids, strict=True),
                         *zip(record.disks, disk_ids, strict=True)]:
        entry[devices.DEVICE_KEY] = ident.to_dict()
    assign_balloon(record, [*nic_ids, *disk_ids], first_slot)


def _first_slot(record: runtime.RuntimeRecord) -> int:
    return int(record.hvparams.get(c.HV_KVM_PCI_RESERVATIONS, devices.FIRST_FREE_SLOT))


def _highest_free_slot(record: runtime.RuntimeRecord,
                       kept: Sequence[dict[str, Any] | None],
                       identities: Sequence[devices.DeviceId | None] | None = None,
                       first_slot: int | None = None) -> int | None:
    """The highest PCI slot (down to kvm_pci_reservations) that no NIC, disk or ``kept``
    controller of ``record`` holds; None if every one is taken.

    The library's controllers take the slots from the top, so that the NICs
    and disks keep theirs and the slots after them stay free for devices
    added later.
    """
    if identities is None:
        identities = [devices.identity_of(e, f"device {i} of {record.name}")
                      for i, e in enumerate([*record.nics, *record.disks])]
    held = [*identities, *(devices.DeviceId.from_dict(k, f"a device of {record.name}")
                           for k in kept if k is not None)]
    used = devices.used_slots(held)
    first = _first_slot(record) if first_slot is None else first_slot
    return next((s for s in range(devices.PCI_SLOTS - 1, first - 1, -1) if s not in used),
                None)


def give_balloon(record: runtime.RuntimeRecord) -> None:
    """Give ``record`` a balloon device if it has none, beside its NICs' and disks' slots."""
    if record.balloon is not None:
        return
    assign_balloon(record, None, _first_slot(record))


def assign_balloon(record: runtime.RuntimeRecord,
                   identities: Sequence[devices.DeviceId | None] | None,
                   first_slot: int = devices.FIRST_FREE_SLOT) -> None:
    """Give a new ``record`` its virtio-balloon device: ``balloon0`` on the last free slot.

    ``identities`` are its NICs' and disks' (None: read from the record).
    Kept in the record for every later start (reboot, migration target).
    """
    if record.balloon is not None:
        return
    slot = _highest_free_slot(record, [record.guest_agent, record.spice_agent], identities,
                              first_slot)
    if slot is None:  # every slot holds a NIC or disk: they matter more
        log.warning("Instance %s gets no balloon device: its NICs and disks hold every PCI "
                    "slot from %d on; it cannot be ballooned", record.name, first_slot)
        return
    record.balloon = devices.DeviceId(backend=BALLOON_ID, id=BALLOON_ID, bus=devices.PCI_BUS,
                                      addr=hex(slot)).to_dict()


def give_guest_agent(record: runtime.RuntimeRecord) -> None:
    """Give ``record`` the guest agent's virtio-serial controller if ``use_guest_agent``
    wants one and it has none.

    On the highest free PCI slot, kept in the record for every later start,
    so a migration target has it where the source has it.  Without a free
    slot the instance gets no channel (logged): its stops use the ACPI
    button only.
    """
    if record.guest_agent is not None or not record.hvparams.get(c.HV_USE_GUEST_AGENT):
        return
    slot = _highest_free_slot(record, [record.balloon, record.spice_agent])
    if slot is None:
        log.warning("Instance %s gets no guest agent channel: its devices hold every PCI "
                    "slot from %d on", record.name, _first_slot(record))
        return
    record.guest_agent = devices.DeviceId(backend=cmdline.GUEST_AGENT_CHARDEV,
                                          id=GUEST_AGENT_ID, bus=devices.PCI_BUS,
                                          addr=hex(slot)).to_dict()


def give_spice_agent(record: runtime.RuntimeRecord) -> None:
    """Give ``record`` the SPICE agent's virtio-serial controller if it needs one.

    Needed with ``spice_bind`` and ``spice_use_vdagent``; on the highest free
    PCI slot, kept in the record for every later start.  Without a free
    slot QEMU places it (logged).
    """
    if record.spice_agent is not None or not spice.wants_agent(record.hvparams):
        return
    slot = _highest_free_slot(record, [record.balloon, record.guest_agent])
    if slot is None:
        log.warning("Instance %s: no free PCI slot from %d on for the SPICE agent's "
                    "controller; QEMU places it", record.name, _first_slot(record))
        record.spice_agent = devices.DeviceId(backend=spice.VIRTIO_SERIAL_ID,
                                              id=spice.VIRTIO_SERIAL_ID).to_dict()
        return
    record.spice_agent = spice.serial_identity(slot).to_dict()


def pin_machine(record: runtime.RuntimeRecord, caps: qemu_caps.QemuCaps) -> str | None:
    """The machine type ``record`` starts with on QEMU ``caps``: pinned, or pinned now.

    A record's type is kept on every later start and refused up front (with
    what to do) if this QEMU lacks it, rather than letting QEMU fail later,
    or, on a migration target, the migration break with "Broken pipe".  A
    record without one takes its ``machine_version`` (an alias resolved to
    the versioned type, refused naming the key if this QEMU lacks it), else
    this QEMU's ``pc`` type (None if its alias table names none: then QEMU
    resolves ``pc`` itself).
    """
    if record.machine is None:
        wanted = record.hvparams.get(c.HV_KVM_MACHINE_VERSION) or ""
        if not wanted:
            return caps.pinned_machine()
        reason = caps.missing_machine(wanted)
        if reason is not None:
            raise errors.ParameterError(
                f"Cannot start instance {record.name}: {c.HV_KVM_MACHINE_VERSION} is "
                f"{wanted!r} but {reason}; set {c.HV_KVM_MACHINE_VERSION} to a machine type "
                f"of this QEMU, or to \"\" for its pc type", c.HV_KVM_MACHINE_VERSION, wanted)
        return caps.resolve_machine(wanted)  # an alias (q35) is pinned as its versioned type
    reason = caps.missing_machine(record.machine)
    if reason is not None:
        raise errors.HypervisorError(
            f"Cannot start instance {record.name}: {reason}, the type it was first started "
            f"with. Start it on a node whose QEMU has {record.machine}, or stop it and start "
            "it afresh here (a new start pins this QEMU's type)")
    return record.machine
