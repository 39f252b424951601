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

from ganeti_kvm import errors, fsutil

RECORD_KIND = "ganeti-kvm-runtime"
RECORD_VERSION = 1


@dataclass
class RuntimeRecord:
    """An instance's saved runtime.

    ``argv`` is the QEMU command line without the parts that change per
    start (NIC file descriptors, ``-S``, ``-incoming``); ``nics`` are the NIC
    dicts with the tap name each got (``tap``); ``disks`` are
    ``{"disk": dict, "path": str, "uri": str | None}`` entries.
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
    upgraded_from: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON document, with its kind and version."""
        return {
            "kind": RECORD_KIND,
            "version": RECORD_VERSION,
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
        if len(data) != 3 or not isinstance(data[0], list) or not isinstance(data[1], list) \
                or not isinstance(data[2], dict):
            raise bad("a list, but not the old [argv, nics, hvparams] form")
        return RuntimeRecord(name=name, argv=[str(a) for a in data[0]], nics=list(data[1]),
                             hvparams=dict(data[2]), upgraded_from=0)
    if not isinstance(data, dict) or data.get("kind") != RECORD_KIND:
        raise bad(f"its kind is not {RECORD_KIND!r}")
    version = data.get("version")
    if version != RECORD_VERSION:
        raise bad(f"unknown version {version!r} (this library writes {RECORD_VERSION})")
    if data.get("name") != name:
        raise bad(f"it belongs to instance {data.get('name')!r}")
    argv = data.get("argv")
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv) or not argv:
        raise bad("argv is missing or not a list of strings")
    try:
        return RuntimeRecord(
            name=name, argv=argv, nics=list(data.get("nics") or []),
            hvparams=dict(data.get("hvparams") or {}),
            beparams=dict(data.get("beparams") or {}),
            disks=list(data.get("disks") or []), tags=list(data.get("tags") or []),
            uid=data.get("uid"), qemu_version=list(data.get("qemu_version") or []),
            uuid=data.get("uuid"), network_port=data.get("network_port"))
    except (TypeError, ValueError) as err:
        raise bad(str(err)) from err


def load(path: str, name: str) -> RuntimeRecord | None:
    """Load the record at ``path``; None if there is none."""
    try:
        raw = fsutil.read_small_file(path, limit=16 << 20)
    except OSError as err:
        raise errors.RuntimeStateError(
            f"Cannot read runtime record {path} of instance {name}: {err}") from err
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
