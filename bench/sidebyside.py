"""Ours side by side with Ganeti 3.0's bundled KVM driver (issue 15, point 3).

Both drivers run in the same bench/peer.py worker (one per node, see
bench/peer.py and bench/peer_client.py), get the same Ganeti instance
objects and are called through Ganeti 3's contract, ours through
:mod:`ganeti_kvm.ganeti3`.  Each figure is the median of samples taken in
turn, ours then the peer's then ours... (the order flipped every round), so
that the machine's drift hits both alike.  Guests run under TCG on QEMU 7.2,
the QEMU Ganeti 3.0 ships with.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

from bench.common import QEMU_72, TABLE_PEER, ms, row
from bench.peer_client import PeerNode, wait_all
from ganeti_kvm.core import migration
from tests.guestimage import dirtying_command
from tests.helpers import free_port

DRIVERS = ("ours", "peer")
TARGET_CALL = "ours ≤ Ganeti 3.0"
# The dirtying guest (issue 15): it rewrites 160 MiB of its 256 MiB in a loop,
# migrated at 32 MiB/s with a 30 ms downtime limit.
DIRTY_MEMORY, DIRTY_MIB, DIRTY_BANDWIDTH, DIRTY_DOWNTIME = 256, 160, 32, 30


TABLE_PEER.notes += [
    "Both drivers run in one worker process per node, under Debian's /usr/bin/python3 "
    "in a private mount namespace (tmpfs over /run, /var/lib/ganeti, /var/log/ganeti), "
    "with the same Ganeti `objects.Instance`; ours through `ganeti_kvm.ganeti3`. "
    "Each call builds a fresh driver object, as Ganeti's node daemon does.",
    "The workers are child subreapers (`prctl(PR_SET_CHILD_SUBREAPER)`) that reap "
    "exited QEMUs at once, as systemd reaps a node daemon's orphans: this machine's "
    "PID 1 reaps lazily, and Ganeti's `KillProcess` counts a zombie as alive.",
    "Samples of ours and the peer's are taken in turn; QEMU 7.2 under TCG. "
    "Migration: ours is the library's own `migrate` (woken by QEMU's events); the "
    "peer's is `MigrateInstance`, then `GetMigrationStatus` every second as Ganeti's "
    "master does (the driver itself waits 2 s more when QEMU is in a state it does not "
    "know, such as `setup`), then `FinalizeMigrationSource`; QEMU's total-time and "
    "downtime are read from the source monitor.",
]


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
                 limit: float | None = None) -> dict[str, Any]:
    """One migration the way Ganeti sequences it; the source's figures."""
    info = place.source("migration_info", driver=driver, name=name)
    place.target("accept", driver=driver, name=name, info=info)
    try:
        result = place.source("migrate", driver=driver, name=name, limit=limit)
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
    """Live migration of a booted, idle guest: wall, QEMU total-time, downtime."""
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
            results: dict[str, list[dict[str, Any]]] = {d: [] for d in DRIVERS}
            # QEMU 7.2 can report "completed" before it filled in total-time (0):
            # such a migration gives no figure to compare and is left out.
            zero = dict.fromkeys(DRIVERS, 0)
            for i in range(3 * samples):
                for driver in order(i):
                    if len(results[driver]) >= samples:
                        continue
                    result = migrate_once(places[driver], driver, names[driver])
                    if result["status"] != "completed":
                        raise RuntimeError(f"{driver}: migration of {memory} MiB ended "
                                           f"{result}")
                    if result["total_time_ms"]:
                        results[driver].append(result)
                    else:
                        zero[driver] += 1
            migration_rows(memory, results, zero)
        finally:
            for driver, place in places.items():
                stop_quietly(place.source, driver, names[driver])


def migration_rows(memory: int, results: dict[str, list[dict[str, Any]]],
                   zero: dict[str, int]) -> None:
    if not all(results.values()):
        raise RuntimeError(f"QEMU reported total-time 0 for every migration of {memory} "
                           f"MiB ({zero})")
    label = f"{memory} MiB" if memory < 1024 else f"{memory // 1024} GiB"

    def middle(driver: str, key: str) -> float:
        return statistics.median(r[key] for r in results[driver])

    counts = ", ".join(f"{len(results[d])} of {d if d == 'ours' else 'Ganeti 3.0'}"
                       for d in DRIVERS) + " (after one not counted)"
    skipped = "".join(f"; {zero[d]} of {d} left out (QEMU said total-time 0)"
                      for d in DRIVERS if zero[d])
    wall = {d: middle(d, "t") for d in DRIVERS}
    total = {d: middle(d, "total_time_ms") / 1000 for d in DRIVERS}
    down = {d: middle(d, "downtime_ms") / 1000 for d in DRIVERS}
    compare(f"live migration {label} (idle guest, 1000 MiB/s), median of {counts}{skipped}: "
            "wall, start to source gone", wall["ours"], wall["peer"],
            target="ours < 1.1x ours' QEMU total-time",
            met=wall["ours"] / total["ours"] < 1.1,
            ours_note=f" ({wall['ours'] / total['ours']:.3f}x its total-time)",
            peer_note=f" ({wall['peer'] / total['peer']:.3f}x its total-time)")
    compare(f"live migration {label}: QEMU total-time", total["ours"], total["peer"])
    compare(f"live migration {label}: QEMU downtime", down["ours"], down["peer"])


def bench_dirty(a: PeerNode, b: PeerNode, guest: Any, limit: float | None) -> None:
    """The dirtying guest: ours from a to b and the peer's from b to a, at the same time.

    ``limit`` bounds both (None: ours uses the library's own time limit and
    the peer gets the same, since Ganeti's master would poll forever).
    """
    names = {d: f"dirty{d[0]}" for d in DRIVERS}
    bound = limit or migration.time_limit(DIRTY_MEMORY, DIRTY_BANDWIDTH)
    for name in names.values():
        port = free_port()
        for node in (a, b):
            node("define", name=name, qemu=QEMU_72, memory=DIRTY_MEMORY,
                 kernel=guest.kernel, initrd=guest.initrd, port=port,
                 bandwidth=DIRTY_BANDWIDTH, downtime=DIRTY_DOWNTIME)
    places = {"ours": Placement(a, b), "peer": Placement(b, a)}
    try:
        boot([(places[d].source, d, names[d]) for d in DRIVERS], pattern=r"/ # ")
        for driver in DRIVERS:
            node = places[driver].source
            node("serial_send", driver=driver, name=names[driver],
                 text=dirtying_command(DIRTY_MIB))
        # Both guests print while both ports are read (a port not read makes its
        # guest wait), so the two measurements run at the same time.
        rates = wait_all([(places[d].source, "serial_rate",
                           {"driver": d, "name": names[d], "pattern": r"PASS \d+\b",
                            "failure": "DIRTY FAILED"})
                          for d in DRIVERS], timeout=300)
        passes = dict(zip(DRIVERS, rates, strict=True))
        infos = {}
        for driver in DRIVERS:
            place = places[driver]
            infos[driver] = place.source("migration_info", driver=driver, name=names[driver])
            place.target("accept", driver=driver, name=names[driver], info=infos[driver])
        started = time.monotonic()
        results = dict(zip(DRIVERS, wait_all(
            [(places[d].source, "migrate", {"driver": d, "name": names[d],
                                             "limit": limit if d == "ours" else bound})
             for d in DRIVERS], timeout=bound + 120), strict=True))
        print(f"    both migrations ended after {time.monotonic() - started:.0f} s", flush=True)
        for driver in DRIVERS:
            completed = results[driver]["status"] == "completed"
            places[driver].target("finalize_dst", driver=driver, name=names[driver],
                                  info=infos[driver], success=completed)
            if completed:
                places[driver].swap()
        dirty_rows(results, passes, bound, limit)
    finally:
        for driver, place in places.items():
            stop_quietly(place.source, driver, names[driver])


def dirty_rows(results: dict[str, dict[str, Any]], passes: dict[str, float], bound: float,
               limit: float | None) -> None:
    what = (f"dirtying guest ({DIRTY_MEMORY} MiB, rewriting {DIRTY_MIB} MiB in a loop at "
            f"{DIRTY_MIB / passes['ours']:.0f} MiB/s (ours), "
            f"{DIRTY_MIB / passes['peer']:.0f} MiB/s (Ganeti 3.0); migration_bandwidth "
            f"{DIRTY_BANDWIDTH} MiB/s, migration_downtime {DIRTY_DOWNTIME} ms)")
    ours, peer = results["ours"], results["peer"]
    limit_text = f"the bench's {limit:.0f} s limit" if limit else \
        f"its time limit ({bound:.0f} s)"

    def outcome(driver: str, result: dict[str, Any]) -> str:
        if result["status"] == "completed":
            return "completed"
        if driver == "ours":
            error = str(result.get("error", ""))
            if "time limit" in error:
                return f"cancelled at {limit_text}"
            return f"failed: {error[:200]}"
        return (f"still active after {bound:.0f} s (Ganeti's master polls with no limit); "
                "the bench cancelled it")

    ours_done = ours["status"] == "completed"
    peer_done = peer["status"] == "completed"
    row(f"{what}: outcome", outcome("ours", ours), outcome("peer", peer), "-",
        "completes", ours_done, table=TABLE_PEER)
    what = "dirtying guest"
    compare(f"{what}: time to that outcome", ours["t"], peer["t"],
            target="completes, no slower than Ganeti 3.0",
            met=ours_done and (not peer_done or ours["t"] <= peer["t"]))
    if ours_done and peer_done:
        compare(f"{what}: QEMU downtime", ours["downtime_ms"] / 1000,
                peer["downtime_ms"] / 1000)
    else:
        row(f"{what}: QEMU downtime",
            ms(ours["downtime_ms"] / 1000) if ours_done else "- (not completed)",
            ms(peer["downtime_ms"] / 1000) if peer_done else "- (not completed)", "-",
            TARGET_CALL, None if not ours_done else True, table=TABLE_PEER)
