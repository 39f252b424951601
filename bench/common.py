"""What every part of the benchmark shares: formatting, timing and the result tables."""

from __future__ import annotations

import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

QEMU_72 = "/usr/bin/qemu-system-x86_64"
QEMU_10 = "/var/cache/ganeti-kvm/qemu-10.0/qemu-system-x86_64"


@dataclass
class Table:
    """One markdown table of results: a title, its columns and rows."""

    title: str
    columns: tuple[str, ...]
    rows: list[tuple[str, ...]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> list[str]:
        lines = [f"## {self.title}", ""]
        if self.notes:
            lines += self.notes + [""]
        lines += ["| " + " | ".join(self.columns) + " |",
                  "| " + " | ".join("---" for _ in self.columns) + " |"]
        lines += ["| " + " | ".join(escape(cell) for cell in r) + " |" for r in self.rows]
        return lines


TABLE_2011 = Table("Against the 2011 driver and bare QEMU",
                   ("what", "ours", "baseline", "ratio", "target", "met?"))
TABLE_PEER = Table("Side by side with Ganeti 3.0's KVM driver",
                   ("what", "ours", "Ganeti 3.0", "Ganeti 3.0 ÷ ours", "target", "met?"))
FAILURES: list[str] = []


def escape(cell: str) -> str:
    """A table cell: pipes escaped (unless the text already escapes them)."""
    return cell if "\\|" in cell else cell.replace("|", "\\|")


def verdict(met: bool | None) -> str:
    return "n/a" if met is None else "yes" if met else "**no**"


def row(what: str, ours: str, baseline: str, ratio: str, target: str, met: bool | None,
        table: Table = TABLE_2011) -> None:
    table.rows.append((what, ours, baseline, ratio, target, verdict(met)))
    print(f"  {what}: ours {ours}, {table.columns[2]} {baseline}, {ratio}, "
          f"target {target}: {verdict(met)}", flush=True)


def measurement(title: str, func: Callable[[], None], table: Table = TABLE_2011) -> None:
    """Run one measurement; a failure becomes a row saying so (and exit code 1)."""
    print(f"==> {title}", flush=True)
    started = time.monotonic()
    try:
        func()
    except Exception as err:  # noqa: BLE001 - reported, then the next measurement runs
        traceback.print_exc(file=sys.stdout)
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        FAILURES.append(f"{title}: {first}")
        table.rows.append((title, "FAILED", "-", "-", "-", f"not measured: {first}"[:160]))
    print(f"    ({time.monotonic() - started:.1f} s)", flush=True)


def ms(seconds: float) -> str:
    value = seconds * 1000
    return f"{value:.3f} ms" if value < 1 else f"{value:.1f} ms" if value < 100 else \
        f"{value:.0f} ms"


def median_time(action: Callable[[], object], n: int) -> float:
    times = []
    for _ in range(n):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def median_times_interleaved(actions: list[Callable[[], object]], n: int) -> list[float]:
    """The median time of each action, called in turn so that they share the
    machine's drift alike."""
    times: list[list[float]] = [[] for _ in actions]
    for _ in range(n):
        for action, samples in zip(actions, times, strict=True):
            started = time.perf_counter()
            action()
            samples.append(time.perf_counter() - started)
    return [statistics.median(samples) for samples in times]


def qemu_label(path: str) -> str:
    return "QEMU 7.2" if path == QEMU_72 else "QEMU 10.0"
