"""Seeing a Ganeti instance from outside Ganeti, for the end-to-end tests.

Ganeti's own answers (``gnt-instance list``) come from the driver under
test, so the end-to-end tests check each step again without it: which
node's namespaces the QEMU process lives in (by its PID file and
``/proc/PID/ns``), what QEMU itself says on the instance's QMP socket, and
what the guest prints on its serial port (the test guest counts, see
:mod:`tests.guestimage`).  Both drivers keep their sockets and PID files at
the same paths under the node's ``/run/ganeti/kvm-hypervisor``, which the
test cluster maps to a host directory (:meth:`tests.cluster.Cluster.host_path`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from ganeti_kvm import errors
from ganeti_kvm.host import process
from ganeti_kvm.qmp.client import qmp_execute
from tests.cluster import CLEAN_ENV, NAMESPACE_KINDS, Cluster
from tests.helpers import SerialReader
from tests.test_console import Terminal

KVM_RUN_DIR = "/run/ganeti/kvm-hypervisor"
QMP_TIMEOUT = 10.0
# QEMU's run states in which the guest executes.
RUNNING = "running"
# A QEMU started with -S (Ganeti's --paused) is "prelaunch" until cont; a
# stopped one is "paused"; after an outgoing migration "postmigrate".
NOT_RUNNING_STATES = ("prelaunch", "paused", "postmigrate", "inmigrate", "finish-migrate")
# Two whole counter lines (the first bytes read may end a line begun before).
TWO_COUNTERS = r"(?<![A-Z])COUNTER (\d+)\n(?s:.*?)(?<![A-Z])COUNTER (\d+)\n"


def ctrl_path(cluster: Cluster, node: str, name: str, suffix: str) -> str:
    """Host path of ``name``'s control socket ``NAME.SUFFIX`` (qmp, serial) on ``node``."""
    return cluster.host_path(node, os.path.join(KVM_RUN_DIR, "ctrl", f"{name}.{suffix}"))


@dataclass(frozen=True)
class Qemu:
    """A live QEMU of an instance: its node and PID."""

    node: str
    pid: int


def qemu_on(cluster: Cluster, node: str, name: str) -> Qemu | None:
    """The live QEMU of ``name`` that ``node``'s PID file names, or None."""
    pid = cluster.instance_pid(node, name)
    if pid is None or not process.is_alive(pid) or process.state(pid) == "Z":
        return None
    argv = process.cmdline(pid) or []
    if not argv or "qemu" not in os.path.basename(argv[0]) and "kvm" not in argv[0]:
        return None
    return Qemu(node, pid)


def where(cluster: Cluster, name: str) -> list[Qemu]:
    """Every live QEMU of ``name`` in the cluster (by the nodes' PID files)."""
    found = [qemu_on(cluster, node, name) for node in cluster.nodes]
    return [q for q in found if q is not None]


def assert_runs_only_on(cluster: Cluster, name: str, node: str) -> Qemu:
    """``name`` has exactly one QEMU, in all of ``node``'s namespaces and none of the other's."""
    found = where(cluster, name)
    assert [q.node for q in found] == [node], \
        f"instance {name}: QEMU expected on {node} only, found {found}"
    qemu = found[0]
    for kind in NAMESPACE_KINDS:
        assert cluster.in_namespace(qemu.pid, node, kind), \
            f"QEMU {qemu.pid} of {name} is not in {node}'s {kind} namespace"
        for other in cluster.nodes:
            if other != node:
                assert not cluster.in_namespace(qemu.pid, other, kind)
    return qemu


def assert_runs_nowhere(cluster: Cluster, name: str, timeout: float = 15.0) -> None:
    """No QEMU of ``name`` is left on any node (bounded wait for one on its way out)."""
    deadline = time.monotonic() + timeout
    while where(cluster, name) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert where(cluster, name) == [], f"instance {name} still has a QEMU"


def qmp_status(cluster: Cluster, node: str, name: str) -> str:
    """QEMU's run state (``query-status``) on the instance's QMP socket on ``node``."""
    path = ctrl_path(cluster, node, name, "qmp")
    try:
        return str(qmp_execute(path, "query-status", timeout=QMP_TIMEOUT)["status"])
    except errors.GenericError as err:
        raise AssertionError(f"instance {name} on {node}: no QMP answer on {path}: "
                             f"{err}") from err


def guest_counter(cluster: Cluster, node: str, name: str, timeout: float = 60.0) -> int:
    """The guest's counter, read from its serial port on ``node``; it must be moving.

    Reads until two counter lines arrive and checks the second is greater:
    the guest runs (a paused or stopped guest prints nothing, and the wait
    is bounded by ``timeout``).  Only while no console is attached: QEMU
    serves one serial client at a time.
    """
    reader = SerialReader(ctrl_path(cluster, node, name, "serial"))
    try:
        match = reader.read_until(TWO_COUNTERS, timeout)
    finally:
        reader.close()
    first, second = int(match.group(1)), int(match.group(2))
    assert second > first, f"instance {name} on {node}: the counter went {first}, {second}"
    return second


def console(cluster: Cluster, name: str) -> Terminal:
    """``gnt-instance console NAME`` run on the master, on a pseudo-terminal.

    Ganeti runs it on the master only; it reaches the primary node by ssh.
    """
    env = dict(CLEAN_ENV, TERM="xterm")
    return Terminal([*cluster._enter(cluster.master), "gnt-instance", "console", name],
                    env=env)


def instance_files(cluster: Cluster, node: str, name: str) -> list[str]:
    """The files named after ``name`` in ``node``'s run directory (pid, ctrl, conf)."""
    found = []
    for sub in ("pid", "ctrl", "conf"):
        directory = cluster.host_path(node, os.path.join(KVM_RUN_DIR, sub))
        try:
            entries = os.listdir(directory)
        except FileNotFoundError:
            continue
        found += [os.path.join(sub, e) for e in entries
                  if e == name or e.startswith(name + ".")]
    return sorted(found)
