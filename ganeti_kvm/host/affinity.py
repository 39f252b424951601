"""Which CPUs this node has, and which CPUs a process's threads may run on.

The kernel's own CPU list syntax (``0-3,6``, as in
``/sys/devices/system/cpu/online`` and ``Cpus_allowed_list``) is read here;
:func:`set_thread_affinity` pins one thread (a thread id works as a pid for
``sched_setaffinity`` on Linux).  Every failure is an
:class:`errors.HypervisorError` naming the thread and what to do.
"""

from __future__ import annotations

import os

from ganeti_kvm import errors

ONLINE_CPUS_FILE = "/sys/devices/system/cpu/online"


def parse_cpu_list(text: str) -> frozenset[int]:
    """The CPU numbers of the kernel's list syntax (``"0-3,6"``); ValueError if malformed."""
    cpus: set[int] = set()
    for item in text.strip().split(","):
        if not item:
            continue
        low, _, high = item.partition("-")
        first, last = int(low), int(high or low)
        if first < 0 or last < first:
            raise ValueError(f"invalid CPU range {item!r}")
        cpus.update(range(first, last + 1))
    return frozenset(cpus)


def online_cpus(online_file: str = ONLINE_CPUS_FILE) -> frozenset[int]:
    """The CPUs of this node that are online (all of ``os.cpu_count()`` if unknown)."""
    try:
        with open(online_file, encoding="ascii") as handle:
            cpus = parse_cpu_list(handle.read())
    except (OSError, ValueError, UnicodeDecodeError):
        cpus = frozenset()
    return cpus or frozenset(range(os.cpu_count() or 1))


def threads_of(pid: int) -> list[int]:
    """The thread ids of process ``pid`` (empty if it is gone)."""
    try:
        return sorted(int(tid) for tid in os.listdir(f"/proc/{pid}/task") if tid.isdigit())
    except OSError:
        return []


def set_thread_affinity(tid: int, cpus: frozenset[int], what: str) -> None:
    """Let thread ``tid`` run only on ``cpus``; ``what`` names it in the error."""
    try:
        os.sched_setaffinity(tid, cpus)
    except OSError as err:
        raise errors.HypervisorError(
            f"Cannot pin {what} (thread {tid}) to CPUs {format_cpu_list(cpus)}: "
            f"{err.strerror or err}; check that the CPUs are online and the thread "
            "still runs") from None


def allowed_cpus(tid: int) -> frozenset[int]:
    """The CPUs thread ``tid`` may run on, as the kernel reports (``Cpus_allowed_list``)."""
    path = f"/proc/{tid}/status"
    try:
        with open(path, encoding="ascii", errors="replace") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key == "Cpus_allowed_list":
                    return parse_cpu_list(value)
    except (OSError, ValueError) as err:
        raise errors.HypervisorError(f"Cannot read the CPU affinity in {path}: {err}") from None
    raise errors.HypervisorError(f"{path} has no Cpus_allowed_list line")


def format_cpu_list(cpus: frozenset[int] | set[int]) -> str:
    """``cpus`` in the kernel's list syntax (``{0, 1, 2, 5}`` -> ``"0-2,5"``)."""
    ranges: list[list[int]] = []
    for cpu in sorted(cpus):
        if ranges and cpu == ranges[-1][1] + 1:
            ranges[-1][1] = cpu
        else:
            ranges.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)
