"""One node of the side-by-side benchmark: Ganeti 3.0's KVM driver and ours, in one process.

Started by :class:`bench.peer_client.PeerNode` as
``unshare --mount --propagation private -- /usr/bin/python3 -B bench/peer.py`` with
the unpacked Ganeti 3.0 tree and this repository on PYTHONPATH: Debian's
interpreter and python3-* libraries, which Ganeti's node daemon uses.

It mounts fresh tmpfs over /run, /var/lib/ganeti and /var/log/ganeti (the
bundled driver's paths are hard-coded), so nothing of a real node is
touched.  The bundled driver ("peer") keeps its state in
/var/run/ganeti/kvm-hypervisor, ours (:class:`ganeti_kvm.ganeti3.KVMHypervisor`)
in /var/run/ganeti/kvm-ours, so that each one's listing sees only its own
instances.  Both get the same Ganeti ``objects.Instance``; every call
builds a fresh driver object, as Ganeti's node daemon does, and the timed
span includes that.

The process is a child subreaper (``prctl(PR_SET_CHILD_SUBREAPER)``): the
QEMUs both drivers daemonize become its children and are reaped as soon as
they exit, as systemd reaps a node daemon's orphans.  (This machine's PID 1
reaps lazily, and Ganeti's ``utils.KillProcess`` counts a zombie as alive.)

Protocol: one JSON request per line on stdin, ``{"op": NAME, ...}``; one
reply per line on stdout, ``{"ok": VALUE}`` or ``{"error": TEXT}``.  Timed
operations return ``{"t": SECONDS, ...}``.  ``exit`` kills every QEMU of
this node and ends the process.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
import traceback
from typing import Any

PEER_DIR = "/var/run/ganeti/kvm-hypervisor"
OURS_DIR = "/var/run/ganeti/kvm-ours"
MOUNTS = ("/run", "/var/lib/ganeti", "/var/log/ganeti")
PR_SET_CHILD_SUBREAPER = 36
GONE_POLL = 0.01  # seconds between ListInstances while waiting for an ACPI stop
MASTER_POLL = 1.0  # Ganeti's master polls GetMigrationStatus every second
DRIVERS = ("ours", "peer")


def private_dirs() -> None:
    """tmpfs over Ganeti's hard-coded directories, in this (private) mount namespace."""
    with open("/proc/self/mountinfo", encoding="ascii") as handle:
        if any(" shared:" in line for line in handle if line.split()[4] == "/"):
            raise SystemExit("bench/peer.py: run me under unshare --propagation private")
    for target in MOUNTS:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", target],
                       check=True)
    for directory in ("/var/log/ganeti/kvm", PEER_DIR, OURS_DIR):
        os.makedirs(directory, exist_ok=True)


class Reaper:
    """Makes this process a child subreaper and reaps the QEMUs it adopts.

    Only known QEMU PIDs are reaped: the drivers' own subprocesses are left
    for ``subprocess`` to wait for.
    """

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
        self.pids: set[int] = set()
        signal.signal(signal.SIGCHLD, self._on_child)

    def watch(self, pids: list[int]) -> None:
        self.pids.update(pids)
        self._on_child(0, None)  # one may have exited before it was known

    def _on_child(self, signum: int, frame: Any) -> None:
        for pid in list(self.pids):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                # Not (yet) ours: still under its daemonizing parent, or gone.
                if not os.path.exists(f"/proc/{pid}"):
                    self.pids.discard(pid)
                continue
            if done:
                self.pids.discard(pid)


class Serial:
    """A connection to an instance's serial port: wait for lines, type commands."""

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.text = ""

    def wait(self, pattern: str, timeout: float) -> str:
        """Read until ``pattern`` (a regex) appears after the last match; the match."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while True:
            match = regex.search(self.text)
            if match:
                self.text = self.text[match.end():]
                return match.group(0)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"serial: no {pattern!r} within {timeout} s; "
                                   f"last output {self.text[-300:]!r}")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                raise EOFError(f"serial closed before {pattern!r}; got {self.text[-300:]!r}")
            self.text += chunk.decode("utf-8", "replace")

    def drain(self) -> None:
        """Forget what was read and what is waiting: the next :meth:`wait` sees only
        output from now on."""
        self.sock.setblocking(False)
        try:
            while self.sock.recv(65536):
                pass
        except BlockingIOError:
            pass
        finally:
            self.sock.setblocking(True)
        self.text = ""

    def send(self, text: str) -> None:
        self.sock.sendall(text.encode())

    def close(self) -> None:
        self.sock.close()


def raw_qmp_status(path: str) -> None:
    """The least one query-status can cost: QEMU's side of the exchange, nothing else."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(path)
        sock.sendall(b'{"execute":"qmp_capabilities"}\n{"execute":"query-status"}\n')
        received = b""
        while received.count(b"\n") < 3:
            chunk = sock.recv(65536)
            if not chunk:
                raise RuntimeError(f"QMP socket {path} closed after {received!r}")
            received += chunk


class Teardown(logging.Handler):
    """Keeps what ganeti-kvm logs of the kernel's teardown of a migration's source
    QEMU (from SIGKILL until it was gone), in milliseconds."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.last_ms: float | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if "after SIGKILL" in record.msg and isinstance(record.args, tuple) \
                and record.args and isinstance(record.args[-1], float):
            self.last_ms = record.args[-1]

    def take(self) -> float | None:
        value, self.last_ms = self.last_ms, None
        return value


class Node:
    """Both drivers on this node, the instances they run and their serial ports."""

    def __init__(self, reaper: Reaper) -> None:
        from ganeti.hypervisor.hv_kvm import KVMHypervisor as Peer  # type: ignore[import-not-found,unused-ignore]

        from ganeti_kvm.ganeti3 import KVMHypervisor as Ours

        self.classes = {"ours": Ours, "peer": Peer}
        self.reaper = reaper
        self.instances: dict[str, Any] = {}
        self.serials: dict[str, Serial] = {}
        self.teardown = Teardown()
        logger = logging.getLogger("ganeti_kvm.core.migration")
        logger.addHandler(self.teardown)
        logger.setLevel(logging.DEBUG)

    def hv(self, driver: str) -> Any:
        """A fresh driver object, as the node daemon makes one per call."""
        if driver == "ours":
            return self.classes["ours"](run_dir=OURS_DIR)
        return self.classes["peer"]()

    def ctrl(self, driver: str) -> str:
        return os.path.join(OURS_DIR if driver == "ours" else PEER_DIR, "ctrl")

    def qmp_socket(self, driver: str, name: str) -> str:
        if driver == "ours":
            return self.hv("ours").node.paths(name).qmp_socket
        return os.path.join(PEER_DIR, "ctrl", name + ".qmp")

    def serial_socket(self, driver: str, name: str) -> str:
        if driver == "ours":
            return self.hv("ours").node.paths(name).serial_socket
        return os.path.join(PEER_DIR, "ctrl", name + ".serial")

    # --- instances -------------------------------------------------------------

    def op_define(self, name: str, qemu: str, memory: int = 64, kernel: str = "",
                  initrd: str = "", port: int | None = None, bandwidth: int = 1000,
                  downtime: int = 30, migration_caps: str = "") -> None:
        """Describe instance ``name`` (the same object for either driver); without
        ``kernel`` it has no guest: QEMU sits in its firmware."""
        from ganeti import constants, objects  # type: ignore[import-not-found,unused-ignore]

        defaults = constants.HVC_DEFAULTS[constants.HT_KVM]
        hvparams = dict(defaults, kvm_path=qemu, kernel_path=kernel, initrd_path=initrd,
                        kvm_flag="disabled", serial_console=True, acpi=True,
                        vhost_net=False, migration_bandwidth=bandwidth,
                        migration_downtime=downtime, migration_caps=migration_caps,
                        migration_port=port or defaults["migration_port"])
        if kernel:
            hvparams.update(root_path="/dev/vda1", kernel_args="panic=-1 quiet")
        beparams = dict(constants.BEC_DEFAULTS, maxmem=memory, minmem=memory, vcpus=1)
        serial_no = len(self.instances) + 1
        self.instances[name] = objects.Instance(
            name=name, uuid=f"8e1c4d2a-0000-4000-8000-{serial_no:012d}",
            primary_node="node-uuid-1", hypervisor=constants.HT_KVM, hvparams=hvparams,
            beparams=beparams, nics=[], disks=[], tags=set(), network_port=None)

    def _watch(self) -> None:
        self.reaper.watch(list(self.op_pids().values()))

    def op_start(self, driver: str, name: str, paused: bool,
                 serial: bool = False) -> dict[str, float]:
        """StartInstance; with ``serial``, connect to the serial port at once (QEMU
        drops what the guest prints while nobody is connected)."""
        inst = self.instances[name]
        started = time.perf_counter()
        self.hv(driver).StartInstance(inst, [], paused)
        elapsed = time.perf_counter() - started
        if serial:
            self._serial(driver, name)
        self._watch()
        return {"t": elapsed}

    def op_stop(self, driver: str, name: str) -> dict[str, float]:
        """A forced stop, then (untimed) the cleanup Ganeti's backend does."""
        self._close_serial(driver, name)
        inst = self.instances[name]
        started = time.perf_counter()
        self.hv(driver).StopInstance(inst, force=True)
        elapsed = time.perf_counter() - started
        self.hv(driver).CleanupInstance(name)
        return {"t": elapsed}

    def op_acpi_stop(self, driver: str, name: str, timeout: float = 60.0) -> dict[str, float]:
        """ACPI stop as Ganeti's backend does it, polling ListInstances every 10 ms
        (the backend's own retry is 5 s) until the instance is gone."""
        self._close_serial(driver, name)
        inst = self.instances[name]
        started = time.perf_counter()
        self.hv(driver).StopInstance(inst, force=False)
        call = time.perf_counter() - started
        while name in self.hv(driver).ListInstances():
            if time.perf_counter() - started > timeout:
                raise TimeoutError(f"{driver}: {name} still runs {timeout} s after ACPI stop")
            time.sleep(GONE_POLL)
        gone = time.perf_counter() - started
        self.hv(driver).CleanupInstance(name)
        return {"t": gone, "call": call}

    def op_info(self, driver: str, name: str) -> dict[str, Any]:
        started = time.perf_counter()
        info = self.hv(driver).GetInstanceInfo(name)
        elapsed = time.perf_counter() - started
        if info is None or info[0] != name:
            raise RuntimeError(f"{driver}: GetInstanceInfo({name}) gave {info!r}")
        return {"t": elapsed}

    def op_all(self, driver: str, count: int) -> dict[str, Any]:
        started = time.perf_counter()
        infos = self.hv(driver).GetAllInstancesInfo()
        elapsed = time.perf_counter() - started
        if len(infos) != count:
            raise RuntimeError(f"{driver}: GetAllInstancesInfo listed {len(infos)} "
                               f"instances, not {count}: {infos!r}")
        return {"t": elapsed}

    def op_qmp(self, driver: str, name: str) -> dict[str, Any]:
        """One query-status the way each driver talks QMP; ``raw``: the floor."""
        if driver == "ours":
            from ganeti_kvm.qmp.client import qmp_execute

            path = self.qmp_socket("ours", name)
            started = time.perf_counter()
            status = qmp_execute(path, "query-status")["status"]
        elif driver == "peer":
            from ganeti.hypervisor.hv_kvm.monitor import QmpConnection  # type: ignore[import-not-found,unused-ignore]

            path = self.qmp_socket("peer", name)
            started = time.perf_counter()
            with QmpConnection(path) as qmp:
                status = qmp.Execute("query-status")["status"]
        else:
            path = self.qmp_socket("ours", name)
            started = time.perf_counter()
            raw_qmp_status(path)
            status = "raw"
        return {"t": time.perf_counter() - started, "status": status}

    # --- the guest's serial port -----------------------------------------------

    def _serial(self, driver: str, name: str) -> Serial:
        key = f"{driver}/{name}"
        if key not in self.serials:
            self.serials[key] = Serial(self.serial_socket(driver, name))
        return self.serials[key]

    def op_serial_wait(self, driver: str, name: str, pattern: str, timeout: float = 120.0,
                       fresh: bool = False) -> dict[str, Any]:
        """Wait for ``pattern`` on the serial port (``fresh``: in output from now on);
        the match and when it was seen."""
        serial = self._serial(driver, name)
        if fresh:
            serial.drain()
        match = serial.wait(pattern, timeout)
        return {"match": match, "at": time.monotonic()}

    def op_serial_rate(self, driver: str, name: str, pattern: str, failure: str,
                       lines: int = 4, timeout: float = 120.0) -> dict[str, Any]:
        """Seconds between lines matching ``pattern``, from output from now on: the
        mean interval of the last ``lines`` - 2 (the first interval may be short
        when the guest waited for the serial port to be read), and the last
        match.  ``failure`` printed instead is an error."""
        serial = self._serial(driver, name)
        serial.drain()
        seen = []
        match = ""
        for _ in range(lines):
            match = serial.wait(f"{pattern}|{failure}", timeout)
            if match == failure:
                raise RuntimeError(f"{driver}'s {name} printed {failure!r}")
            seen.append(time.monotonic())
        return {"interval": (seen[-1] - seen[1]) / (lines - 2), "last": match}

    def op_serial_send(self, driver: str, name: str, text: str) -> None:
        self._serial(driver, name).send(text)

    def _close_serial(self, driver: str, name: str) -> None:
        serial = self.serials.pop(f"{driver}/{name}", None)
        if serial is not None:
            serial.close()

    # --- migration -------------------------------------------------------------

    def op_migration_info(self, driver: str, name: str) -> str:
        return str(self.hv(driver).MigrationInfo(self.instances[name]))

    def op_accept(self, driver: str, name: str, info: str) -> None:
        self.hv(driver).AcceptInstance(self.instances[name], info, "127.0.0.1")
        self._watch()

    def op_finalize_dst(self, driver: str, name: str, info: str, success: bool) -> None:
        self.hv(driver).FinalizeMigrationDst(self.instances[name], info, success)

    def _migrate_ours(self, name: str, limit: float | None) -> dict[str, Any]:
        """The library's own migration: one call, woken by QEMU's events."""
        from ganeti_kvm import errors
        from ganeti_kvm.core import migration as core

        self._close_serial("ours", name)
        node = self.hv("ours").node
        started = time.perf_counter()
        try:
            final = core.migrate(node, name, "127.0.0.1", True, limit=limit)
        except errors.MigrationError as err:
            elapsed = time.perf_counter() - started
            after = core.status(node, name)
            return {"t": elapsed, "status": "cancelled", "error": str(err),
                    "qemu_status": after.status, "total_time_ms": after.total_time_ms,
                    "downtime_ms": after.downtime_ms}
        elapsed = time.perf_counter() - started
        return {"t": elapsed, "status": final.status, "total_time_ms": final.total_time_ms,
                "downtime_ms": final.downtime_ms, "step": final.step,
                "teardown_ms": self.teardown.take()}

    def _migrate_master(self, driver: str, name: str, bound: float | None) -> dict[str, Any]:
        """MigrateInstance, then GetMigrationStatus every second as Ganeti's master
        does, then FinalizeMigrationSource.  QEMU's own figures are read from the
        source monitor between the two.  Ganeti sets no time limit: past ``bound``
        the bench cancels the migration itself."""
        from ganeti import constants  # type: ignore[import-not-found,unused-ignore]

        from ganeti_kvm.qmp.client import qmp_execute

        self._close_serial(driver, name)
        inst = self.instances[name]
        qmp_path = self.qmp_socket(driver, name)
        started = time.perf_counter()
        self.hv(driver).MigrateInstance("cluster", inst, "127.0.0.1", True)
        while True:
            status = self.hv(driver).GetMigrationStatus(inst)
            if status.status not in constants.HV_KVM_MIGRATION_ACTIVE_STATUSES:
                break
            if bound is not None and time.perf_counter() - started > bound:
                qmp_execute(qmp_path, "migrate_cancel", timeout=10)
                elapsed = time.perf_counter() - started
                deadline = time.monotonic() + 30
                while qmp_execute(qmp_path, "query-migrate", timeout=10).get(
                        "status") not in ("cancelled", "failed", "completed"):
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{driver}: migrate_cancel of {name} did not settle")
                    time.sleep(0.05)
                self.hv(driver).FinalizeMigrationSource(inst, False, True)
                return {"t": elapsed, "status": "still active", "total_time_ms": None,
                        "downtime_ms": None}
            time.sleep(MASTER_POLL)
        seen = time.perf_counter() - started
        query = qmp_execute(qmp_path, "query-migrate", timeout=10)
        success = status.status == constants.HV_MIGRATION_COMPLETED
        finalize_started = time.perf_counter()
        self.teardown.take()
        self.hv(driver).FinalizeMigrationSource(inst, success, True)
        elapsed = seen + time.perf_counter() - finalize_started
        return {"t": elapsed, "status": status.status,
                "total_time_ms": query.get("total-time"), "downtime_ms": query.get("downtime"),
                "teardown_ms": self.teardown.take()}

    def op_migrate(self, driver: str, name: str, limit: float | None = None,
                   master: bool | None = None) -> dict[str, Any]:
        """Migrate ``name`` to 127.0.0.1 from this node; ``limit`` bounds either driver.

        ``master`` (the default for the peer, and the only way it can): as
        Ganeti's master drives it, polling every second; else ours' own
        :func:`ganeti_kvm.core.migration.migrate`.
        """
        if master is None:
            master = driver == "peer"
        if master:
            return self._migrate_master(driver, name, limit)
        return self._migrate_ours(name, limit)

    # --- housekeeping ----------------------------------------------------------

    def op_pids(self) -> dict[str, int]:
        """Every QEMU PID either driver recorded: ``{"DRIVER/NAME": pid}``."""
        pids = {}
        for driver, root in (("peer", PEER_DIR), ("ours", OURS_DIR)):
            directory = os.path.join(root, "pid")
            for name in os.listdir(directory) if os.path.isdir(directory) else []:
                try:
                    with open(os.path.join(directory, name), encoding="ascii") as handle:
                        text = handle.read().strip()
                except OSError:
                    continue
                if text.isdigit():
                    pids[f"{driver}/{name}"] = int(text)
        return pids

    def kill_all(self) -> None:
        """SIGKILL every QEMU of this node (those whose command line names them)."""
        for serial in self.serials.values():
            serial.close()
        self.serials.clear()
        for key, pid in self.op_pids().items():
            name = key.split("/", 1)[1]
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as handle:
                    argv = handle.read().split(b"\0")
            except OSError:
                continue
            if b"-name" in argv and argv[argv.index(b"-name") + 1].split(b",")[0] == \
                    name.encode():
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while self.reaper.pids and time.monotonic() < deadline:
            self.reaper.watch([])
            time.sleep(0.01)


def main() -> int:
    private_dirs()
    node = Node(Reaper())
    print(json.dumps({"ok": "ready"}), flush=True)
    try:
        for line in sys.stdin:
            request = json.loads(line)
            op = request.pop("op")
            if op == "exit":
                break
            try:
                reply = {"ok": getattr(node, "op_" + op)(**request)}
            except Exception as err:  # noqa: BLE001 - every failure goes back to the bench
                reply = {"error": f"{type(err).__module__}.{type(err).__name__}: {err}",
                         "traceback": traceback.format_exc()}
            print(json.dumps(reply, default=repr), flush=True)
    finally:
        node.kill_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
