"""Escalating a migration that does not converge, and migration_caps (issue 15).

First the library's decisions alone (:func:`migration.escalate`), then
poll and finish_source against a fake QMP (the steps it sends, and a
post-copy failure that must touch nothing), then migration_caps with real
QEMU: set on both ends, and a migration with them completes.  The
dirtying guest itself is in tests/test_convergence.py.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from ganeti_kvm import errors
from ganeti_kvm.core import migration, params
from ganeti_kvm.core import names as c
from ganeti_kvm.core.migration import MigrationState, MigrationStatus
from ganeti_kvm.core.node import KvmNode
from ganeti_kvm.ganeti3 import params as g3params
from ganeti_kvm.hv_kvm import KVMHypervisor
from ganeti_kvm.qemu import caps as qemu_caps
from tests import test_migration_steps
from tests.fakeqmp import FakeQmp, Peer
from tests.helpers import free_port
from tests.test_migration_steps import bare_instance, poll_until_done

MIB = 2**20
sink = test_migration_steps.sink  # the fixture: a port that never reads


def _state(**overrides: Any) -> MigrationState:
    now = time.monotonic()
    values: dict[str, Any] = {
        "target": "192.0.2.2", "live": True, "paused_by_us": False, "started": now,
        "deadline": now + 1000, "limit": 1000, "stall_timeout": 30, "last_moved": now,
        "converge": True}
    values.update(overrides)
    return MigrationState(**values)


def _status(syncs: int, dirty_mib: float, link_mib: float, throttle: int = 0,
            status: str = "active") -> MigrationStatus:
    return MigrationStatus(status=status, transferred=1, total=256 * MIB,
                           dirty_rate=int(dirty_mib * MIB), link_rate=int(link_mib * MIB),
                           dirty_syncs=syncs, throttle_percent=throttle)


# --- escalate: the decisions alone ----------------------------------------------------


def test_the_first_pass_and_a_pass_already_judged_decide_nothing() -> None:
    state = _state()
    assert migration.escalate(_status(1, 100, 32), state) == (state, None)
    judged = _state(last_sync=3)
    assert migration.escalate(_status(3, 100, 32), judged) == (judged, None)


def test_a_converging_guest_is_left_alone_but_its_pass_is_noted() -> None:
    new, step = migration.escalate(_status(2, 15, 32), _state())
    assert step is None and new.last_sync == 2 and new.step == migration.STEP_PRECOPY
    # Without a measured link rate nothing is known either.
    assert migration.escalate(_status(3, 100, 0), new)[1] is None


def test_a_guest_outrunning_the_link_gets_the_throttle_steps_in_turn() -> None:
    state, taken = _state(), []
    for sync in range(2, 8):
        state, step = migration.escalate(_status(sync, 40, 32, state.throttle_max), state)
        taken.append(step and step.parameters)
    assert taken[:3] == [
        {"cpu-throttle-initial": level, "cpu-throttle-increment": level - before,
         "max-cpu-throttle": level}
        for before, level in ((migration.THROTTLE_HOLD, 50), (50, 80), (80, 99))]
    assert taken[3:] == [None, None, None]  # nothing left: the time limit decides
    assert migration.step_name(state) == "throttle 99%"
    assert state.step == migration.STEP_THROTTLE and state.last_sync == 7


def test_post_copy_comes_first_when_allowed() -> None:
    """No throttle before post-copy: on QEMU 10.0 it made the switch's downtime 100 ms-5 s."""
    state = _state(postcopy_allowed=True)
    state, first = migration.escalate(_status(2, 40, 32), state)
    assert first is not None and first.postcopy and first.parameters is None
    assert "40.0 MiB/s" in first.reason and "pass 2" in first.reason
    assert migration.step_name(state) == "postcopy"
    assert migration.escalate(_status(3, 40, 32), state)[1] is None


def test_without_the_throttle_post_copy_comes_first_or_nothing() -> None:
    """A TCG guest on a QEMU that corrupts throttled guests is never throttled."""
    state, step = migration.escalate(_status(2, 40, 32), _state(throttle=False))
    assert step is None and state.step == migration.STEP_PRECOPY  # the time limit decides
    state, step = migration.escalate(_status(2, 40, 32),
                                     _state(throttle=False, postcopy_allowed=True))
    assert step is not None and step.postcopy and step.parameters is None
    assert state.step == migration.STEP_POSTCOPY


@pytest.mark.parametrize("state,status", [
    (_state(converge=False), _status(2, 100, 32)),  # human monitor, or non-live
    (_state(), _status(2, 100, 32, status="setup")),
    (_state(step=migration.STEP_POSTCOPY), _status(2, 100, 32)),
], ids=["not-escalating", "not-active", "in-post-copy"])
def test_no_escalation_outside_an_active_pre_copy(state: MigrationState,
                                                  status: MigrationStatus) -> None:
    assert migration.escalate(status, state)[1] is None


def test_the_figures_come_from_query_migrate() -> None:
    status = MigrationStatus.from_query({
        "status": "active", "expected-downtime": 5243, "cpu-throttle-percentage": 80,
        "ram": {"dirty-sync-count": 5, "dirty-pages-rate": 8192, "page-size": 4096,
                "mbps": 268.4, "transferred": 7, "remaining": 3, "total": 9}})
    assert (status.dirty_rate, status.dirty_syncs, status.throttle_percent) == (
        32 * MIB, 5, 80)
    assert status.link_rate == 33_550_000 and status.expected_downtime_ms == 5243
    assert status.to_dict()["throttle_percent"] == 80


def test_the_state_keeps_the_step_across_processes(tmp_path: Any) -> None:
    state = _state(step=migration.STEP_THROTTLE, throttle_max=80, last_sync=4,
                   postcopy_allowed=True, downtime_limit=30)
    again = MigrationState.from_dict(state.to_dict(), "here")
    assert again == state
    with pytest.raises(errors.RuntimeStateError, match="bad values"):
        MigrationState.from_dict(dict(state.to_dict(), step="warp"), "here")
    # A record of the previous version (no convergence fields) still loads.
    old = {k: v for k, v in state.to_dict().items()
           if k not in ("converge", "postcopy_allowed", "downtime_limit", "step",
                        "throttle_max", "last_sync")}
    assert MigrationState.from_dict(old, "here").step == migration.STEP_PRECOPY


# --- poll and finish_source against a fake QMP ------------------------------------------


class FakeMonitor:
    """A source QEMU whose migration is ``status``, with the figures of ``ram``."""

    def __init__(self, status: str, ram: dict[str, Any] | None = None,
                 run_state: str = "postmigrate") -> None:
        self.status = status
        self.ram = ram or {}
        self.run_state = run_state
        self.commands: list[tuple[str, Any]] = []

    def script(self, peer: Peer) -> None:
        peer.handshake()
        while True:
            try:
                request = peer.recv()
            except EOFError:
                return
            command = request["execute"]
            self.commands.append((command, request.get("arguments")))
            if command == "query-migrate":
                peer.reply(request, {"status": self.status, "ram": dict(
                    {"transferred": 5, "remaining": 5, "total": 10}, **self.ram)})
            elif command == "query-status":
                peer.reply(request, {"status": self.run_state, "running": False})
            elif command in ("migrate-set-parameters", "migrate-start-postcopy"):
                peer.reply(request, {})
            else:  # migrate_cancel, cont: must not come
                raise AssertionError(f"unexpected command {command}")

    def sent(self, command: str) -> list[Any]:
        return [args for name, args in self.commands if name == command]


@pytest.fixture
def fake_node(short_dir: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[
        Callable[..., KvmNode]]:
    """Factory: a node whose instance ``f1`` "runs" with the fake monitor."""
    servers: list[FakeQmp] = []

    def make(fake: FakeMonitor, connections: int = 1) -> KvmNode:
        node = KvmNode(os.path.join(short_dir, "run"))
        node.ensure_dirs()
        monkeypatch.setattr(node, "running_pid", lambda name: 4242)
        server = FakeQmp(node.paths("f1").qmp_socket, fake.script, connections=connections)
        server.release.set()
        servers.append(server)
        return node

    yield make
    for server in servers:
        server.stop()


OUTRUNNING = {"dirty-sync-count": 3, "dirty-pages-rate": 10240, "page-size": 4096,
              "mbps": 268.0}


def test_poll_raises_the_throttle_of_a_guest_outrunning_the_link(fake_node: Any) -> None:
    fake = FakeMonitor("active", OUTRUNNING)
    node = fake_node(fake)
    migration.save_state(node.paths("f1"), _state())
    status = migration.poll(node, "f1")
    assert status.status == "active" and status.step == "throttle 50%"
    assert fake.sent("migrate-set-parameters") == [
        {"cpu-throttle-initial": 50, "cpu-throttle-increment": 50, "max-cpu-throttle": 50}]
    saved = migration.load_state(node.paths("f1"))
    assert saved is not None and (saved.step, saved.throttle_max, saved.last_sync) == (
        migration.STEP_THROTTLE, 50, 3)


def test_get_migration_status_reports_the_step(fake_node: Any) -> None:
    node = fake_node(FakeMonitor("active", OUTRUNNING))
    migration.save_state(node.paths("f1"), _state(step=migration.STEP_THROTTLE,
                                                  throttle_max=80))
    report = migration.status(node, "f1").to_dict()
    assert report["step"] == "throttle 80%" and report["dirty_syncs"] == 3
    assert report["dirty_rate"] == 40 * MIB


def test_poll_switches_to_post_copy_when_allowed(fake_node: Any) -> None:
    fake = FakeMonitor("active", OUTRUNNING)
    node = fake_node(fake)
    migration.save_state(node.paths("f1"), _state(
        postcopy_allowed=True, step=migration.STEP_THROTTLE, throttle_max=50, last_sync=2))
    assert migration.poll(node, "f1").step == "postcopy"
    assert [name for name, _ in fake.commands] == ["query-migrate", "migrate-start-postcopy"]


def test_a_post_copy_past_the_time_limit_is_not_cancelled(fake_node: Any) -> None:
    fake = FakeMonitor("postcopy-active")
    node = fake_node(fake, connections=2)
    now = time.monotonic()
    migration.save_state(node.paths("f1"), _state(step=migration.STEP_POSTCOPY,
                                                  deadline=now - 1, limit=60))
    assert migration.poll(node, "f1").status == "postcopy-active"  # 2x the limit: goes on
    migration.save_state(node.paths("f1"), _state(step=migration.STEP_POSTCOPY,
                                                  deadline=now - 61, limit=60))
    late = migration.poll(node, "f1")
    assert late.status == "failed" and "not finished 120 s" in (late.error or "")
    assert fake.sent("migrate_cancel") == []


def test_a_paused_post_copy_is_reported_with_qemus_recovery_and_not_touched(
        fake_node: Any) -> None:
    fake = FakeMonitor("postcopy-paused")
    node = fake_node(fake, connections=2)
    migration.save_state(node.paths("f1"), _state(step=migration.STEP_POSTCOPY))
    status = migration.poll(node, "f1")
    assert status.status == "failed"
    assert "migrate-recover" in (status.error or "") and "resume" in (status.error or "")
    # Ganeti's master then finishes the source as failed: the stale source
    # must not resume, and the state stays for a later call.
    with pytest.raises(errors.MigrationError, match="Cannot let instance f1 run on"):
        migration.finish_source(node, "f1", success=False)
    assert [name for name, _ in fake.commands] == ["query-migrate"] * 3
    assert migration.load_state(node.paths("f1")) is not None


def test_a_failed_migration_after_post_copy_does_not_resume_the_source(
        fake_node: Any) -> None:
    fake = FakeMonitor("failed")
    node = fake_node(fake)
    migration.save_state(node.paths("f1"), _state(step=migration.STEP_POSTCOPY))
    with pytest.raises(errors.MigrationError, match="post-copy"):
        migration.finish_source(node, "f1", success=False)
    assert fake.sent("cont") == [] and fake.sent("migrate_cancel") == []


# --- migration_caps: the parameter ------------------------------------------------------


@pytest.mark.parametrize("value", ["", "postcopy-ram", "xbzrle:auto-converge:postcopy-ram",
                                   "multifd"])
def test_migration_caps_takes_qemus_names(value: str) -> None:
    params.check_all_syntax(dict(c.DEFAULTS, migration_caps=value))
    assert ":".join(params.parse_migration_caps(value)) == value


@pytest.mark.parametrize("value", ["x-postcopy-ram", "xbzrle:", "xbzrle::multifd",
                                   "xbzrle:xbzrle", "events", "xbzrle,multifd", 3])
def test_migration_caps_refuses_anything_else(value: Any) -> None:
    with pytest.raises(errors.ParameterError, match="migration_caps"):
        params.check_all_syntax(dict(c.DEFAULTS, migration_caps=value))


def test_ganeti3_passes_migration_caps_through() -> None:
    hvparams = dict(g3params.DEFAULTS, migration_caps="xbzrle:postcopy-ram")
    g3params.check_implemented(hvparams)
    assert g3params.to_core(hvparams)[c.HV_KVM_MIGRATION_CAPS] == "xbzrle:postcopy-ram"


# --- real QEMU ---------------------------------------------------------------------------


def _enabled(node: KvmNode, name: str) -> set[str]:
    return {cap["capability"] for cap in node.qmp(name, "query-migrate-capabilities")
            if cap["state"]}


def test_migration_caps_are_set_on_both_ends(nodes: tuple[KVMHypervisor, KVMHypervisor],
                                             qemu_bin: str) -> None:
    source, target = nodes
    inst = bare_instance("cv1", qemu_bin, free_port(), migration_caps="xbzrle:postcopy-ram")
    source.StartInstance(inst, [], startup_paused=False)
    info = source.MigrationInfo(inst)
    target.AcceptInstance(inst, info, "127.0.0.1")
    assert {"xbzrle", "postcopy-ram"} <= _enabled(target.node, "cv1")
    state = migration.start(source.node, "cv1", "127.0.0.1", live=True)
    assert state.converge and state.postcopy_allowed
    # A TCG guest is throttled only where QEMU keeps it intact (not 7.2).
    assert state.throttle == qemu_caps.probe(qemu_bin).throttles_tcg_guests_safely
    own = {"events", "auto-converge"} if state.throttle else {"events"}
    assert {"xbzrle", "postcopy-ram"} | own <= _enabled(source.node, "cv1")
    assert state.throttle or "auto-converge" not in _enabled(source.node, "cv1")
    assert poll_until_done(source.node, "cv1").status == "completed"
    migration.finish_source(source.node, "cv1", success=True)
    target.FinalizeMigration(inst, info, True)
    assert target.node.qmp("cv1", "query-status")["status"] == "running"


def test_a_capability_the_target_refuses_stops_nothing_but_the_target(
        nodes: tuple[KVMHypervisor, KVMHypervisor], qemu_bin: str) -> None:
    source, target = nodes
    # QEMU refuses post-copy preemption without post-copy (7.2 and 10.0).
    inst = bare_instance("cv2", qemu_bin, free_port(), migration_caps="postcopy-preempt")
    source.StartInstance(inst, [], startup_paused=False)
    info = source.MigrationInfo(inst)
    with pytest.raises(errors.MigrationError, match="migration_caps postcopy-preempt"):
        target.AcceptInstance(inst, info, "127.0.0.1")
    assert target.ListInstances() == [] and source.ListInstances() == ["cv2"]


def test_qemu_takes_parameters_but_no_capability_once_migrating(
        hv: KVMHypervisor, qemu_bin: str, sink: int) -> None:
    # Why auto-converge is enabled at the start and the library raises the
    # throttle through parameters (a stream larger than the socket buffers
    # never ends, so the migration stays active).
    inst = bare_instance("cv3", qemu_bin, sink, memory=4096)
    hv.StartInstance(inst, [], startup_paused=False)
    state = migration.start(hv.node, "cv3", "127.0.0.1", live=True)
    assert state.converge and not state.postcopy_allowed
    assert ("auto-converge" in _enabled(hv.node, "cv3")) == state.throttle
    with pytest.raises(errors.QmpCommandError, match="in progress"):
        hv.node.qmp("cv3", "migrate-set-capabilities", {"capabilities": [
            {"capability": "postcopy-ram", "state": True}]})
    hv.node.qmp("cv3", "migrate-set-parameters", {"max-cpu-throttle": 80})
    assert hv.node.qmp("cv3", "query-migrate-parameters")["max-cpu-throttle"] == 80
    migration.finish_source(hv.node, "cv3", success=False)
    assert hv.node.qmp("cv3", "query-status")["status"] == "running"


# --- the downtime of a post-copy switch -------------------------------------------------


def _completed(downtime: int | None, step: str | None = migration.STEP_POSTCOPY,
               status: str = "completed") -> MigrationStatus:
    return MigrationStatus(status=status, total_time_ms=12412, downtime_ms=downtime, step=step)


def test_a_post_copy_downtime_qemu_measured_to_the_end_is_taken_from_its_events() -> None:
    # QEMU's 0 ms switch counted as "not measured": the whole post-copy phase.
    stopped, switched = 1000.000200, 1000.000650
    assert migration.switchover_downtime(_completed(5108), stopped, switched) == 1
    assert migration.switchover_downtime(_completed(5108), stopped, stopped + 0.0031) == 4


def test_a_right_downtime_and_every_other_case_stay_as_qemu_said() -> None:
    stopped = 1000.0
    assert migration.switchover_downtime(_completed(2), stopped, stopped + 0.0015) == 2
    for status, args in [
            (_completed(5108, step=migration.STEP_PRECOPY), (stopped, stopped + 0.001)),
            (_completed(5108, step=None), (stopped, stopped + 0.001)),
            (_completed(5108, status="postcopy-active"), (stopped, stopped + 0.001)),
            (_completed(5108), (None, stopped)),
            (_completed(5108), (stopped, None)),
            (_completed(5108), (stopped, stopped - 1)),  # a STOP after the switch: not its
            (_completed(None), (stopped, stopped + 0.001))]:
        assert migration.switchover_downtime(status, *args) == status.downtime_ms


class _Events:
    """A QMP client that has these events for ``wait_event`` (and nothing else)."""

    def __init__(self, events: list[dict[str, Any]]) -> None:
        self.events = events

    def wait_event(self, names: list[str], timeout: float) -> dict[str, Any] | None:
        for index, event in enumerate(self.events):
            if event["event"] in names:
                return self.events.pop(index)
        return None


def _event(name: str, seconds: int, micros: int, **data: Any) -> dict[str, Any]:
    return {"event": name, "data": data,
            "timestamp": {"seconds": seconds, "microseconds": micros}}


def test_the_monitor_notes_the_stop_and_the_switch_and_corrects_the_report() -> None:
    client = _Events([_event("STOP", 1000, 200), _event("RESUME", 1000, 300),
                      _event("MIGRATION", 1000, 650, status="postcopy-active"),
                      _event("MIGRATION", 1005, 108000, status="completed")])
    mon = migration._QmpMonitor(client, "d1")  # type: ignore[arg-type]
    assert mon.wait(1.0) == "postcopy-active"  # the STOP on the way is noted
    assert (mon.stopped_at, mon.postcopy_at) == (1000.0002, 1000.00065)
    assert mon.wait(1.0) == "completed"
    assert mon.wait(0.0) is None and [e["event"] for e in client.events] == ["RESUME"]
    assert mon.settle(_completed(5108)).downtime_ms == 1
    assert migration.event_time({"timestamp": {"seconds": -1, "microseconds": 0}}) is None
    assert migration.event_time({}) is None
