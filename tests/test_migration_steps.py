"""The source side of a migration as steps: start, poll, cancel, finish_source.

Ganeti 3 calls them from separate node daemon requests; the blocking
``migrate()`` of the 2011 contract runs on the same steps (its own tests are
in tests/test_migration.py).  First poll's decisions against a fake QMP,
then the steps with real QEMU, guest-less VMs on loopback.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import threading
import time
import types
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from ganeti_kvm import constants as c
from ganeti_kvm import errors
from ganeti_kvm.core import migration, migration_ready
from ganeti_kvm.core.migration import MigrationState, MigrationStatus
from ganeti_kvm.core.node import KvmNode
from ganeti_kvm.hv_kvm import KVMHypervisor
from tests import legacy2011
from tests.fakeqmp import FakeQmp, Peer
from tests.helpers import free_port, make_instance

POLL_BOUND = 120.0  # seconds a test polls a migration at most


# --- judge: the decision alone ---------------------------------------------------------


def _state(now: float, **overrides: Any) -> MigrationState:
    values: dict[str, Any] = {
        "target": "192.0.2.2", "live": True, "paused_by_us": False, "started": now,
        "deadline": now + 1000, "limit": 1000, "stall_timeout": 30,
        "last_transferred": 10, "last_moved": now}
    values.update(overrides)
    return MigrationState(**values)


def test_judge_stops_a_migration_past_its_deadline() -> None:
    state = _state(100.0, deadline=150.0, limit=50)
    moving = MigrationStatus(status="active", transferred=20, total=100)
    new, reason = migration.judge(moving, state, 151.0)
    assert reason is not None and "time limit of 50 s" in reason and "20 of 100" in reason
    assert new.last_transferred == 20


def test_judge_stops_a_migration_without_progress() -> None:
    state = _state(100.0, last_moved=100.0)
    still = MigrationStatus(status="active", transferred=10, total=100)
    assert migration.judge(still, state, 129.0)[1] is None
    new, reason = migration.judge(still, state, 131.0)
    assert reason is not None and "no progress for 30 s" in reason
    assert new.last_moved == 100.0


def test_judge_lets_a_moving_migration_go_on_and_moves_the_mark() -> None:
    state = _state(100.0, last_moved=100.0)
    moving = MigrationStatus(status="active", transferred=11, total=100)
    new, reason = migration.judge(moving, state, 200.0)
    assert reason is None
    assert (new.last_transferred, new.last_moved) == (11, 200.0)


# --- poll against a fake QMP ---------------------------------------------------------


class FakeMigration:
    """QEMU's monitor for a migration in state ``status``; ``migrate_cancel`` cancels it."""

    def __init__(self, status: str, transferred: int = 50,
                 error: str | None = None) -> None:
        self.status = status
        self.transferred = transferred
        self.error = error
        self.commands: list[str] = []

    def reply(self) -> dict[str, Any]:
        reply: dict[str, Any] = {"status": self.status}
        if self.status != "none":
            reply["ram"] = {"transferred": self.transferred, "remaining": 10, "total": 100}
        if self.status == "completed":
            reply.update({"total-time": 1234, "downtime": 12})
        if self.error:
            reply["error-desc"] = self.error
        return reply

    def script(self, peer: Peer) -> None:
        peer.handshake()
        while True:
            try:
                request = peer.recv()
            except EOFError:
                return
            command = request["execute"]
            self.commands.append(command)
            if command == "migrate_cancel":
                self.status = "cancelled"
                peer.reply(request, {})
            elif command == "query-migrate":
                peer.reply(request, self.reply())
            else:
                raise AssertionError(f"unexpected command {command}")


@pytest.fixture
def fake_node(short_dir: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[
        Callable[..., KvmNode]]:
    """Factory: a node whose instance ``f1`` "runs" with the fake QMP ``fake``,
    for ``polls`` connections."""
    servers: list[FakeQmp] = []

    def make(fake: FakeMigration, polls: int = 1) -> KvmNode:
        node = KvmNode(os.path.join(short_dir, "run"))
        node.ensure_dirs()
        monkeypatch.setattr(node, "running_pid", lambda name: 4242)
        server = FakeQmp(node.paths("f1").qmp_socket, fake.script, connections=polls)
        server.release.set()  # each poll's connection ends when the client closes it
        servers.append(server)
        return node

    yield make
    for server in servers:
        server.stop()


def test_poll_cancels_a_migration_past_its_time_limit(fake_node: Any) -> None:
    fake = FakeMigration("active")
    node = fake_node(fake, polls=2)
    paths = node.paths("f1")
    now = time.monotonic()
    migration.save_state(paths, _state(now - 100, deadline=now - 50, limit=50))
    status = migration.poll(node, "f1")
    assert status.status == "failed"
    assert "time limit of 50 s" in (status.error or "") and "cancelled" in (status.error or "")
    assert fake.commands.count("migrate_cancel") == 1
    # Every later poll, from any process, reports the same verdict.
    again = migration.poll(node, "f1")
    assert (again.status, again.error) == ("failed", status.error)
    assert fake.commands.count("migrate_cancel") == 1


def test_poll_cancels_a_stalled_migration(fake_node: Any) -> None:
    fake = FakeMigration("active", transferred=10)
    node = fake_node(fake)
    now = time.monotonic()
    migration.save_state(node.paths("f1"), _state(now - 60, last_moved=now - 60))
    status = migration.poll(node, "f1")
    assert status.status == "failed" and "no progress for 30 s" in (status.error or "")
    assert "migrate_cancel" in fake.commands


def test_poll_cancels_even_when_the_state_cannot_be_saved(
        fake_node: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeMigration("active")
    node = fake_node(fake)
    now = time.monotonic()
    migration.save_state(node.paths("f1"), _state(now - 100, deadline=now - 50, limit=50))

    def disk_full(path: str, data: Any, mode: int = 0o600, durable: bool = True) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(migration.fsutil, "atomic_write", disk_full)
    status = migration.poll(node, "f1")
    assert status.status == "failed" and "time limit of 50 s" in (status.error or "")
    assert "migrate_cancel" in fake.commands


def test_poll_keeps_a_moving_migration_going_and_saves_its_mark(fake_node: Any) -> None:
    fake = FakeMigration("active", transferred=20)
    node = fake_node(fake)
    paths = node.paths("f1")
    now = time.monotonic()
    migration.save_state(paths, _state(now - 60, last_moved=now - 60))
    status = migration.poll(node, "f1")
    assert (status.status, status.transferred) == ("active", 20)
    assert "migrate_cancel" not in fake.commands
    saved = migration.load_state(paths)
    assert saved is not None and saved.last_transferred == 20 and saved.last_moved >= now


def test_poll_reports_completion_and_qemus_failure(fake_node: Any) -> None:
    fake = FakeMigration("completed", transferred=100)
    node = fake_node(fake, polls=2)
    migration.save_state(node.paths("f1"), _state(time.monotonic()))
    done = migration.poll(node, "f1")
    assert (done.status, done.total_time_ms, done.downtime_ms) == ("completed", 1234, 12)
    fake.status, fake.error = "failed", "Unable to write to socket: Broken pipe"
    failed = migration.poll(node, "f1")
    assert failed.status == "failed" and "Broken pipe" in (failed.error or "")
    assert "migrate_cancel" not in fake.commands


def test_poll_without_a_state_record_only_reports(fake_node: Any) -> None:
    fake = FakeMigration("active", transferred=10)
    node = fake_node(fake)
    assert migration.poll(node, "f1").status == "active"
    assert "migrate_cancel" not in fake.commands


# --- migrate() against a fake QMP: what it asks QEMU, and when ------------------------


SURVEY = ["query-migrate", "query-kvm", "query-migrate-capabilities",
          "query-migrate-parameters"]


class FakeSource:
    """The source QEMU's long-operation monitor for one whole :func:`migration.migrate`.

    ``migrate`` starts the migration: QEMU announces ``setup`` and ``active``
    at once and ``completed`` ``finish_after`` seconds later (or, while a
    question arrives, answers it first).  ``refuse``: the commands QEMU
    refuses, with its own words.
    """

    # What the instance of the fake_source fixture migrates with.
    SETTINGS = migration.Settings(100, 30, (), True)

    def __init__(self, finish_after: float = 0.02, refuse: tuple[str, ...] = (),
                 prepared: bool = False) -> None:
        self.finish_after = finish_after
        self.refuse = refuse
        self.prepared = prepared  # QEMU has the settings already
        self.status = "none"
        self.commands: list[str] = []

    def reply(self) -> dict[str, Any]:
        reply: dict[str, Any] = {"status": self.status}
        if self.status == "completed":
            reply.update({"total-time": 30, "downtime": 2})
        return reply

    def answer(self, peer: Peer, request: dict[str, Any]) -> None:
        command = request["execute"]
        self.commands.append(command)
        if command in self.refuse:
            peer.send({"error": {"class": "GenericError", "desc": f"{command}: no"},
                       "id": request["id"]})
        elif command == "query-migrate":
            peer.reply(request, self.reply())
        elif command == "query-kvm":
            peer.reply(request, {"enabled": True, "present": True})
        elif command == "query-migrate-capabilities":
            enabled = self.SETTINGS.capabilities() if self.prepared else []
            peer.reply(request, [{"capability": cap, "state": cap in enabled}
                                 for cap in ("xbzrle", "events", "auto-converge")])
        elif command == "query-migrate-parameters":
            peer.reply(request, self.SETTINGS.parameters() if self.prepared else
                       {"max-bandwidth": 134217728, "downtime-limit": 300})
        elif command == "query-status":
            peer.reply(request, {"status": "running", "running": True})
        elif command == "migrate_cancel":
            self.status = "cancelled"
            peer.reply(request, {})
        else:
            assert command in ("migrate-set-capabilities", "migrate-set-parameters",
                               "migrate"), command
            peer.reply(request, {})
            if command == "migrate":
                self.status = "active"
                for status in ("setup", "active"):
                    peer.send({"event": "MIGRATION", "data": {"status": status},
                               "timestamp": {"seconds": 0, "microseconds": 0}})

    def script(self, peer: Peer) -> None:
        peer.handshake()
        finish: float | None = None
        while True:
            if self.status == "active" and finish is None:
                finish = time.monotonic() + self.finish_after
            timeout = 5.0 if finish is None or self.status != "active" else \
                max(0.001, finish - time.monotonic())
            try:
                request = peer.recv(timeout=timeout)
            except TimeoutError:
                if self.status != "active":
                    raise
                self.status = "completed"
                peer.send({"event": "MIGRATION", "data": {"status": "completed"},
                           "timestamp": {"seconds": 0, "microseconds": 0}})
                continue
            except EOFError:
                return
            self.answer(peer, request)


@pytest.fixture
def fake_source(short_dir: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[
        Callable[[FakeSource], tuple[KvmNode, list[str]]]]:
    """Factory: a node whose instance ``f1`` "runs" with ``fake`` as its long-operation
    monitor; the source's end (SIGKILL, clean-up) is recorded, not done."""
    servers: list[FakeQmp] = []

    def make(fake: FakeSource) -> tuple[KvmNode, list[str]]:
        node = KvmNode(os.path.join(short_dir, "run"))
        node.ensure_dirs()
        record = types.SimpleNamespace(hvparams={"migration_bandwidth": 100},
                                       beparams={"memory": 128})
        monkeypatch.setattr(node, "running_pid", lambda name: 4242)
        monkeypatch.setattr(node, "load_record", lambda name: record)
        ended: list[str] = []
        monkeypatch.setattr(migration, "_end_source",
                            lambda node, mon, name, *args, **kwargs: ended.append(name))
        server = FakeQmp(node.paths("f1").qmp_long_socket, fake.script)
        server.release.set()
        servers.append(server)
        return node, ended

    yield make
    for server in servers:
        server.stop()


def test_migrate_asks_qemu_only_once_the_migration_ended(fake_source: Any) -> None:
    # QEMU announces setup and active at once, completed 20 ms later: a
    # question in between would only compete with the migration.
    fake = FakeSource(finish_after=0.02)
    node, ended = fake_source(fake)
    final = migration.migrate(node, "f1", "127.0.0.1", True)
    assert (final.status, final.total_time_ms, final.downtime_ms) == ("completed", 30, 2)
    assert fake.commands == [*SURVEY, "migrate-set-capabilities", "migrate-set-parameters",
                             "migrate", "query-migrate"]
    assert ended == ["f1"]


def test_migrate_starts_at_once_when_qemu_has_the_settings(fake_source: Any) -> None:
    # MigrationInfo set them ahead: nothing is set again before migrate.
    fake = FakeSource(prepared=True)
    node, ended = fake_source(fake)
    assert migration.migrate(node, "f1", "127.0.0.1", True).status == "completed"
    assert fake.commands == [*SURVEY, "migrate", "query-migrate"] and ended == ["f1"]


def _note(node: KvmNode, pid: int = 4242, tcg: bool = False,
          settings: migration.Settings = FakeSource.SETTINGS) -> None:
    migration_ready.save(node.paths("f1"), migration_ready.Prepared(
        pid, tcg, tuple(settings.capabilities()), settings.parameters()))


def test_a_migration_set_up_by_migration_info_starts_in_one_write(fake_source: Any) -> None:
    # The note says QEMU 4242 has these very settings: no survey, no settings.
    fake = FakeSource(prepared=True)
    node, ended = fake_source(fake)
    _note(node)
    assert migration.migrate(node, "f1", "127.0.0.1", True).status == "completed"
    assert fake.commands == ["query-migrate", "migrate", "query-migrate"] and ended == ["f1"]
    # Used up: a migration may escalate its parameters, so the next one asks
    # QEMU again (test_migrate_starts_at_once_when_qemu_has_the_settings).
    assert not os.path.exists(node.paths("f1").migration_prepared)


@pytest.mark.parametrize("note", [
    {"pid": 4243},  # another QEMU (the instance was restarted since)
    {"settings": migration.Settings(50, 30, (), True)},  # the bandwidth changed since
    {"tcg": True},  # a guest under TCG: its throttle may differ (see _throttle_is_safe)
])
def test_a_note_for_another_qemu_or_other_settings_is_not_trusted(
        fake_source: Any, monkeypatch: pytest.MonkeyPatch, note: dict[str, Any]) -> None:
    monkeypatch.setattr(migration, "_throttle_is_safe", lambda *args, **kwargs: not note.get(
        "tcg", False))
    fake = FakeSource(prepared=True)
    node, ended = fake_source(fake)
    _note(node, **note)
    assert migration.migrate(node, "f1", "127.0.0.1", True).status == "completed"
    assert fake.commands[:len(SURVEY)] == SURVEY and ended == ["f1"]
    assert not os.path.exists(node.paths("f1").migration_prepared)  # used up all the same


def test_a_noted_start_into_a_running_migration_leaves_it_alone(fake_source: Any) -> None:
    # Someone else's migration runs (not the library's: it would have used
    # the note up): QEMU refuses the second migrate, and nothing is cancelled.
    fake = FakeSource(finish_after=10.0, refuse=("migrate",), prepared=True)
    fake.status = "active"
    node, ended = fake_source(fake)
    _note(node)
    with pytest.raises(errors.MigrationError, match="already migrating"):
        migration.migrate(node, "f1", "127.0.0.1", True)
    assert fake.commands == ["query-migrate", "migrate"] and ended == []
    assert not os.path.exists(node.paths("f1").migration_state)


def test_a_noted_start_that_qemu_refuses_keeps_the_instance_running(
        fake_source: Any) -> None:
    fake = FakeSource(refuse=("migrate",), prepared=True)
    node, ended = fake_source(fake)
    _note(node)
    with pytest.raises(errors.MigrationError,
                       match="Cannot start migrating instance f1 .*migrate: no.*keeps running"):
        migration.migrate(node, "f1", "127.0.0.1", True)
    assert "migrate_cancel" not in fake.commands and ended == []
    assert not os.path.exists(node.paths("f1").migration_state)


def test_the_note_is_private_and_a_bad_one_is_ignored(short_dir: str) -> None:
    node = KvmNode(os.path.join(short_dir, "run"))
    node.ensure_dirs()
    paths = node.paths("n1")
    note = migration_ready.Prepared(7, True, ("events",), {"downtime-limit": 30})
    migration_ready.save(paths, note)
    assert stat.S_IMODE(os.stat(paths.migration_prepared).st_mode) == 0o600
    assert migration_ready.take(paths) == note
    assert migration_ready.take(paths) is None  # taken
    for bad in ('{"pid": "7", "tcg": true, "capabilities": [], "parameters": {}}',
                '{"pid": 7, "tcg": true, "capabilities": [], "parameters": {"a": true}}',
                "[1]", "{not json", "\xff"):
        with open(paths.migration_prepared, "w", encoding="utf-8") as handle:
            handle.write(bad)
        assert migration_ready.take(paths) is None
        assert not os.path.exists(paths.migration_prepared)
    assert paths.migration_prepared in paths.runtime_files()
    assert paths.migration_prepared in paths.control_files()


def test_configured_wants_every_capability_and_parameter() -> None:
    settings = migration.Settings(32, 30, ("postcopy-ram",), throttle=True)
    caps = frozenset(["events", "auto-converge", "postcopy-ram", "xbzrle"])
    status = MigrationStatus(status="none")
    ready = migration.Survey(status, False, caps, dict(settings.parameters(), extra=1))
    assert migration.configured(ready, settings)
    assert not migration.configured(ready._replace(enabled=caps - {"postcopy-ram"}), settings)
    escalated = dict(settings.parameters(), **{"max-cpu-throttle": 99})
    assert not migration.configured(ready._replace(parameters=escalated), settings)
    assert not migration.configured(migration.Survey(status, False), settings)


def test_migrate_still_asks_every_poll_interval(fake_source: Any) -> None:
    fake = FakeSource(finish_after=5 * migration.POLL_INTERVAL)
    node, ended = fake_source(fake)
    seen: list[MigrationStatus] = []
    final = migration.migrate(node, "f1", "127.0.0.1", True, progress=seen.append)
    assert final.status == "completed" and ended == ["f1"]
    assert seen and all(s.status == "active" for s in seen)
    assert fake.commands.count("query-migrate") == len(seen) + 2


def test_a_refused_capability_cancels_the_migration_qemu_began_anyway(
        fake_source: Any) -> None:
    # Capabilities, parameters and migrate go out in one write: QEMU starts
    # the migration even when it refused what came before.
    fake = FakeSource(finish_after=10.0, refuse=("migrate-set-capabilities",))
    node, ended = fake_source(fake)
    with pytest.raises(errors.MigrationError,
                       match="Cannot start migrating instance f1 .*migrate-set-capabilities: "
                       "no.*keeps running"):
        migration.migrate(node, "f1", "127.0.0.1", True)
    after = fake.commands[fake.commands.index("migrate") + 1:]
    assert after.count("migrate_cancel") == 1 and after[-1] == "query-status", after
    assert "cont" not in fake.commands and ended == []
    assert not os.path.exists(node.paths("f1").migration_state)


def test_a_source_that_outlives_sigkill_keeps_its_pidfile_and_record(
        short_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The control files go while the kernel tears the process down; the
    # pidfile and the record only once it is gone, so a QEMU stuck in the
    # kernel stays listed.  Here the exit is never seen (a stand-in process).
    node = KvmNode(os.path.join(short_dir, "run"))
    node.ensure_dirs()
    paths = node.paths("f2")
    for path in [paths.pidfile, paths.runtime_file, *paths.control_files()]:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write("x")
    stand_in = subprocess.Popen(["sleep", "60"])
    try:
        pidfd = os.pidfd_open(stand_in.pid)
        monkeypatch.setattr(migration, "_wait_exit", lambda *args: False)
        monkeypatch.setattr(migration.process, "terminate", lambda pid: False)
        with pytest.raises(errors.MigrationError, match="survived SIGKILL; its files are kept"):
            migration._end_source(node, None, "f2", paths,  # type: ignore[arg-type]
                                  completed=True,
                                  source=migration._Source(stand_in.pid, pidfd))
        os.close(pidfd)
    finally:
        stand_in.kill()
        stand_in.wait()
    assert os.path.exists(paths.pidfile) and os.path.exists(paths.runtime_file)
    assert not any(os.path.exists(path) for path in paths.control_files())


def test_the_source_end_spares_a_process_that_is_not_the_instances_qemu(
        short_dir: str) -> None:
    # The pidfd taken during the migration must name the instance's QEMU:
    # a PID that now belongs to another process (here: this test) gives none.
    node = KvmNode(os.path.join(short_dir, "run"))
    node.ensure_dirs()
    with migration._source_process(os.getpid(), node.paths("f1")) as source:
        assert source is None


def test_the_state_record_is_private_and_a_corrupt_one_is_ignored(short_dir: str) -> None:
    node = KvmNode(os.path.join(short_dir, "run"))
    node.ensure_dirs()
    paths = node.paths("s1")
    state = _state(5.0)
    migration.save_state(paths, state)
    assert stat.S_IMODE(os.stat(paths.migration_state).st_mode) == 0o600
    assert migration.load_state(paths) == state
    with open(paths.migration_state, "w", encoding="utf-8") as handle:
        handle.write('{"version": 1, "target": 7}')
    assert migration.load_state(paths) is None
    with open(paths.migration_state, "w", encoding="utf-8") as handle:
        handle.write("{not json")
    assert migration.load_state(paths) is None
    assert paths.migration_state in paths.runtime_files()


def test_poll_of_an_instance_not_running_names_it(short_dir: str) -> None:
    node = KvmNode(os.path.join(short_dir, "run"))
    with pytest.raises(errors.InstanceNotRunning, match="n1"):
        migration.poll(node, "n1")


# --- real QEMU -----------------------------------------------------------------------


def bare_instance(name: str, qemu_bin: str, port: int, memory: int = 128,
                  **overrides: Any) -> Any:
    """A guest-less instance (no kernel, no disk: it sits in the BIOS)."""
    hvp = dict(c.HVC_DEFAULTS[c.HT_KVM])
    hvp.update(kvm_path=qemu_bin, kernel_path="", root_path="", kvm_flag="disabled",
               serial_console=False, migration_port=port, migration_bandwidth=1000)
    hvp.update(overrides)
    return make_instance(name, hvp, memory=memory)


def poll_until_done(node: KvmNode, name: str) -> MigrationStatus:
    deadline = time.monotonic() + POLL_BOUND
    while True:
        status = migration.poll(node, name)
        if status.status not in migration.ONGOING:
            return status
        assert time.monotonic() < deadline, f"the migration is still {status.status}"
        time.sleep(0.05)


@pytest.fixture
def sink() -> Iterator[int]:
    """A port that takes a migration's connection and never reads a byte."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        yield listener.getsockname()[1]


def test_start_poll_finish_moves_the_instance(nodes: tuple[KVMHypervisor, KVMHypervisor],
                                              qemu_bin: str) -> None:
    source, target = nodes
    inst = bare_instance("st1", qemu_bin, free_port())
    source.StartInstance(inst, [], startup_paused=False)
    info = source.MigrationInfo(inst)
    # MigrationInfo set the migration up ahead on the source's QEMU.
    parameters = source.node.qmp("st1", "query-migrate-parameters")
    assert parameters["max-bandwidth"] == parameters["max-postcopy-bandwidth"] == 1000 * 2**20
    assert parameters["max-cpu-throttle"] == migration.THROTTLE_HOLD
    enabled = {cap["capability"] for cap in source.node.qmp("st1", "query-migrate-capabilities")
               if cap["state"]}
    assert "events" in enabled
    target.AcceptInstance(inst, info, "127.0.0.1")
    paths = source.node.paths("st1")
    state = migration.start(source.node, "st1", "127.0.0.1", live=True)
    with open(paths.migration_state, encoding="utf-8") as handle:
        saved = json.load(handle)
    assert stat.S_IMODE(os.stat(paths.migration_state).st_mode) == 0o600
    assert saved["target"] == "127.0.0.1" and saved["live"] is True
    assert saved["paused_by_us"] is False and saved["deadline"] == state.deadline
    assert saved["deadline"] - saved["started"] == pytest.approx(migration.MIN_TIME_LIMIT)
    final = poll_until_done(source.node, "st1")
    assert final.status == "completed" and final.transferred > 0
    assert source.ListInstances() == ["st1"]  # the stale source waits for the verdict
    migration.finish_source(source.node, "st1", success=True)
    target.FinalizeMigration(inst, info, True)
    assert source.ListInstances() == [] and target.ListInstances() == ["st1"]
    assert not os.path.exists(paths.migration_state)
    assert not os.path.exists(paths.runtime_file)
    assert target.node.qmp("st1", "query-status")["status"] == "running"


def test_a_migration_set_up_ahead_starts_without_asking_and_a_poll_waits_for_its_end(
        nodes: tuple[KVMHypervisor, KVMHypervisor], qemu_bin: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    source, target = nodes
    inst = bare_instance("st6", qemu_bin, free_port())
    source.StartInstance(inst, [], startup_paused=False)
    info = source.MigrationInfo(inst)
    paths = source.node.paths("st6")
    with open(paths.migration_prepared, encoding="utf-8") as handle:
        note = json.load(handle)
    assert note["pid"] == source.node.running_pid("st6") and note["tcg"] is True
    assert stat.S_IMODE(os.stat(paths.migration_prepared).st_mode) == 0o600
    target.AcceptInstance(inst, info, "127.0.0.1")

    def survey(self: Any) -> None:
        raise AssertionError("the migration asked QEMU what MigrationInfo had set up")

    monkeypatch.setattr(migration._QmpMonitor, "survey", survey)
    migration.start(source.node, "st6", "127.0.0.1", live=True)
    assert not os.path.exists(paths.migration_prepared)
    # One poll that waits sees the end (a guest-less VM moves in well under a second).
    final = migration.poll(source.node, "st6", wait=POLL_BOUND)
    assert final.status == "completed" and final.total_time_ms
    assert source.node.qmp("st6", "query-migrate-parameters")["max-bandwidth"] == 1000 * 2**20
    migration.finish_source(source.node, "st6", success=True)
    target.FinalizeMigration(inst, info, True)
    assert source.ListInstances() == [] and target.ListInstances() == ["st6"]
    assert not os.listdir(source.node.layout.ctrl_dir)  # sockets gone with it


def test_a_waiting_poll_answers_at_its_bound_while_the_migration_goes_on(
        hv: KVMHypervisor, qemu_bin: str, sink: int) -> None:
    inst = bare_instance("st7", qemu_bin, sink, memory=4096)
    hv.StartInstance(inst, [], startup_paused=False)
    migration.start(hv.node, "st7", "127.0.0.1", live=True)
    began = time.monotonic()
    assert migration.poll(hv.node, "st7", wait=0.3).status in migration.ONGOING
    assert time.monotonic() - began >= 0.3  # it watched, not just asked
    # While a poll watches, the instance's short monitor stays free for listings.
    seen: list[str] = []
    watcher = threading.Thread(
        target=lambda: seen.append(migration.poll(hv.node, "st7", wait=3.0).status))
    watcher.start()
    try:
        time.sleep(0.2)
        assert hv.node.qmp("st7", "query-status")["status"] == "running"
        assert hv.ListInstances() == ["st7"]
        assert watcher.is_alive()  # answered while the watch went on
    finally:
        watcher.join(timeout=30)
    assert seen and seen[0] in migration.ONGOING
    with pytest.raises(errors.MigrationError, match="seconds from 0 up"):
        migration.poll(hv.node, "st7", wait=-1)
    migration.cancel(hv.node, "st7")
    migration.finish_source(hv.node, "st7", success=False)
    assert hv.node.qmp("st7", "query-status")["status"] == "running"


def test_a_cancelled_non_live_migration_lets_the_source_run_on(
        hv: KVMHypervisor, qemu_bin: str, sink: int) -> None:
    # Untouched RAM still costs a few bytes a page on the wire: 4 GiB make a
    # stream larger than the socket buffers, so it never ends by itself.
    inst = bare_instance("st2", qemu_bin, sink, memory=4096)
    hv.StartInstance(inst, [], startup_paused=False)
    state = migration.start(hv.node, "st2", "127.0.0.1", live=False)
    assert state.paused_by_us and not state.live
    assert hv.node.qmp("st2", "query-status")["status"] in ("paused", "finish-migrate")
    assert migration.poll(hv.node, "st2").status in migration.ONGOING
    with pytest.raises(errors.MigrationError, match="already migrating"):
        migration.start(hv.node, "st2", "127.0.0.1", live=True)
    migration.cancel(hv.node, "st2")
    assert migration.poll(hv.node, "st2").status == "cancelled"
    migration.finish_source(hv.node, "st2", success=False)
    assert hv.node.qmp("st2", "query-status")["status"] == "running"
    assert not os.path.exists(hv.node.paths("st2").migration_state)
    with pytest.raises(errors.MigrationError, match="not completed"):
        migration.finish_source(hv.node, "st2", success=True)
    assert hv.ListInstances() == ["st2"]


def test_another_process_polls_and_enforces_the_time_limit(
        hv: KVMHypervisor, qemu_bin: str, sink: int) -> None:
    inst = bare_instance("st3", qemu_bin, sink, memory=4096)
    hv.StartInstance(inst, [], startup_paused=False)
    migration.start(hv.node, "st3", "127.0.0.1", live=True, limit=1.0)
    other = KvmNode(hv.node.layout.root)  # what another daemon process sees
    final = poll_until_done(other, "st3")
    assert final.status == "failed" and "time limit of 1 s" in (final.error or "")
    assert hv.node.qmp("st3", "query-migrate")["status"] == "cancelled"
    seen_here = migration.poll(hv.node, "st3")
    assert (seen_here.status, seen_here.error) == ("failed", final.error)
    migration.finish_source(hv.node, "st3", success=False)
    assert hv.node.qmp("st3", "query-status")["status"] == "running"
    assert not os.path.exists(hv.node.paths("st3").migration_state)


def test_a_forced_stop_removes_the_migration_state(hv: KVMHypervisor, qemu_bin: str,
                                                   sink: int) -> None:
    inst = bare_instance("st4", qemu_bin, sink, memory=4096)
    hv.StartInstance(inst, [], startup_paused=False)
    migration.start(hv.node, "st4", "127.0.0.1", live=True)
    assert os.path.exists(hv.node.paths("st4").migration_state)
    hv.StopInstance(inst, force=True)
    assert hv.ListInstances() == []
    assert not os.path.exists(hv.node.paths("st4").migration_state)


def test_the_steps_over_the_human_monitor_of_a_2011_qemu(
        hv: KVMHypervisor, qemu_bin: str, sink: int, short_dir: str) -> None:
    hv.node.ensure_dirs()
    root = hv.node.layout.root
    hvp = legacy2011.hvparams_2011(kernel_path="", root_path="", kvm_flag="disabled",
                                   serial_console=False, vnc_bind_address=short_dir,
                                   migration_port=sink, migration_bandwidth=1000)
    cmd = legacy2011.kvm_cmd_2011(qemu_bin, root, "old1", hvp, 4096, 1, [])
    with open(hv.node.paths("old1").runtime_file, "w", encoding="utf-8") as handle:
        handle.write(legacy2011.record_2011(cmd, [], hvp))
    argv = [str(a) for a in cmd] + ["-net", "none"]
    flag = argv.index("-disable-kvm")
    argv[flag:flag + 1] = ["-machine", "accel=tcg"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert hv.node.human_monitor_only(hv.node.paths("old1"))
    migration.start(hv.node, "old1", "127.0.0.1", live=False, limit=1.0)
    assert hv.node.run_state("old1") == "paused"
    final = poll_until_done(KvmNode(root), "old1")
    assert final.status == "failed" and "time limit of 1 s" in (final.error or "")
    migration.finish_source(hv.node, "old1", success=False)
    assert hv.node.run_state("old1") == "running"
    assert not os.path.exists(hv.node.paths("old1").migration_state)


@pytest.mark.parametrize("limit, stall", [(0, 30.0), (-5.0, 30.0), (None, 0),
                                          (float("nan"), 30.0), (None, True)])
def test_a_bad_time_limit_or_stall_timeout_is_refused_up_front(
        short_dir: str, limit: Any, stall: Any) -> None:
    node = KvmNode(os.path.join(short_dir, "run"))
    with pytest.raises(errors.MigrationError, match="instance b1: its (time limit|stall)"):
        migration.start(node, "b1", "127.0.0.1", True, limit=limit, stall_timeout=stall)
    with pytest.raises(errors.MigrationError, match="nothing was started"):
        migration.migrate(node, "b1", "127.0.0.1", True, limit=limit, stall_timeout=stall)
