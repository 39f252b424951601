"""ganeti-kvm benchmark: each figure of ours against a baseline measured in the same run.

Run as root from the repository: ``python3 bench/run.py [--quick] [--only
2011|peer]`` (or ``make bench``).  Prints two markdown tables and writes them
to ``bench/results.md``: one against the 2011 driver, a bare QEMU and an
uncached probe (this file), one side by side with Ganeti 3.0's own KVM
driver (bench/sidebyside.py, bench/peer.py).  Every row compares a
measurement of the library with a baseline taken in the same run, on the
same QEMU, on the same machine (except where the baseline is a stated
constant or a computed figure).
Targets are reported, never asserted: the exit code is 1 only when a
measurement itself could not be made.  Everything started here is killed
and every run directory removed, also on failure.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import sidebyside  # noqa: E402
from bench.common import (  # noqa: E402
    FAILURES,
    QEMU_10,
    QEMU_72,
    TABLE_2011,
    TABLE_PEER,
    measurement,
    median_time,
    median_times_interleaved,
    ms,
    qemu_label,
    row,
)
from bench.peer import raw_qmp_status  # noqa: E402
from bench.peer_client import PeerNode  # noqa: E402
from ganeti_kvm import objects  # noqa: E402
from ganeti_kvm.core import migration  # noqa: E402
from ganeti_kvm.hv_kvm import KVMHypervisor  # noqa: E402
from ganeti_kvm.qemu import caps as qemu_caps  # noqa: E402
from ganeti_kvm.qmp import client as qmp  # noqa: E402
from tests.guestimage import FIRST_LINE, build_guest  # noqa: E402
from tests.helpers import SerialReader, guest_hvparams, kill_instances  # noqa: E402
from tests.test_console import Terminal  # noqa: E402

RESULTS_FILE = os.path.join(ROOT, "bench", "results.md")
RUN_DIRS: list[str] = []


# --- helpers -------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def new_node(base: str, label: str) -> KVMHypervisor:
    run_dir = os.path.join(base, label)
    RUN_DIRS.append(run_dir)
    return KVMHypervisor(run_dir=run_dir)


def instance(name: str, qemu: str, guest, memory: int = 32, **hv) -> objects.Instance:
    return objects.Instance(name=name, primary_node="localhost",
                            hvparams=guest_hvparams(qemu, guest, **hv),
                            beparams={"memory": memory, "vcpus": 1})


def socat(command: str) -> str:
    result = subprocess.run(["sh", "-c", command], capture_output=True, text=True,
                            timeout=30, check=False)
    return result.stdout


# --- 1. one monitor command ----------------------------------------------------------

def bench_monitor(base: str, guest, qemu: str, n: int) -> None:
    hv = new_node(base, f"m{len(RUN_DIRS)}")
    inst = instance("mon1", qemu, guest)
    hv.StartInstance(inst, [], startup_paused=True)
    paths = hv.node.paths("mon1")
    shell = ("echo '{\"execute\":\"qmp_capabilities\"}{\"execute\":\"query-status\"}' | "
             "socat STDIO UNIX-CONNECT:" + paths.qmp_long_socket)
    # Both ways must really get the answer before they are timed.
    status = qmp.qmp_execute(paths.qmp_socket, "query-status")["status"]
    out = socat(shell)
    if status != "prelaunch" or '"prelaunch"' not in out:
        raise RuntimeError(f"unexpected answers: qmp_execute {status!r}, socat {out!r}")
    ours = baseline = 0.0
    for _ in range(2):  # alternate blocks to share any drift of the machine's load
        ours += median_time(lambda: qmp.qmp_execute(paths.qmp_socket, "query-status"), n) / 2
        baseline += median_time(lambda: socat(shell), max(3, n // 3)) / 2
    ratio = baseline / ours
    row(f"QMP `query-status`, median ({qemu_label(qemu)})", ms(ours),
        f"{ms(baseline)} (`echo … \\| socat`, 2011)", f"{ratio:.1f}x faster",
        "≥ 8x faster", ratio >= 8)
    hv.StopInstance(inst, force=True)


# --- 2. capability probe -------------------------------------------------------------

class _CountingPopen(subprocess.Popen):  # type: ignore[type-arg]
    count = 0

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        type(self).count += 1
        super().__init__(*args, **kwargs)


def bench_probe(base: str, qemu: str, n_uncached: int) -> None:
    uncached = []
    for _ in range(n_uncached):
        qemu_caps.clear_cache()
        cache_dir = tempfile.mkdtemp(prefix="caps-", dir=base)
        started = time.perf_counter()
        qemu_caps.probe(qemu, cache_dir=cache_dir)
        uncached.append(time.perf_counter() - started)
        shutil.rmtree(cache_dir)
    original = subprocess.Popen
    subprocess.Popen = _CountingPopen  # type: ignore[misc]
    _CountingPopen.count = 0
    try:
        cached = median_time(lambda: qemu_caps.probe(qemu), 2000)
        cached_procs = _CountingPopen.count
        # The counter itself works: an uncached probe is seen starting processes.
        qemu_caps.clear_cache()
        qemu_caps.probe(qemu)
        uncached_procs = _CountingPopen.count - cached_procs
    finally:
        subprocess.Popen = original  # type: ignore[misc]
    base_s = statistics.median(uncached)
    row(f"capability probe, cached in-process vs uncached ({qemu_label(qemu)})",
        f"{ms(cached)}, {cached_procs} processes in 2000 calls",
        f"{ms(base_s)} uncached (median of {n_uncached}), {uncached_procs} processes",
        f"{base_s / cached:,.0f}x faster", "cached runs no probe process",
        cached_procs == 0 and uncached_procs > 0)


# --- 3. StartInstance ----------------------------------------------------------------

def bench_start(base: str, guest, qemu: str, n: int) -> None:
    hv = new_node(base, f"s{len(RUN_DIRS)}")
    bare_root = os.path.join(base, f"bare{len(RUN_DIRS)}")
    RUN_DIRS.append(bare_root)
    for sub in ("pid", "ctrl"):
        os.makedirs(os.path.join(bare_root, sub), mode=0o700)
    inst = instance("st1", qemu, guest)
    hv.StartInstance(inst, [], startup_paused=True)  # warm the caches of both ways alike
    argv = hv.node.load_record("st1").argv
    hv.StopInstance(inst, force=True)
    root = hv.node.layout.root
    bare_argv = [a.replace(root + "/", bare_root + "/") for a in argv] + ["-S"]
    bare_pidfile = os.path.join(bare_root, "pid", "st1")
    if bare_pidfile not in bare_argv:
        raise RuntimeError(f"cannot move the bare run to {bare_root}: {argv}")

    def bare() -> None:
        subprocess.run(bare_argv, stdin=subprocess.DEVNULL, capture_output=True,
                       timeout=60, check=True)

    ours, baseline = [], []
    for _ in range(n):
        started = time.perf_counter()
        hv.StartInstance(inst, [], startup_paused=True)
        ours.append(time.perf_counter() - started)
        hv.StopInstance(inst, force=True)
        started = time.perf_counter()
        bare()
        baseline.append(time.perf_counter() - started)
        kill_instances(bare_root)
    o, b = statistics.median(ours), statistics.median(baseline)
    row(f"StartInstance paused, median of {n} ({qemu_label(qemu)})", ms(o),
        f"{ms(b)} (bare `qemu … -S -daemonize`)",
        f"{(o / b - 1) * 100:+.0f}% ({o / b:.2f}x)", "library adds < 15%", o / b < 1.15)


# --- 4. GetAllInstancesInfo ----------------------------------------------------------

def bench_listing(base: str, guest, n_calls: int) -> None:
    hv = new_node(base, "l")
    started: list[str] = []

    def grow(count: int) -> None:
        while len(started) < count:
            name = f"l{len(started) + 1:02d}"
            hv.StartInstance(instance(name, QEMU_72, guest), [], startup_paused=True)
            started.append(name)

    def per_instance(count: int) -> float:
        infos = hv.GetAllInstancesInfo()
        if len(infos) != count or any(i[4] != "paused" for i in infos):
            raise RuntimeError(f"expected {count} paused instances, got {infos}")
        return median_time(hv.GetAllInstancesInfo, n_calls) / count

    def hmp_per_instance(names: list[str]) -> float:
        commands = ["echo info status | socat STDIO UNIX-CONNECT:" +
                    hv.node.paths(name).monitor_socket for name in names]
        out = socat(commands[0])
        if "paused" not in out:
            raise RuntimeError(f"the human monitor said {out!r}")
        return median_time(lambda: [socat(cmd) for cmd in commands],
                           max(3, n_calls // 4)) / len(names)

    grow(10)
    base_10 = hmp_per_instance(started[:10])
    for count in (1, 10, 50):
        if count == 1:
            hv_one = new_node(base, "l1")
            hv_one.StartInstance(instance("one", QEMU_72, guest), [], startup_paused=True)
            infos = hv_one.GetAllInstancesInfo()
            if len(infos) != 1:
                raise RuntimeError(f"expected 1 instance, got {infos}")
            qmp_socket = hv_one.node.paths("one").qmp_socket
            cost, floor = median_times_interleaved(
                [hv_one.GetAllInstancesInfo, functools.partial(raw_qmp_status, qmp_socket)],
                n_calls)
            kill_instances(hv_one.node.layout.root)
        else:
            grow(count)
            cost = per_instance(count)
        row(f"GetAllInstancesInfo, {count} paused instance{'s' if count > 1 else ''} "
            f"(QEMU 7.2), per instance", ms(cost),
            f"{ms(base_10)} (HMP `info status` via socat, 10 instances)",
            f"{base_10 / cost:.0f}x faster", "< 0.5 ms per instance", cost < 0.0005)
        if count == 1:
            row("GetAllInstancesInfo, 1 paused instance (QEMU 7.2), against QEMU's own "
                "QMP exchange", ms(cost),
                f"{ms(floor)} (one raw socket: connect, both requests in one write, "
                "three lines back; no /proc, no parsing)",
                f"{cost / floor:.2f}x", "n/a (QEMU's floor, for reference)", None)


# --- 5. console unpause ----------------------------------------------------------------

def bench_console(base: str, guest, n: int) -> None:
    hv = new_node(base, "c")
    inst = instance("con1", QEMU_72, guest, memory=128)
    delays = []
    for i in range(n):
        hv.StartInstance(inst, [], startup_paused=True)
        timing_file = os.path.join(base, f"timing{i}.json")
        console = KVMHypervisor.GetInstanceConsole(inst, inst.hvparams, inst.beparams,
                                                   run_dir=hv.node.layout.root)
        term = Terminal(console.command, env=dict(os.environ,
                                                  GANETI_KVM_CONSOLE_TIMING=timing_file))
        try:
            term.read_until(FIRST_LINE, timeout=60)
            term.write(b"\x1d")
            term.proc.wait(10)
        finally:
            term.close()
        with open(timing_file, encoding="utf-8") as handle:
            timing = json.load(handle)
        if timing.get("cont_delay") is None:
            raise RuntimeError(f"the wrapper did not unpause: {timing}")
        delays.append(timing["cont_delay"])
        hv.StopInstance(inst, force=True)
    d = statistics.median(delays)
    row(f"console: attach seen → `cont`, median of {n} (QEMU 7.2)", ms(d),
        "3000 ms (2011 wrapper's fixed `sleep 3`; a constant, not measured)",
        f"{3.0 / d:,.0f}x sooner", "< 100 ms", d < 0.1)


# --- 6. migration ----------------------------------------------------------------------

def bench_migration(base: str, guest, sizes: list[int]) -> None:
    for memory in sizes:
        node_a = new_node(base, f"a{memory}")
        node_b = new_node(base, f"b{memory}")
        name = f"mig{memory}"
        inst = instance(name, QEMU_72, guest, memory=memory, migration_port=free_port(),
                        migration_bandwidth=1000)
        node_a.StartInstance(inst, [])
        reader = SerialReader(node_a.node.paths(name).serial_socket)
        try:
            reader.read_until(r"COUNTER 2\b", timeout=120)
        finally:
            reader.close()
        # QEMU 7.2 can answer query-migrate with status "completed" before it
        # has filled in total-time (seen as 0): such a migration gives no
        # QEMU figure to compare with, so it is counted and left out.
        walls, totals, zero = [], [], 0
        src, dst = node_a, node_b
        for _ in range(6):  # there and back, until two migrations have QEMU's figure
            if len(walls) == 2:
                break
            info = src.MigrationInfo(inst)
            dst.AcceptInstance(inst, info, "127.0.0.1")
            started = time.perf_counter()
            try:
                final = migration.migrate(src.node, name, "127.0.0.1", True)
            except Exception:
                dst.FinalizeMigration(inst, info, False)
                raise
            wall = time.perf_counter() - started
            dst.FinalizeMigration(inst, info, True)
            src, dst = dst, src
            if final.status != "completed":
                raise RuntimeError(f"migration ended {final}")
            if not final.total_time_ms:
                zero += 1
                continue
            walls.append(wall)
            totals.append(final.total_time_ms / 1000)
        if not walls:
            raise RuntimeError(f"QEMU reported total-time 0 for all {zero} migrations of "
                               f"{memory} MiB")
        src.StopInstance(inst, force=True)
        wall, total = statistics.mean(walls), statistics.mean(totals)
        extra = wall - total
        label = f"{memory} MiB" if memory < 1024 else f"{memory // 1024} GiB"
        skipped = f"; {zero} more left out, QEMU said total-time 0" if zero else ""
        row(f"live migration {label}, mean of {len(walls)}{skipped} (QEMU 7.2): "
            "MigrateInstance wall vs QEMU `total-time`", ms(wall), f"{ms(total)} (QEMU)",
            f"{wall / total:.3f}x", "< 1.1x", wall / total < 1.1)
        row(f"live migration {label}: completion-detection latency "
            "(wall − QEMU total-time)", ms(extra),
            "1000 ms expected, 2000 ms worst (2011's 2 s poll; computed, not measured)",
            f"{1.0 / max(extra, 1e-6):.0f}x sooner (expected)", "n/a (no target set)", None)


# --- main ------------------------------------------------------------------------------

def _terminate(signum: int, frame) -> None:  # noqa: ANN001
    raise SystemExit(128 + signum)


def run_2011(base: str, guest, quick: bool) -> None:  # noqa: ANN001
    """The rows against the 2011 driver, a bare QEMU and uncached probes."""
    qemus = [QEMU_72] + ([QEMU_10] if os.access(QEMU_10, os.X_OK) else [])
    if len(qemus) == 1:
        print(f"note: {QEMU_10} not found; QEMU 10.0 rows skipped", flush=True)
    for qemu in qemus:
        measurement(f"1. monitor command ({qemu_label(qemu)})",
                    lambda q=qemu: bench_monitor(base, guest, q, 30 if quick else 100))
    for qemu in qemus:
        measurement(f"2. capability probe ({qemu_label(qemu)})",
                    lambda q=qemu: bench_probe(base, q, 2 if quick else 3))
    for qemu in qemus:
        measurement(f"3. StartInstance ({qemu_label(qemu)})",
                    lambda q=qemu: bench_start(base, guest, q, 9 if quick else 21))
    measurement("4. GetAllInstancesInfo",
                lambda: bench_listing(base, guest, 30 if quick else 100))
    for run_dir in list(RUN_DIRS):
        kill_instances(run_dir)  # the 50 listed instances are not needed any more
    measurement("5. console unpause delay",
                lambda: bench_console(base, guest, 1 if quick else 3))
    measurement("6. live migration",
                lambda: bench_migration(base, guest, [128] if quick else [128, 1024]))


def run_peer(base: str, guest, quick: bool) -> None:  # noqa: ANN001
    """The rows side by side with Ganeti 3.0's KVM driver (bench/sidebyside.py)."""
    table = TABLE_PEER
    made: list[PeerNode] = []

    def node() -> PeerNode:
        if len(made) < 2:
            made.append(PeerNode(os.path.join(base, f"peer{len(made)}.log")))
        return made[-1]

    try:
        measurement("7. Ganeti 3.0: start and forced stop",
                    lambda: sidebyside.bench_start_stop(node(), 5 if quick else 15), table)
        measurement("8. Ganeti 3.0: GetInstanceInfo, GetAllInstancesInfo, one QMP call",
                    lambda: sidebyside.bench_listing(node(), 10 if quick else 30,
                                                     30 if quick else 100, (1, 10, 30)),
                    table)
        measurement("9. Ganeti 3.0: ACPI stop",
                    lambda: sidebyside.bench_acpi(node(), guest, 2 if quick else 4), table)
        measurement("10. Ganeti 3.0: live migration",
                    lambda: sidebyside.bench_migration(
                        made[0] if made else node(), node(), guest,
                        [128] if quick else [128, 1024], 3 if quick else 7), table)
        measurement("11. Ganeti 3.0: the dirtying guest",
                    lambda: sidebyside.bench_dirty(made[0], node(), guest,
                                                   15.0 if quick else None), table)
    finally:
        for peer in made:
            try:
                peer.close()
            except Exception as err:  # noqa: BLE001 - keep cleaning
                print(f"cleanup of a Ganeti 3.0 worker failed: {err}", file=sys.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples")
    parser.add_argument("--only", choices=("2011", "peer"),
                        help="only the rows against the 2011 driver, or only those "
                        "against Ganeti 3.0's driver")
    args = parser.parse_args()
    quick = args.quick
    if os.geteuid() != 0:
        print("the benchmark needs root (like the tests and the demo)", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    began = time.monotonic()
    base = tempfile.mkdtemp(prefix="gk-bench-", dir="/tmp")
    try:
        guest = build_guest()
        if args.only != "peer":
            run_2011(base, guest, quick)
        if args.only != "2011":
            run_peer(base, guest, quick)
    finally:
        for run_dir in RUN_DIRS:
            try:
                kill_instances(run_dir)
            except Exception as err:  # noqa: BLE001 - keep cleaning
                print(f"cleanup of {run_dir} failed: {err}", file=sys.stderr)
        shutil.rmtree(base, ignore_errors=True)
    elapsed = time.monotonic() - began
    uname = os.uname()
    lines = [
        f"# ganeti-kvm benchmark ({'quick' if quick else 'full'} run, {elapsed:.0f} s, "
        f"{os.cpu_count()} CPUs, {uname.sysname} {uname.release}, TCG, "
        f"{time.strftime('%Y-%m-%d %H:%M')})",
        "",
        "The machine may be shared with other work: figures drift from run to run; "
        "every ratio compares two figures from the same run.",
    ]
    for table in (TABLE_2011, TABLE_PEER):
        if table.rows:
            lines += [""] + table.markdown()
    if FAILURES:
        lines += ["", "Not measured:"] + [f"- {f}" for f in FAILURES]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    with open(RESULTS_FILE, "w", encoding="utf-8") as handle:
        handle.write(text)
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
