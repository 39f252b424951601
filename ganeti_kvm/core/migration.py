"""Moving a running instance to another node with QEMU's migration.

The source side is a few steps, so that a cluster manager that calls back
(Ganeti 3) and one that waits (the 2011 contract) share one path:

* :func:`start` sets bandwidth and downtime, starts QEMU's migration and
  saves a :class:`MigrationState` record (time limit, stall timeout, whether
  the guest was paused for a non-live migration) at
  :attr:`~ganeti_kvm.host.paths.InstancePaths.migration_state`;
* :func:`poll` reads QEMU's progress and enforces the record's limits: a
  migration past its time limit, or one that moved no byte for its stall
  timeout, is cancelled and reported ``failed``.  Any process can poll;
* :func:`cancel` stops a migration QEMU still runs;
* :func:`finish_source` ends the stale source QEMU after a success, or
  cancels and lets the guest run on after a failure, and drops the record.

:func:`migrate` runs them all in one call on the instance's long-operation
monitor and sees completion from QEMU's ``MIGRATION`` events, within
:data:`POLL_INTERVAL` of QEMU reaching it.  Whatever goes wrong, the
migration is cancelled and the source keeps running: no instance is ever
lost or left running twice.  A QEMU the 2011 driver started has only a
human monitor; the same steps then run over it, polled.

The target side is :func:`accept` (start QEMU waiting with ``-incoming``) and
:func:`finalize` (configure NICs and continue, or stop and clean up).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from ganeti_kvm import errors
from ganeti_kvm.core import names as c
from ganeti_kvm.core import runtime
from ganeti_kvm.core.node import KvmNode
from ganeti_kvm.host import fsutil, process
from ganeti_kvm.host.paths import InstancePaths
from ganeti_kvm.qemu import caps as qemu_caps
from ganeti_kvm.qemu import cmdline
from ganeti_kvm.qmp.client import QmpClient
from ganeti_kvm.qmp.hmp import HmpClient, run_state

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.05  # seconds between progress queries while waiting for events
STALL_TIMEOUT = 30.0  # cancel when no byte moved for this long (a broken link)
CANCEL_TIMEOUT = 30.0  # a cancelled migration must settle within this
MIN_TIME_LIMIT = 60.0
SOURCE_STATE_KEY = "migration_source_state"
STATE_VERSION = 1
# QEMU's states of a migration that is still going on.
ONGOING = ("setup", "active", "cancelling", "pre-switchover", "device", "wait-unplug",
           "postcopy-active", "postcopy-paused", "postcopy-recover")


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
    def from_query(cls, reply: dict[str, Any]) -> MigrationStatus:
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
    if record.machine is None and record.upgraded_from is None:
        # A record from before types were pinned: the running QEMU says what
        # it emulates (the probe only knows what "pc" means today), and the
        # target must start exactly that.  A QEMU the 2011 driver started has
        # no QMP; its target gets that command line, without a pinned type.
        data["machine"] = node.running_machine(name)
    data[SOURCE_STATE_KEY] = node.run_state(name)
    return json.dumps(data, sort_keys=True)


@dataclass(frozen=True)
class MigrationState:
    """What the source remembers of a migration between the steps.

    Times are ``time.monotonic()`` values: one clock for every process of
    the node since it booted (a migration does not survive a reboot).
    """

    target: str
    live: bool
    paused_by_us: bool  # the guest was stopped for a non-live migration
    started: float
    deadline: float  # the time limit, as a point in time
    limit: float  # the time limit in seconds, for messages
    stall_timeout: float
    started_wall: float = 0.0  # time.time() at the start, for people
    last_transferred: int = -1  # the progress mark: bytes sent when last seen moving
    last_moved: float = 0.0
    verdict: str | None = None  # why the library cancelled it, once it did
    # When the mark was last saved (not saved itself): saving is throttled.
    saved_moved: float = dataclasses.field(default=0.0, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        del data["saved_moved"]
        data["version"] = STATE_VERSION
        return data

    @classmethod
    def from_dict(cls, data: Any, where: str) -> MigrationState:
        """The state in ``data``; :class:`errors.RuntimeStateError` naming ``where`` if bad."""
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            raise errors.RuntimeStateError(
                f"The migration state {where} is not a version {STATE_VERSION} record")
        names = {f.name for f in dataclasses.fields(cls)} - {"saved_moved"}
        values = {k: v for k, v in data.items() if k in names}
        try:
            state = cls(**values)
        except TypeError as err:
            raise errors.RuntimeStateError(
                f"The migration state {where} is incomplete: {err}") from None
        numbers = (state.started, state.deadline, state.limit, state.stall_timeout,
                   state.started_wall, state.last_transferred, state.last_moved)
        if not isinstance(state.target, str) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers) \
                or not all(isinstance(v, bool) for v in (state.live, state.paused_by_us)) \
                or not isinstance(state.verdict, (str, type(None))):
            raise errors.RuntimeStateError(f"The migration state {where} has bad values")
        return dataclasses.replace(state, saved_moved=state.last_moved)


def load_state(paths: InstancePaths) -> MigrationState | None:
    """The saved migration state of the instance, or None (none, or unreadable: logged)."""
    path = paths.migration_state
    try:
        raw = fsutil.read_small_file(path)
        if raw is None:
            return None
        return MigrationState.from_dict(json.loads(raw), path)
    except (ValueError, errors.HypervisorError) as err:
        log.warning("Ignoring the migration state of instance %s: %s", paths.name, err)
        return None


def save_state(paths: InstancePaths, state: MigrationState) -> MigrationState:
    """Write ``state`` atomically (mode 0600); returns it with its mark saved."""
    saved = dataclasses.replace(state, saved_moved=state.last_moved)
    try:
        fsutil.atomic_write(paths.migration_state, json.dumps(saved.to_dict(), sort_keys=True))
    except OSError as err:
        raise errors.HypervisorError(
            f"Cannot save the migration state of instance {paths.name} at "
            f"{paths.migration_state}: {err}") from None
    return saved


def _drop_state(paths: InstancePaths) -> None:
    try:
        fsutil.remove_file(paths.migration_state)
    except errors.HypervisorError as err:
        log.error("Cannot remove the migration state of instance %s: %s", paths.name, err)


def judge(status: MigrationStatus, state: MigrationState,
          now: float) -> tuple[MigrationState, str | None]:
    """Whether an ongoing migration must be cancelled, and the updated progress mark.

    Returns ``(state, reason)``: ``reason`` is None while the migration may
    go on, else why it must stop (past its time limit, or no byte moved for
    the stall timeout).
    """
    if status.transferred != state.last_transferred:
        state = dataclasses.replace(state, last_transferred=status.transferred,
                                    last_moved=now)
    if now > state.deadline:
        return state, (f"did not finish within its time limit of {state.limit:.0f} s "
                       f"({status.transferred} of {status.total} bytes sent; raise "
                       "migration_bandwidth or the time limit)")
    if now - state.last_moved > state.stall_timeout:
        return state, (f"made no progress for {state.stall_timeout:.0f} s "
                       "(link down or target hung?)")
    return state, None


def _save_interval(state: MigrationState) -> float:
    """How stale the saved progress mark may get: small against the stall timeout."""
    return min(1.0, state.stall_timeout / 10.0)


# The monitors a migration runs over: QMP, or the 2011 driver's human monitor.

class _Monitor(Protocol):
    def query(self) -> MigrationStatus: ...
    def run_state(self) -> str: ...
    def command(self, command: str) -> None: ...
    def configure(self, bandwidth_mib_s: int, downtime_ms: int) -> None: ...
    def migrate(self, uri: str) -> None: ...
    def wait(self, timeout: float) -> None: ...
    def settle(self, status: MigrationStatus) -> MigrationStatus: ...


class _QmpMonitor:
    """The steps over QMP; :meth:`wait` returns early on a ``MIGRATION`` event."""

    def __init__(self, client: QmpClient, name: str) -> None:
        self.client = client
        self.name = name

    def query(self) -> MigrationStatus:
        return MigrationStatus.from_query(self.client.execute("query-migrate"))

    def run_state(self) -> str:
        return str(self.client.execute("query-status")["status"])

    def command(self, command: str) -> None:
        self.client.execute(command)

    def configure(self, bandwidth_mib_s: int, downtime_ms: int) -> None:
        self.client.execute("migrate-set-capabilities",
                            {"capabilities": [{"capability": "events", "state": True}]})
        self.client.execute("migrate-set-parameters", {
            "max-bandwidth": bandwidth_mib_s * 1024 * 1024, "downtime-limit": downtime_ms})

    def migrate(self, uri: str) -> None:
        self.client.execute("migrate", {"uri": uri})

    def wait(self, timeout: float) -> None:
        event = self.client.wait_event(["MIGRATION"], timeout=timeout)
        if event is not None:
            log.debug("Migration of %s: event %s", self.name, event.get("data"))

    def settle(self, status: MigrationStatus) -> MigrationStatus:
        """The final report once QEMU has filled in its timing figures.

        Right after the state changes to completed QEMU may still report a
        total time of 0; ask again briefly (bounded) for the real figures.
        """
        deadline = time.monotonic() + 0.5
        while status.status == "completed" and not status.total_time_ms \
                and time.monotonic() < deadline:
            time.sleep(0.005)
            status = self.query()
        return status


class _HmpMonitor:
    """The steps over a human monitor: no events, so :meth:`wait` sleeps."""

    def __init__(self, client: HmpClient, name: str) -> None:
        self.client = client
        self.name = name

    def _run(self, line: str) -> None:
        output = self.client.command(line)
        if output:
            raise errors.MonitorError(
                f"{line!r} on the human monitor of instance {self.name} failed: {output}")

    def query(self) -> MigrationStatus:
        return _hmp_status(self.client.command("info migrate"))

    def run_state(self) -> str:
        return run_state(self.client.command("info status"))

    def command(self, command: str) -> None:
        self._run(command)

    def configure(self, bandwidth_mib_s: int, downtime_ms: int) -> None:
        self._run(f"migrate_set_parameter max-bandwidth {bandwidth_mib_s * 1024 * 1024}")
        self._run(f"migrate_set_parameter downtime-limit {downtime_ms}")

    def migrate(self, uri: str) -> None:
        self._run(f"migrate -d {uri}")

    def wait(self, timeout: float) -> None:
        time.sleep(timeout)

    def settle(self, status: MigrationStatus) -> MigrationStatus:
        return status


@contextlib.contextmanager
def _monitor(node: KvmNode, paths: InstancePaths, long: bool) -> Iterator[_Monitor]:
    """A connection to the instance's monitor for the steps.

    ``long`` takes the long-operation QMP monitor, which a blocking
    migration holds for its whole run; the other steps take the short one,
    so that another process can poll or cancel meanwhile.
    """
    if node.human_monitor_only(paths):
        with HmpClient(paths.monitor_socket, timeout=10.0) as hmp:
            yield _HmpMonitor(hmp, paths.name)
        return
    with QmpClient(paths.qmp_long_socket if long else paths.qmp_socket, timeout=10.0) as qmp:
        qmp.connect()
        yield _QmpMonitor(qmp, paths.name)


def _uri_host(target: str) -> str:
    return cmdline.uri_host(target)  # an IP address or host name, IPv6 in brackets


# The steps, each on an open monitor; the public calls below add the lock and
# the connection.

def _check_bounds(name: str, limit: float | None, stall_timeout: float) -> None:
    """Refuse a time limit (None: derived) or stall timeout that is not a positive number."""
    bounds: list[tuple[str, object]] = [("stall timeout", stall_timeout)]
    if limit is not None:
        bounds.append(("time limit", limit))
    for what, value in bounds:
        if not isinstance(value, (int, float)) or isinstance(value, bool) \
                or not 0 < value < float("inf"):
            raise errors.MigrationError(
                f"Cannot migrate instance {name}: its {what} must be a positive number of "
                f"seconds, not {value!r}; nothing was started")


def _begin(node: KvmNode, mon: _Monitor, name: str, paths: InstancePaths, target: str,
           live: bool, limit: float | None, stall_timeout: float) -> MigrationState:
    """Configure and start the migration; save and return its state."""
    if node.running_pid(name) is None:
        raise errors.InstanceNotRunning(f"Cannot migrate instance {name}: it is not running")
    record = node.load_record(name)
    if record is None:
        raise errors.RuntimeStateError(
            f"Cannot migrate instance {name}: its runtime record is missing")
    hvp = record.hvparams
    live = live and hvp.get(c.HV_MIGRATION_MODE, c.HT_MIGRATION_LIVE) != c.HT_MIGRATION_NONLIVE
    bandwidth = int(hvp.get(c.HV_MIGRATION_BANDWIDTH, 32))
    downtime = int(hvp.get(c.HV_MIGRATION_DOWNTIME, 30))
    port = int(hvp.get(c.HV_MIGRATION_PORT, 8102))
    if limit is None:
        limit = time_limit(int(record.beparams.get(c.BE_MEMORY, 128)), bandwidth)
    uri = f"tcp:{_uri_host(target)}:{port}"
    current = mon.query()
    if current.status in ONGOING:
        raise errors.MigrationError(
            f"Cannot migrate instance {name} to {target}: QEMU is already migrating it "
            f"({current.status}); wait for that migration or cancel it first")
    paused_by_us = False
    if not live and mon.run_state() == "running":
        mon.command("stop")
        paused_by_us = True
    now = time.monotonic()
    state = MigrationState(target=target, live=live, paused_by_us=paused_by_us, started=now,
                           deadline=now + limit, limit=limit, stall_timeout=stall_timeout,
                           started_wall=time.time(), last_moved=now)
    try:
        state = save_state(paths, state)
        mon.configure(bandwidth, downtime)
        log.info("Migrating instance %s to %s (%s)", name, uri, "live" if live else "non-live")
        mon.migrate(uri)
    except BaseException as err:
        _abort(mon, name, paths, state)
        if isinstance(err, errors.HypervisorError) and not isinstance(
                err, errors.MigrationError):
            raise errors.MigrationError(
                f"Cannot start migrating instance {name} to {target}: {err}; "
                "the instance keeps running on this node") from err
        raise
    return state


def _check(mon: _Monitor, name: str, paths: InstancePaths, state: MigrationState | None,
           now: float | None = None) -> tuple[MigrationStatus, MigrationState | None]:
    """QEMU's report, after enforcing the limits of ``state``; and the updated state."""
    status = mon.query()
    if status.status == "completed":
        return mon.settle(status), state
    if status.status not in ONGOING:
        if status.status == "cancelled" and state is not None and state.verdict:
            status = dataclasses.replace(status, status="failed", error=state.verdict)
        return status, state
    if state is None:  # not started by this library, or its record is lost
        return status, state
    state, reason = judge(status, state, time.monotonic() if now is None else now)
    if reason is None:
        if state.last_moved - state.saved_moved >= _save_interval(state):
            state = _save_quietly(paths, state)
        return status, state
    verdict = f"the migration {reason}; ganeti-kvm cancelled it"
    log.error("Migration of instance %s to %s %s; cancelling it", name, state.target, reason)
    if not _cancel_on(mon, name):
        verdict += f", but QEMU had not stopped it after {CANCEL_TIMEOUT:.0f} s"
    state = _save_quietly(paths, dataclasses.replace(state, verdict=verdict))
    return dataclasses.replace(status, status="failed", error=verdict), state


def _save_quietly(paths: InstancePaths, state: MigrationState) -> MigrationState:
    """:func:`save_state` while a migration runs: a failure is logged, not raised.

    The migration itself is unharmed; only another process's poll sees an
    older progress mark (or no verdict) until a later save succeeds.
    """
    try:
        return save_state(paths, state)
    except errors.HypervisorError as err:
        log.warning("%s; the migration goes on", err)
        return dataclasses.replace(state, saved_moved=state.last_moved)


def _cancel_on(mon: _Monitor, name: str) -> bool:
    """Cancel a migration QEMU still runs; True once none runs (bounded wait)."""
    if mon.query().status not in ONGOING:
        return True
    mon.command("migrate_cancel")
    deadline = time.monotonic() + CANCEL_TIMEOUT
    while mon.query().status in ONGOING:
        if time.monotonic() > deadline:
            log.error("Migration of %s was still not cancelled after %.0f s", name,
                      CANCEL_TIMEOUT)
            return False
        mon.wait(POLL_INTERVAL)
    return True


def _abort(mon: _Monitor, name: str, paths: InstancePaths,
           state: MigrationState | None) -> None:
    """After a failure: cancel, let the guest run on, drop the state; never raises.

    The guest continues if this library stopped it (non-live) or QEMU
    paused it at the end of a migration the target did not take over.
    """
    try:
        _cancel_on(mon, name)
        run = mon.run_state()
        if run == "postmigrate" or (state is not None and state.paused_by_us
                                    and run == "paused"):
            mon.command("cont")
    except errors.HypervisorError as err:
        log.error("Could not cancel the migration of instance %s or resume it here: %s",
                  name, err)
    finally:
        _drop_state(paths)


def _end_source(node: KvmNode, mon: _Monitor, name: str, paths: InstancePaths) -> None:
    """After a completed migration: end the source QEMU and remove all its state here.

    The guest runs on the target; the files are removed only once this
    QEMU is gone, so a QEMU that survives SIGKILL keeps its pidfile and is
    still listed here, where the operator can see it.
    """
    pid = node.running_pid(name)
    if pid is not None:
        reported = mon.query().status
        if reported != "completed":
            raise errors.MigrationError(
                f"Refusing to end instance {name}'s QEMU on this node: its migration is "
                f"{reported}, not completed, so the guest may run only here. Finish the "
                "migration as failed to let it run on")
        with contextlib.suppress(errors.MonitorError):  # QEMU closes it as it quits
            mon.command("quit")
        if not process.wait_gone(pid, 10.0) and not process.terminate(pid):
            raise errors.MigrationError(
                f"Instance {name} migrated, but its old QEMU process {pid} on this node "
                "survived SIGKILL; its files are kept. Find out why the process cannot exit "
                "(fuser, /proc/PID/stack) and run CleanupInstance once it is gone")
    node._cleanup_stopped(name, paths)


# The public steps.

def start(node: KvmNode, name: str, target: str, live: bool, limit: float | None = None,
          stall_timeout: float = STALL_TIMEOUT) -> MigrationState:
    """Start migrating running instance ``name`` to ``target``; returns once QEMU migrates.

    ``limit`` overrides the time limit derived from RAM size and bandwidth
    (:func:`time_limit`); a migration that moves no byte for
    ``stall_timeout`` seconds is cancelled by :func:`poll`.  A non-live
    migration stops the guest first.  If QEMU refuses to start, the source
    is left as it was and :class:`errors.MigrationError` says why.
    """
    _check_bounds(name, limit, stall_timeout)
    with node.locked(name, "migrate") as paths, _monitor(node, paths, long=True) as mon:
        return _begin(node, mon, name, paths, target, live, limit, stall_timeout)


def _require_running(node: KvmNode, name: str, what: str) -> InstancePaths:
    paths = node.paths(name)
    if node.running_pid(name) is None:
        raise errors.InstanceNotRunning(
            f"Cannot {what} of instance {name}: it is not running on this node."
            f"{node.qemu_said(name)}")
    return paths


def poll(node: KvmNode, name: str) -> MigrationStatus:
    """QEMU's report of ``name``'s migration, with the library's limits enforced.

    A migration past its time limit or without progress for its stall
    timeout (see :func:`start`) is cancelled here and reported ``failed``
    with the reason in ``error``; so is it on every later poll.  Safe to
    call from any process, also while :func:`migrate` runs; ``none`` means
    no migration was started.
    """
    paths = _require_running(node, name, "check the migration")
    with _monitor(node, paths, long=False) as mon:
        return _check(mon, name, paths, load_state(paths))[0]


def cancel(node: KvmNode, name: str) -> None:
    """Cancel ``name``'s migration if QEMU still runs one; waits (bounded) until it ends.

    The guest is not resumed here: :func:`finish_source` does that.
    """
    paths = _require_running(node, name, "cancel the migration")
    with _monitor(node, paths, long=False) as mon:
        if not _cancel_on(mon, name):
            raise errors.MigrationError(
                f"The migration of instance {name} was still not cancelled after "
                f"{CANCEL_TIMEOUT:.0f} s; check the instance's QEMU (query-migrate)")


def finish_source(node: KvmNode, name: str, success: bool) -> None:
    """After the verdict on the migration: end the stale source, or let it run on.

    With ``success`` the source QEMU (whose migration must have completed)
    quits and its files are removed.  Without, a migration QEMU still runs
    is cancelled and the guest continues if this library stopped it or QEMU
    paused it at the end of the migration.  The state record is removed.
    """
    with node.locked(name, "finish the migration") as paths:
        if node.running_pid(name) is None:
            if not success:
                log.error("Instance %s's QEMU on this node is gone after a failed "
                          "migration.%s", name, node.qemu_said(name))
            node._cleanup_stopped(name, paths)
            return
        with _monitor(node, paths, long=False) as mon:
            if success:
                _end_source(node, mon, name, paths)
                return
            state = load_state(paths)
            _abort(mon, name, paths, state)


def migrate(node: KvmNode, name: str, target: str, live: bool,
            limit: float | None = None, stall_timeout: float = STALL_TIMEOUT,
            progress: Callable[[MigrationStatus], None] | None = None) -> MigrationStatus:
    """Migrate ``name`` to ``target`` and return QEMU's final report.

    The steps of :func:`start`, :func:`poll` and :func:`finish_source` in
    one call, on the long-operation monitor, woken by QEMU's events;
    ``progress`` gets each report while the migration runs.  On success
    the source QEMU is gone and its files are cleaned.  On any failure the
    migration is cancelled, the source keeps running (resumed if it was
    stopped for a non-live migration) and :class:`errors.MigrationError`
    says what happened.
    """
    _check_bounds(name, limit, stall_timeout)
    with node.locked(name, "migrate") as paths, _monitor(node, paths, long=True) as mon:
        state: MigrationState | None = _begin(node, mon, name, paths, target, live, limit,
                                              stall_timeout)
        try:
            while True:
                mon.wait(POLL_INTERVAL)
                final, state = _check(mon, name, paths, state)
                if final.status not in ONGOING:
                    break
                if progress is not None:
                    progress(final)
        except BaseException as err:
            _abort(mon, name, paths, state)
            if isinstance(err, errors.HypervisorError) and not isinstance(
                    err, errors.MigrationError):
                raise errors.MigrationError(
                    f"Migration of instance {name} to {target} failed: {err}; "
                    "the instance keeps running on this node") from err
            raise
        if final.status != "completed":
            _abort(mon, name, paths, state)
            raise errors.MigrationError(
                f"Migration of instance {name} to {target} {final.status}: "
                f"{final.error or 'QEMU gave no reason'}; the instance keeps running "
                "on this node")
        _end_source(node, mon, name, paths)
        return final


def _hmp_status(output: str) -> MigrationStatus:
    """A :class:`MigrationStatus` from the human monitor's ``info migrate``."""
    fields: dict[str, str] = {}
    for line in output.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip().lower()] = value.strip()
    status = (fields.get("migration status") or fields.get("status") or "none").split()
    status_word = status[0] if status else "none"

    def kbytes(key: str) -> int:
        words = fields.get(key, "0").split()
        return int(words[0]) * 1024 if words and words[0].isdigit() else 0

    def millis(key: str) -> int | None:
        words = fields.get(key, "").split()
        return int(words[0]) if words and words[0].isdigit() else None

    error = fields.get("error description") or (" ".join(status[1:]).strip("()") or None)
    return MigrationStatus(status=status_word, transferred=kbytes("transferred ram"),
                           remaining=kbytes("remaining ram"), total=kbytes("total ram"),
                           total_time_ms=millis("total time"), downtime_ms=millis("downtime"),
                           error=error if status_word == "failed" else None,
                           raw={"hmp": output})


def status(node: KvmNode, name: str) -> MigrationStatus:
    """The current migration state of ``name`` as QEMU reports it (``none``: none ran).

    Only reads: :func:`poll` also enforces the library's limits.
    """
    return MigrationStatus.from_query(node.qmp(name, "query-migrate"))


# --- target side -----------------------------------------------------------------

def _record_from_info(info: str, name: str) -> tuple[runtime.RuntimeRecord, str | None]:
    try:
        data = json.loads(info)
    except (TypeError, ValueError) as err:
        raise errors.MigrationError(
            f"Migration info for instance {name} is corrupt: {err}") from err
    source_state = data.pop(SOURCE_STATE_KEY, None) if isinstance(data, dict) else None
    return runtime.upgrade(data, name, "migration info"), source_state


def accept(node: KvmNode, name: str, info: str, target: str) -> None:
    """Start QEMU for ``name`` waiting for the migration on ``target``:``migration_port``."""
    record, _ = _record_from_info(info, name)
    record.uid = None  # a pool uid belongs to the source node's pool
    for nic in record.nics:
        nic.pop("tap", None)
    if record.upgraded_from is None:
        _check_machine(node, record)
    port = int(record.hvparams.get(c.HV_MIGRATION_PORT, 8102))
    with node.locked(name, "accept") as paths:
        if node.running_pid(name) is not None:
            raise errors.MigrationError(
                f"Cannot accept instance {name}: it is already running on this node")
        node._remove_leftovers(paths)
        node.start_from_record(record, incoming=f"tcp:{_uri_host(target)}:{port}",
                               run_ifup=False)


def _check_machine(node: KvmNode, record: runtime.RuntimeRecord) -> None:
    """Pin the machine type the source runs, refusing a target QEMU that lacks it.

    Without a pinned type the target would start with ``-machine pc``, which
    a newer QEMU resolves to a newer type, and the migration would fail late
    with "Broken pipe".  Info from a source running the previous library
    version carries no type; the upstream type of its QEMU version is then
    pinned if this QEMU has it, else (a distribution's own names, or a
    newer QEMU) this QEMU's ``pc`` as before: a guess never refuses.
    """
    caps = node.caps(record.hvparams.get(c.HV_KVM_PATH, c.KVM_PATH))
    if record.machine is None:
        guess = qemu_caps.machine_of_version(record.qemu_version)
        if guess is not None and caps.missing_machine(guess) is None:
            record.machine = guess
        else:
            log.warning("Instance %s comes with no machine type and QEMU %s; starting this "
                        "node's pc type for it", record.name, record.qemu_version)
        return
    reason = caps.missing_machine(record.machine)
    if reason is not None:
        raise errors.MigrationError(
            f"Cannot accept instance {record.name} for migration: {reason}, and the instance "
            f"runs machine type {record.machine}, pinned when it was first started. Migrate "
            f"it to a node whose QEMU has {record.machine}, or upgrade QEMU here; a guest "
            "first started on a newer QEMU cannot move to an older one without a stop and a "
            "new start. Nothing was started on this node; the instance keeps running")


def finalize(node: KvmNode, name: str, info: str, success: bool) -> None:
    """After the migration: configure NICs and continue, or stop and clean up."""
    _, source_state = _record_from_info(info, name)
    if not success:
        node.stop(name, acpi=False, force=True)
        return
    with node.locked(name, "finalize migration") as paths:
        if node.running_pid(name) is None:
            raise errors.MigrationError(
                f"Instance {name} is not running on this node after its migration."
                f"{node.qemu_said(name)}")
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
