"""Moving a running instance to another node with QEMU's migration.

The source side (:func:`migrate`) drives one QMP connection on the
instance's long-operation monitor: it sets bandwidth and downtime, starts
the migration, and waits for QEMU's ``MIGRATION`` events, asking
``query-migrate`` between them for progress.  Completion is seen within
:data:`POLL_INTERVAL` of QEMU reaching it, not seconds later.  Whatever goes
wrong (QEMU reports failure, the target dies or the link breaks, progress
stalls, the time limit passes) the migration is cancelled and the source
keeps running: no instance is ever lost or left running twice.

The target side is :func:`accept` (start QEMU waiting with ``-incoming``) and
:func:`finalize` (configure NICs and continue, or stop and clean up).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ganeti_kvm import constants as c
from ganeti_kvm import errors, process, runtime
from ganeti_kvm.lifecycle import KvmNode
from ganeti_kvm.qmp import QmpClient

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.05  # seconds between progress queries while waiting for events
STALL_TIMEOUT = 30.0  # cancel when no byte moved for this long (a broken link)
MIN_TIME_LIMIT = 60.0
SOURCE_STATE_KEY = "migration_source_state"
_FINAL_STATES = ("completed", "failed", "cancelled")


@dataclass(frozen=True)
class MigrationStatus:
    """A snapshot of a migration as QEMU reports it."""

    status: str
    transferred: int = 0
    remaining: int = 0
    total: int = 0
    total_time_ms: int | None = None
    downtime_ms: int | None = None
    error: str | None = None
    raw: dict[str, Any] | None = None

    @classmethod
    def from_query(cls, reply: dict[str, Any]) -> "MigrationStatus":
        ram = reply.get("ram") or {}
        return cls(status=str(reply.get("status", "none")),
                   transferred=int(ram.get("transferred", 0)),
                   remaining=int(ram.get("remaining", 0)),
                   total=int(ram.get("total", 0)),
                   total_time_ms=reply.get("total-time"),
                   downtime_ms=reply.get("downtime"),
                   error=reply.get("error-desc"), raw=reply)

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "transferred": self.transferred,
                "remaining": self.remaining, "total": self.total,
                "total_time_ms": self.total_time_ms, "downtime_ms": self.downtime_ms,
                "error": self.error, "qemu": self.raw or {}}


def time_limit(memory_mib: int, bandwidth_mib_s: int, factor: float = 3.0) -> float:
    """How long a migration may take: ``factor`` times RAM over bandwidth, at least a minute."""
    if bandwidth_mib_s <= 0:
        return MIN_TIME_LIMIT
    return max(MIN_TIME_LIMIT, factor * memory_mib / bandwidth_mib_s + 10.0)


# --- source side ---------------------------------------------------------------

def migration_info(node: KvmNode, name: str) -> str:
    """The serialized runtime record of running instance ``name`` for its target."""
    if node.running_pid(name) is None:
        raise errors.InstanceNotRunning(f"Cannot migrate instance {name}: it is not running")
    record = node.load_record(name)
    if record is None:
        raise errors.RuntimeStateError(
            f"Cannot migrate instance {name}: its runtime record is missing")
    data = record.to_dict()
    data[SOURCE_STATE_KEY] = node.qmp(name, "query-status")["status"]
    return json.dumps(data, sort_keys=True)


def migrate(node: KvmNode, name: str, target: str, live: bool,
            limit: float | None = None, stall_timeout: float = STALL_TIMEOUT,
            progress: Callable[[MigrationStatus], None] | None = None) -> MigrationStatus:
    """Migrate ``name`` to ``target`` and return QEMU's final report.

    On success the source QEMU is gone and its files are cleaned.  On any
    failure the migration is cancelled, the source keeps running (resumed if
    it was stopped for a non-live migration) and :class:`errors.MigrationError`
    says what happened.
    """
    with node.locked(name, "migrate") as paths:
        pid = node.running_pid(name)
        if pid is None:
            raise errors.InstanceNotRunning(f"Cannot migrate instance {name}: it is not running")
        record = node.load_record(name)
        if record is None:
            raise errors.RuntimeStateError(
                f"Cannot migrate instance {name}: its runtime record is missing")
        hvp = record.hvparams
        live = live and hvp.get(c.HV_MIGRATION_MODE, c.HT_MIGRATION_LIVE) != \
            c.HT_MIGRATION_NONLIVE
        bandwidth = int(hvp.get(c.HV_MIGRATION_BANDWIDTH, 32))
        port = int(hvp.get(c.HV_MIGRATION_PORT, 8102))
        if limit is None:
            limit = time_limit(int(record.beparams.get(c.BE_MEMORY, 128)), bandwidth)
        with QmpClient(paths.qmp_long_socket, timeout=10.0) as qmp:
            qmp.connect()
            was_running = qmp.execute("query-status")["running"]
            stopped_by_us = False
            if not live and was_running:
                qmp.execute("stop")
                stopped_by_us = True
            try:
                qmp.execute("migrate-set-capabilities",
                            {"capabilities": [{"capability": "events", "state": True}]})
                qmp.execute("migrate-set-parameters", {
                    "max-bandwidth": bandwidth * 1024 * 1024,
                    "downtime-limit": int(hvp.get(c.HV_MIGRATION_DOWNTIME, 30))})
                uri = f"tcp:{_uri_host(target)}:{port}"
                log.info("Migrating instance %s to %s (%s)", name, uri,
                         "live" if live else "non-live")
                qmp.execute("migrate", {"uri": uri})
                final = _wait(qmp, name, limit, stall_timeout, progress)
            except BaseException as err:
                _cancel(qmp, name)
                if stopped_by_us:
                    _resume(qmp, name)
                if isinstance(err, errors.MigrationError):
                    raise
                if isinstance(err, errors.HypervisorError):
                    raise errors.MigrationError(
                        f"Migration of instance {name} to {target} failed: {err}; "
                        "the instance keeps running on this node") from err
                raise
            if final.status != "completed":
                if stopped_by_us:
                    _resume(qmp, name)
                raise errors.MigrationError(
                    f"Migration of instance {name} to {target} {final.status}: "
                    f"{final.error or 'QEMU gave no reason'}; the instance keeps running "
                    "on this node")
            # The guest now runs on the target; this QEMU only holds a stale copy.
            try:
                qmp.execute("quit")
            except errors.MonitorError:
                pass  # QEMU may close the monitor before answering
        if not process.wait_gone(pid, 10.0):
            process.terminate(pid)
        node._cleanup_stopped(name, paths)
        return final


def _uri_host(target: str) -> str:
    return f"[{target}]" if ":" in target and not target.startswith("[") else target


def _wait(qmp: QmpClient, name: str, limit: float,
          stall_timeout: float,
          progress: Callable[[MigrationStatus], None] | None) -> MigrationStatus:
    """Wait for the migration to end; cancel on time limit or stall."""
    started = time.monotonic()
    last_moved = started
    last_transferred = -1
    while True:
        event = qmp.wait_event(["MIGRATION"], timeout=POLL_INTERVAL)
        status = MigrationStatus.from_query(qmp.execute("query-migrate"))
        if event is not None:
            log.debug("Migration of %s: event %s", name, event.get("data"))
        if status.status in _FINAL_STATES:
            return _settled(qmp, status)
        if progress is not None:
            progress(status)
        now = time.monotonic()
        if status.transferred != last_transferred:
            last_transferred, last_moved = status.transferred, now
        if now - started > limit:
            raise errors.MigrationError(
                f"Migration of instance {name} did not finish within its time limit of "
                f"{limit:.0f} s ({status.transferred} of {status.total} bytes sent); "
                "cancelled, the instance keeps running on this node. Raise "
                "migration_bandwidth or the time limit")
        if now - last_moved > stall_timeout:
            raise errors.MigrationError(
                f"Migration of instance {name} made no progress for {stall_timeout:.0f} s "
                f"(link down or target hung?); cancelled, the instance keeps running on "
                "this node")


def _settled(qmp: QmpClient, status: MigrationStatus) -> MigrationStatus:
    """The final report once QEMU has filled in its timing figures.

    Right after the state changes to completed QEMU may still report a
    total time of 0; ask again briefly (bounded) for the real figures.
    """
    deadline = time.monotonic() + 0.5
    while status.status == "completed" and not status.total_time_ms \
            and time.monotonic() < deadline:
        time.sleep(0.005)
        status = MigrationStatus.from_query(qmp.execute("query-migrate"))
    return status


def _cancel(qmp: QmpClient, name: str) -> None:
    try:
        qmp.execute("migrate_cancel")
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline:
            status = qmp.execute("query-migrate").get("status")
            if status not in ("active", "setup", "cancelling", "pre-switchover",
                              "device", "wait-unplug"):
                return
            qmp.wait_event(["MIGRATION"], timeout=POLL_INTERVAL)
        log.error("Migration of %s was still not cancelled after 30 s", name)
    except errors.MonitorError as err:
        log.error("Cancelling the migration of %s failed: %s", name, err)


def _resume(qmp: QmpClient, name: str) -> None:
    try:
        qmp.execute("cont")
    except errors.MonitorError as err:
        log.error("Could not resume instance %s after a failed migration: %s", name, err)


def status(node: KvmNode, name: str) -> MigrationStatus:
    """The current migration state of ``name`` (``none`` when none ever ran)."""
    return MigrationStatus.from_query(node.qmp(name, "query-migrate"))


# --- target side -----------------------------------------------------------------

def _record_from_info(info: str, name: str) -> tuple[runtime.RuntimeRecord, str | None]:
    try:
        data = json.loads(info)
    except (TypeError, ValueError) as err:
        raise errors.MigrationError(f"Migration info for instance {name} is corrupt: {err}")
    source_state = data.pop(SOURCE_STATE_KEY, None) if isinstance(data, dict) else None
    return runtime.upgrade(data, name, "migration info"), source_state


def accept(node: KvmNode, name: str, info: str, target: str) -> None:
    """Start QEMU for ``name`` waiting for the migration on ``target``:``migration_port``."""
    record, _ = _record_from_info(info, name)
    record.uid = None  # a pool uid belongs to the source node's pool
    for nic in record.nics:
        nic.pop("tap", None)
    port = int(record.hvparams.get(c.HV_MIGRATION_PORT, 8102))
    with node.locked(name, "accept") as paths:
        if node.running_pid(name) is not None:
            raise errors.MigrationError(
                f"Cannot accept instance {name}: it is already running on this node")
        node._remove_leftovers(paths)
        node.start_from_record(record, incoming=f"tcp:{_uri_host(target)}:{port}",
                               run_ifup=False)


def finalize(node: KvmNode, name: str, info: str, success: bool) -> None:
    """After the migration: configure NICs and continue, or stop and clean up."""
    _, source_state = _record_from_info(info, name)
    if not success:
        node.stop(name, acpi=False, force=True)
        return
    with node.locked(name, "finalize migration") as paths:
        if node.running_pid(name) is None:
            raise errors.MigrationError(
                f"Instance {name} is not running on this node after its migration")
        record = node.load_record(name)
        if record is None:
            raise errors.RuntimeStateError(f"Instance {name} has no runtime record here")
        node._configure_nics(record)
        runtime.save(paths.runtime_file, record)
        state = node.qmp(name, "query-status")["status"]
        # With a non-live migration the guest arrives stopped; it ran on the
        # source, so it runs here.  One that was never started stays so.
        if state == "paused" and source_state == "running":
            node.qmp(name, "cont")
