"""Ours side by side with Ganeti 3.0's bundled KVM driver (issue 15, point 3).

Both drivers run in the same bench/peer.py worker (one per node, see
bench/peer.py and bench/peer_client.py), get the same Ganeti instance
objects and are called through Ganeti 3's contract, ours through
:mod:`ganeti_kvm.ganeti3`.  Each figure is the median of samples taken in
turn, ours then the peer's then ours... (the order flipped every round), so
that the machine's drift hits both alike.  Guests run under TCG on QEMU 7.2,
the QEMU Ganeti 3.0 ships with (the dirtying guest also on QEMU 10.0, ours
only).  The migration rows are taken on a quiet machine and with every CPU
kept busy by another process (:func:`busy_cpus`), in the same rounds.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from bench.common import QEMU_10, QEMU_72, TABLE_PEER, ms, qemu_label, row
from bench.peer_client import PeerNode, wait_all
from ganeti_kvm.core import migration
from tests.guestimage import dirtying_command
from tests.helpers import free_port

DRIVERS = ("ours", "peer")
# How each migration is driven: ours in one call of the library, ours as
# Ganeti's master drives it, and the peer (only as the master drives it).
MODES = {"ours": ("ours", False), "ours-master": ("ours", True), "peer": ("peer", True)}
TARGET_CALL = "ours ≤ Ganeti 3.0"
# The dirtying guest (issue 15): it rewrites 160 MiB of its 256 MiB in a loop,
# migrated at 32 MiB/s with a 30 ms downtime limit.
DIRTY_MEMORY, DIRTY_MIB, DIRTY_BANDWIDTH, DIRTY_DOWNTIME = 256, 160, 32, 30
# Both drivers get the same hvparams: post-copy allowed (Ganeti 3.0 enables
# the capability on both ends too, but never switches to post-copy).
DIRTY_CAPS = "postcopy-ram"
# The neighbour that keeps the CPUs busy: one busy loop per CPU, pinned to
# it, at the default nice value (as demanding as any other work on a node).
BUSY_LOOP = "import os, sys\nos.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True:\n    pass\n"
QUIET, BUSY = "quiet", "busy"
# A whole line: the serial port delivers a few bytes at a time, and "PASS 1"
# may be the first part of "PASS 17".
PASS_LINE = r"PASS \d+\r?\n"


TABLE_PEER.notes += [
    "Both drivers run in one worker process per node, under Debian's /usr/bin/python3 "
    "in a private mount namespace (tmpfs over /run, /var/lib/ganeti, /var/log/ganeti), "
    "with the same Ganeti `objects.Instance`; ours through `ganeti_kvm.ganeti3`. "
    "Each call builds a fresh driver object, as Ganeti's node daemon does.",
    "The workers are child subreapers (`prctl(PR_SET_CHILD_SUBREAPER)`) that reap "
    "exited QEMUs at once, as systemd reaps a node daemon's orphans: this machine's "
    "PID 1 reaps lazily, and Ganeti's `KillProcess` counts a zombie as alive.",
    "Samples of ours and the peer's are taken in turn; QEMU 7.2 under TCG. "
    "Migration is driven two ways. As Ganeti's master drives it (both drivers): "
    "`MigrateInstance`, then `GetMigrationStatus`, sleeping a second after each "
    "`active` (Ganeti 3.0's driver itself waits 2 s more when QEMU is in a state it does "
    "not know, such as `setup`; ours answers when the migration ends or after 5 s), then "
    "`FinalizeMigrationSource`; QEMU's total-time and downtime are read from the source "
    "monitor in between, untimed. In one call (ours only): the library's own `migrate`, "
    "woken by QEMU's events. Ours sets the migration's capabilities and parameters in "
    "`MigrationInfo` (untimed, called before `AcceptInstance`), so that its timed call "
    "starts the migration in one write; Ganeti 3.0 sets them in its timed "
    "`MigrateInstance`.",
    "Rows marked \"every CPU kept busy\": in the same rounds as the quiet ones, the "
    "bench starts one busy loop per CPU (pinned to it, nice 0) before the "
    "migrations of the round and kills them by PID after. The dirtying guest has "
    "`migration_caps` postcopy-ram for both drivers (Ganeti 3.0 switches to post-copy "
    "after QEMU's second pass over the RAM); on QEMU 10.0 only ours runs.",
    "\"Start to source gone\" ends when the source QEMU process no longer exists: Ganeti "
    "releases the disks on the source right after FinalizeMigrationSource (DRBD "
    "secondary, RBD unmap), which needs QEMU's file descriptors closed, and the kernel "
    "closes them only after it has taken the process's memory apart. On this machine "
    "(a paravirtualised guest itself) that teardown costs about 65 µs per MiB of a "
    "process's small pages: 3-4 ms for a TCG QEMU, 2 ms even for `qemu -machine none`, "
    "13 ms for a Python holding 200 MiB. The rows \"the kernel's teardown\" give it as "
    "the library measures it (SIGKILL until its pidfd reports the exit) and the wall "
    "without it.",
]


@contextlib.contextmanager
def busy_cpus() -> Iterator[list[int]]:
    """Keep every CPU of this machine busy while the block runs; the busy loops'
    PIDs.  Each loop is pinned to its CPU at the default nice value, started
    here and killed by its PID at the end."""
    loops: list[subprocess.Popen[bytes]] = []
    try:
        for cpu in sorted(os.sched_getaffinity(0)):
            loops.append(subprocess.Popen([sys.executable, "-c", BUSY_LOOP, str(cpu)],
                                          stdin=subprocess.DEVNULL))
        yield [loop.pid for loop in loops]
    finally:
        for loop in loops:
            loop.kill()
        for loop in loops:
            loop.wait(10)


def order(round_no: int) -> tuple[str, ...]:
    """Ours first in even rounds, the peer first in odd ones."""
    return DRIVERS if round_no % 2 == 0 else DRIVERS[::-1]


def compare(what: str, ours: float, peer: float, target: str = TARGET_CALL,
            met: bool | None = None, reference: bool = False, ours_note: str = "",
            peer_note: str = "") -> None:
    """A row of two times: met when ours is no slower, unless ``met`` says;
    ``reference``: no target (n/a)."""
    verdict = None if reference else ours <= peer if met is None else met
    row(what, ms(ours) + ours_note, ms(peer) + peer_note, f"{peer / ours:.2f}x", target,
        verdict, table=TABLE_PEER)


def median(samples: list[float]) -> float:
    return statistics.median(samples)


def stop_quietly(node: PeerNode, driver: str, name: str) -> None:
    """Force-stop ``name`` in clean-up; a failure is printed, not raised (the
    worker kills whatever is left when it ends)."""
    try:
        node("stop", driver=driver, name=name)
    except Exception as err:  # noqa: BLE001 - clean-up goes on
        print(f"    clean-up: stopping {driver}'s {name} failed: {err}", flush=True)


# --- single-node calls ---------------------------------------------------------------

def bench_start_stop(node: PeerNode, n: int) -> None:
    """StartInstance paused and unpaused, and forced StopInstance, of a guest-less VM."""
    node("define", name="st", qemu=QEMU_72)
    for driver in DRIVERS:  # warm both alike: page cache, QEMU's help output, caches
        node("start", driver=driver, name="st", paused=True)
        node("stop", driver=driver, name="st")
    starts: dict[tuple[str, bool], list[float]] = {(d, p): [] for d in DRIVERS
                                                   for p in (True, False)}
    stops: dict[str, list[float]] = {d: [] for d in DRIVERS}
    for i in range(n):
        for paused in (True, False):
            for driver in order(i):
                starts[driver, paused].append(
                    node("start", driver=driver, name="st", paused=paused)["t"])
                stops[driver].append(node("stop", driver=driver, name="st")["t"])
    for paused in (True, False):
        compare(f"StartInstance {'paused' if paused else 'unpaused'}, guest-less VM, "
                f"median of {n}", median(starts["ours", paused]),
                median(starts["peer", paused]))
    compare(f"StopInstance force, median of {2 * n}", median(stops["ours"]),
            median(stops["peer"]))


def bench_listing(node: PeerNode, n: int, n_qmp: int, counts: tuple[int, ...]) -> None:
    """GetInstanceInfo and GetAllInstancesInfo with 1, 10, 30 paused instances each;
    one QMP call against the raw-socket floor (with one instance)."""
    names: list[str] = []
    try:
        for count in counts:
            while len(names) < count:
                name = f"i{len(names) + 1:02d}"
                node("define", name=name, qemu=QEMU_72)
                for driver in DRIVERS:
                    node("start", driver=driver, name=name, paused=True)
                names.append(name)
            info: dict[str, list[float]] = {d: [] for d in DRIVERS}
            every: dict[str, list[float]] = {d: [] for d in DRIVERS}
            for i in range(n):
                for driver in order(i):
                    info[driver].append(node("info", driver=driver, name="i01")["t"])
                    every[driver].append(node("all", driver=driver, count=count)["t"])
            plural = "s" if count > 1 else ""
            compare(f"GetInstanceInfo, {count} paused instance{plural}, median of {n}",
                    median(info["ours"]), median(info["peer"]))
            compare(f"GetAllInstancesInfo, {count} paused instance{plural}, median of {n}",
                    median(every["ours"]), median(every["peer"]))
            if count == 1:
                bench_qmp(node, n_qmp)
    finally:
        for name in names:
            for driver in DRIVERS:
                stop_quietly(node, driver, name)


def bench_qmp(node: PeerNode, n: int) -> None:
    """One ``query-status``: each driver's QMP client, and the raw socket's floor."""
    samples: dict[str, list[float]] = {d: [] for d in (*DRIVERS, "raw")}
    for i in range(n):
        for driver in (*order(i), "raw"):
            samples[driver].append(node("qmp", driver=driver, name="i01")["t"])
    ours, peer, raw = (median(samples[d]) for d in ("ours", "peer", "raw"))
    compare(f"one QMP `query-status` (connect, greeting, capabilities, the call), "
            f"median of {n}", ours, peer,
            ours_note=f" ({ours / raw:.2f}x the raw socket's {ms(raw)})",
            peer_note=f" ({peer / raw:.2f}x the raw socket's)")


# --- guests ----------------------------------------------------------------------------

def boot(nodes: list[tuple[PeerNode, str, str]], pattern: str = "READY") -> None:
    """Start each ``(node, driver, name)`` unpaused, then wait until each printed
    ``pattern`` on its serial port."""
    for node, driver, name in nodes:
        node("start", driver=driver, name=name, paused=False, serial=True)
    for node, driver, name in nodes:
        node("serial_wait", driver=driver, name=name, pattern=pattern, timeout=180)


def bench_acpi(node: PeerNode, guest: Any, n: int) -> None:
    """StopInstance without force on a booted guest, until its QEMU is gone."""
    node("define", name="ac", qemu=QEMU_72, memory=128, kernel=guest.kernel,
         initrd=guest.initrd)
    gone: dict[str, list[float]] = {d: [] for d in DRIVERS}
    calls: dict[str, list[float]] = {d: [] for d in DRIVERS}
    try:
        for i in range(n):
            boot([(node, driver, "ac") for driver in DRIVERS])
            for driver in order(i):
                result = node("acpi_stop", driver=driver, name="ac")
                gone[driver].append(result["t"])
                calls[driver].append(result["call"])
    finally:
        for driver in DRIVERS:
            stop_quietly(node, driver, "ac")
    compare(f"StopInstance ACPI (booted guest): the call (presses the power button), "
            f"median of {n}", median(calls["ours"]), median(calls["peer"]))
    compare(f"StopInstance ACPI: until the instance is no longer listed (ListInstances "
            f"every 10 ms), median of {n}", median(gone["ours"]), median(gone["peer"]),
            target="n/a: the guest's own power-off", reference=True)


# --- migration -------------------------------------------------------------------------

@dataclass
class Placement:
    """Where one driver's instance runs now, and where it goes next."""

    source: PeerNode
    target: PeerNode

    def swap(self) -> None:
        self.source, self.target = self.target, self.source


def migrate_once(place: Placement, driver: str, name: str,
                 limit: float | None = None, master: bool | None = None) -> dict[str, Any]:
    """One migration the way Ganeti sequences it; the source's figures.

    ``master``: the source's part as Ganeti's master drives it (see
    :meth:`bench.peer.Worker.op_migrate`); the default is the driver's own.
    """
    info = place.source("migration_info", driver=driver, name=name)
    place.target("accept", driver=driver, name=name, info=info)
    try:
        result = place.source("migrate", driver=driver, name=name, limit=limit, master=master)
    except BaseException:
        place.target("finalize_dst", driver=driver, name=name, info=info, success=False)
        raise
    completed = result["status"] == "completed"
    place.target("finalize_dst", driver=driver, name=name, info=info, success=completed)
    if completed:
        place.swap()
    return result


def bench_migration(a: PeerNode, b: PeerNode, guest: Any, sizes: list[int],
                    samples: int) -> None:
    """Live migration of a booted, idle guest: wall, QEMU total-time, downtime; on a
    quiet machine and with every CPU kept busy by another process (:func:`busy_cpus`).

    Each round migrates ours and the peer's (in turn) on the quiet machine,
    then both again with the busy loops running.
    """
    for memory in sizes:
        names = {d: f"m{memory}{d[0]}" for d in DRIVERS}
        for name in names.values():
            port = free_port()
            for node in (a, b):
                node("define", name=name, qemu=QEMU_72, memory=memory, kernel=guest.kernel,
                     initrd=guest.initrd, port=port, bandwidth=1000)
        places = {d: Placement(a, b) for d in DRIVERS}
        try:
            boot([(a, d, names[d]) for d in DRIVERS], pattern=r"COUNTER 2\b")
            # The first migration after boot is often much slower (the guest is
            # still settling): one of each, not counted.
            for driver in DRIVERS:
                migrate_once(places[driver], driver, names[driver])
            results: dict[tuple[str, str], list[dict[str, Any]]] = {
                (cond, m): [] for cond in (QUIET, BUSY) for m in MODES}
            # QEMU 7.2 can report "completed" before it filled in total-time (0):
            # such a migration gives no figure to compare and is left out.
            zero = dict.fromkeys(results, 0)
            modes = list(MODES)
            for i in range(3 * samples):
                for cond in (QUIET, BUSY):
                    with busy_cpus() if cond == BUSY else contextlib.nullcontext():
                        # Each mode leads in turn.
                        for mode in modes[i % 3:] + modes[:i % 3]:
                            if len(results[cond, mode]) >= samples:
                                continue
                            driver, master = MODES[mode]
                            result = migrate_once(places[driver], driver, names[driver],
                                                  master=master)
                            if result["status"] != "completed":
                                raise RuntimeError(f"{mode}: migration of {memory} MiB "
                                                   f"({cond}) ended {result}")
                            if result["total_time_ms"]:
                                results[cond, mode].append(result)
                            else:
                                zero[cond, mode] += 1
            for cond in (QUIET, BUSY):
                migration_rows(memory, cond, {m: results[cond, m] for m in MODES},
                               {m: zero[cond, m] for m in MODES})
        finally:
            for driver, place in places.items():
                stop_quietly(place.source, driver, names[driver])


def migration_rows(memory: int, cond: str, results: dict[str, list[dict[str, Any]]],
                   zero: dict[str, int]) -> None:
    if not all(results.values()):
        raise RuntimeError(f"QEMU reported total-time 0 for every migration of {memory} "
                           f"MiB ({cond}: {zero})")
    label = f"{memory} MiB" if memory < 1024 else f"{memory // 1024} GiB"
    if cond == BUSY:
        label += (f", every CPU kept busy by another process ({os.cpu_count()} busy loops, "
                  "one pinned per CPU, nice 0)")

    def middle(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in results[mode])

    names = {"ours": "ours in one call", "ours-master": "ours driven as Ganeti's master "
             "drives it", "peer": "Ganeti 3.0"}
    counts = ", ".join(f"{len(results[m])} of {names[m]}" for m in MODES) \
        + " (after one of each driver not counted)"
    skipped = "".join(f"; {zero[m]} of {names[m]} left out (QEMU said total-time 0)"
                      for m in MODES if zero[m])
    wall = {m: middle(m, "t") for m in MODES}
    total = {m: middle(m, "total_time_ms") / 1000 for m in MODES}
    down = {m: middle(m, "downtime_ms") / 1000 for m in MODES}
    ratio = {m: wall[m] / total[m] for m in MODES}
    compare(f"live migration {label} (idle guest, 1000 MiB/s), median of {counts}{skipped}: "
            "wall, start to source gone; ours in one call", wall["ours"], wall["peer"],
            target="ours < 1.1x ours' QEMU total-time",
            met=ratio["ours"] < 1.1,
            ours_note=f" ({ratio['ours']:.3f}x its total-time)",
            peer_note=f" ({ratio['peer']:.3f}x its total-time)")
    compare(f"live migration {label}: wall, start to source gone; both driven as Ganeti's "
            "master drives them (MigrateInstance, GetMigrationStatus, a second's sleep after "
            "each `active`, FinalizeMigrationSource)", wall["ours-master"], wall["peer"],
            target="ours < 1.1x ours' QEMU total-time",
            met=ratio["ours-master"] < 1.1,
            ours_note=f" ({ratio['ours-master']:.3f}x its total-time)",
            peer_note=f" ({ratio['peer']:.3f}x its total-time)")
    for mode in ("ours", "ours-master"):
        teardown = [r["teardown_ms"] for r in results[mode] if r.get("teardown_ms")]
        if len(teardown) != len(results[mode]):
            continue  # the library did not say (it logs it at debug level)
        rest = statistics.median(r["t"] - r["teardown_ms"] / 1000 for r in results[mode])
        how = "in one call" if mode == "ours" else "driven as Ganeti's master drives it"
        row(f"live migration {label}, ours {how}: the kernel's teardown of the source QEMU "
            "(SIGKILL until it is gone), and the wall without it",
            f"teardown {ms(statistics.median(teardown) / 1000)}; the rest {ms(rest)} "
            f"({rest / total[mode]:.3f}x its total-time)", "-", "-",
            "n/a (the machine's: see the note)", None, table=TABLE_PEER)
    for mode, how in (("ours", "in one call"), ("ours-master", "driven as the master does")):
        compare(f"live migration {label}: QEMU total-time, ours {how}", total[mode],
                total["peer"])
        compare(f"live migration {label}: QEMU downtime, ours {how}", down[mode], down["peer"])


def bench_dirty(a: PeerNode, b: PeerNode, guest: Any, limit: float | None) -> None:
    """The dirtying guest, post-copy allowed (``migration_caps`` postcopy-ram) for both.

    Ganeti 3.0's ``GetMigrationStatus`` switches to post-copy after QEMU's
    second pass over the RAM when ``migration_caps`` has postcopy-ram; ours
    once the guest outruns the link (:func:`ganeti_kvm.core.migration.escalate`).

    On QEMU 7.2 ours goes from a to b and the peer's from b to a, at the
    same time; then ours alone on QEMU 10.0 (the peer runs on the QEMU
    Ganeti 3.0 ships with only).  ``limit`` bounds both (None: ours uses
    the library's own time limit and the peer gets the same, since Ganeti's
    master would poll forever).
    """
    bound = limit or migration.time_limit(DIRTY_MEMORY, DIRTY_BANDWIDTH)
    runs = dirty_runs(a, b, guest, [("ours", QEMU_72), ("peer", QEMU_72)], limit, bound)
    dirty_rows(runs[0], runs[1], bound, limit)
    if os.access(QEMU_10, os.X_OK):
        [ours_10] = dirty_runs(a, b, guest, [("ours", QEMU_10)], limit, bound)
        dirty_rows(ours_10, None, bound, limit)
    else:
        print(f"note: {QEMU_10} not found; the dirtying guest on QEMU 10.0 skipped",
              flush=True)


@dataclass
class DirtyRun:
    """One driver's dirtying guest on one QEMU: where it runs and what became of it."""

    driver: str
    qemu: str
    name: str
    place: Placement
    interval: float = 0.0  # seconds per pass over the 160 MiB before the migration
    last_pass: int = 0  # the last pass seen on the source before the migration
    result: dict[str, Any] | None = None
    went_on: tuple[int, int] | None = None  # two later passes seen on the target


def dirty_runs(a: PeerNode, b: PeerNode, guest: Any, which: list[tuple[str, str]],
               limit: float | None, bound: float) -> list[DirtyRun]:
    """Boot a dirtying guest per ``(driver, qemu)``, migrate them all at once, and
    check that each one that moved goes on over there."""
    runs = []
    for driver, qemu in which:
        name = f"dirty{driver[0]}{qemu_label(qemu).split()[-1].replace('.', '')}"
        # Ours from a to b, the peer's the other way: each node has a source.
        runs.append(DirtyRun(driver, qemu, name,
                             Placement(a, b) if driver == "ours" else Placement(b, a)))
        port = free_port()
        for node in (a, b):
            node("define", name=name, qemu=qemu, memory=DIRTY_MEMORY,
                 kernel=guest.kernel, initrd=guest.initrd, port=port,
                 bandwidth=DIRTY_BANDWIDTH, downtime=DIRTY_DOWNTIME,
                 migration_caps=DIRTY_CAPS)
    try:
        boot([(r.place.source, r.driver, r.name) for r in runs], pattern=r"/ # ")
        for run in runs:
            run.place.source("serial_send", driver=run.driver, name=run.name,
                             text=dirtying_command(DIRTY_MIB))
        # Every guest prints while every port is read (a port not read makes its
        # guest wait), so the measurements run at the same time.
        rates = wait_all([(r.place.source, "serial_rate",
                           {"driver": r.driver, "name": r.name, "pattern": PASS_LINE,
                            "failure": "DIRTY FAILED"}) for r in runs], timeout=300)
        infos = {}
        for run, rate in zip(runs, rates, strict=True):
            run.interval, run.last_pass = rate["interval"], pass_number(rate["last"])
            infos[run.name] = run.place.source("migration_info", driver=run.driver,
                                               name=run.name)
            run.place.target("accept", driver=run.driver, name=run.name,
                             info=infos[run.name])
        started = time.monotonic()
        results = wait_all([(r.place.source, "migrate",
                             {"driver": r.driver, "name": r.name,
                              "limit": limit if r.driver == "ours" else bound})
                            for r in runs], timeout=bound + 120)
        print(f"    the migrations ended after {time.monotonic() - started:.0f} s", flush=True)
        for run, result in zip(runs, results, strict=True):
            run.result = result
            completed = result["status"] == "completed"
            run.place.target("finalize_dst", driver=run.driver, name=run.name,
                             info=infos[run.name], success=completed)
            if completed:
                run.place.swap()
                first = run.place.source("serial_wait", driver=run.driver, name=run.name,
                                         pattern=PASS_LINE, fresh=True, timeout=60)
                second = run.place.source("serial_wait", driver=run.driver, name=run.name,
                                          pattern=PASS_LINE, timeout=60)
                run.went_on = (pass_number(first["match"]), pass_number(second["match"]))
        return runs
    finally:
        for run in runs:
            stop_quietly(run.place.source, run.driver, run.name)


def pass_number(line: str) -> int:
    """N of the guest's ``PASS N``."""
    return int(line.split()[-1])


def dirty_rows(ours: DirtyRun, peer: DirtyRun | None, bound: float,
               limit: float | None) -> None:
    """The rows of one QEMU: ours, and the peer's beside it if it ran there."""
    assert ours.result is not None
    rates = f"{DIRTY_MIB / ours.interval:.0f} MiB/s (ours)" + (
        f", {DIRTY_MIB / peer.interval:.0f} MiB/s (Ganeti 3.0)" if peer else "")
    what = (f"dirtying guest, {qemu_label(ours.qemu)} ({DIRTY_MEMORY} MiB, rewriting "
            f"{DIRTY_MIB} MiB in a loop at {rates}; migration_bandwidth {DIRTY_BANDWIDTH} "
            f"MiB/s, migration_downtime {DIRTY_DOWNTIME} ms, migration_caps {DIRTY_CAPS})")
    limit_text = f"the bench's {limit:.0f} s limit" if limit else \
        f"its time limit ({bound:.0f} s)"
    absent = "- (Ganeti 3.0 runs on QEMU 7.2 here)"

    def outcome(run: DirtyRun) -> str:
        result = run.result or {}
        if result.get("status") == "completed":
            step = result.get("step")
            return "completed" + (f" (last step: {step})" if step else "")
        if run.driver == "ours":
            error = str(result.get("error", ""))
            if "time limit" in error:
                return f"cancelled at {limit_text}"
            return f"failed: {error[:200]}"
        return (f"still active after {bound:.0f} s (Ganeti's master polls with no limit); "
                "the bench cancelled it")

    def done(run: DirtyRun | None) -> bool:
        return run is not None and (run.result or {}).get("status") == "completed"

    ours_result, peer_result = ours.result, (peer.result if peer else None)
    row(f"{what}: outcome", outcome(ours), outcome(peer) if peer else absent, "-",
        "completes", done(ours), table=TABLE_PEER)
    label = f"dirtying guest, {qemu_label(ours.qemu)}"
    if peer_result is not None:
        compare(f"{label}: time to that outcome", ours_result["t"], peer_result["t"],
                target="completes in < 60 s, no slower than Ganeti 3.0",
                met=done(ours) and ours_result["t"] < 60
                and (not done(peer) or ours_result["t"] <= peer_result["t"]))
    else:
        row(f"{label}: time to that outcome", ms(ours_result["t"]), absent, "-",
            "completes in < 60 s", done(ours) and ours_result["t"] < 60, table=TABLE_PEER)

    def downtime(run: DirtyRun | None) -> str:
        if run is None:
            return absent
        return ms((run.result or {})["downtime_ms"] / 1000) if done(run) else \
            "- (not completed)"

    both = done(ours) and done(peer) and ours_result["downtime_ms"]
    row(f"{label}: QEMU downtime", downtime(ours), downtime(peer),
        f"{peer_result['downtime_ms'] / ours_result['downtime_ms']:.2f}x"
        if both and peer_result else "-",
        f"≤ 3x migration_downtime ({3 * DIRTY_DOWNTIME} ms)",
        done(ours) and ours_result["downtime_ms"] <= 3 * DIRTY_DOWNTIME, table=TABLE_PEER)

    def went_on(run: DirtyRun | None) -> str:
        if run is None:
            return absent
        if run.went_on is None:
            return f"- (stayed on its node; last pass {run.last_pass} before the migration)"
        return (f"passes {run.went_on[0]}, {run.went_on[1]} on the target after pass "
                f"{run.last_pass} on the source")

    row(f"{label}: the guest goes on (its dirtying loop's pass counter)", went_on(ours),
        went_on(peer), "-", "counter goes on after the move",
        ours.went_on is not None and ours.last_pass < ours.went_on[0] < ours.went_on[1],
        table=TABLE_PEER)
