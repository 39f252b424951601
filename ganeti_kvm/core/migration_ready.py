"""What the source set up ahead for an instance's next migration, and for which QEMU.

``MigrationInfo`` (:func:`ganeti_kvm.core.migration.migration_info`) runs
before the target accepts and sets the migration's capabilities and
parameters on the source QEMU.  It leaves a note of what it set, on which
QEMU process and whether that QEMU runs the guest under TCG, at
:attr:`~ganeti_kvm.host.paths.InstancePaths.migration_prepared`.  The
migration itself takes the note (reads and removes it, whatever follows):
if it names the same QEMU and the same settings, the migration starts in
one exchange with QEMU, without asking it first what it has.

A note is good for one migration only: a migration may escalate its
parameters, so the next one asks QEMU again unless ``MigrationInfo`` ran
again.  It is written without fsync (what a running QEMU has set means
nothing after a crash of the node) and with mode 0600; a note that cannot
be read is ignored, so the worst a bad note costs is one round trip.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from ganeti_kvm import errors
from ganeti_kvm.host import fsutil
from ganeti_kvm.host.paths import InstancePaths

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prepared:
    """The capabilities and parameters set on QEMU process ``pid``."""

    pid: int
    tcg: bool  # the guest runs under TCG (QEMU's query-kvm: not enabled)
    capabilities: tuple[str, ...]
    parameters: dict[str, int]

    def matches(self, pid: int, capabilities: list[str], parameters: dict[str, int]) -> bool:
        """Whether this note says QEMU ``pid`` has exactly these settings; pure."""
        return (self.pid == pid and self.capabilities == tuple(capabilities)
                and self.parameters == parameters)

    def to_dict(self) -> dict[str, Any]:
        return {"pid": self.pid, "tcg": self.tcg, "capabilities": list(self.capabilities),
                "parameters": dict(self.parameters)}

    @classmethod
    def from_dict(cls, data: Any) -> Prepared | None:
        """The note in ``data``; None if anything in it has the wrong type."""
        if not isinstance(data, dict):
            return None
        pid, tcg = data.get("pid"), data.get("tcg")
        caps, parameters = data.get("capabilities"), data.get("parameters")
        if not isinstance(pid, int) or isinstance(pid, bool) or not isinstance(tcg, bool) \
                or not isinstance(caps, list) or not all(isinstance(x, str) for x in caps) \
                or not isinstance(parameters, dict) \
                or not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                           for k, v in parameters.items()):
            return None
        return cls(pid, tcg, tuple(caps), dict(parameters))


def save(paths: InstancePaths, note: Prepared) -> None:
    """Leave ``note`` for the next migration of the instance (atomic, mode 0600)."""
    try:
        fsutil.atomic_write(paths.migration_prepared, json.dumps(note.to_dict(), sort_keys=True),
                            durable=False)
    except OSError as err:
        raise errors.HypervisorError(
            f"Cannot note the migration set-up of instance {paths.name} at "
            f"{paths.migration_prepared}: {err}") from None


def take(paths: InstancePaths) -> Prepared | None:
    """The note left by :func:`save`, removed; None if there is none or it is unreadable.

    Never raises: a note that cannot be read or removed is logged and not
    used, and the migration asks QEMU instead.
    """
    path = paths.migration_prepared
    try:
        raw = fsutil.read_small_file(path)
        if raw is None:
            return None
        fsutil.remove_file(path)
    except errors.HypervisorError as err:
        log.warning("Ignoring the migration set-up note of instance %s: %s", paths.name, err)
        return None
    try:
        note = Prepared.from_dict(json.loads(raw))
    except ValueError:
        note = None
    if note is None:
        log.warning("Ignoring the migration set-up note of instance %s at %s: it is not "
                    "what this library writes", paths.name, path)
    return note
