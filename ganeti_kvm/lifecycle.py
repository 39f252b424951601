"""The core of the KVM driver: start, stop and inspect instances on one node.

:class:`KvmNode` works on plain data (names, filled parameter dicts, block
devices, NIC dicts) and knows nothing of the cluster manager's call
signatures; :mod:`ganeti_kvm.hv_kvm` adapts those to it.  A start has
explicit phases, and whatever a phase acquired (a uid, TAP devices, the
QEMU process, files) is released if a later phase fails.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import shutil
import signal
import subprocess
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ganeti_kvm import (
    cmdline,
    errors,
    fsutil,
    ifup,
    locking,
    netdev,
    process,
    qemu_caps,
    qmp_batch,
    runtime,
    uidpool,
    validation,
)
from ganeti_kvm import constants as c
from ganeti_kvm.paths import InstancePaths, RunDir
from ganeti_kvm.qmp import QmpClient

log = logging.getLogger(__name__)

LAUNCH_TIMEOUT = 120.0  # the daemonizing QEMU parent must exit within this
QMP_READY_TIMEOUT = 30.0  # QMP must answer within this after the parent exited
LIST_QMP_TIMEOUT = 1.0  # a listing call waits at most this for one instance
UID_POOL_ENV = "GANETI_KVM_UID_POOL"


@dataclass
class InstanceSpec:
    """What the core needs to start an instance, independent of call signatures."""

    name: str
    hvparams: dict[str, Any]
    memory: int
    vcpus: int
    nics: list[dict[str, Any]] = field(default_factory=list)
    disks: list[cmdline.BlockDevice] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    uuid: str | None = None
    network_port: int | None = None


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


class _StartUndo:
    """What a start has acquired so far, released in reverse on failure."""

    def __init__(self) -> None:
        self._steps: list[tuple[str, Any]] = []

    def push(self, what: str, action: Any) -> None:
        self._steps.append((what, action))

    def run(self) -> None:
        while self._steps:
            what, action = self._steps.pop()
            try:
                action()
            except Exception:  # keep undoing the rest; report this one
                log.exception("Cleaning up after a failed start: %s failed", what)

    def forget(self) -> None:
        self._steps.clear()


class KvmNode:
    """One node's instances under a run directory."""

    def __init__(self, run_dir: str, uid_pool: str | None = None,
                 socat_path: str = c.SOCAT_PATH, ifup_script: str = c.KVM_IFUP,
                 netns: str | None = None) -> None:
        self.layout = RunDir(os.path.abspath(run_dir))
        self.uid_pool_text = uid_pool if uid_pool is not None else os.environ.get(UID_POOL_ENV)
        self.socat_path = socat_path
        self.ifup_script = ifup_script
        # The network namespace (an ``ip netns`` name) where the instances' TAP
        # devices live and the ifup hook runs; None is this process's own.
        self.netns = netns

    # --- helpers -------------------------------------------------------------

    def paths(self, name: str) -> InstancePaths:
        """The validated paths of instance ``name``."""
        return self.layout.instance(name)

    def ensure_dirs(self) -> None:
        """Create the run directory layout with mode 0700."""
        try:
            fsutil.ensure_dirs(self.layout.all_dirs())
        except OSError as err:
            raise errors.HypervisorError(
                f"Cannot create the run directory {self.layout.root}: {err}") from err

    def caps(self, kvm_path: str) -> qemu_caps.QemuCaps:
        """The capabilities of ``kvm_path``, probed once and cached on disk."""
        self.ensure_dirs()
        return qemu_caps.probe(kvm_path, cache_dir=self.layout.cache_dir)

    @contextlib.contextmanager
    def locked(self, name: str, operation: str, timeout: float = 120.0) -> Iterator[InstancePaths]:
        """Hold instance ``name``'s lock; yields its paths."""
        paths = self.paths(name)
        self.ensure_dirs()
        with locking.instance_lock(paths.lock_file, name, operation, timeout):
            yield paths

    def running_pid(self, name: str) -> int | None:
        """The PID of instance ``name``'s QEMU if it really runs, else None."""
        found = self._running(self.paths(name))
        return found.pid if found else None

    @staticmethod
    def _running(paths: InstancePaths) -> process.QemuProcess | None:
        """The instance's QEMU if it really runs, read from /proc once."""
        pid = process.read_pidfile(paths.pidfile)
        if pid is None:
            return None
        return process.instance_process(pid, paths.name, paths.pidfile)

    def load_record(self, name: str) -> runtime.RuntimeRecord | None:
        """The saved runtime record of ``name``, or None."""
        return runtime.load(self.paths(name).runtime_file, name)

    def check_params(self, hvparams: Mapping[str, Any]) -> qemu_caps.QemuCaps:
        """Syntax and node checks of filled ``hvparams``; returns the QEMU's capabilities."""
        validation.check_all_syntax(hvparams)
        caps = self.caps(hvparams[c.HV_KVM_PATH])
        validation.check_all_node(hvparams, caps)
        return caps

    # --- start ---------------------------------------------------------------

    def start(self, spec: InstanceSpec, paused: bool = False) -> None:
        """Start ``spec`` and return once QEMU runs and answers on QMP."""
        caps = self.check_params(spec.hvparams)
        with self.locked(spec.name, "start") as paths:
            if self.running_pid(spec.name) is not None:
                raise errors.HypervisorError(
                    f"Failed to start instance {spec.name}: it is already running")
            self._remove_leftovers(paths)
            record = runtime.RuntimeRecord(
                name=spec.name, argv=[], nics=[dict(n) for n in spec.nics],
                hvparams=dict(spec.hvparams),
                beparams={c.BE_MEMORY: spec.memory, c.BE_VCPUS: spec.vcpus},
                disks=[d.to_dict() for d in spec.disks], tags=list(spec.tags),
                qemu_version=list(caps.version), uuid=spec.uuid,
                network_port=spec.network_port)
            self.start_from_record(record, paused=paused, caps=caps)

    def build_argv(self, record: runtime.RuntimeRecord, caps: qemu_caps.QemuCaps,
                   paths: InstancePaths) -> list[str]:
        """The command line of ``record`` on this node (its paths, its uid)."""
        spec = cmdline.MachineSpec(
            name=record.name, memory=int(record.beparams[c.BE_MEMORY]),
            vcpus=int(record.beparams[c.BE_VCPUS]), uuid=record.uuid,
            network_port=record.network_port,
            run_as=self._run_as(record.hvparams, record.uid))
        disks = [cmdline.BlockDevice.from_dict(d) for d in record.disks]
        return cmdline.build_argv(spec, disks, record.hvparams, caps, paths)

    def start_from_record(self, record: runtime.RuntimeRecord, paused: bool = False,
                          incoming: str | None = None, run_ifup: bool = True,
                          caps: qemu_caps.QemuCaps | None = None) -> None:
        """Start QEMU from a record (a new start, a reboot, a migration target).

        The caller holds the instance's lock; ``caps`` are those of the
        record's ``kvm_path`` if the caller has them already.
        The command line is rebuilt from the record's parameters for this
        node's paths, so a record from another node (a migration) works too;
        a record upgraded from the 2011 format keeps its command line.
        """
        paths = self.paths(record.name)
        undo = _StartUndo()
        try:
            record.uid = self._request_uid(record.name, record.hvparams, undo)
            if record.upgraded_from is None:
                caps = caps or self.caps(record.hvparams[c.HV_KVM_PATH])
                record.argv = self.build_argv(record, caps, paths)
                record.qemu_version = list(caps.version)
            self._execute(record, paths, paused, undo, incoming=incoming, run_ifup=run_ifup)
        except BaseException:
            undo.run()
            raise
        undo.forget()

    def _request_uid(self, name: str, hvparams: Mapping[str, Any],
                     undo: _StartUndo) -> int | None:
        """A uid from this node's pool for security model ``pool``, else None."""
        if hvparams.get(c.HV_SECURITY_MODEL) != c.HT_SM_POOL:
            return None
        pool = self._uid_pool()
        uid = pool.request(name)
        undo.push(f"release uid {uid}", lambda: pool.release(uid))
        return uid

    def _uid_pool(self) -> uidpool.UidPool:
        if not self.uid_pool_text:
            raise errors.HypervisorError(
                "Security model 'pool' needs a uid pool: pass uid_pool= to the hypervisor "
                f"or set {UID_POOL_ENV} (e.g. '1000-1010, 2000')")
        return uidpool.UidPool(self.layout.uid_dir, uidpool.parse_uid_pool(self.uid_pool_text))

    @staticmethod
    def _run_as(hvparams: Mapping[str, Any], uid: int | None) -> str | None:
        model = hvparams[c.HV_SECURITY_MODEL]
        if model == c.HT_SM_USER:
            return str(hvparams[c.HV_SECURITY_DOMAIN])
        if model == c.HT_SM_POOL and uid is not None:
            return f"{uid}:{uid}"
        return None

    def _execute(self, record: runtime.RuntimeRecord, paths: InstancePaths, paused: bool,
                 undo: _StartUndo, incoming: str | None = None, run_ifup: bool = True) -> None:
        """Launch QEMU from ``record``: TAPs, process, QMP, hooks, password, continue."""
        hvp = record.hvparams
        if hvp[c.HV_KVM_USE_CHROOT]:
            self._make_chroot(paths)
            undo.push("remove chroot", lambda: self._retire_chroot(paths, record.name))
        taps = self._open_taps(record, undo)
        # Saved once the TAP names are known, before QEMU starts.
        runtime.save(paths.runtime_file, record)
        undo.push("remove runtime record", lambda: fsutil.remove_file(paths.runtime_file))
        argv = list(record.argv)
        argv += cmdline.build_nic_argv(
            [cmdline.NicSpec(model=cmdline.NIC_MODELS[hvp[c.HV_NIC_TYPE]],
                             mac=str(nic["mac"]), fd=fd,
                             vhost=bool(hvp[c.HV_VHOST_NET]))
             for nic, (fd, _) in zip(record.nics, taps)],
            boot_network=hvp[c.HV_BOOT_ORDER] == c.HT_BO_NETWORK and not hvp[c.HV_KERNEL_PATH])
        argv += cmdline.start_flags(paused=True, incoming=incoming)
        undo.push("remove sockets and pidfile", lambda: self._remove_leftovers(paths))
        self._launch(argv, [fd for fd, _ in taps], record.name)
        for fd, _ in taps:
            os.close(fd)  # QEMU holds its own copies now
        pid = process.read_pidfile(paths.pidfile)
        if pid is None:
            raise errors.HypervisorError(
                f"QEMU for instance {record.name} started but wrote no pidfile "
                f"{paths.pidfile}; check the node's logs")
        undo.push(f"kill QEMU {pid}", lambda: self._kill(pid))
        with QmpClient(paths.qmp_socket, timeout=QMP_READY_TIMEOUT) as qmp:
            qmp.connect()
            qmp.execute("query-status")
            if run_ifup:
                self._configure_nics(record)
            password_file = hvp[c.HV_VNC_PASSWORD_FILE]
            if password_file:
                password = validation.read_vnc_password(password_file)
                qmp.execute("set_password", {"protocol": "vnc", "password": password})
            if not paused and incoming is None:
                qmp.execute("cont")

    def _launch(self, argv: list[str], pass_fds: list[int], name: str) -> None:
        log.info("Starting instance %s: %s", name, argv)
        try:
            result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                                    pass_fds=pass_fds, timeout=LAUNCH_TIMEOUT, check=False)
        except FileNotFoundError as err:
            raise errors.QemuLaunchError(
                f"Failed to start instance {name}: QEMU binary {argv[0]} not found ({err})",
                argv=argv) from None
        except subprocess.TimeoutExpired as err:
            stderr = (err.stderr or b"").decode("utf-8", "replace").strip()
            raise errors.QemuLaunchError(
                f"Failed to start instance {name}: QEMU did not finish starting within "
                f"{LAUNCH_TIMEOUT:.0f} s. QEMU said: {stderr or '(nothing)'}",
                argv=argv, stderr=stderr) from None
        stderr = result.stderr.decode("utf-8", "replace").strip()
        if result.returncode != 0:
            raise errors.QemuLaunchError(
                f"Failed to start instance {name}: QEMU exited with code {result.returncode}. "
                f"QEMU said: {stderr or '(nothing)'}",
                argv=argv, exitcode=result.returncode, stderr=stderr)
        if stderr:
            log.warning("QEMU warnings while starting instance %s: %s", name, stderr)

    def _kill(self, pid: int) -> None:
        process.signal_pid(pid, signal.SIGKILL)
        if not process.wait_gone(pid, 10.0):
            log.error("QEMU process %d did not exit after SIGKILL", pid)

    # --- NICs (TAP devices and the ifup hook) --------------------------------

    def _open_taps(self, record: runtime.RuntimeRecord,
                   undo: _StartUndo) -> list[tuple[int, str]]:
        if not record.nics:
            return []
        vnet_hdr = record.hvparams[c.HV_NIC_TYPE] == c.HT_NIC_PARAVIRTUAL
        taps = []
        for nic in record.nics:
            fd, name = netdev.open_tap(vnet_hdr=vnet_hdr, netns=self.netns)
            undo.push(f"close tap {name}", lambda fd=fd: _close_quietly(fd))
            nic["tap"] = name
            taps.append((fd, name))
        return taps

    def _configure_nics(self, record: runtime.RuntimeRecord) -> None:
        """Run the ifup hook once per NIC (after QEMU holds the TAP devices)."""
        if not record.nics:
            return
        for index, nic in enumerate(record.nics):
            env = ifup.nic_environment(record.name, _NicView(nic), index, nic["tap"],
                                       record.tags)
            ifup.run_ifup(self.ifup_script, env, netns=self.netns)

    # --- chroot --------------------------------------------------------------

    def _make_chroot(self, paths: InstancePaths) -> None:
        if os.path.isdir(paths.chroot):
            self._retire_chroot(paths, paths.name)
        os.makedirs(paths.chroot, mode=0o755)

    def _retire_chroot(self, paths: InstancePaths, name: str) -> None:
        """Remove an instance's chroot; quarantine it if QEMU left anything inside."""
        try:
            os.rmdir(paths.chroot)
            return
        except FileNotFoundError:
            return
        except OSError:
            pass
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        target = os.path.join(self.layout.quarantine_dir, f"{name}-{stamp}")
        shutil.move(paths.chroot, target)
        log.warning("The chroot of instance %s was not empty after it stopped (a possible "
                    "compromise); moved it to %s for inspection", name, target)

    # --- stop ----------------------------------------------------------------

    def stop(self, name: str, acpi: bool, force: bool = False, timeout: float | None = None,
             lock_timeout: float = 120.0) -> bool:
        """Stop ``name``; True once it is gone, False if it was only asked to power down."""
        with self.locked(name, "stop", lock_timeout) as paths:
            return self._stop_locked(name, paths, acpi, force, timeout)

    def _stop_locked(self, name: str, paths: InstancePaths, acpi: bool, force: bool,
                     timeout: float | None) -> bool:
        pid = self.running_pid(name)
        if pid is None:
            self._cleanup_stopped(name, paths)
            return True
        if acpi and not force:
            try:
                with QmpClient(paths.qmp_socket, timeout=5.0) as qmp:
                    qmp.execute("system_powerdown")
            except errors.MonitorError as err:
                if timeout is None:
                    raise errors.HypervisorError(
                        f"Failed to stop instance {name} by ACPI: {err}; "
                        "stop it with force") from err
                log.warning("ACPI power-down of %s failed (%s); stopping it by signal",
                            name, err)
            else:
                if timeout is None:
                    return False  # the caller polls, as the cluster manager does
                if process.wait_gone(pid, timeout):
                    self._cleanup_stopped(name, paths)
                    return True
                log.warning("Instance %s did not power off within %.1f s; terminating it",
                            name, timeout)
        if not process.terminate(pid):
            raise errors.HypervisorError(
                f"Failed to stop instance {name}: QEMU process {pid} survived SIGKILL")
        self._cleanup_stopped(name, paths)
        return True

    def _cleanup_stopped(self, name: str, paths: InstancePaths) -> None:
        """Release everything of a stopped instance: files, uid, chroot."""
        try:
            record = self.load_record(name)
        except errors.RuntimeStateError as err:
            log.warning("Ignoring the unreadable runtime record of %s: %s", name, err)
            record = None
        if record is not None and record.uid is not None and self.uid_pool_text:
            self._uid_pool().release(record.uid)
        self._retire_chroot(paths, name)
        self._remove_leftovers(paths)
        fsutil.remove_file(paths.runtime_file)

    @staticmethod
    def _remove_leftovers(paths: InstancePaths) -> None:
        for path in paths.runtime_files():
            fsutil.remove_file(path)

    def cleanup(self, name: str) -> None:
        """Remove everything a stopped instance left; refuses while it runs."""
        with self.locked(name, "clean up") as paths:
            if self.running_pid(name) is not None:
                raise errors.HypervisorError(
                    f"Cannot clean up instance {name}: it is still running; stop it first")
            self._cleanup_stopped(name, paths)

    # --- reboot --------------------------------------------------------------

    def reboot(self, name: str, acpi_timeout: float = 30.0) -> None:
        """Stop ``name`` and start it again from its saved runtime record."""
        with self.locked(name, "reboot") as paths:
            if self.running_pid(name) is None:
                raise errors.HypervisorError(f"Failed to reboot instance {name}: not running")
            record = self.load_record(name)
            if record is None:
                raise errors.RuntimeStateError(
                    f"Failed to reboot instance {name}: no runtime record at "
                    f"{paths.runtime_file}")
            self._stop_locked(name, paths, bool(record.hvparams.get(c.HV_ACPI)), False,
                              acpi_timeout)
            self.start_from_record(record, paused=False)

    # --- listing -------------------------------------------------------------

    def _scan(self) -> Iterator[tuple[InstancePaths, process.QemuProcess]]:
        """Every instance whose QEMU really runs, with what /proc showed of it."""
        try:
            entries = sorted(os.listdir(self.layout.pid_dir))
        except FileNotFoundError:
            return
        for entry in entries:
            try:
                paths = self.paths(entry)
            except errors.HypervisorError:
                continue  # not an instance name of ours
            found = self._running(paths)
            if found is not None:
                yield paths, found

    def list_names(self) -> list[str]:
        """Names of the instances whose QEMU really runs."""
        return [paths.name for paths, _ in self._scan()]

    def info(self, name: str) -> InstanceInfo | None:
        """The running instance ``name``, or None; never raises for a dead instance."""
        try:
            paths = self.paths(name)
        except errors.HypervisorError:
            return None
        found = self._running(paths)
        return None if found is None else _describe([(paths, found)])[0]

    def all_info(self) -> list[InstanceInfo]:
        """Every running instance."""
        return _describe(self._scan())

    def qmp(self, name: str, command: str, arguments: dict[str, Any] | None = None,
            timeout: float = 10.0) -> Any:
        """Run one QMP command on running instance ``name``."""
        if self.running_pid(name) is None:
            raise errors.InstanceNotRunning(f"Instance {name} is not running")
        with QmpClient(self.paths(name).qmp_socket, timeout=timeout) as client:
            return client.execute(command, arguments)


class _NicView:
    """Attribute access to a NIC dict, for the ifup environment builder."""

    def __init__(self, nic: Mapping[str, Any]) -> None:
        self.mac = nic.get("mac")
        self.ip = nic.get("ip")
        self.nicparams = dict(nic.get("nicparams") or {})


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def _describe(found: Iterable[tuple[InstancePaths, process.QemuProcess]]) -> list[InstanceInfo]:
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
        state = _run_state(None if ticket is None else answers[ticket])
        described.append(InstanceInfo(name=paths.name, pid=proc.pid, memory=memory,
                                      vcpus=vcpus, state=state, cpu_time=proc.stat.cpu_time))
    return described


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

