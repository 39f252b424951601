"""Listing: which instances run on the node, and what each one is.

The node's pidfiles name the candidates; /proc says whether each QEMU
really runs (read once per instance), and every running instance's
monitor is asked ``query-status`` at once (:mod:`ganeti_kvm.qmp.batch`).
Memory is the balloon's where the record says the instance was ballooned.
An instance whose guest powered itself off (``user_shutdown``, marked by
ganeti-kvmd) is listed on request, without a process.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ganeti_kvm import errors
from ganeti_kvm.core import names as c
from ganeti_kvm.core import runtime
from ganeti_kvm.host import fsutil, process
from ganeti_kvm.host.paths import SHUTDOWN_MARKER_SUFFIX, InstancePaths, RunDir
from ganeti_kvm.qmp import batch as qmp_batch

LIST_QMP_TIMEOUT = 1.0  # a listing call waits at most this for one instance


@dataclass(frozen=True)
class InstanceInfo:
    """A running instance as the listing calls see it."""

    name: str
    pid: int
    memory: int
    vcpus: int
    state: str
    cpu_time: float

    def as_tuple(self) -> tuple[str, int, int, int, str, float]:
        """The cluster manager's ``(name, pid, memory, vcpus, state, times)`` tuple."""
        return (self.name, self.pid, self.memory, self.vcpus, self.state, self.cpu_time)


def running(paths: InstancePaths) -> process.QemuProcess | None:
    """The instance's QEMU if it really runs, read from /proc once."""
    pid = process.read_pidfile(paths.pidfile)
    if pid is None:
        return None
    return process.instance_process(pid, paths.name, paths.pidfile)


def _instances(directory: str, suffix: str, layout: RunDir) -> Iterator[InstancePaths]:
    """The paths of each instance named by an entry ``NAME`` + ``suffix`` of ``directory``.

    Entries that name no valid instance are skipped.  A missing directory
    has none; one that cannot be read is an error naming it.
    """
    try:
        entries = sorted(os.listdir(directory))
    except FileNotFoundError:
        return
    except OSError as err:
        raise errors.HypervisorError(
            f"Cannot list {directory}: {err.strerror}; it must be a directory readable "
            "by this process") from None
    for entry in entries:
        if not entry.endswith(suffix):
            continue
        try:
            yield layout.instance(entry[:len(entry) - len(suffix)])
        except errors.HypervisorError:
            continue  # not an instance name of ours


def scan(layout: RunDir) -> Iterator[tuple[InstancePaths, process.QemuProcess]]:
    """Every instance whose QEMU really runs, with what /proc showed of it.

    An entry that is not a readable pidfile (a directory, say) is skipped:
    it cannot be a QEMU of ours, and the other instances are still listed.
    """
    for paths in _instances(layout.pid_dir, "", layout):
        found = running(paths)
        if found is not None:
            yield paths, found


def info(paths: InstancePaths, user_down: bool = False) -> InstanceInfo | None:
    """The running instance of ``paths``, or None; never raises for a dead instance.

    With ``user_down``, an instance whose guest powered itself off as
    ganeti-kvmd saw it (``user_shutdown``) is reported too, in state
    :data:`~ganeti_kvm.core.names.HV_STATE_USER_DOWN`, until a start, stop
    or clean-up.
    """
    found = running(paths)
    if found is None:
        return _user_down(paths) if user_down else None
    return describe([(paths, found)])[0]


def all_info(layout: RunDir, user_down: bool = False) -> list[InstanceInfo]:
    """Every running instance; with ``user_down`` also those :func:`info` reports so."""
    described = describe(scan(layout))
    if user_down:
        listed = {one.name for one in described}
        for paths in _instances(layout.ctrl_dir, SHUTDOWN_MARKER_SUFFIX, layout):
            if paths.name not in listed and running(paths) is None:
                down = _user_down(paths)
                if down is not None:
                    described.append(down)
    return described


def describe(found: Iterable[tuple[InstancePaths, process.QemuProcess]]) -> list[InstanceInfo]:
    """InstanceInfo for each running instance, asking all their monitors at once.

    Each monitor is asked as soon as its instance is found, so QEMU answers
    while the rest of /proc is read.  A SIGSTOPped QEMU cannot answer: its
    monitor is not asked and its state is unknown, as is the state of a
    monitor that fails or is held by another client for
    :data:`LIST_QMP_TIMEOUT`.
    """
    with qmp_batch.Batch("query-status", LIST_QMP_TIMEOUT) as batch:
        asked = [(paths, proc,
                  None if proc.stat.state == "T" else batch.ask(paths.qmp_socket))
                 for paths, proc in found]
        answers = batch.answers()
    described = []
    for paths, proc, ticket in asked:
        memory, vcpus = _memory_vcpus(proc.argv)
        memory = _ballooned(paths) or memory
        state = _run_state(None if ticket is None else answers[ticket])
        described.append(InstanceInfo(name=paths.name, pid=proc.pid, memory=memory,
                                      vcpus=vcpus, state=state, cpu_time=proc.stat.cpu_time))
    return described


def _user_down(paths: InstancePaths) -> InstanceInfo | None:
    """A QEMU-less instance whose guest powered itself off (ganeti-kvmd's marker), or None.

    No process: no pid (-1), memory, vCPUs or CPU time, as Ganeti's driver
    reports it.
    """
    if not os.path.isfile(paths.shutdown_marker):
        return None
    return InstanceInfo(name=paths.name, pid=-1, memory=0, vcpus=0,
                        state=c.HV_STATE_USER_DOWN, cpu_time=0.0)


def _ballooned(paths: InstancePaths) -> int | None:
    """The memory (MiB) the instance's balloon was set to, kept in its record; None if none.

    The record, not QEMU: asking each monitor ``query-balloon`` as well
    would cost every listing a command per instance, for a value that only
    :meth:`ganeti_kvm.core.node.KvmNode.balloon` changes.  A record that cannot be read (an
    instance another driver started) counts as not ballooned.
    """
    try:
        raw = fsutil.read_small_file(paths.runtime_file, limit=16 << 20)
    except errors.GenericError:
        return None
    return None if raw is None else runtime.balloon_memory_of(raw, paths.name)


def _run_state(status: Any) -> str:
    """The hypervisor state for a ``query-status`` answer (anything else: unknown)."""
    if not isinstance(status, dict):
        return c.HV_STATE_UNKNOWN
    return c.HV_STATE_RUNNING if status.get("running") else c.HV_STATE_PAUSED


def _memory_vcpus(argv: Sequence[str]) -> tuple[int, int]:
    """Memory (MiB) and vCPUs from a QEMU command line."""
    memory = vcpus = 0
    for index, arg in enumerate(argv[:-1]):
        value = argv[index + 1]
        if arg == "-m":
            with contextlib.suppress(ValueError):
                memory = int(value.split(",")[0].rstrip("Mm"))
        elif arg == "-smp":
            with contextlib.suppress(ValueError):
                vcpus = int(value.split(",")[0].removeprefix("cpus="))
    return memory, vcpus
