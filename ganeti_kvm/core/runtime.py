"""The runtime record: what an instance was started with.

The record is written before QEMU starts and read back for reboots and
migrations, so an instance restarts with the parameters it was started
with, not today's configuration.  It is a named, versioned JSON document;
older versions, including the 2011 driver's bare ``[argv, nics, hvparams]``
list, are upgraded when loaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ganeti_kvm import errors
from ganeti_kvm.core import legacy
from ganeti_kvm.host import fsutil
from ganeti_kvm.qemu import caps as qemu_caps
from ganeti_kvm.qemu import devices

RECORD_KIND = "ganeti-kvm-runtime"
# Version 1: every record up to the virtio-serial controllers.  Version 2:
# a record with the guest agent's or the SPICE agent's controller, which a
# reader of version 1 would silently leave out of a migration target's
# QEMU (the migration would then fail inside QEMU); such a reader refuses
# version 2 by name instead.  A record without them stays version 1, so
# instances still move to nodes with the older library.
RECORD_VERSION = 2
READ_VERSIONS = frozenset([1, 2])
UPGRADED_KEY = "upgraded_from"


@dataclass
class RuntimeRecord:
    """An instance's saved runtime.

    ``argv`` is the QEMU command line without the parts that change per
    start (NIC file descriptors, ``-S``, ``-incoming``); ``nics`` are the NIC
    dicts with the tap name each got (``tap``); ``disks`` are
    ``{"disk": dict, "path": str, "uri": str | None}`` entries.  Each NIC
    and disk entry keeps its device identity under ``"device"`` (see
    :mod:`ganeti_kvm.qemu.devices`); an entry without one (a record written
    before identities were kept) runs with the ones by position.
    """

    name: str
    argv: list[str]
    nics: list[dict[str, Any]] = field(default_factory=list)
    hvparams: dict[str, Any] = field(default_factory=dict)
    beparams: dict[str, Any] = field(default_factory=dict)
    disks: list[dict[str, Any]] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    uid: int | None = None
    qemu_version: list[int] = field(default_factory=list)
    uuid: str | None = None
    network_port: int | None = None
    # The versioned machine type pinned at the first start ("pc-i440fx-7.2").
    # None in records written before it existed: the instance runs whatever
    # its QEMU resolved "pc" to, which only that QEMU can tell (see
    # KvmNode.running_machine); the next start from such a record pins one.
    machine: str | None = None
    # 0 while the QEMU that runs the instance was started by an earlier
    # driver (the 2011 one, or Ganeti's bundled one); None once this library
    # started it.  A reboot rebuilds the command line from the parameters.
    upgraded_from: int | None = None
    # The virtio-balloon device's identity (a DeviceId's dict), given at the
    # first start; None in records written before it existed: no balloon.
    balloon: dict[str, Any] | None = None
    # The memory (MiB) the balloon was last set to while this QEMU runs;
    # None: the full memory (never ballooned since QEMU started).
    balloon_memory: int | None = None
    # The guest agent's virtio-serial controller (a DeviceId's dict), given at
    # a start with use_guest_agent; None: no guest agent channel.
    guest_agent: dict[str, Any] | None = None
    # The SPICE agent's virtio-serial controller (a DeviceId's dict), given at
    # a start with spice_bind and spice_use_vdagent; None: no such channel.
    spice_agent: dict[str, Any] | None = None

    def version(self) -> int:
        """The lowest document version that holds everything this record has."""
        return 2 if self.guest_agent is not None or self.spice_agent is not None else 1

    def to_dict(self) -> dict[str, Any]:
        """The JSON document, with its kind and version."""
        return {
            "kind": RECORD_KIND,
            "version": self.version(),
            "name": self.name,
            "argv": list(self.argv),
            "nics": self.nics,
            "hvparams": self.hvparams,
            "beparams": self.beparams,
            "disks": self.disks,
            "tags": list(self.tags),
            "uid": self.uid,
            "qemu_version": list(self.qemu_version),
            "uuid": self.uuid,
            "network_port": self.network_port,
            "machine": self.machine,
            # Set while a QEMU an earlier driver started still runs this
            # instance: a migration target must then start the same devices.
            UPGRADED_KEY: self.upgraded_from,
            "balloon": self.balloon,
            "balloon_memory": self.balloon_memory,
            "guest_agent": self.guest_agent,
            "spice_agent": self.spice_agent,
        }

    def serialize(self) -> str:
        """The record as JSON text (also the migration info sent to a target)."""
        return json.dumps(self.to_dict(), sort_keys=True, indent=1)


def parse(text: str | bytes, name: str, source: str) -> RuntimeRecord:
    """Parse a serialized record for instance ``name``; ``source`` names it in errors."""
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as err:
        raise errors.RuntimeStateError(
            f"Runtime record {source} of instance {name} is corrupt ({err}); "
            "stop the instance with force and run CleanupInstance") from err
    return upgrade(data, name, source)


def upgrade(data: Any, name: str, source: str) -> RuntimeRecord:
    """Turn any known version of the document into a current :class:`RuntimeRecord`."""
    def bad(why: str) -> errors.RuntimeStateError:
        return errors.RuntimeStateError(
            f"Runtime record {source} of instance {name} is not valid: {why}")

    if isinstance(data, list):
        # The 2011 driver's format: [kvm_cmd, [nic dicts], hvparams]
        return _with_identities(RuntimeRecord(name=name, upgraded_from=0,
                                              **legacy.fields_from_2011(data, name, source)),
                                source)
    if not isinstance(data, dict) or data.get("kind") != RECORD_KIND:
        raise bad(f"its kind is not {RECORD_KIND!r}")
    version = data.get("version")
    if version not in READ_VERSIONS:
        raise bad(f"unknown version {version!r} (this library reads "
                  f"{', '.join(map(str, sorted(READ_VERSIONS)))}); it was written by a newer "
                  "ganeti-kvm: upgrade ganeti-kvm on this node")
    if data.get("name") != name:
        raise bad(f"it belongs to instance {data.get('name')!r}")
    argv = data.get("argv")
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv) or not argv:
        raise bad("argv is missing or not a list of strings")
    machine = data.get("machine")  # absent from records of earlier versions: None
    if machine is not None and not qemu_caps.is_machine_name(machine):
        raise bad(f"machine {machine!r} is not a machine type name")
    try:
        return _with_identities(RuntimeRecord(
            name=name, argv=argv, nics=list(data.get("nics") or []),
            hvparams=dict(data.get("hvparams") or {}),
            beparams=dict(data.get("beparams") or {}),
            disks=list(data.get("disks") or []), tags=list(data.get("tags") or []),
            uid=data.get("uid"), qemu_version=list(data.get("qemu_version") or []),
            uuid=data.get("uuid"), network_port=data.get("network_port"), machine=machine,
            upgraded_from=_upgraded_from(data.get(UPGRADED_KEY), bad),
            balloon=_balloon(data.get("balloon"), name, source),
            balloon_memory=_balloon_memory(data.get("balloon_memory"), bad),
            guest_agent=_device(data.get("guest_agent"),
                                f"the guest agent channel of instance {name} ({source})"),
            spice_agent=_device(data.get("spice_agent"),
                                f"the SPICE agent channel of instance {name} ({source})")),
            source)
    except (TypeError, ValueError, AttributeError) as err:
        raise bad(str(err)) from err


def _with_identities(record: RuntimeRecord, source: str) -> RuntimeRecord:
    """``record``, once every identity its NIC and disk entries keep is checked.

    An entry without one comes from a record written before identities were
    kept: its instance runs with the names by position, which the command
    line gives such an entry (see :func:`ganeti_kvm.qemu.devices.positional_nic`).
    """
    for kind, entries in (("NIC", record.nics), ("disk", record.disks)):
        for index, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise errors.RuntimeStateError(
                    f"Runtime record {source} of instance {record.name} is not valid: "
                    f"{kind} {index} is not a mapping")
            devices.identity_of(entry, f"{kind} {index} of instance {record.name} ({source})")
    return record


def _balloon(value: Any, name: str, source: str) -> dict[str, Any] | None:
    """The balloon identity of a record (checked), or None if it has none."""
    if value is None:
        return None
    return devices.DeviceId.from_dict(value, f"the balloon of instance {name} ({source})").to_dict()


def _device(value: Any, what: str) -> dict[str, Any] | None:
    """A device identity kept in a record (checked), or None if it has none."""
    return None if value is None else devices.DeviceId.from_dict(value, what).to_dict()


def _balloon_memory(value: Any, bad: Any) -> int | None:
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        return value
    raise bad(f"balloon_memory {value!r} is not a memory size in MiB")


def _upgraded_from(value: Any, bad: Any) -> int | None:
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return value
    raise bad(f"{UPGRADED_KEY} {value!r} is not a record version")


def balloon_memory_of(raw: bytes, name: str) -> int | None:
    """The ``balloon_memory`` of serialized record ``raw`` of instance ``name``, or None.

    For the listing, which needs this one field of every record: the rest
    of the record is neither upgraded nor checked, and a record that cannot
    be read counts as not ballooned (never an error).
    """
    if b'"balloon_memory": null' in raw:  # as serialize() writes it: the usual case
        return None
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict) or data.get("kind") != RECORD_KIND \
            or data.get("name") != name:
        return None
    value = data.get("balloon_memory")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 \
        else None


def load(path: str, name: str) -> RuntimeRecord | None:
    """Load the record at ``path``; None if there is none."""
    try:
        raw = fsutil.read_small_file(path, limit=16 << 20)
    except errors.HypervisorError as err:
        raise errors.RuntimeStateError(
            f"Cannot read the runtime record of instance {name}: {err}") from err
    if raw is None:
        return None
    return parse(raw, name, path)


def save(path: str, record: RuntimeRecord) -> None:
    """Write the record atomically with mode 0600."""
    try:
        fsutil.atomic_write(path, record.serialize(), mode=0o600)
    except OSError as err:
        raise errors.RuntimeStateError(
            f"Cannot write runtime record {path} of instance {record.name}: {err}") from err
