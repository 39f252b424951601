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
import errno
import logging
import os
import shutil
import signal
import stat
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ganeti_kvm import errors
from ganeti_kvm.core import hardware, hotplug, legacy, listing, params, pinning, runtime
from ganeti_kvm.core import names as c
from ganeti_kvm.core.listing import InstanceInfo
from ganeti_kvm.host import fsutil, ifup, locking, netdev, process, uidpool
from ganeti_kvm.host.paths import InstancePaths, RunDir
from ganeti_kvm.qemu import caps as qemu_caps
from ganeti_kvm.qemu import cmdline, devices, macaddr, spice
from ganeti_kvm.qemu import log as qemulog
from ganeti_kvm.qmp import hmp
from ganeti_kvm.qmp.agent import GuestAgent
from ganeti_kvm.qmp.client import QmpClient

log = logging.getLogger(__name__)

LAUNCH_TIMEOUT = 120.0  # the daemonizing QEMU parent must exit within this
QMP_READY_TIMEOUT = 30.0  # QMP must answer within this after the parent exited
# A stop's word to ganeti-kvmd, and to the guest agent, waits at most this per step
ADMIN_STOP_TIMEOUT = 2.0
GUEST_AGENT_TIMEOUT = 2.0
UID_POOL_ENV = "GANETI_KVM_UID_POOL"
# QEMU run states in which no guest OS runs that could hear the ACPI button.
NO_GUEST_STATES = frozenset(["prelaunch", "inmigrate", "postmigrate", "finish-migrate",
                             "shutdown", "guest-panicked", "internal-error"])


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
                 netns: str | None = None, spice_tls: spice.TlsFiles | None = None) -> None:
        if not isinstance(run_dir, str) or not run_dir or "\0" in run_dir:
            raise errors.HypervisorError(
                f"Invalid run directory {run_dir!r:.100}: give a path without NUL bytes")
        self.layout = RunDir(os.path.abspath(run_dir))
        self.uid_pool_text = uid_pool if uid_pool is not None else os.environ.get(UID_POOL_ENV)
        self.socat_path = socat_path
        self.ifup_script = ifup_script
        # The network namespace (an ``ip netns`` name) where the instances' TAP
        # devices live and the ifup hook runs; None is this process's own.
        self.netns = netns
        # The node's SPICE certificate files (spice_use_tls), where the cluster
        # manager keeps them; None: SPICE over TLS is refused.
        self.spice_tls = spice_tls

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

    def problems(self, kvm_path: str) -> list[str]:
        """What this node lacks to run instances with ``kvm_path``; empty if nothing."""
        problems = []
        try:
            if not self.caps(kvm_path).has_option("daemonize"):
                problems.append(f"QEMU {kvm_path} cannot -daemonize")
        except errors.HypervisorError as err:
            problems.append(f"QEMU is not usable: {err}")
        socat = self.socat_path
        if not (os.path.isfile(socat) and os.access(socat, os.X_OK)):
            problems.append(f"socat not found at {socat} (needed for serial consoles)")
        try:
            self.ensure_dirs()
        except errors.HypervisorError as err:
            problems.append(str(err))
        return problems

    def caps(self, kvm_path: str) -> qemu_caps.QemuCaps:
        """The capabilities of ``kvm_path``, probed once and cached on disk."""
        cmdline.check_value(c.HV_KVM_PATH, kvm_path)
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
        return listing.running(paths)

    def load_record(self, name: str) -> runtime.RuntimeRecord | None:
        """The saved runtime record of ``name``, or None."""
        return runtime.load(self.paths(name).runtime_file, name)

    def check_params(self, hvparams: Mapping[str, Any]) -> qemu_caps.QemuCaps:
        """Syntax and node checks of filled ``hvparams``; returns the QEMU's capabilities."""
        params.check_all_syntax(hvparams)
        caps = self.caps(hvparams[c.HV_KVM_PATH])
        params.check_all_node(hvparams, caps, spice_tls=self.spice_tls)
        return caps

    # --- start ---------------------------------------------------------------

    def start(self, spec: InstanceSpec, paused: bool = False) -> None:
        """Start ``spec`` and return once QEMU runs and answers on QMP."""
        caps = self.check_params(spec.hvparams)
        pinning.check_vcpus(spec.hvparams.get(c.HV_CPU_MASK) or c.CPU_PINNING_ALL, spec.vcpus)
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
            hardware.assign_devices(record)  # kept in the record for every later start
            self.start_from_record(record, paused=paused, caps=caps)

    def build_argv(self, record: runtime.RuntimeRecord, caps: qemu_caps.QemuCaps,
                   paths: InstancePaths) -> list[str]:
        """The command line of ``record`` on this node (its paths, its uid)."""
        spec = cmdline.MachineSpec(
            name=record.name, memory=int(record.beparams[c.BE_MEMORY]),
            vcpus=int(record.beparams[c.BE_VCPUS]), uuid=record.uuid,
            network_port=record.network_port,
            run_as=self._run_as(record.hvparams, record.uid), machine=record.machine,
            balloon=None if record.balloon is None else devices.DeviceId.from_dict(
                record.balloon, f"the balloon of instance {record.name}"),
            guest_agent=None if record.guest_agent is None else devices.DeviceId.from_dict(
                record.guest_agent, f"the guest agent channel of instance {record.name}"),
            # an interface's address is this node's: looked up at every start
            spice_address=params.resolve_spice_bind(record.hvparams),
            spice_tls=self.spice_tls,
            spice_agent=None if record.spice_agent is None else devices.DeviceId.from_dict(
                record.spice_agent, f"the SPICE agent channel of instance {record.name}"))
        disks = [cmdline.BlockDevice.from_dict(d) for d in record.disks]
        return cmdline.build_argv(spec, disks, record.hvparams, caps, paths)

    def start_from_record(self, record: runtime.RuntimeRecord, paused: bool = False,
                          incoming: str | None = None, run_ifup: bool = True,
                          caps: qemu_caps.QemuCaps | None = None,
                          autostart: bool = False) -> None:
        """Start QEMU from a record (a new start, a reboot, a migration target).

        A migration target (``incoming``) waits paused until the library
        continues it, unless ``autostart``: QEMU then runs the guest itself
        as soon as it may (at the switch to post-copy, or at the end of a
        pre-copy), if it ran on the source.

        The caller holds the instance's lock; ``caps`` are those of the
        record's ``kvm_path`` if the caller has them already.
        The command line is rebuilt from the record's parameters for this
        node's paths, so a record from another node (a migration) works too.
        A record upgraded from the 2011 format is rebuilt from its parameters
        too (a reboot), except on a migration target while a QEMU started by
        the 2011 driver still runs it: the target must then have the same
        devices, so it gets that command line for this node
        (:func:`ganeti_kvm.core.legacy.target_argv`).
        The machine type is the record's pinned one (refused up front if
        this node's QEMU lacks it), or for a new start this QEMU's ``pc``.
        """
        paths = self.paths(record.name)
        undo = _StartUndo()
        try:
            record.uid = self._request_uid(record.name, record.hvparams, undo)
            if record.upgraded_from is not None and incoming is not None:
                caps = caps or self._check_upgraded(record)
                record.argv = legacy.target_argv(record.argv, paths, caps, bool(record.nics),
                                                 self._run_as(record.hvparams, record.uid))
                record.qemu_version = list(caps.version)
            else:
                if record.upgraded_from is not None:
                    caps = self._check_upgraded(record)
                    record.upgraded_from = None  # from now on a record of this library
                caps = caps or self.caps(record.hvparams[c.HV_KVM_PATH])
                if incoming is None:
                    record.balloon_memory = None  # a new QEMU starts with all its memory
                    # A fresh QEMU need match no other: a record written before
                    # balloons existed gets one now (a migration target must not).
                    hardware.give_balloon(record)
                    hardware.give_guest_agent(record)
                    hotplug.drop_unplugged(record)  # their removal was asked for
                    hardware.give_spice_agent(record)
                record.machine = hardware.pin_machine(record, caps)
                record.argv = self.build_argv(record, caps, paths)
                record.qemu_version = list(caps.version)
            self._execute(record, paths, paused, undo, incoming=incoming, run_ifup=run_ifup,
                          autostart=autostart)
        except BaseException:
            undo.run()
            raise
        undo.forget()

    def _check_upgraded(self, record: runtime.RuntimeRecord) -> qemu_caps.QemuCaps:
        """Check the parameters of an upgraded record (``upgraded_from`` set) as a
        new start's are.

        The driver that wrote it (the 2011 one, or Ganeti's bundled one)
        allowed values that today's QEMU cannot do; they are refused here,
        naming the parameter, before anything is stopped or started.
        """
        try:
            return self.check_params(record.hvparams)
        except errors.HypervisorError as err:
            raise errors.HypervisorError(
                f"Cannot start instance {record.name} from the runtime record an earlier "
                f"driver wrote: {err}. Stop it, then start it with today's parameters") from err

    def _request_uid(self, name: str, hvparams: Mapping[str, Any],
                     undo: _StartUndo) -> int | None:
        """A uid from this node's pool for security model ``pool``, else None."""
        if hvparams.get(c.HV_SECURITY_MODEL) != c.HT_SM_POOL:
            return None
        pool = self._uid_pool()
        try:
            uid = pool.request(name)
        except OSError as err:
            raise errors.HypervisorError(
                f"Cannot allocate a uid for instance {name} in {pool.pool_dir}: {err}") from None
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
                 undo: _StartUndo, incoming: str | None = None, run_ifup: bool = True,
                 autostart: bool = False) -> None:
        """Launch QEMU from ``record``: TAPs, process, QMP, hooks, password, continue."""
        hvp = record.hvparams
        macaddr.check_nics(record.name, record.nics)  # before anything is acquired
        if hvp[c.HV_KVM_USE_CHROOT]:
            self._make_chroot(paths)
            undo.push("remove chroot", lambda: self._retire_chroot(paths, record.name))
        taps = self._open_taps(record, undo)
        # Saved once the TAP names are known, before QEMU starts.
        runtime.save(paths.runtime_file, record)
        undo.push("remove runtime record", lambda: fsutil.remove_file(paths.runtime_file))
        argv = list(record.argv)
        argv += cmdline.build_nic_argv(
            [cmdline.NicSpec(model=cmdline.NIC_MODELS.get(hvp[c.HV_NIC_TYPE], ""),
                             mac=nic["mac"], fd=fds[0], vhost=bool(hvp[c.HV_VHOST_NET]),
                             device=devices.identity_of(nic, f"NIC {index} of {record.name}"),
                             queue_fds=tuple(fds) if len(fds) > 1 else ())
             for index, (nic, (fds, _)) in enumerate(zip(record.nics, taps, strict=True))],
            boot_network=hvp[c.HV_BOOT_ORDER] == c.HT_BO_NETWORK and not hvp[c.HV_KERNEL_PATH],
            name=record.name)
        argv += cmdline.start_flags(paused=not (incoming and autostart), incoming=incoming)
        undo.push("remove sockets and pidfile", lambda: self._remove_leftovers(paths))
        self._launch(argv, [fd for fds, _ in taps for fd in fds], record.name, paths)
        for fd in (fd for fds, _ in taps for fd in fds):
            os.close(fd)  # QEMU holds its own copies now
        pid = process.read_pidfile(paths.pidfile)
        if pid is None:
            raise errors.QemuLaunchError(
                f"QEMU for instance {record.name} started but wrote no pidfile "
                f"{paths.pidfile}.{qemulog.quote(paths.qemu_log) or ' Check the node logs.'}",
                argv=argv, stderr=qemulog.tail(paths.qemu_log))
        undo.push(f"kill QEMU {pid}", lambda: self._kill(pid))
        try:
            # The long-operation monitor: listings ask every instance's short
            # monitor, which serves one client at a time, so there a start
            # would queue behind them.  The only other user of this one is a
            # migration, which needs the lock this start holds.
            with QmpClient(paths.qmp_long_socket, timeout=QMP_READY_TIMEOUT) as qmp:
                qmp.connect()
                qmp.execute("query-status")
                _publish_kvmd_socket(paths)  # QEMU listens on every socket now
                # before the guest runs a single instruction (start, reboot, target)
                pinning.apply(record.name, pid, hvp, int(record.beparams[c.BE_VCPUS]),
                              qmp.execute)
                if run_ifup:
                    self._configure_nics(record)
                password_file = hvp[c.HV_VNC_PASSWORD_FILE]
                if password_file:
                    password = params.read_vnc_password(password_file)
                    qmp.execute("set_password", {"protocol": "vnc", "password": password})
                if spice.enabled(hvp) and hvp.get(c.HV_KVM_SPICE_PASSWORD_FILE):
                    # QEMU refuses every SPICE client until this ticket is set
                    password = params.read_spice_password(hvp[c.HV_KVM_SPICE_PASSWORD_FILE])
                    qmp.execute("set_password", {"protocol": "spice", "password": password})
                if not paused and incoming is None:
                    qmp.execute("cont")
        except errors.MonitorError as err:
            if process.runs_instance(pid, record.name, paths.pidfile):
                raise
            said = qemulog.tail(paths.qemu_log)
            raise errors.QemuLaunchError(
                f"Failed to start instance {record.name}: QEMU exited after it went to the "
                f"background ({err}).{qemulog.quote(paths.qemu_log) or ' QEMU said nothing.'}",
                argv=argv, stderr=said) from err

    def _launch(self, argv: list[str], pass_fds: list[int], name: str,
                paths: InstancePaths) -> None:
        """Run the daemonizing QEMU; its output before and after goes to its log.

        QEMU writes what it says to the log given by ``-D`` (added if the
        command line lacks it, as one from the 2011 driver does), both
        before and after it daemonizes; only errors in options before
        ``-D`` come on its stderr.  A failure quotes both.
        """
        if "-D" not in argv:
            argv = argv[:1] + cmdline.log_flags(paths) + argv[1:]
        try:
            qemulog.prepare(paths.qemu_log)
        except OSError as err:
            raise errors.HypervisorError(
                f"Failed to start instance {name}: cannot create its QEMU log "
                f"{paths.qemu_log}: {err.strerror}; check the run directory") from None
        log.info("Starting instance %s: %s", name, argv)
        try:
            result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                                    pass_fds=pass_fds, timeout=LAUNCH_TIMEOUT, check=False)
        except FileNotFoundError as err:
            raise errors.QemuLaunchError(
                f"Failed to start instance {name}: QEMU binary {argv[0]} not found ({err})",
                argv=argv) from None
        except subprocess.TimeoutExpired as err:
            self._kill_launched(name, paths)
            stderr = _said(err.stderr, paths)
            raise errors.QemuLaunchError(
                f"Failed to start instance {name}: QEMU did not finish starting within "
                f"{LAUNCH_TIMEOUT:.0f} s. QEMU said: {stderr or '(nothing)'}",
                argv=argv, stderr=stderr) from None
        except (OSError, ValueError) as err:  # E2BIG, a NUL: the kernel refused the argv
            raise errors.QemuLaunchError(
                f"Failed to start instance {name}: cannot run QEMU: {_argv_problem(argv, err)}",
                argv=argv) from None
        stderr = _said(result.stderr, paths)
        if result.returncode != 0:
            raise errors.QemuLaunchError(
                f"Failed to start instance {name}: QEMU exited with code {result.returncode}. "
                f"QEMU said: {stderr or '(nothing)'}",
                argv=argv, exitcode=result.returncode, stderr=stderr)
        if stderr:
            log.warning("QEMU warnings while starting instance %s: %s", name, stderr)

    def _kill_launched(self, name: str, paths: InstancePaths) -> None:
        """Kill a QEMU whose launch timed out, if it got as far as its pidfile."""
        pid = process.read_pidfile(paths.pidfile)
        if pid is not None and process.runs_instance(pid, name, paths.pidfile):
            self._kill(pid)

    def qemu_said(self, name: str) -> str:
        """``" QEMU said: ..."`` with the tail of ``name``'s QEMU log, or ``""``.

        For errors about an instance whose QEMU is gone (see
        :mod:`ganeti_kvm.qemu.log`); read before the log is cleaned up.
        """
        return qemulog.quote(self.paths(name).qemu_log)

    def _kill(self, pid: int) -> None:
        process.signal_pid(pid, signal.SIGKILL)
        if not process.wait_gone(pid, 10.0):
            log.error("QEMU process %d did not exit after SIGKILL", pid)

    # --- NICs (TAP devices and the ifup hook) --------------------------------

    def _open_taps(self, record: runtime.RuntimeRecord,
                   undo: _StartUndo) -> list[tuple[list[int], str]]:
        if not record.nics:
            return []
        # Ganeti 3's vnet_hdr (on unless set off; a record from before it has none)
        vnet_hdr = (record.hvparams[c.HV_NIC_TYPE] == c.HT_NIC_PARAVIRTUAL
                    and record.hvparams.get(c.HV_VNET_HDR, True) is not False)
        taps = []
        # Ganeti 3's virtio_net_queues: one TAP queue per virtio queue
        queues = (record.hvparams.get(c.HV_VIRTIO_NET_QUEUES, 1)
                  if record.hvparams[c.HV_NIC_TYPE] == c.HT_NIC_PARAVIRTUAL else 1)
        for nic in record.nics:
            fds, name = netdev.open_tap_queues(vnet_hdr=vnet_hdr, queues=queues,
                                               netns=self.netns)
            for fd in fds:
                undo.push(f"close tap {name}", lambda fd=fd: _close_quietly(fd))
            nic["tap"] = name
            taps.append((fds, name))
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
        self._retire_chroot(paths, paths.name)
        try:
            os.mkdir(paths.chroot, mode=0o755)
        except OSError as err:
            raise errors.HypervisorError(
                f"Cannot create the chroot {paths.chroot} of instance {paths.name}: "
                f"{err.strerror}; check the run directory") from None

    def _retire_chroot(self, paths: InstancePaths, name: str) -> None:
        """Remove an instance's chroot; quarantine it if QEMU left anything inside."""
        try:
            if not stat.S_ISDIR(os.lstat(paths.chroot).st_mode):
                raise errors.HypervisorError(
                    f"The chroot {paths.chroot} of instance {name} is not a directory; "
                    "move it away and retry")
            os.rmdir(paths.chroot)
            return
        except FileNotFoundError:
            return
        except OSError as err:
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise errors.HypervisorError(
                    f"Cannot remove the chroot {paths.chroot} of instance {name}: "
                    f"{err.strerror}") from None
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        target = os.path.join(self.layout.quarantine_dir, f"{name}-{stamp}")
        try:
            shutil.move(paths.chroot, target)
        except OSError as err:
            raise errors.HypervisorError(
                f"Cannot move the non-empty chroot {paths.chroot} of instance {name} to "
                f"{target}: {err}; inspect and remove it by hand") from None
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
            self._report_dead(name, paths)
            self._cleanup_stopped(name, paths)
            return True
        if acpi and not force:
            try:
                pressed = self._press_power_button(paths)
            except errors.MonitorError as err:
                if timeout is None:
                    raise errors.HypervisorError(
                        f"Failed to stop instance {name} by ACPI: {err}; "
                        "stop it with force") from err
                log.warning("ACPI power-down of %s failed (%s); stopping it by signal",
                            name, err)
            else:
                if not pressed:
                    log.info("Instance %s runs no guest that could hear the ACPI button; "
                             "terminating its QEMU", name)
                elif timeout is None:
                    return False  # the caller polls, as the cluster manager does
                elif process.wait_gone(pid, timeout):
                    self._cleanup_stopped(name, paths)
                    return True
                else:
                    log.warning("Instance %s did not power off within %.1f s; terminating it",
                                name, timeout)
        self._end_qemu(name, paths, pid)
        self._cleanup_stopped(name, paths)
        return True

    def _end_qemu(self, name: str, paths: InstancePaths, pid: int) -> None:
        """End QEMU by signal (SIGTERM, then SIGKILL), as an administrator's stop.

        SIGTERM makes QEMU report a SHUTDOWN event, which ganeti-kvmd alone
        would read as the guest's own power-off: it is told first
        (:meth:`_announce_admin_stop`).  A QEMU that cannot be told (its
        monitor does not answer) gets SIGKILL at once, which reports nothing.
        """
        if self._announce_admin_stop(paths) is False:
            log.warning("Instance %s: its monitor does not answer; killing QEMU %d so that "
                        "ganeti-kvmd cannot take the stop for the guest's own", name, pid)
            process.signal_pid(pid, signal.SIGKILL)
            gone = process.wait_gone(pid, 10.0)
        else:
            gone = process.terminate(pid)
        if not gone:
            raise errors.HypervisorError(
                f"Failed to stop instance {name}: QEMU process {pid} survived SIGKILL")

    @staticmethod
    def _announce_admin_stop(paths: InstancePaths) -> bool | None:
        """Make ganeti-kvmd read QEMU's coming end as an administrator's stop.

        kvmd (``user_shutdown``, on :attr:`InstancePaths.kvmd_socket`) takes
        a SHUTDOWN event with no POWERDOWN or STOP event before it for the
        guest's own power-off, and writes the marker Ganeti shows as
        USER_down; it decides when QEMU closes the socket, which may be after
        this stop removed the marker, so the word must come before QEMU goes.
        ``stop`` emits STOP if the guest runs; ``system_powerdown`` emits
        POWERDOWN in every run state (the guest, stopped, never hears it).
        QEMU emits POWERDOWN from its main loop after the command returned,
        where a pending SIGTERM would win, so the event is awaited.  Every
        monitor gets each event at once: kvmd has it before QEMU exits.

        None: QEMU has no kvmd monitor, nothing to tell; True: told; False:
        the monitor did not answer within :data:`ADMIN_STOP_TIMEOUT` a step.
        """
        if not os.path.exists(paths.kvmd_socket):
            return None
        try:
            with QmpClient(paths.qmp_socket, timeout=ADMIN_STOP_TIMEOUT) as client:
                client.execute("stop")
                client.execute("system_powerdown")
                if client.wait_event(["POWERDOWN"], ADMIN_STOP_TIMEOUT) is not None:
                    return True
        except errors.MonitorError as err:
            log.warning("Cannot tell ganeti-kvmd that instance %s is stopped by the "
                        "administrator: %s", paths.name, err)
            return False
        log.warning("Instance %s's QEMU sent no POWERDOWN event within %.0f s",
                    paths.name, ADMIN_STOP_TIMEOUT)
        return False

    def _press_power_button(self, paths: InstancePaths) -> bool:
        """Press the ACPI power button if a guest can hear it; False if none can.

        A QEMU that never ran its guest (started paused), or that only
        waits for or has finished a migration, has no guest OS to react:
        waiting for it to power off would only cost the stop's timeout.
        """
        if self.human_monitor_only(paths):
            state = hmp.run_state(hmp.hmp_command(paths.monitor_socket, "info status", 5.0))
        else:
            agent = os.path.exists(paths.guest_agent_socket)
            with QmpClient(paths.qmp_socket, timeout=5.0) as client:
                state = str(client.execute("query-status")["status"])
                if state in NO_GUEST_STATES:
                    return False
                client.execute("system_powerdown")
                # The agent's shut-down must come after POWERDOWN (see _ask_guest_agent)
                powered = not agent or client.wait_event(["POWERDOWN"], 5.0) is not None
            if agent and powered:
                self._ask_guest_agent(paths)
            elif agent:
                log.warning("Instance %s's QEMU sent no POWERDOWN event; its guest agent is "
                            "not asked, the ACPI power button alone stops it", paths.name)
            return True
        if state in NO_GUEST_STATES:
            return False
        self.monitor_command(paths, "system_powerdown", timeout=5.0)
        return True

    @staticmethod
    def _ask_guest_agent(paths: InstancePaths) -> None:
        """Ask the guest agent, if it answers within :data:`GUEST_AGENT_TIMEOUT`, to
        power the guest off, besides the ACPI button just pressed.

        A guest that ignores the button (no ACPI daemon, a locked desktop)
        still powers off.  The button stays: its POWERDOWN event is what
        tells ganeti-kvmd (``user_shutdown``) that the administrator stopped
        the guest, and the agent's own power-off reports only SHUTDOWN, which
        kvmd would take for the guest's own.  Pressing it first costs the
        cooperative guest nothing (both ask the same power-off); stopping
        and continuing the guest instead would pause it, and a
        failed continue would leave it paused where its agent cannot act.
        A silent agent (none installed, not started) is logged: the button
        alone acts then, as without ``use_guest_agent``.
        """
        try:
            with GuestAgent(paths.guest_agent_socket, paths.name,
                            timeout=GUEST_AGENT_TIMEOUT) as agent:
                agent.shutdown()
        except errors.GuestAgentError as err:
            log.info("Instance %s: %s; the ACPI power button alone stops it", paths.name, err)
        else:
            log.info("Instance %s: asked its guest agent to power the guest off", paths.name)

    def _cleanup_stopped(self, name: str, paths: InstancePaths) -> None:
        """Release everything of a stopped instance: uid, chroot, files, 2011 leftovers.

        Every step runs even if an earlier one fails; then the failures are
        raised together, each naming its path.
        """
        self._cleanup_stopped_with(name, paths, self._record_or_none(name))

    def _record_or_none(self, name: str) -> runtime.RuntimeRecord | None:
        """The instance's runtime record; None if it has none or it cannot be read (logged)."""
        try:
            return self.load_record(name)
        except errors.RuntimeStateError as err:
            log.warning("Ignoring the unreadable runtime record of %s: %s", name, err)
            return None

    def _cleanup_stopped_with(self, name: str, paths: InstancePaths,
                              record: runtime.RuntimeRecord | None) -> None:
        """:meth:`_cleanup_stopped` with the runtime record read already."""
        problems: list[str] = []
        for step in (lambda: self._release_uids(name, record),
                     lambda: self._retire_chroot(paths, name),
                     lambda: self._remove_leftovers(paths)):
            try:
                step()
            except errors.HypervisorError as err:
                problems.append(str(err))
        if problems:
            raise errors.HypervisorError(
                f"Cleaning up instance {name} left state behind: {'; '.join(problems)}")

    def _release_uids(self, name: str, record: runtime.RuntimeRecord | None) -> None:
        """Free every pool uid recorded for ``name`` (also when its record is unreadable
        or this hypervisor was made without a uid pool)."""
        pool = uidpool.UidPool(self.layout.uid_dir, [])  # releasing needs no ranges
        try:
            owned = {uid for uid, owner in pool.allocated().items() if owner == name}
            if record is not None and record.uid is not None \
                    and pool.owner_of(record.uid) == name:
                owned.add(record.uid)
            for uid in sorted(owned):
                pool.release(uid)
        except OSError as err:
            raise errors.HypervisorError(
                f"Cannot release the uids of instance {name} in {pool.pool_dir}: {err}") from None

    @staticmethod
    def _remove_control_files(paths: InstancePaths) -> None:
        """Remove the sockets and migration notes of a QEMU that is ending; never raises.

        Done while the kernel takes the process apart (milliseconds for a
        QEMU), instead of after; what fails here is logged and tried again
        by :meth:`_cleanup_stopped`.
        """
        for path in paths.control_files():
            try:
                fsutil.remove_file(path)
            except errors.HypervisorError as err:
                log.warning("%s; trying again once the QEMU of %s is gone", err, paths.name)

    @staticmethod
    def _remove_leftovers(paths: InstancePaths) -> None:
        """Remove the files a stopped instance may leave: sockets, pidfile, log, record,
        half-written records, and what the 2011 driver kept per instance."""
        problems = []
        # The user_shutdown marker too: every caller is a start, a stop or a
        # clean-up the administrator asked for (never a listing).
        for path in (paths.runtime_files() + [paths.runtime_file, paths.shutdown_marker]
                     + _stale_temp_files(paths)):
            try:
                fsutil.remove_file(path)
            except errors.HypervisorError as err:
                problems.append(str(err))
        for path in legacy.leftovers(paths.run_dir.root, paths.name):
            try:
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    fsutil.remove_file(path)
            except (OSError, errors.HypervisorError) as err:
                problems.append(f"Cannot remove {path}: {err}")
        if problems:
            raise errors.HypervisorError("; ".join(problems))

    def cleanup(self, name: str) -> None:
        """Remove everything a stopped instance left; refuses while it runs."""
        with self.locked(name, "clean up") as paths:
            if self.running_pid(name) is not None:
                raise errors.HypervisorError(
                    f"Cannot clean up instance {name}: it is still running; stop it first")
            self._report_dead(name, paths)
            self._cleanup_stopped(name, paths)

    @staticmethod
    def _report_dead(name: str, paths: InstancePaths) -> None:
        """Log the last words of a QEMU found dead, before its log is cleaned up."""
        said = qemulog.tail(paths.qemu_log)
        if said:
            log.warning("Instance %s had already stopped. QEMU said: %s", name, said)

    # --- reboot --------------------------------------------------------------

    def reboot(self, name: str, acpi_timeout: float = 30.0) -> None:
        """Stop ``name`` and start it again from its saved runtime record."""
        with self.locked(name, "reboot") as paths:
            if self.running_pid(name) is None:
                raise errors.InstanceNotRunning(
                    f"Failed to reboot instance {name}: not running."
                    f"{qemulog.quote(paths.qemu_log)}")
            record = self.load_record(name)
            if record is None:
                raise errors.RuntimeStateError(
                    f"Failed to reboot instance {name}: no runtime record at "
                    f"{paths.runtime_file}")
            if record.upgraded_from is None:
                if record.machine is None:
                    record.machine = self.running_machine(name)  # keep what the guest had
                # refused here, before the stop, if this node's QEMU lacks the type
                hardware.pin_machine(record, self.caps(record.hvparams[c.HV_KVM_PATH]))
            else:
                self._check_upgraded(record)  # refused before the stop, not after it
            self._stop_locked(name, paths, bool(record.hvparams.get(c.HV_ACPI)), False,
                              acpi_timeout)
            self.start_from_record(record, paused=False)

    # --- listing -------------------------------------------------------------

    def _scan(self) -> Iterator[tuple[InstancePaths, process.QemuProcess]]:
        return listing.scan(self.layout)

    def list_names(self) -> list[str]:
        """Names of the instances whose QEMU really runs."""
        return [paths.name for paths, _ in self._scan()]

    def info(self, name: str, user_down: bool = False) -> InstanceInfo | None:
        """The running instance ``name``, or None (:func:`ganeti_kvm.core.listing.info`)."""
        try:
            paths = self.paths(name)
        except errors.HypervisorError:
            return None
        return listing.info(paths, user_down)

    def all_info(self, user_down: bool = False) -> list[InstanceInfo]:
        """Every running instance (:func:`ganeti_kvm.core.listing.all_info`)."""
        return listing.all_info(self.layout, user_down)

    def running_machine(self, name: str) -> str | None:
        """The machine type instance ``name``'s QEMU really emulates, asked over QMP.

        For records without a pinned type (written before it existed, or
        upgraded from 2011): QEMU's answer is the truth, the probe's alias
        table is only what a new start would get today.  None (logged) when
        QEMU cannot tell; the caller then falls back to this node's ``pc``.
        """
        try:
            answer = self.qmp(name, "qom-get", {"path": "/machine", "property": "type"})
        except errors.MonitorError as err:
            log.warning("Cannot ask instance %s's QEMU for its machine type: %s", name, err)
            return None
        machine = qemu_caps.machine_from_qom_type(answer)
        if machine is None:
            log.warning("Instance %s's QEMU named no machine type: %r", name, answer)
        return machine

    @staticmethod
    def human_monitor_only(paths: InstancePaths) -> bool:
        """Whether the instance's QEMU has only the 2011 driver's human monitor, no QMP."""
        return not os.path.exists(paths.qmp_socket) and os.path.exists(paths.monitor_socket)

    def monitor_command(self, paths: InstancePaths, command: str, timeout: float = 10.0) -> None:
        """Run an argument-less command that QMP and the human monitor spell alike
        (``system_powerdown``, ``stop``, ``cont``, ``quit``), on whichever the QEMU has."""
        if self.human_monitor_only(paths):
            output = hmp.hmp_command(paths.monitor_socket, command, timeout)
            if output:
                raise errors.MonitorError(
                    f"{command} on the human monitor of instance {paths.name} failed: {output}")
            return
        with QmpClient(paths.qmp_socket, timeout=timeout) as client:
            client.execute(command)

    def balloon(self, name: str, memory: int, timeout: float = 10.0) -> None:
        """Set running instance ``name``'s balloon so the guest has ``memory`` MiB.

        QMP ``balloon`` asks the guest's virtio-balloon driver to give back
        (or take again) memory down to (up to) ``memory``; the value is kept
        in the record, which the listing reports.  Refused, in QEMU's words,
        for a QEMU without a balloon device (started before this library
        gave one); a QEMU another driver started with a balloon works too.
        """
        if not isinstance(memory, int) or isinstance(memory, bool) or memory <= 0:
            raise errors.ParameterError(
                f"Cannot balloon instance {name}: the memory must be a whole number of MiB "
                f"greater than zero, not {memory!r}", "memory", memory)
        with self.locked(name, "balloon") as paths:
            record = self.load_record(name) if self.running_pid(name) is not None else None
            if record is None:
                raise errors.InstanceNotRunning(
                    f"Cannot balloon instance {name}: it is not running")
            maximum = int(record.beparams[c.BE_MEMORY])
            if memory > maximum:
                raise errors.ParameterError(
                    f"Cannot balloon instance {name} to {memory} MiB: it was started with "
                    f"{maximum} MiB, the most a balloon can give it; restart it with more "
                    "memory instead", "memory", memory)
            try:
                with QmpClient(paths.qmp_socket, timeout=timeout) as client:
                    client.execute("balloon", {"value": memory * 1024 * 1024})
            except errors.QmpCommandError as err:
                raise errors.HypervisorError(
                    f"Cannot balloon instance {name}: QEMU said {err.desc or err}; its QEMU "
                    "was started without a balloon device: restart the instance to give it "
                    "one") from err
            record.balloon_memory = None if memory == maximum else memory
            runtime.save(paths.runtime_file, record)

    def run_state(self, name: str) -> str:
        """QEMU's run state of running instance ``name`` (``running``, ``paused``, ...)."""
        paths = self.paths(name)
        if self.running_pid(name) is not None and self.human_monitor_only(paths):
            return hmp.run_state(hmp.hmp_command(paths.monitor_socket, "info status"))
        return str(self.qmp(name, "query-status")["status"])

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


def _said(stderr: bytes | None, paths: InstancePaths) -> str:
    """What a launching QEMU said: its stderr (options before ``-D``) and its log."""
    parts = [(stderr or b"").decode("utf-8", "replace").strip(), qemulog.tail(paths.qemu_log)]
    return "\n".join(part for part in parts if part)


def _argv_problem(argv: Sequence[str], err: Exception) -> str:
    """Which argument the kernel refused (a NUL, too long, not encodable) and why."""
    for index, arg in enumerate(argv):
        try:
            size = len(os.fsencode(arg))
        except (UnicodeError, TypeError):
            size, bad = 0, "is not valid text"
        else:
            bad = ("contains a NUL byte" if "\0" in arg
                   else f"is {size} bytes long" if size >= cmdline.MAX_VALUE_BYTES else "")
        if bad:
            option = argv[index - 1] if index and argv[index - 1].startswith("-") else None
            where = f"the value of {option}" if option else f"argument {index}"
            return f"{where} {bad} ({err}); fix the parameter that sets it"
    return f"{err}; check the QEMU binary and its command line"


def _stale_temp_files(paths: InstancePaths) -> list[str]:
    """Temporary files of runtime record writes that a crash interrupted."""
    directory, base = os.path.split(paths.runtime_file)
    try:
        entries = os.listdir(directory)
    except OSError:
        return []
    return [os.path.join(directory, e) for e in entries if e.startswith(f".{base}.")]


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def _publish_kvmd_socket(paths: InstancePaths) -> None:
    """Give ganeti-kvmd's monitor its name (``NAME.kvmd``) once QEMU listens on it.

    kvmd connects to a ``*.kvmd`` socket when inotify shows the file
    created, and never again: QEMU's own socket file appears at its bind,
    before its listen, and kvmd's connect was seen refused in that gap.
    A hard link made now is a creation kvmd sees, of a socket that already
    listens.  Nothing to do for a QEMU without the monitor (user_shutdown off).
    """
    if not os.path.exists(paths.kvmd_bind_socket):
        return
    try:
        fsutil.remove_file(paths.kvmd_socket)
        os.link(paths.kvmd_bind_socket, paths.kvmd_socket)
        os.unlink(paths.kvmd_bind_socket)
    except OSError as err:
        raise errors.HypervisorError(
            f"Failed to start instance {paths.name}: cannot link ganeti-kvmd's monitor "
            f"{paths.kvmd_bind_socket} to {paths.kvmd_socket}: {err.strerror}; check the "
            "run directory") from None
