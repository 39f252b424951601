"""Live and non-live migration between two run directories (two nodes) on loopback."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from ganeti_kvm import errors
from ganeti_kvm.core import migration
from ganeti_kvm.host import process
from ganeti_kvm.hv_kvm import KVMHypervisor
from tests.helpers import SerialReader, free_port, guest_hvparams, make_instance


def start_counting(hv: KVMHypervisor, inst, paused: bool = False) -> SerialReader:
    hv.StartInstance(inst, [], startup_paused=paused)
    serial = SerialReader(hv.node.paths(inst.name).serial_socket)
    if not paused:
        serial.read_until(r"COUNTER 3\b")
    return serial


def assert_counter_continues(serial_text_before: list[int], hv: KVMHypervisor, name: str,
                             first_line: str) -> None:
    reader = SerialReader(hv.node.paths(name).serial_socket)
    reader.read_until(r"COUNTER \d+\s+COUNTER \d+", timeout=30)
    after = reader.counters()
    assert after[0] >= serial_text_before[-1], (serial_text_before[-5:], after[:5])
    assert after == sorted(after)
    assert first_line not in reader.text  # continued, not rebooted
    reader.close()


@pytest.mark.parametrize("live", [True, False], ids=["live", "non-live"])
def test_migration_keeps_the_guest_running(nodes, qemu_bin, guest, live) -> None:
    source, target = nodes
    inst = make_instance("mig1", guest_hvparams(qemu_bin, guest, migration_port=free_port(),
                                                migration_bandwidth=1000))
    serial = start_counting(source, inst)
    info = source.MigrationInfo(inst)
    target.AcceptInstance(inst, info, "127.0.0.1")
    assert target.node.qmp("mig1", "query-status")["status"] == "inmigrate"
    source_pid = source.GetInstanceInfo("mig1")[1]
    serial.read_until(r"COUNTER \d+")
    before = serial.counters()
    started = time.monotonic()
    source.MigrateInstance(inst, "127.0.0.1", live)
    elapsed = time.monotonic() - started
    target.FinalizeMigration(inst, info, True)
    serial.close()
    assert not process.is_alive(source_pid)
    assert source.ListInstances() == [] and target.ListInstances() == ["mig1"]
    assert not os.path.exists(source.node.paths("mig1").runtime_file)
    assert target.node.qmp("mig1", "query-status")["status"] == "running"
    assert_counter_continues(before, target, "mig1", guest.first_line)
    assert elapsed < 60


def test_paused_instance_stays_paused_on_the_target(nodes, qemu_bin, guest) -> None:
    source, target = nodes
    inst = make_instance("mig2", guest_hvparams(qemu_bin, guest, migration_port=free_port(),
                                                migration_bandwidth=1000))
    source.StartInstance(inst, [], startup_paused=True)
    info = source.MigrationInfo(inst)
    target.AcceptInstance(inst, info, "127.0.0.1")
    source.MigrateInstance(inst, "127.0.0.1", True)
    target.FinalizeMigration(inst, info, True)
    assert target.node.qmp("mig2", "query-status")["status"] == "prelaunch"
    assert target.GetInstanceInfo("mig2")[4] == "paused"


def test_nothing_listening_on_the_target(nodes, qemu_bin, guest) -> None:
    source, _ = nodes
    inst = make_instance("mig3", guest_hvparams(qemu_bin, guest, migration_port=free_port()))
    serial = start_counting(source, inst)
    with pytest.raises(errors.MigrationError, match="keeps running") as info:
        source.MigrateInstance(inst, "127.0.0.1", True)
    assert "mig3" in str(info.value)
    count = len(serial.counters())
    serial.read_until(rf"COUNTER {serial.counters()[-1] + 2}\b")
    assert len(serial.counters()) > count
    assert source.ListInstances() == ["mig3"]
    assert source.node.qmp("mig3", "query-status")["status"] == "running"


@pytest.mark.parametrize("live", [True, False], ids=["live", "non-live"])
def test_target_killed_mid_migration(nodes, qemu_bin, guest, live) -> None:
    source, target = nodes
    inst = make_instance("mig4", guest_hvparams(qemu_bin, guest, migration_port=free_port(),
                                                migration_bandwidth=1))
    serial = start_counting(source, inst)
    info = source.MigrationInfo(inst)
    target.AcceptInstance(inst, info, "127.0.0.1")
    target_pid = target.GetInstanceInfo("mig4")[1]
    killer = threading.Timer(1.5, os.kill, (target_pid, signal.SIGKILL))
    killer.start()
    try:
        with pytest.raises(errors.MigrationError, match="failed|no progress|keeps running"):
            source.MigrateInstance(inst, "127.0.0.1", live)
    finally:
        killer.cancel()
    target.FinalizeMigration(inst, info, False)
    assert target.ListInstances() == []
    assert not os.path.exists(target.node.paths("mig4").runtime_file)
    assert source.node.qmp("mig4", "query-status")["status"] == "running"
    last = serial.counters()[-1]
    serial.read_until(rf"COUNTER {last + 2}\b", timeout=30)


def test_time_limit_too_short(nodes, qemu_bin, guest) -> None:
    source, target = nodes
    inst = make_instance("mig5", guest_hvparams(qemu_bin, guest, migration_port=free_port(),
                                                migration_bandwidth=1))
    serial = start_counting(source, inst)
    info = source.MigrationInfo(inst)
    target.AcceptInstance(inst, info, "127.0.0.1")
    with pytest.raises(errors.MigrationError, match="time limit of 1 s"):
        source.MigrateInstance(inst, "127.0.0.1", True, timeout=1.0)
    target.FinalizeMigration(inst, info, False)
    assert target.ListInstances() == [] and source.ListInstances() == ["mig5"]
    status = source.GetMigrationStatus(inst)
    assert status["status"] == "cancelled"
    last = serial.counters()[-1]
    serial.read_until(rf"COUNTER {last + 2}\b", timeout=30)


def test_migration_status_reports_progress(nodes, qemu_bin, guest) -> None:
    source, target = nodes
    inst = make_instance("mig6", guest_hvparams(qemu_bin, guest, migration_port=free_port(),
                                                migration_bandwidth=8))
    start_counting(source, inst)
    info = source.MigrationInfo(inst)
    target.AcceptInstance(inst, info, "127.0.0.1")
    seen: list[migration.MigrationStatus] = []
    final = migration.migrate(source.node, "mig6", "127.0.0.1", True, progress=seen.append)
    target.FinalizeMigration(inst, info, True)
    assert final.status == "completed" and (final.total_time_ms or 0) > 0
    assert final.transferred > 0
    assert seen and seen[0].status in ("setup", "active")
    active = [s for s in seen if s.status == "active"]
    assert active and active[-1].total > 0 and active[-1].transferred > 0
    assert target.ListInstances() == ["mig6"]
