"""Moving a running instance to another node with QEMU's migration.

The source side is a few steps, so that a cluster manager that calls back
(Ganeti 3) and one that waits (the 2011 contract) share one path:

* :func:`start` sets bandwidth, downtime and capabilities (unless
  :func:`migration_info` already set them, which the cluster manager calls
  first: QEMU's own time of the migration starts at ``migrate``, so
  whatever comes before it is kept short), starts QEMU's migration and
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

The target side is :func:`accept` (start QEMU waiting with ``-incoming``,
with the capabilities of ``migration_caps`` set; paused, unless post-copy
is allowed) and :func:`finalize` (configure NICs and continue, or stop and
clean up).

Convergence.  A guest that dirties its memory faster than the link carries
it never finishes a pre-copy migration.  QEMU refuses to change a
capability once a migration runs (7.2 and 10.0: "There's a migration
process in progress") but takes new parameters, so :func:`start` enables
``auto-converge`` from the start with a throttle held at
:data:`THROTTLE_HOLD` percent, and :func:`escalate` decides, after each of
QEMU's dirty-bitmap syncs (a pass over the RAM), whether the guest still
outruns the link (``dirty-pages-rate`` against ``mbps``).  If it does and
the instance's ``migration_caps`` has ``postcopy-ram`` (enabled on both
ends before the start), the library switches to post-copy at once; else it
takes the next step of :data:`THROTTLE_STEPS` (QEMU throttles the vCPUs up
to that percentage at its next trigger).  Post-copy comes first because a
throttle before it made things worse on QEMU 10.0: with one throttle step
first, the switch's downtime was 5.1 s in 2 of 7 runs (about 100 ms in 3 of
9 without a post-copy bandwidth limit) and the migration took 12.6-17.6 s;
straight to post-copy, 1-2 ms in 9 of 9 runs and 7.4-12.4 s
(tests/test_convergence.py).  Each step is logged and reported in
:class:`MigrationStatus` (``step``).  The time limit and its cancellation stay the last resort.
A guest under TCG on a QEMU that corrupts guests it throttles (7.2, see
:attr:`~ganeti_kvm.qemu.caps.QemuCaps.throttles_tcg_guests_safely`) is never
throttled: auto-converge stays off and post-copy, where allowed, comes first.

Post-copy failures.  Once post-copy started the guest runs on the target
and pages it has not received yet exist only on the source: neither side
alone has the guest.  So a migration in a ``postcopy-*`` state is never
cancelled, the source is never resumed and the target is never stopped by
this library; a failure is reported, naming QEMU's recovery: if the link
broke, both QEMUs wait in ``postcopy-paused``, and ``migrate-recover`` on
the target followed by ``migrate`` with ``resume: true`` on the source
continues the migration.  Only if one of the two QEMUs is gone is the
guest lost (start it again from its disks).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import select
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from ganeti_kvm import errors
from ganeti_kvm.core import migration_ready, params, pinning, runtime
from ganeti_kvm.core import names as c
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
PREPARE_LOCK_TIMEOUT = 2.0  # MigrationInfo waits no longer to set the migration up ahead
SOURCE_STATE_KEY = "migration_source_state"
STATE_VERSION = 1
# QEMU's states of a migration that is still going on.
ONGOING = ("setup", "active", "cancelling", "pre-switchover", "device", "wait-unplug",
           "postcopy-active", "postcopy-paused", "postcopy-recover")
POSTCOPY_STATES = ("postcopy-active", "postcopy-paused", "postcopy-recover")

# Convergence (see the module's docstring).  The throttle QEMU may apply
# before the library decides anything, and the maxima of the later steps.
THROTTLE_INITIAL = 20
THROTTLE_INCREMENT = 10
THROTTLE_HOLD = 20
THROTTLE_STEPS = (50, 80, 99)
# The guest outruns the link when it dirties more than this share of what
# the link carries: each pass then shrinks by less than half.
OUTRUN_SHARE = 0.5
STEP_PRECOPY, STEP_THROTTLE, STEP_POSTCOPY = "precopy", "throttle", "postcopy"


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
    # Convergence figures: bytes the guest dirties per second, the link's
    # bytes per second, QEMU's passes over the RAM so far, the downtime QEMU
    # expects, the vCPU throttle it applies (percent), and the library's
    # escalation step (a STEP_* name with the throttle maximum, or None).
    dirty_rate: int = 0
    link_rate: int = 0
    dirty_syncs: int = 0
    expected_downtime_ms: int | None = None
    throttle_percent: int = 0
    step: str | None = None

    @classmethod
    def from_query(cls, reply: dict[str, Any]) -> MigrationStatus:
        ram = reply.get("ram") or {}
        return cls(status=str(reply.get("status", "none")),
                   transferred=int(ram.get("transferred", 0)),
                   remaining=int(ram.get("remaining", 0)),
                   total=int(ram.get("total", 0)),
                   total_time_ms=reply.get("total-time"),
                   downtime_ms=reply.get("downtime"),
                   error=reply.get("error-desc"), raw=reply,
                   dirty_rate=int(ram.get("dirty-pages-rate", 0)) * int(
                       ram.get("page-size", 4096)),
                   link_rate=round(float(ram.get("mbps", 0)) * 125_000),  # Mbit/s
                   dirty_syncs=int(ram.get("dirty-sync-count", 0)),
                   expected_downtime_ms=reply.get("expected-downtime"),
                   throttle_percent=int(reply.get("cpu-throttle-percentage", 0)))

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "transferred": self.transferred,
                "remaining": self.remaining, "total": self.total,
                "total_time_ms": self.total_time_ms, "downtime_ms": self.downtime_ms,
                "error": self.error, "dirty_rate": self.dirty_rate,
                "link_rate": self.link_rate, "dirty_syncs": self.dirty_syncs,
                "expected_downtime_ms": self.expected_downtime_ms,
                "throttle_percent": self.throttle_percent, "step": self.step,
                "qemu": self.raw or {}}


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
    _prepare_quietly(node, name)
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
    # Convergence: whether the library escalates (auto-converge was set at
    # the start), whether post-copy may be used (postcopy-ram on both ends),
    # the downtime limit (ms), the current step, the throttle maximum it
    # allows, and QEMU's sync count at its last decision.
    converge: bool = False
    postcopy_allowed: bool = False
    # Whether the vCPUs may be throttled (auto-converge): not for a TCG guest
    # on a QEMU that corrupts those (QemuCaps.throttles_tcg_guests_safely).
    throttle: bool = True
    downtime_limit: int = 30
    step: str = STEP_PRECOPY
    throttle_max: int = THROTTLE_HOLD
    last_sync: int = 0
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
                   state.started_wall, state.last_transferred, state.last_moved,
                   state.downtime_limit, state.throttle_max, state.last_sync)
        flags = (state.live, state.paused_by_us, state.converge, state.postcopy_allowed,
                 state.throttle)
        if not isinstance(state.target, str) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers) \
                or not all(isinstance(v, bool) for v in flags) \
                or state.step not in (STEP_PRECOPY, STEP_THROTTLE, STEP_POSTCOPY) \
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
    """Write ``state`` atomically (mode 0600); returns it with its mark saved.

    Without fsync: the state of a migration means nothing once the node
    has crashed (its QEMUs are gone with it), and an fsync costs the
    migration's start as much as QEMU's own set-up.
    """
    saved = dataclasses.replace(state, saved_moved=state.last_moved)
    try:
        fsutil.atomic_write(paths.migration_state, json.dumps(saved.to_dict(), sort_keys=True),
                            durable=False)
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


@dataclass(frozen=True)
class Escalation:
    """A step the library takes against a migration that does not converge.

    Either QEMU parameters to set (``parameters``: a higher throttle) or
    the switch to post-copy (``postcopy``); ``reason`` gives the figures.
    """

    step: str
    reason: str
    parameters: dict[str, int] | None = None
    postcopy: bool = False


def step_name(state: MigrationState) -> str:
    """The escalation step of ``state`` for people: ``precopy``, ``throttle 50%``, ``postcopy``."""
    if state.step == STEP_THROTTLE:
        return f"{STEP_THROTTLE} {state.throttle_max}%"
    return state.step


def outruns(status: MigrationStatus) -> bool:
    """Whether the guest dirties its RAM too fast for the migration to converge.

    True when it dirties more than :data:`OUTRUN_SHARE` of what the link
    carries in the same time.  QEMU's ``expected-downtime`` is not used: at
    a new sync it still holds the limit or the last pass's figure.  Without
    a measured link rate (QEMU reports 0 at first) nothing is known.
    """
    return status.link_rate > 0 and status.dirty_rate > OUTRUN_SHARE * status.link_rate


def escalate(status: MigrationStatus,
             state: MigrationState) -> tuple[MigrationState, Escalation | None]:
    """The library's decision after QEMU's latest pass over the RAM; pure.

    Decides once per dirty-bitmap sync, from the second on (the first pass
    says nothing about the guest's dirtying): a guest that :func:`outruns`
    the link gets the switch to post-copy if ``postcopy_allowed``, else the
    next throttle of :data:`THROTTLE_STEPS` (if ``throttle``).  Returns the
    updated state (with the new step, not yet
    applied) and the escalation, or None: converging, nothing new, or
    nothing left to try (the time limit then decides).
    """
    if not state.converge or status.status != "active" or state.step == STEP_POSTCOPY \
            or status.dirty_syncs < 2 or status.dirty_syncs <= state.last_sync:
        return state, None
    state = dataclasses.replace(state, last_sync=status.dirty_syncs)
    if not outruns(status):
        return state, None
    figures = (f"after pass {status.dirty_syncs} the guest dirties "
               f"{status.dirty_rate / 2**20:.1f} MiB/s, the link carries "
               f"{status.link_rate / 2**20:.1f} MiB/s, QEMU expects "
               f"{status.expected_downtime_ms} ms of downtime (limit "
               f"{state.downtime_limit} ms), throttle {status.throttle_percent}%")
    if state.postcopy_allowed:
        return (dataclasses.replace(state, step=STEP_POSTCOPY),
                Escalation(STEP_POSTCOPY, figures, postcopy=True))
    higher = [level for level in THROTTLE_STEPS if level > state.throttle_max] \
        if state.throttle else []
    if not higher:
        return state, None
    level = higher[0]
    increment = max(1, min(100, level - status.throttle_percent))
    parameters = {"cpu-throttle-initial": level, "cpu-throttle-increment": increment,
                  "max-cpu-throttle": level}
    return (dataclasses.replace(state, step=STEP_THROTTLE, throttle_max=level),
            Escalation(STEP_THROTTLE, figures, parameters=parameters))


def postcopy_started(status: MigrationStatus, state: MigrationState | None) -> bool:
    """Whether the guest may already run on the target: post-copy began.

    Then neither QEMU alone has the guest, and the source must not resume.
    """
    if status.status == "completed":
        return False
    return status.status in POSTCOPY_STATES or (
        state is not None and state.step == STEP_POSTCOPY)


def postcopy_failure(name: str, status: MigrationStatus) -> str:
    """What happened to a post-copy migration that did not complete, and what to do."""
    return (f"the post-copy migration of instance {name} is {status.status}"
            f"{': ' + status.error if status.error else ''}. The guest runs on the target "
            "and part of its RAM is still only on the source, so neither QEMU was stopped, "
            "cancelled or resumed. If the link broke, both wait in postcopy-paused: run "
            "migrate-recover (uri tcp:ADDRESS:PORT) on the target's QMP, then migrate with "
            "resume true to that address on the source's; only if one of the two QEMUs is "
            "gone is the guest lost (start it again from its disks)")


def _save_interval(state: MigrationState) -> float:
    """How stale the saved progress mark may get: small against the stall timeout."""
    return min(1.0, state.stall_timeout / 10.0)


@dataclass(frozen=True)
class Settings:
    """The capabilities and parameters a migration of the instance runs with."""

    bandwidth_mib_s: int
    downtime_ms: int
    caps: tuple[str, ...]  # the operator's migration_caps
    throttle: bool  # whether auto-converge may throttle the vCPUs

    def capabilities(self) -> list[str]:
        """Every capability to enable: ``events``, ``auto-converge`` with
        ``throttle`` (it cannot be enabled once a migration runs), then ``caps``."""
        own = ["events", c.MIGRATION_CAP_AUTO_CONVERGE] if self.throttle else ["events"]
        return own + [cap for cap in self.caps if cap not in own]

    def parameters(self) -> dict[str, int]:
        """QEMU's parameters: bandwidth (post-copy has its own limit, 0 meaning
        none: the same one), downtime, and the throttle held at
        :data:`THROTTLE_HOLD` percent until :func:`escalate` raises it."""
        bandwidth = self.bandwidth_mib_s * 1024 * 1024
        return {"max-bandwidth": bandwidth, "max-postcopy-bandwidth": bandwidth,
                "downtime-limit": self.downtime_ms, "cpu-throttle-initial": THROTTLE_INITIAL,
                "cpu-throttle-increment": THROTTLE_INCREMENT, "max-cpu-throttle": THROTTLE_HOLD}


class Survey(NamedTuple):
    """What QEMU says before a migration: its state, whether the guest runs under
    TCG, the capabilities enabled and the parameters set."""

    status: MigrationStatus
    tcg: bool
    enabled: frozenset[str] = frozenset()
    parameters: dict[str, Any] = {}


def configured(survey: Survey, settings: Settings) -> bool:
    """Whether QEMU already has every capability and parameter of ``settings``; pure.

    :func:`migration_info` sets them ahead (see :func:`_prepare_quietly`);
    an escalated throttle of an earlier migration, or a QEMU restarted
    since, differs and is set again.
    """
    return set(settings.capabilities()) <= survey.enabled and all(
        survey.parameters.get(key) == value for key, value in settings.parameters().items())


# The monitors a migration runs over: QMP, or the 2011 driver's human monitor.

class _Monitor(Protocol):
    escalates: bool  # whether the library escalates a migration over it

    def query(self) -> MigrationStatus: ...
    def survey(self) -> Survey: ...
    def run_state(self) -> str: ...
    def command(self, command: str) -> None: ...
    def configure(self, settings: Settings) -> None: ...
    def start_migration(self, uri: str, settings: Settings | None) -> None: ...
    def start_prepared(self, uri: str) -> MigrationStatus: ...
    def set_parameters(self, parameters: dict[str, int]) -> None: ...
    def wait(self, timeout: float) -> str | None: ...
    def settle(self, status: MigrationStatus) -> MigrationStatus: ...


class _QmpMonitor:
    """The steps over QMP; :meth:`wait` returns early on a ``MIGRATION`` event."""

    escalates = True

    def __init__(self, client: QmpClient, name: str) -> None:
        self.client = client
        self.name = name
        # QEMU's timestamps (seconds) of the guest's last stop and of the
        # switch to post-copy, from its events (see switchover_downtime).
        self.stopped_at: float | None = None
        self.postcopy_at: float | None = None

    def query(self) -> MigrationStatus:
        return MigrationStatus.from_query(self.client.execute("query-migrate"))

    def run_state(self) -> str:
        return str(self.client.execute("query-status")["status"])

    def command(self, command: str) -> None:
        self.client.execute(command)

    def survey(self) -> Survey:
        """QEMU's migration state, whether the guest runs under TCG (``query-kvm``:
        KVM not enabled), its capabilities and parameters: one write."""
        migrating, kvm, caps, parameters = _returns(self.client.execute_many([
            ("query-migrate", None), ("query-kvm", None),
            ("query-migrate-capabilities", None), ("query-migrate-parameters", None)]))
        enabled = frozenset(str(cap.get("capability")) for cap in caps
                            if isinstance(cap, dict) and cap.get("state") is True)
        return Survey(MigrationStatus.from_query(migrating), not kvm.get("enabled"), enabled,
                      parameters if isinstance(parameters, dict) else {})

    def _settings_requests(self, settings: Settings) -> list[tuple[str, dict[str, Any] | None]]:
        return [("migrate-set-capabilities", {"capabilities": [
                    {"capability": cap, "state": True} for cap in settings.capabilities()]}),
                ("migrate-set-parameters", dict(settings.parameters()))]

    def configure(self, settings: Settings) -> None:
        """Capabilities and parameters of ``settings``, in one write."""
        _returns(self.client.execute_many(self._settings_requests(settings)))

    def start_migration(self, uri: str, settings: Settings | None) -> None:
        """``migrate``, after the capabilities and parameters of ``settings`` (None:
        QEMU has them already), all in one write.

        QEMU's own time of the migration starts at ``migrate``: what comes
        before it is overhead, so it is one round trip.  QEMU runs
        ``migrate`` even if it refused a capability or parameter before it
        (rare: ``migration_caps`` were checked when the instance started);
        that refusal is raised here, and the caller cancels the migration
        that started without it.
        """
        requests = self._settings_requests(settings) if settings is not None else []
        _returns(self.client.execute_many([*requests, ("migrate", {"uri": uri})]))

    def start_prepared(self, uri: str) -> MigrationStatus:
        """``query-migrate`` and ``migrate`` in one write (on a new connection, the
        negotiation's): QEMU's migration state before; see :func:`_begin`.

        QEMU refuses ``migrate`` while a migration runs; that refusal is
        expected then and the state before says so.  Any other refusal is
        raised.
        """
        before, started = self.client.execute_many(
            [("query-migrate", None), ("migrate", {"uri": uri})])
        if isinstance(before, errors.QmpCommandError):
            raise before
        status = MigrationStatus.from_query(before)
        if isinstance(started, errors.QmpCommandError) and status.status not in ONGOING:
            raise started
        return status

    def set_parameters(self, parameters: dict[str, int]) -> None:
        self.client.execute("migrate-set-parameters", dict(parameters))

    def wait(self, timeout: float) -> str | None:
        """Wait for a ``MIGRATION`` event; the state it announces (None: none came).

        The guest's ``STOP`` on the way is noted with the switch to post-copy
        (:func:`switchover_downtime`), and the wait goes on.
        """
        deadline = time.monotonic() + timeout
        while True:
            event = self.client.wait_event(["MIGRATION", "STOP"],
                                           timeout=max(0.0, deadline - time.monotonic()))
            if event is None:
                return None
            data = event.get("data") or {}
            status = data.get("status") if isinstance(data, dict) else None
            if event.get("event") == "STOP":
                self.stopped_at = event_time(event)
                continue
            log.debug("Migration of %s: event %s", self.name, data)
            if status == "postcopy-active":
                self.postcopy_at = event_time(event)
            return status if isinstance(status, str) else None

    def settle(self, status: MigrationStatus) -> MigrationStatus:
        """The final report once QEMU has filled in its timing figures.

        Right after the state changes to completed QEMU may still report a
        total time of 0; ask again briefly (bounded) for the real figures.
        """
        deadline = time.monotonic() + 0.5
        while status.status == "completed" and not status.total_time_ms \
                and time.monotonic() < deadline:
            time.sleep(0.001)  # QEMU's migration thread fills them in at once
            status = dataclasses.replace(self.query(), step=status.step)
        downtime = switchover_downtime(status, self.stopped_at, self.postcopy_at)
        if downtime != status.downtime_ms:
            log.info("Migration of %s: QEMU reports a downtime of %s ms, but the guest was "
                     "stopped for %s ms, from its STOP to the switch to post-copy (QEMU's "
                     "events): reporting that", self.name, status.downtime_ms, downtime)
            status = dataclasses.replace(status, downtime_ms=downtime)
        return status


def event_time(event: dict[str, Any]) -> float | None:
    """The time QEMU stamped on ``event``, in seconds since the epoch (None: none)."""
    stamp = event.get("timestamp")
    if not isinstance(stamp, dict):
        return None
    seconds, micros = stamp.get("seconds"), stamp.get("microseconds")
    if not isinstance(seconds, int) or not isinstance(micros, int) or seconds < 0:
        return None
    return seconds + micros / 1e6


def switchover_downtime(status: MigrationStatus, stopped_at: float | None,
                        postcopy_at: float | None) -> int | None:
    """The downtime of a completed post-copy migration, corrected where QEMU got it wrong;
    pure.

    QEMU (7.2 to 10.0) keeps the downtime in whole milliseconds and takes 0
    for "not measured yet": when the switch to post-copy stops the guest for
    less than a millisecond, it measures again at the very end, and reports
    the whole post-copy phase as downtime (seen: 5.1 s for 164 MiB sent at
    32 MiB/s after the switch, while the guest ran on the target).  QEMU's
    own events say better: its ``STOP`` and its ``MIGRATION`` event of
    ``postcopy-active`` carry microsecond timestamps, and between them lies
    exactly what QEMU means by downtime (the guest stopped until the
    device state is sent).  The smaller figure wins, rounded up to a
    millisecond; any other status is returned as QEMU reported it.
    """
    reported = status.downtime_ms
    if status.status != "completed" or status.step is None \
            or not status.step.startswith(STEP_POSTCOPY) or reported is None \
            or stopped_at is None or postcopy_at is None or postcopy_at < stopped_at:
        return reported
    measured = max(1, math.ceil((postcopy_at - stopped_at) * 1000))
    return min(reported, measured)


class _HmpMonitor:
    """The steps over a human monitor: no events, so :meth:`wait` sleeps."""

    escalates = False

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

    def survey(self) -> Survey:
        # TCG is not asked (the library does not escalate over a human monitor),
        # nor the settings: they are set before every migration.
        return Survey(self.query(), False)

    def configure(self, settings: Settings) -> None:
        """Bandwidth, downtime and the operator's ``caps`` (no escalation here)."""
        for cap in settings.caps:
            self._run(f"migrate_set_capability {cap} on")
        self._run(f"migrate_set_parameter max-bandwidth "
                  f"{settings.bandwidth_mib_s * 1024 * 1024}")
        self._run(f"migrate_set_parameter downtime-limit {settings.downtime_ms}")

    def start_prepared(self, uri: str) -> MigrationStatus:
        status = self.query()
        if status.status not in ONGOING:
            self.start_migration(uri, None)
        return status

    def start_migration(self, uri: str, settings: Settings | None) -> None:
        """:meth:`configure` (unless ``settings`` is None), then ``migrate``; each
        command only if the one before succeeded."""
        if settings is not None:
            self.configure(settings)
        self._run(f"migrate -d {uri}")

    def set_parameters(self, parameters: dict[str, int]) -> None:
        for key, value in parameters.items():
            self._run(f"migrate_set_parameter {key} {int(value)}")

    def wait(self, timeout: float) -> str | None:
        time.sleep(timeout)
        return None

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
    # Connected by the first command: the migration's first question then goes
    # out with the negotiation (QmpClient.execute_many).
    with QmpClient(paths.qmp_long_socket if long else paths.qmp_socket, timeout=10.0) as qmp:
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


def migration_caps(record: runtime.RuntimeRecord) -> list[str]:
    """The QEMU capabilities the instance's ``migration_caps`` names (checked at its start)."""
    value = record.hvparams.get(c.HV_KVM_MIGRATION_CAPS) or ""
    return params.parse_migration_caps(value) if isinstance(value, str) else []


def _throttle_is_safe(node: KvmNode, mon: _Monitor, name: str,
                      record: runtime.RuntimeRecord, tcg: bool, quiet: bool = False) -> bool:
    """Whether the library may throttle the guest's vCPUs to make its migration converge.

    Not for a guest under TCG (``tcg``) on a QEMU that corrupts such guests
    (:attr:`QemuCaps.throttles_tcg_guests_safely`): convergence then has only
    post-copy, where ``migration_caps`` allows it, and the time limit.
    """
    if not mon.escalates or not tcg:
        return True
    kvm_path = record.hvparams.get(c.HV_KVM_PATH)
    if not isinstance(kvm_path, str) or node.caps(kvm_path).throttles_tcg_guests_safely:
        return True
    if quiet:
        return False
    log.warning("Instance %s runs under TCG on %s, which corrupts guests whose vCPUs it "
                "throttles: its migration will not be throttled (post-copy only, if "
                "migration_caps has postcopy-ram)", name, kvm_path)
    return False


def _settings(node: KvmNode, mon: _Monitor, name: str, record: runtime.RuntimeRecord,
              tcg: bool, quiet: bool = False) -> Settings:
    """The :class:`Settings` of the instance's migration, from its runtime record."""
    hvp = record.hvparams
    return Settings(int(hvp.get(c.HV_MIGRATION_BANDWIDTH, 32)),
                    int(hvp.get(c.HV_MIGRATION_DOWNTIME, 30)), tuple(migration_caps(record)),
                    _throttle_is_safe(node, mon, name, record, tcg, quiet))


def _prepare_quietly(node: KvmNode, name: str) -> None:
    """Set the migration's capabilities and parameters on the instance's QEMU ahead.

    Called by :func:`migration_info`, which both contracts' cluster managers
    call on the source before the target accepts: setting them costs QEMU
    about a millisecond before its migration starts, and :func:`migrate`
    (:func:`start`) then finds them set (:func:`configured`) and starts at
    once.  Only over QMP, only while no migration runs and the instance's
    lock is free within :data:`PREPARE_LOCK_TIMEOUT`; a failure is logged,
    never raised: the migration then sets them itself.
    """
    try:
        with node.locked(name, "prepare the migration", PREPARE_LOCK_TIMEOUT) as paths:
            record = node.load_record(name)
            if record is None or node.human_monitor_only(paths):
                return
            with _monitor(node, paths, long=False) as mon:
                survey = mon.survey()
                if survey.status.status in ONGOING:
                    return
                settings = _settings(node, mon, name, record, survey.tcg, quiet=True)
                if not configured(survey, settings):
                    mon.configure(settings)
                pid = node.running_pid(name)
                if pid is not None:
                    migration_ready.save(paths, migration_ready.Prepared(
                        pid, survey.tcg, tuple(settings.capabilities()), settings.parameters()))
    except errors.HypervisorError as err:
        log.warning("Instance %s: cannot set its migration's capabilities and parameters "
                    "ahead (the migration will set them itself): %s", name, err)


def _begin(node: KvmNode, mon: _Monitor, name: str, paths: InstancePaths, target: str,
           live: bool, limit: float | None,
           stall_timeout: float) -> tuple[MigrationState, int]:
    """Configure and start the migration; save and return its state, and the PID of
    the instance's QEMU.

    If :func:`migration_info` set this QEMU up for it
    (:mod:`ganeti_kvm.core.migration_ready`), a live migration is one
    write: the monitor's negotiation, ``query-migrate`` and ``migrate``.
    Else two: the negotiation with a survey of QEMU's migration state and
    settings, then the settings QEMU lacks and ``migrate``.  QEMU's own
    time of the migration starts at ``migrate``; what comes before it is
    overhead.
    """
    pid = node.running_pid(name)
    if pid is None:
        raise errors.InstanceNotRunning(f"Cannot migrate instance {name}: it is not running")
    record = node.load_record(name)
    if record is None:
        raise errors.RuntimeStateError(
            f"Cannot migrate instance {name}: its runtime record is missing")
    hvp = record.hvparams
    live = live and hvp.get(c.HV_MIGRATION_MODE, c.HT_MIGRATION_LIVE) != c.HT_MIGRATION_NONLIVE
    downtime = int(hvp.get(c.HV_MIGRATION_DOWNTIME, 30))
    port = int(hvp.get(c.HV_MIGRATION_PORT, 8102))
    caps = migration_caps(record)
    if limit is None:
        limit = time_limit(int(record.beparams.get(c.BE_MEMORY, 128)),
                           int(hvp.get(c.HV_MIGRATION_BANDWIDTH, 32)))
    uri = f"tcp:{_uri_host(target)}:{port}"
    ongoing = errors.MigrationError(
        f"Cannot migrate instance {name} to {target}: QEMU is already migrating it; "
        "wait for that migration or cancel it first")
    # Taken whatever follows: good for this migration only.
    prepared = migration_ready.take(paths)
    settings = survey = None
    if live and mon.escalates and prepared is not None:
        settings = _settings(node, mon, name, record, prepared.tcg)
        if not prepared.matches(pid, settings.capabilities(), settings.parameters()):
            settings = None
    if settings is None:
        survey = mon.survey()
        settings = _settings(node, mon, name, record, survey.tcg)
        if survey.status.status in ONGOING:
            raise ongoing
    paused_by_us = False
    if not live and mon.run_state() == "running":
        mon.command("stop")
        paused_by_us = True
    now = time.monotonic()
    state = MigrationState(target=target, live=live, paused_by_us=paused_by_us, started=now,
                           deadline=now + limit, limit=limit, stall_timeout=stall_timeout,
                           started_wall=time.time(), last_moved=now,
                           converge=mon.escalates and live,
                           postcopy_allowed=live and c.MIGRATION_CAP_POSTCOPY in caps,
                           throttle=settings.throttle,
                           downtime_limit=downtime)
    try:
        state = save_state(paths, state)
        log.info("Migrating instance %s to %s (%s)", name, uri, "live" if live else "non-live")
        if survey is None:
            before = mon.start_prepared(uri).status
        else:
            before = "none"
            mon.start_migration(uri, None if configured(survey, settings) else settings)
    except BaseException as err:
        _abort(mon, name, paths, state)
        if isinstance(err, errors.HypervisorError) and not isinstance(
                err, errors.MigrationError):
            raise errors.MigrationError(
                f"Cannot start migrating instance {name} to {target}: {err}; "
                "the instance keeps running on this node") from err
        raise
    if before in ONGOING:
        # Not one of this library's (that would have taken the note): QEMU
        # refused the second one, and the state saved just now is not its.
        _drop_state(paths)
        raise ongoing
    return state, pid


def _returns(results: list[Any]) -> list[Any]:
    """The results of :meth:`QmpClient.execute_many`; the first refusal among them raised."""
    for result in results:
        if isinstance(result, errors.QmpCommandError):
            raise result
    return results


def _check(mon: _Monitor, name: str, paths: InstancePaths, state: MigrationState | None,
           now: float | None = None) -> tuple[MigrationStatus, MigrationState | None]:
    """QEMU's report, after enforcing the limits of ``state``; and the updated state.

    A migration that does not converge is escalated (:func:`escalate`);
    one in post-copy is never cancelled (see the module's docstring).
    """
    status = mon.query()
    if state is not None:
        status = dataclasses.replace(status, step=step_name(state))
    if status.status == "completed":
        return mon.settle(status), state
    if status.status not in ONGOING:
        if status.status == "cancelled" and state is not None and state.verdict:
            status = dataclasses.replace(status, status="failed", error=state.verdict)
        elif postcopy_started(status, state):
            status = dataclasses.replace(status, status="failed",
                                         error=postcopy_failure(name, status))
        return status, state
    if state is None:  # not started by this library, or its record is lost
        return status, state
    now = time.monotonic() if now is None else now
    if status.status in POSTCOPY_STATES:
        return _check_postcopy(name, status, state, now), state
    state, reason = judge(status, state, now)
    if reason is None:
        state = _converge(mon, name, paths, status, state)
        if state.last_moved - state.saved_moved >= _save_interval(state):
            state = _save_quietly(paths, state)
        return dataclasses.replace(status, step=step_name(state)), state
    verdict = f"the migration {reason}; ganeti-kvm cancelled it"
    log.error("Migration of instance %s to %s %s; cancelling it", name, state.target, reason)
    if not _cancel_on(mon, name):
        verdict += f", but QEMU had not stopped it after {CANCEL_TIMEOUT:.0f} s"
    state = _save_quietly(paths, dataclasses.replace(state, verdict=verdict))
    return dataclasses.replace(status, status="failed", error=verdict), state


def _check_postcopy(name: str, status: MigrationStatus, state: MigrationState,
                    now: float) -> MigrationStatus:
    """A post-copy migration: never cancelled; failed once paused, or twice past its limit.

    Post-copy sends every page left at the link's speed, so it ends well
    within another time limit; past that, or paused by a broken link, it
    is reported failed with what to do (:func:`postcopy_failure`).
    """
    if status.status == "postcopy-paused" or now > state.deadline + state.limit:
        if status.status != "postcopy-paused":
            status = dataclasses.replace(
                status, error=f"not finished {2 * state.limit:.0f} s after its start")
        return dataclasses.replace(status, status="failed",
                                   error=postcopy_failure(name, status))
    return status


def _converge(mon: _Monitor, name: str, paths: InstancePaths, status: MigrationStatus,
              state: MigrationState) -> MigrationState:
    """Take the step :func:`escalate` decides, if any; returns the (saved) new state.

    A step QEMU refuses is logged and not taken: the migration goes on as
    before, and the time limit stays the last resort.
    """
    new, step = escalate(status, state)
    if new.last_sync != state.last_sync:
        log.debug("Migration of %s, pass %d: dirtying %d B/s, link %d B/s, expected downtime "
                  "%s ms, throttle %d%%, step %s", name, status.dirty_syncs, status.dirty_rate,
                  status.link_rate, status.expected_downtime_ms, status.throttle_percent,
                  step_name(new))
    if step is None:
        return new
    try:
        if step.postcopy:
            mon.command("migrate-start-postcopy")
        elif step.parameters:
            mon.set_parameters(step.parameters)
    except errors.HypervisorError as err:
        log.warning("Migration of instance %s does not converge (%s), but QEMU refused the "
                    "step to %s: %s", name, step.reason, step_name(new), err)
        return dataclasses.replace(state, last_sync=new.last_sync)
    log.warning("Migration of instance %s does not converge (%s); escalating to %s",
                name, step.reason, step_name(new))
    return _save_quietly(paths, new)


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
           state: MigrationState | None) -> bool:
    """After a failure: cancel, let the guest run on, drop the state; never raises.

    The guest continues if this library stopped it (non-live) or QEMU
    paused it at the end of a migration the target did not take over.  Once
    post-copy began nothing is touched and the state is kept, so that a
    later call knows it too (:func:`postcopy_failure`); returns False then.
    """
    keep = False
    try:
        current = mon.query()
        if postcopy_started(current, state):
            keep = True
            log.error("Not resuming instance %s here: %s", name,
                      postcopy_failure(name, current))
            return False
        _cancel_on(mon, name)
        run = mon.run_state()
        if run == "postmigrate" or (state is not None and state.paused_by_us
                                    and run == "paused"):
            mon.command("cont")
    except errors.HypervisorError as err:
        log.error("Could not cancel the migration of instance %s or resume it here: %s",
                  name, err)
    finally:
        if not keep:
            _drop_state(paths)
    return True


def _wait_exit(pid: int, timeout: float, pidfd: int | None = None) -> bool:
    """:func:`process.wait_gone`, woken by the exit itself where the kernel offers a pidfd.

    Polling would see a QEMU that quits in 3 ms only at its next poll; a
    pidfd (``pidfd``, else one opened here) becomes readable the moment the
    process has exited.
    """
    if pidfd is not None:
        return bool(select.select([pidfd], [], [], timeout)[0])
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):  # an older kernel, or the process is gone already
        return process.wait_gone(pid, timeout)
    try:
        select.select([pidfd], [], [], timeout)
    finally:
        os.close(pidfd)
    return process.wait_gone(pid, 0.0)


def _kill(pid: int, pidfd: int | None) -> bool:
    """SIGKILL to ``pid``, through ``pidfd`` if given; False if it is gone already."""
    if pidfd is None:
        return process.signal_pid(pid, signal.SIGKILL)
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True


def _end_source(node: KvmNode, mon: _Monitor, name: str, paths: InstancePaths,
                completed: bool = False, source: _Source | None = None) -> None:
    """After a completed migration: end the source QEMU and remove all its state here.

    The guest runs on the target; the files are removed only once this
    QEMU is gone, so a QEMU that survives SIGKILL keeps its pidfile and is
    still listed here, where the operator can see it.  ``completed``: the
    caller has just seen QEMU report the migration completed; ``source``:
    the instance's QEMU (from :func:`_source_process`), which then needs
    no look-up.
    """
    pid = node.running_pid(name) if source is None else source.pid
    pidfd = None if source is None else source.pidfd
    if pid is not None:
        reported = "completed" if completed else mon.query().status
        if reported != "completed":
            raise errors.MigrationError(
                f"Refusing to end instance {name}'s QEMU on this node: its migration is "
                f"{reported}, not completed, so the guest may run only here. Finish the "
                "migration as failed to let it run on")
        # Its guest runs on the target and its disks were handed over when
        # the migration completed: nothing of this QEMU is worth a graceful
        # quit, which costs milliseconds of its own clean-up.
        killed = time.perf_counter()
        if _kill(pid, pidfd):
            # The kernel takes milliseconds to tear a QEMU down: meanwhile,
            # read the record and remove what no one reaches the QEMU by.
            # The pidfile and the record stay until it is gone, so that a
            # QEMU that survives SIGKILL is still listed here.
            record = node._record_or_none(name)
            node._remove_control_files(paths)
            if not _wait_exit(pid, 10.0, pidfd) and not process.terminate(pid):
                raise errors.MigrationError(
                    f"Instance {name} migrated, but its old QEMU process {pid} on this node "
                    "survived SIGKILL; its files are kept. Find out why the process cannot "
                    "exit (fuser, /proc/PID/stack) and run CleanupInstance once it is gone")
            log.debug("Instance %s: the source QEMU %d was gone %.3f ms after SIGKILL", name,
                      pid, (time.perf_counter() - killed) * 1000)
            node._cleanup_stopped_with(name, paths, record)
            return
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
        return _begin(node, mon, name, paths, target, live, limit, stall_timeout)[0]


def _require_running(node: KvmNode, name: str, what: str) -> InstancePaths:
    paths = node.paths(name)
    if node.running_pid(name) is None:
        raise errors.InstanceNotRunning(
            f"Cannot {what} of instance {name}: it is not running on this node."
            f"{node.qemu_said(name)}")
    return paths


def poll(node: KvmNode, name: str, wait: float = 0.0) -> MigrationStatus:
    """QEMU's report of ``name``'s migration, with the library's limits enforced.

    A migration past its time limit or without progress for its stall
    timeout (see :func:`start`) is cancelled here and reported ``failed``
    with the reason in ``error``; so is it on every later poll.  Safe to
    call from any process, also while :func:`migrate` runs; ``none`` means
    no migration was started.

    ``wait``: while the migration goes on, keep watching it (as
    :func:`migrate` does: woken by QEMU's events, escalating where it does
    not converge) for up to that many seconds, and report as soon as it
    has ended.  A caller that polls at a fixed pace (Ganeti's master: every
    second) then learns of the end when it happens, not at its next poll.
    The watch holds the long-operation monitor, which :func:`start` left
    free: QEMU serves one client per monitor, and the short one stays free
    for listings.  Over a human monitor (a QEMU of the 2011 driver), the
    only one, there is no watch: the report comes at once.
    """
    if not 0 <= wait < float("inf"):
        raise errors.MigrationError(
            f"Cannot watch the migration of instance {name} for {wait!r} seconds: "
            "give a number of seconds from 0 up")
    paths = _require_running(node, name, "check the migration")
    if node.human_monitor_only(paths):
        wait = 0.0
    with _monitor(node, paths, long=wait > 0) as mon:
        status, state = _check(mon, name, paths, load_state(paths))
        deadline = time.monotonic() + wait
        asked = time.monotonic()
        while status.status in ONGOING and time.monotonic() < deadline:
            _wait_to_ask(mon, asked, deadline)
            status, state = _check(mon, name, paths, state)
            asked = time.monotonic()
        return status


def _wait_to_ask(mon: _Monitor, asked: float, until: float = math.inf) -> None:
    """Wait until QEMU is to be asked again: an event announcing a state that ends
    the migration, :data:`POLL_INTERVAL` after ``asked``, or ``until``.

    An event of a state the migration goes on in (``setup``, ``active``...)
    says all there is to know then; a question would only compete with the
    migration for QEMU's main loop.
    """
    due = min(until, asked + POLL_INTERVAL)
    while mon.wait(max(0.0, due - time.monotonic())) in ONGOING and time.monotonic() < due:
        pass


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
    After a post-copy began, nothing is resumed: :class:`errors.MigrationError`
    says why and what to do (see the module's docstring).
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
            if not _abort(mon, name, paths, state):
                raise errors.MigrationError(
                    f"Cannot let instance {name} run on on this node: "
                    f"{postcopy_failure(name, mon.query())}")


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
        begun, pid = _begin(node, mon, name, paths, target, live, limit, stall_timeout)
        state: MigrationState | None = begun
        with _source_process(pid, paths) as source:
            final, state = _follow(mon, name, paths, target, state, progress)
            if final.status != "completed":
                if not _abort(mon, name, paths, state):
                    raise errors.MigrationError(
                        f"Migration of instance {name} to {target} failed: {final.error}")
                raise errors.MigrationError(
                    f"Migration of instance {name} to {target} {final.status}: "
                    f"{final.error or 'QEMU gave no reason'}; the instance keeps running "
                    "on this node")
            _end_source(node, mon, name, paths, completed=True, source=source)
        return final


def _follow(mon: _Monitor, name: str, paths: InstancePaths, target: str,
            state: MigrationState | None,
            progress: Callable[[MigrationStatus], None] | None,
            ) -> tuple[MigrationStatus, MigrationState | None]:
    """Watch a started migration until it ends; QEMU's last report and the state.

    QEMU is asked (:func:`_check`) every :data:`POLL_INTERVAL`, and at once
    when an event announces a state that ends the migration: an event of
    a state it goes on in (``setup``, ``active``...) says all there is to
    know then, and a question would only compete with the migration for
    QEMU's main loop.  On any error the migration is aborted
    (:func:`_abort`) and :class:`errors.MigrationError` raised.
    """
    try:
        asked = time.monotonic()
        while True:
            _wait_to_ask(mon, asked)
            final, state = _check(mon, name, paths, state)
            asked = time.monotonic()
            if final.status not in ONGOING:
                return final, state
            if progress is not None:
                progress(final)
    except BaseException as err:
        resumed = _abort(mon, name, paths, state)
        if isinstance(err, errors.HypervisorError) and not isinstance(
                err, errors.MigrationError):
            raise errors.MigrationError(
                f"Migration of instance {name} to {target} failed: {err}; "
                + ("the instance keeps running on this node" if resumed else
                   "post-copy had begun, so nothing was resumed or stopped: see the "
                   "migration status on both nodes")) from err
        raise


class _Source(NamedTuple):
    """The source QEMU of a running migration: its PID and a pidfd naming it."""

    pid: int
    pidfd: int


@contextlib.contextmanager
def _source_process(pid: int, paths: InstancePaths) -> Iterator[_Source | None]:
    """The source QEMU ``pid`` with a pidfd, while the migration runs (None: none to have).

    Taken while QEMU migrates (it costs the migration nothing), so that
    the end needs neither /proc nor the pidfile: the signal goes to
    exactly this process, whatever became of its PID.  None on a kernel
    without pidfds, or if ``pid`` no longer runs the instance.
    """
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        yield None
        return
    try:
        # The PID was checked before the migration began; check that the
        # process the pidfd names is still that QEMU.
        yield _Source(pid, pidfd) \
            if process.instance_process(pid, paths.name, paths.pidfile) else None
    finally:
        os.close(pidfd)


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

    Only reads: :func:`poll` also enforces the library's limits.  ``step``
    is the library's escalation step while a migration it started runs.
    """
    status = MigrationStatus.from_query(node.qmp(name, "query-migrate"))
    state = load_state(node.paths(name))
    return status if state is None else dataclasses.replace(status, step=step_name(state))


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
    """Start QEMU for ``name`` waiting for the migration on ``target``:``migration_port``.

    The target waits paused, and :func:`finalize` continues the guest once
    both sides have agreed the migration completed: until then it can run
    on the source again, never on both.  Except when ``migration_caps``
    allows post-copy: post-copy needs the guest to run here from the
    switch (paused, it would stand still through the whole post-copy phase,
    seconds, while QEMU reports a downtime of a millisecond), so QEMU
    starts it itself, as it would at the end of a pre-copy.  The operator
    chose post-copy knowing that it binds the guest to both nodes.  NICs
    are still configured by :func:`finalize`.
    """
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
        caps = migration_caps(record)
        node.start_from_record(record, incoming=f"tcp:{_uri_host(target)}:{port}",
                               run_ifup=False, autostart=c.MIGRATION_CAP_POSTCOPY in caps)
        if caps:
            _enable_incoming_caps(node, name, caps)


def _enable_incoming_caps(node: KvmNode, name: str, caps: list[str]) -> None:
    """Enable ``caps`` on the waiting target before the source connects; stop it if refused.

    QEMU takes capabilities only before a migration starts, and post-copy
    needs ``postcopy-ram`` on both ends.
    """
    try:
        node.qmp(name, "migrate-set-capabilities", {"capabilities": [
            {"capability": cap, "state": True} for cap in caps]})
    except errors.HypervisorError as err:
        node._stop_locked(name, node.paths(name), acpi=False, force=True, timeout=None)
        raise errors.MigrationError(
            f"Cannot accept instance {name} for migration: this node's QEMU refused its "
            f"migration_caps {c.MIGRATION_CAPS_SEP.join(caps)}: {err}. Nothing runs here; "
            "the instance keeps running on its node. Remove the capability QEMU lacks "
            "from migration_caps") from err


def _refuse_stopping_postcopy(node: KvmNode, name: str) -> None:
    """Raise :class:`errors.MigrationError` if the target runs ``name`` in post-copy.

    Its QEMU then holds the running guest; stopping it would lose it.
    """
    if node.running_pid(name) is None:
        return
    try:
        incoming = MigrationStatus.from_query(node.qmp(name, "query-migrate"))
    except errors.HypervisorError as err:
        log.warning("Cannot ask instance %s's QEMU here about its migration: %s", name, err)
        return
    if incoming.status in POSTCOPY_STATES:
        raise errors.MigrationError(
            f"Refusing to stop instance {name} on this node after a failed migration: "
            f"{postcopy_failure(name, incoming)}")


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
        _refuse_stopping_postcopy(node, name)
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
        pid = node.running_pid(name)
        try:  # pinned at accept already; again, now that the guest is here
            if pid is not None:
                pinning.apply(name, pid, record.hvparams, int(record.beparams[c.BE_VCPUS]),
                              lambda command: node.qmp(name, command))
        except errors.HypervisorError as err:  # never leave the arrived guest stopped
            log.warning("Instance %s: cannot pin its vCPUs again after the migration: %s",
                        name, err)
        runtime.save(paths.runtime_file, record)
        state = node.qmp(name, "query-status")["status"]
        # With a non-live migration the guest arrives stopped; it ran on the
        # source, so it runs here.  One that was never started stays so.
        if state == "paused" and source_state == "running":
            node.qmp(name, "cont")
