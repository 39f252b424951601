"""CPU pinning (``cpu_mask``): which physical CPUs each vCPU of an instance may use.

Ganeti's syntax: entries separated by ``:``, each a CPU list (``0-2,5``) or
``all``.  One entry applies to the whole instance: QEMU's process and every
thread of it (its vCPUs included) are pinned to it, unless it is ``all``.
Otherwise there is one entry per vCPU, in vCPU order, and each vCPU thread
is pinned to its entry (``all``: every online CPU of the node).

Ganeti 3.0's bundled driver pins only QEMU's main thread for a single entry,
after QEMU has created its vCPU threads, so these keep running anywhere;
here the vCPU threads are pinned themselves.  The vCPU thread ids come from
QMP's ``query-cpus-fast``; pinning happens before the guest runs (on a
start, a reboot and a migration target) and again when a migration is
finalized.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from typing import Any

from ganeti_kvm import errors
from ganeti_kvm.core import names as c
from ganeti_kvm.host import affinity

log = logging.getLogger(__name__)

#: The highest CPU number Linux can have (NR_CPUS is at most 8192).
MAX_CPU = 8191
_CPU_LIST_RE = re.compile(r"\d{1,5}(-\d{1,5})?(,\d{1,5}(-\d{1,5})?)*")

#: An entry of a mask: the CPUs, or None for "all" (no restriction).
Entry = frozenset[int] | None


def parse_multi_cpu_mask(cpu_mask: str) -> list[Entry]:
    """The entries of ``cpu_mask`` (``"0-1:all:2"`` -> ``[{0, 1}, None, {2}]``).

    Raises :class:`errors.ParameterError` naming ``cpu_mask`` for anything
    else (an empty entry, a bad range, a non-string).
    """
    if not isinstance(cpu_mask, str) or not cpu_mask:
        raise errors.ParameterError(
            f"Parameter {c.HV_CPU_MASK} must be CPU lists or 'all' separated by "
            f"'{c.CPU_PINNING_SEP}' (e.g. 0-1:2:all), not {cpu_mask!r}", c.HV_CPU_MASK,
            cpu_mask)
    entries: list[Entry] = []
    for item in cpu_mask.split(c.CPU_PINNING_SEP):
        if item == c.CPU_PINNING_ALL:
            entries.append(None)
            continue
        try:
            if not _CPU_LIST_RE.fullmatch(item):
                raise ValueError(f"{item!r} is not a CPU list")
            cpus = affinity.parse_cpu_list(item)
            if max(cpus) > MAX_CPU:
                raise ValueError(f"CPU {max(cpus)} is beyond the kernel's limit of {MAX_CPU}")
        except ValueError as err:
            raise errors.ParameterError(
                f"Parameter {c.HV_CPU_MASK} {cpu_mask!r}: {err}; each entry is a CPU list "
                f"such as 0-2,5 or '{c.CPU_PINNING_ALL}'", c.HV_CPU_MASK, cpu_mask) from None
        if not cpus:
            raise errors.ParameterError(
                f"Parameter {c.HV_CPU_MASK} {cpu_mask!r} has an empty entry; each entry is "
                f"a CPU list such as 0-2,5 or '{c.CPU_PINNING_ALL}'", c.HV_CPU_MASK, cpu_mask)
        entries.append(frozenset(cpus))
    return entries


def is_multi_cpu_mask(cpu_mask: Any) -> bool:
    """The table's syntax check of ``cpu_mask``."""
    try:
        parse_multi_cpu_mask(cpu_mask)
    except errors.ParameterError:
        return False
    return True


def check_vcpus(cpu_mask: str, vcpus: int) -> None:
    """Refuse a mask with several entries whose number is not the instance's vCPUs."""
    entries = parse_multi_cpu_mask(cpu_mask)
    if len(entries) > 1 and len(entries) != vcpus:
        raise errors.ParameterError(
            f"Parameter {c.HV_CPU_MASK} {cpu_mask!r} has {len(entries)} entries but the "
            f"instance has {vcpus} vCPUs; give one entry per vCPU, or a single entry for "
            "all of them", c.HV_CPU_MASK, cpu_mask)


def check_node_cpus(cpu_mask: str, online: frozenset[int]) -> None:
    """Refuse a mask naming a CPU this node does not have (online)."""
    wanted: set[int] = set()
    for entry in parse_multi_cpu_mask(cpu_mask):
        wanted.update(entry or ())
    missing = sorted(wanted - online)
    if missing:
        raise errors.ParameterError(
            f"Parameter {c.HV_CPU_MASK} {cpu_mask!r} names CPU(s) "
            f"{', '.join(map(str, missing))}, which this node does not have (its CPUs: "
            f"{affinity.format_cpu_list(online)}); use CPUs of this node", c.HV_CPU_MASK,
            cpu_mask)


def plan(cpu_mask: str, vcpus: int) -> tuple[Entry, list[Entry]]:
    """``(whole, per_vcpu)``: the CPUs of the whole process (None: leave it) and of each vCPU."""
    check_vcpus(cpu_mask, vcpus)
    entries = parse_multi_cpu_mask(cpu_mask)
    if len(entries) == 1:
        return entries[0], [entries[0]] * vcpus
    return None, entries


def vcpu_threads(cpus: Any, name: str) -> list[int]:
    """The thread id of each vCPU, in vCPU order, from a ``query-cpus-fast`` answer."""
    try:
        ordered = sorted(cpus, key=lambda cpu: int(cpu["cpu-index"]))
        return [int(cpu["thread-id"]) for cpu in ordered]
    except (TypeError, KeyError, ValueError):
        raise errors.HypervisorError(
            f"Instance {name}: QEMU's query-cpus-fast answer names no vCPU threads "
            f"({str(cpus)[:200]}); cannot pin its vCPUs") from None


def apply(name: str, pid: int, hvparams: Mapping[str, Any], vcpus: int,
          execute: Callable[[str], Any], online: frozenset[int] | None = None) -> bool:
    """Pin instance ``name``'s QEMU (``pid``) as its ``cpu_mask`` says; False if nothing to do.

    ``execute`` runs a QMP command on the instance's monitor.  Threads
    created later (QEMU's workers) inherit the main thread's CPUs.
    """
    cpu_mask = hvparams.get(c.HV_CPU_MASK) or c.CPU_PINNING_ALL
    whole, per_vcpu = plan(cpu_mask, vcpus)
    if whole is None and all(entry is None for entry in per_vcpu):
        return False
    all_cpus = online if online is not None else affinity.online_cpus()
    if whole is not None:
        for tid in affinity.threads_of(pid):
            affinity.set_thread_affinity(tid, whole, f"instance {name}'s QEMU")
    threads = vcpu_threads(execute("query-cpus-fast"), name)
    if len(threads) != len(per_vcpu):
        raise errors.HypervisorError(
            f"Instance {name}: QEMU runs {len(threads)} vCPU threads but {c.HV_CPU_MASK} "
            f"{cpu_mask!r} is for {len(per_vcpu)} vCPUs; stop and start the instance")
    for index, (tid, entry) in enumerate(zip(threads, per_vcpu, strict=True)):
        affinity.set_thread_affinity(tid, all_cpus if entry is None else entry,
                                     f"vCPU {index} of instance {name}")
    log.info("Instance %s: pinned its vCPU threads as %s=%s", name, c.HV_CPU_MASK, cpu_mask)
    return True
