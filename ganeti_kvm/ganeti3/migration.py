"""Ganeti 3's asynchronous migration, on the source node.

Ganeti 3 splits a migration into calls that may reach different node
daemon processes: ``MigrateInstance`` starts it and returns, the master
polls ``GetMigrationStatus`` for as long as the status is ``active``, then
calls ``FinalizeMigrationSource`` (and ``FinalizeMigrationDst`` on the
target).  The core offers exactly these steps
(:func:`ganeti_kvm.core.migration.start`, :func:`~ganeti_kvm.core.migration.poll`,
:func:`~ganeti_kvm.core.migration.finish_source`), with the library's time limit
and stall timeout kept between the calls in the instance's migration state
record.  This module maps QEMU's states onto Ganeti's, and makes the
status poll wait for the migration's end (up to :data:`STATUS_WAIT`), so
that the master learns of it when it happens instead of at its next poll.
"""

from __future__ import annotations

from typing import Any

from ganeti_kvm.core import migration as core_migration
from ganeti_kvm.core.node import KvmNode

GANETI_ACTIVE, GANETI_COMPLETED, GANETI_FAILED, GANETI_CANCELLED = (
    "active", "completed", "failed", "cancelled")
# How long GetMigrationStatus watches a migration that goes on before it
# answers "active".  Ganeti's master asks, and sleeps a second after each
# "active": answering at once would leave the end of every migration to be
# seen up to a second late; watching 5 s leaves it so only when it falls
# into the master's sleep (one time in six), and the master still reports
# progress about every 10 s as it means to (its RPC allows an hour).
STATUS_WAIT = 5.0


def ganeti_state(qemu_status: str) -> str:
    """Ganeti's name for QEMU's migration state ``qemu_status``.

    Ganeti knows only active, completed, failed and cancelled; every state
    of a migration still going on is ``active``, and ``none`` (nothing was
    started, e.g. the source QEMU was restarted) is ``failed``.
    """
    if qemu_status in core_migration.ONGOING:
        return GANETI_ACTIVE
    if qemu_status in (GANETI_COMPLETED, GANETI_CANCELLED):
        return qemu_status
    return GANETI_FAILED


def start(node: KvmNode, name: str, target: str, live: bool,
          limit: float | None = None,
          stall_timeout: float = core_migration.STALL_TIMEOUT) -> None:
    """``MigrateInstance``: start migrating ``name``; returns once QEMU migrates."""
    core_migration.start(node, name, target, live, limit=limit, stall_timeout=stall_timeout)


def poll(node: KvmNode, name: str,
         wait: float = STATUS_WAIT) -> tuple[str, core_migration.MigrationStatus]:
    """``GetMigrationStatus``: Ganeti's state of ``name``'s migration and QEMU's report.

    The core cancels a migration past its time limit or without progress
    and reports it ``failed``, with the reason in the report's ``error``.
    While the migration goes on, the answer waits up to ``wait`` seconds
    for its end (see :data:`STATUS_WAIT`).
    """
    status = core_migration.poll(node, name, wait=wait)
    return ganeti_state(status.status), status


def finish_source(node: KvmNode, name: str, success: bool) -> None:
    """``FinalizeMigrationSource``: end the stale source QEMU, or let the guest run on."""
    core_migration.finish_source(node, name, success)


def ganeti_fields(status: core_migration.MigrationStatus) -> dict[str, Any]:
    """The RAM figures Ganeti's ``objects.MigrationStatus`` carries."""
    return {"transferred_ram": status.transferred, "total_ram": status.total}
