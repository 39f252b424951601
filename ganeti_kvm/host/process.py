"""Processes: is this PID really our QEMU, signals, and bounded waits.

Everything here reads /proc directly; nothing starts a subprocess, so the
listing calls stay cheap and cannot hang on another program.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from typing import NamedTuple

from ganeti_kvm import errors
from ganeti_kvm.host import fsutil


def read_pidfile(path: str) -> int | None:
    """The PID in ``path``, or None if the file is missing, empty or garbage."""
    try:
        raw = fsutil.read_small_file(path, limit=64)
    except errors.HypervisorError:
        return None  # unreadable, e.g. a directory in its place: no QEMU of ours wrote it
    if not raw:
        return None
    try:
        pid = int(raw.strip())
    except ValueError:
        return None
    return pid if pid > 0 else None


def cmdline(pid: int) -> list[str] | None:
    """The argv of process ``pid`` from /proc, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            raw = handle.read()
    except OSError:
        return None
    if not raw:
        return None  # a zombie or a kernel thread
    return [part.decode("utf-8", "surrogateescape") for part in raw.rstrip(b"\0").split(b"\0")]


class Stat(NamedTuple):
    """What /proc/PID/stat says of a process that the listing calls need."""

    state: str  # the one-letter scheduler state: R, S, T, Z ...
    cpu_time: float  # user + system CPU seconds so far


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def stat(pid: int) -> Stat | None:
    """State and CPU time of ``pid`` from one read of /proc/PID/stat; None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            raw = handle.read()
    except OSError:
        return None
    # The command name is in parentheses and may contain anything; the state follows it.
    close = raw.rfind(b")")
    fields = raw[close + 2:].split()
    if close < 0 or not fields:
        return None
    try:
        cpu_time = (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
    except (IndexError, ValueError):
        cpu_time = 0.0
    return Stat(fields[0][:1].decode("ascii", "replace"), cpu_time)


def state(pid: int) -> str | None:
    """The one-letter scheduler state of ``pid`` (R, S, T, Z ...), or None if it is gone."""
    current = stat(pid)
    return None if current is None else current.state


def is_alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    current = state(pid)
    return current is not None and current not in ("Z", "X")


class QemuProcess(NamedTuple):
    """A live QEMU of one instance, as /proc showed it."""

    pid: int
    argv: list[str]
    stat: Stat


def instance_process(pid: int, name: str, pidfile: str) -> QemuProcess | None:
    """``pid`` if it is a live QEMU started for instance ``name`` with
    ``pidfile``, else None.

    A PID from a stale pidfile may have been reused by an unrelated process;
    only a process whose command line names this instance and this pidfile
    counts.
    """
    current = stat(pid)
    if current is None or current.state in ("Z", "X"):
        return None
    argv = cmdline(pid)
    if not argv or _option_value(argv, "-name") != name \
            or _option_value(argv, "-pidfile") != pidfile:
        return None
    return QemuProcess(pid, argv, current)


def runs_instance(pid: int, name: str, pidfile: str) -> bool:
    """Whether ``pid`` is a live QEMU started for instance ``name`` with ``pidfile``."""
    return instance_process(pid, name, pidfile) is not None


def _option_value(argv: list[str], option: str) -> str | None:
    try:
        return argv[argv.index(option) + 1]
    except (ValueError, IndexError):
        return None


def signal_pid(pid: int, signum: int) -> bool:
    """Send ``signum``; False if the process is already gone."""
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        return False
    except OSError as err:
        if err.errno == errno.ESRCH:
            return False
        raise
    return True


def wait_gone(pid: int, timeout: float, interval: float = 0.005) -> bool:
    """Wait until ``pid`` has exited (or is a zombie); True if it did within ``timeout``.

    The poll interval grows from 5 ms to 50 ms, so a quick exit is seen at
    once and a slow one costs little CPU.
    """
    deadline = time.monotonic() + timeout
    while True:
        _reap(pid)
        if not is_alive(pid):
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(interval, remaining))
        interval = min(interval * 1.5, 0.05)


def _reap(pid: int) -> None:
    """Collect ``pid`` if it happens to be our child, so it does not stay a zombie."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


#: Seconds between SIGTERMs while :func:`terminate` waits for the exit.
TERM_REPEAT = 0.25


def terminate(pid: int, term_timeout: float = 10.0, kill_timeout: float = 10.0) -> bool:
    """SIGTERM, then SIGKILL after ``term_timeout``; True once the process is gone.

    The SIGTERM is sent again every :data:`TERM_REPEAT` seconds.  QEMU (7.2
    and 10.0) can miss the wake-up that ends its exit: its main loop then
    sleeps in the monitor's clean-up (seen to outlast a 10 s wait) with the
    guest already gone.  A monitor client busy at that moment (a listing)
    is enough; it happened to one stop in five under a node's listing load.
    Each signal wakes the main loop, so a repeated SIGTERM ends the exit at
    once instead of a SIGKILL after ``term_timeout``.
    """
    deadline = time.monotonic() + term_timeout
    while True:
        if not signal_pid(pid, signal.SIGTERM):
            return True
        # A stopped (SIGSTOP) process would hold the SIGTERM pending forever;
        # continue it so it can act on the signal.
        signal_pid(pid, signal.SIGCONT)
        remaining = deadline - time.monotonic()
        if wait_gone(pid, min(TERM_REPEAT, max(remaining, 0.0))):
            return True
        if time.monotonic() >= deadline:
            break
    signal_pid(pid, signal.SIGKILL)
    return wait_gone(pid, kill_timeout)
