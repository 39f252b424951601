"""A guest that dirties its RAM faster than the link carries it still moves (issue 15).

The dirtying guest of the bench (bench/sidebyside.py): 256 MiB, rewriting
a 160 MiB tmpfs file with non-zero 4 MiB blocks in a loop, migrated at
32 MiB/s with a 30 ms downtime limit.  Plain pre-copy never finishes it;
the library throttles it (auto-converge) until it converges, except on a QEMU
that corrupts throttled TCG guests (7.2), where the guest is not throttled
and a short time limit cancels the migration with the guest intact.  One test per
QEMU; each takes up to a minute (the library's own time limit for 256 MiB
at 32 MiB/s), and completing within it is what the test asks.
"""

from __future__ import annotations

import re
import select
import threading
from typing import Any

import pytest

from ganeti_kvm import errors
from ganeti_kvm.core import migration
from ganeti_kvm.hv_kvm import KVMHypervisor
from ganeti_kvm.qemu import caps as qemu_caps
from ganeti_kvm.qmp.client import QmpClient
from tests.guestimage import dirtying_command
from tests.helpers import SerialReader, free_port, guest_hvparams, make_instance

DIRTY_MEMORY, DIRTY_MIB, BANDWIDTH, DOWNTIME = 256, 160, 32, 30
MIB = 2**20


class Drain:
    """Reads a serial port in a thread, so that the guest never waits on it."""

    def __init__(self, reader: SerialReader) -> None:
        self.reader = reader
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        sock = self.reader.sock
        while not self.stop.is_set():
            ready, _, _ = select.select([sock], [], [], 0.2)
            if not ready:
                continue
            try:
                data = sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            self.reader.text += data.decode("utf-8", "replace").replace("\r", "")

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        self.reader.close()


def complete_counters(text: str) -> list[int]:
    """The counters of the complete lines of ``text`` (the last may be cut short)."""
    return [int(n) for n in re.findall(r"COUNTER (\d+)\n", text)]


def start_dirtying(hv: KVMHypervisor, inst: Any) -> SerialReader:
    """Boot the guest and start its dirtying loop; returns once it has done two passes."""
    hv.StartInstance(inst, [])
    serial = SerialReader(hv.node.paths(inst.name).serial_socket)
    serial.read_until(r"/ # ", timeout=180)
    serial.send(dirtying_command(DIRTY_MIB))
    serial.read_until(r"PASS 2\b|DIRTY FAILED", timeout=180)
    assert "DIRTY FAILED" not in serial.text
    return serial


def report(qemu_bin: str, final: migration.MigrationStatus,
           seen: list[migration.MigrationStatus]) -> list[str]:
    """Print the figures (``pytest -s`` shows them) and return the steps taken."""
    for before, now in zip([None, *seen], seen, strict=False):
        if before is None or (before.dirty_syncs, before.step) != (now.dirty_syncs, now.step):
            print(f"  pass {now.dirty_syncs}: throttle {now.throttle_percent}%, step "
                  f"{now.step}, dirtying {now.dirty_rate / MIB:.0f} MiB/s, link "
                  f"{now.link_rate / MIB:.0f} MiB/s, {now.remaining / MIB:.0f} MiB left")
    steps = sorted({s.step for s in seen if s.step})
    print(f"QEMU {qemu_bin}: {final.status} in {final.total_time_ms} ms, downtime "
          f"{final.downtime_ms} ms (limit {DOWNTIME} ms), "
          f"{max(s.dirty_syncs for s in seen)} passes, steps {steps}, throttle at most "
          f"{max(s.throttle_percent for s in seen)}%")
    return steps


def migrate_dirtying(nodes: tuple[KVMHypervisor, KVMHypervisor], qemu_bin: str, guest: Any,
                     **hvparams: Any) -> list[str]:
    """Migrate the dirtying guest; check it completed and goes on; returns the steps."""
    source, target = nodes
    inst = make_instance("dirty", guest_hvparams(
        qemu_bin, guest, migration_port=free_port(), migration_bandwidth=BANDWIDTH,
        migration_downtime=DOWNTIME, **hvparams), memory=DIRTY_MEMORY)
    drain = Drain(start_dirtying(source, inst))
    info = source.MigrationInfo(inst)
    target.AcceptInstance(inst, info, "127.0.0.1")
    seen: list[migration.MigrationStatus] = []
    # The guest's own downtime, outside the library and QEMU's report: from
    # the source's STOP to the target's RESUME (one host, one clock).  The
    # migration runs on the source's long-operation monitor and
    # FinalizeMigration on the target's short one; these watch the others.
    with QmpClient(source.node.paths("dirty").qmp_socket) as source_qmp, \
            QmpClient(target.node.paths("dirty").qmp_long_socket) as target_qmp:
        source_qmp.connect()
        target_qmp.connect()
        try:
            final = migration.migrate(source.node, "dirty", "127.0.0.1", True,
                                      progress=seen.append)
        finally:
            drain.close()
        target.FinalizeMigration(inst, info, True)
        stopped = source_qmp.wait_event(["STOP"], timeout=5)
        resumed = target_qmp.wait_event(["RESUME"], timeout=5)
    assert stopped is not None and resumed is not None
    stop_at, resume_at = migration.event_time(stopped), migration.event_time(resumed)
    assert stop_at is not None and resume_at is not None
    gap_ms = (resume_at - stop_at) * 1000
    print(f"  the guest stood still {gap_ms:.1f} ms (source STOP to target RESUME); "
          f"QEMU reported {final.raw.get('downtime') if final.raw else None} ms, the "
          f"library {final.downtime_ms} ms")
    steps = report(qemu_bin, final, seen)
    # The library's figure (QEMU's, or its events' where QEMU measured the
    # whole post-copy phase) is at most what the guest saw, plus rounding.
    assert final.downtime_ms is not None and final.downtime_ms <= gap_ms + 1
    source_text = drain.reader.text
    assert "BUG" not in source_text and "panic" not in source_text, (
        "the guest crashed on the source", source_text[-3000:])
    assert final.status == "completed"
    assert final.downtime_ms is not None and final.downtime_ms <= 3 * DOWNTIME
    # The guest goes on over there: its counter and its dirtying loop continue.
    last_pass = int(drain.reader.text.rsplit("PASS ", 1)[1].split()[0])
    moved = SerialReader(target.node.paths("dirty").serial_socket)
    try:
        # Any later pass: the guest ran on the target from the switch to
        # post-copy, so passes printed before this reader attached are gone.
        moved.read_until(r"PASS \d+\r?\n|Kernel panic|BUG", timeout=60)
        passes = [int(n) for n in re.findall(r"PASS (\d+)\r?\n", moved.text)]
        assert passes and passes[-1] > last_pass, (last_pass, moved.text[-3000:])
        moved.read_until(r"COUNTER \d+\s+COUNTER \d+", timeout=30)
    finally:
        moved.close()
    assert guest.first_line not in moved.text, moved.text[-3000:]  # continued, not rebooted
    assert "BUG" not in moved.text and "panic" not in moved.text, moved.text[-3000:]
    before, after = complete_counters(source_text), complete_counters(moved.text)
    assert after and before and after[0] >= before[-1] and after == sorted(after)
    GUEST_GAPS[qemu_bin] = gap_ms
    return steps


# The guest's own downtime (source STOP to target RESUME), in milliseconds,
# of the last migrate_dirtying per QEMU binary.
GUEST_GAPS: dict[str, float] = {}


def test_a_guest_dirtying_faster_than_the_link_is_throttled_until_it_moves(
        nodes: tuple[KVMHypervisor, KVMHypervisor], qemu_bin: str, guest: Any) -> None:
    if not qemu_caps.probe(qemu_bin).throttles_tcg_guests_safely:
        not_throttled_and_cancelled(nodes, qemu_bin, guest)
        return
    steps = migrate_dirtying(nodes, qemu_bin, guest)
    # The guest outran the link, so the library had to escalate.
    assert any(step.startswith(migration.STEP_THROTTLE) for step in steps), steps
    assert migration.STEP_POSTCOPY not in steps


def not_throttled_and_cancelled(nodes: tuple[KVMHypervisor, KVMHypervisor], qemu_bin: str,
                                guest: Any) -> None:
    """On a QEMU that corrupts throttled TCG guests (7.2) nothing is throttled.

    Without post-copy nothing else can make the guest converge: the time
    limit (short here) cancels the migration and the guest runs on, intact,
    on the source.
    """
    source, target = nodes
    inst = make_instance("dirty", guest_hvparams(
        qemu_bin, guest, migration_port=free_port(), migration_bandwidth=BANDWIDTH,
        migration_downtime=DOWNTIME), memory=DIRTY_MEMORY)
    drain = Drain(start_dirtying(source, inst))
    info = source.MigrationInfo(inst)
    target.AcceptInstance(inst, info, "127.0.0.1")
    seen: list[migration.MigrationStatus] = []
    try:
        with pytest.raises(errors.MigrationError, match="time limit"):
            migration.migrate(source.node, "dirty", "127.0.0.1", True, limit=15,
                              progress=seen.append)
    finally:
        target.FinalizeMigration(inst, info, False)
        last_pass = int(drain.reader.text.rsplit("PASS ", 1)[1].split()[0])
        drain.close()
    assert seen and all(s.throttle_percent == 0 for s in seen)
    assert not any((s.step or "").startswith(migration.STEP_THROTTLE) for s in seen)
    assert target.ListInstances() == [] and source.ListInstances() == ["dirty"]
    assert source.node.qmp("dirty", "query-status")["status"] == "running"
    again = SerialReader(source.node.paths("dirty").serial_socket)
    try:
        # Output while no reader was attached is not kept: any later pass will do.
        again.read_until(r"PASS \d+\n(?:.|\n)*PASS \d+\n|Kernel panic|BUG", timeout=60)
    finally:
        again.close()
    assert "BUG" not in again.text and "panic" not in again.text, again.text[-3000:]
    passes = [int(n) for n in re.findall(r"PASS (\d+)\n", again.text)]
    assert passes and min(passes) > last_pass and passes == sorted(passes), again.text[-3000:]


def test_with_postcopy_ram_it_switches_to_post_copy(
        nodes: tuple[KVMHypervisor, KVMHypervisor], qemu_bin: str, guest: Any) -> None:
    steps = migrate_dirtying(nodes, qemu_bin, guest, migration_caps="postcopy-ram")
    assert migration.STEP_POSTCOPY in steps, steps
    # The guest itself stood still no longer than that: the target runs it
    # from the switch (a target waiting paused until FinalizeMigration kept it
    # still through the whole post-copy phase, 5.1 s here, while QEMU
    # reported 1 ms).
    assert GUEST_GAPS[qemu_bin] <= 3 * DOWNTIME
