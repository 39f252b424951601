"""The KVM hypervisor behind Ganeti 3.x's contract.

:class:`KVMHypervisor` has every public member of Ganeti 3's
``hv_kvm.KVMHypervisor`` and its ``hv_base.BaseHypervisor``, with the same
signatures and kinds (class method, static method or not), and hands Ganeti
its own types back (see :mod:`ganeti_kvm.ganeti3._ganeti`).  It only adapts
Ganeti's objects to plain data: the work is done by
:class:`ganeti_kvm.core.node.KvmNode` and :mod:`ganeti_kvm.core.migration`.

Every error of the library leaves a public call as Ganeti's
``errors.HypervisorError`` (``HotplugError`` for hotplug), with the
library's message and the original exception as its cause.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from ganeti_kvm import errors
from ganeti_kvm.core import hotplug
from ganeti_kvm.core import migration as core_migration
from ganeti_kvm.core import names as c
from ganeti_kvm.core import params as core_params
from ganeti_kvm.core.node import InstanceSpec, KvmNode
from ganeti_kvm.ganeti3 import _ganeti, bundled, migration, params
from ganeti_kvm.host import nodeinfo, paths
from ganeti_kvm.qemu import cmdline, spice

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

_SERIAL_SOCAT = "STDIO,raw,echo=0,escape=0x1d"


def _as_ganeti_errors(func: F) -> F:
    """Raise the library's errors as Ganeti's ``HypervisorError`` (the cause kept)."""
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except errors.GenericError as err:
            if isinstance(err, _ganeti.HypervisorError):
                raise
            raise _ganeti.HypervisorError(str(err)) from err
    return wrapper  # type: ignore[return-value]


def _attr(obj: Any, name: str, default: Any = None) -> Any:
    """An attribute of a Ganeti object, or the key of a dict."""
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _name(instance: Any) -> str:
    return paths.check_instance_name(_attr(instance, "name"))


def _nic_dict(nic: Any) -> dict[str, Any]:
    if isinstance(nic, Mapping):
        data = dict(nic)
    elif hasattr(nic, "ToDict"):
        data = nic.ToDict()
    else:
        data = {k: getattr(nic, k, None) for k in ("mac", "ip", "nicparams")}
    data["nicparams"] = dict(data.get("nicparams") or {})
    return data


def _positive_int(name: str, key: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise errors.ParameterError(
            f"Instance {name}: backend parameter {key} must be a whole number greater "
            f"than zero, not {value!r}", key, value)
    return value


# Ganeti 3.0's DTS_EXT_MIRROR (disk templates on storage every node reaches), used without Ganeti
_FALLBACK_EXT_MIRROR = frozenset(["blockdev", "diskless", "ext", "gluster", "rbd", "sharedfile"])


def _on_shared_storage(disk: Any) -> bool:
    """Whether Ganeti 3's ``disk`` must not be cached: its ``dev_type`` is externally
    mirrored, except rbd (Ganeti leaves RBD's cache to the disk_cache setting)."""
    mirrored = (_ganeti.ganeti_constants.DTS_EXT_MIRROR if _ganeti.HAVE_GANETI
                else _FALLBACK_EXT_MIRROR)
    dev_type = _attr(disk, "dev_type")
    return dev_type in mirrored and dev_type != "rbd"


def block_devices_of(block_devices: Any) -> list[cmdline.BlockDevice]:
    """The core's disks for Ganeti 3's ``(disk, link, uri)`` triples, each marked shared
    if its storage is (see :func:`_on_shared_storage`)."""
    entries = list(block_devices or [])
    disks = cmdline.normalize_block_devices(entries)
    return [dataclasses.replace(d, shared=_on_shared_storage(entry[0]),
                                uuid=_str_or_none(_attr(entry[0], "uuid")))
            for d, entry in zip(disks, entries, strict=True)]


def _disk_index(disk: Any) -> int | None:
    """The index in Ganeti's ``iv_name`` (``disk/N``) of ``disk``, or None."""
    iv_name = _attr(disk, "iv_name")
    prefix = "disk/"
    if isinstance(iv_name, str) and iv_name.startswith(prefix) and \
            iv_name[len(prefix):].isdigit():
        return int(iv_name[len(prefix):])
    return None


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


# Ganeti's hotplug actions and targets (constants.HOTPLUG_ACTION_*, HOTPLUG_TARGET_*)
_HOTPLUG_ACTIONS = {"hotadd": hotplug.ADD, "hotremove": hotplug.REMOVE,
                    "hotmod": hotplug.MODIFY}
_HOTPLUG_TARGETS = {"disk": hotplug.DISK, "nic": hotplug.NIC}


def _as_hotplug_errors(func: F) -> F:
    """Raise the library's errors as Ganeti's ``HotplugError`` (the cause kept)."""
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except errors.GenericError as err:
            if isinstance(err, _ganeti.HotplugError):
                raise
            raise _ganeti.HotplugError(str(err)) from err
    return wrapper  # type: ignore[return-value]


def _hotplug_kind(instance: Any, action: str, dev_type: str) -> tuple[str, str]:
    """The core's ``(kind, action)`` for Ganeti's ``dev_type`` and ``action``."""
    kind, verb = _HOTPLUG_TARGETS.get(dev_type), _HOTPLUG_ACTIONS.get(action)
    if kind is None or verb is None:
        raise errors.HotplugError(
            f"Cannot hotplug on instance {_attr(instance, 'name')}: unknown action "
            f"{action!r} or device type {dev_type!r} (Ganeti sends "
            f"{', '.join(sorted(_HOTPLUG_ACTIONS))} of {', '.join(sorted(_HOTPLUG_TARGETS))})")
    return kind, verb


def _hotplug_nic(instance: Any, device: Any) -> dict[str, Any]:
    """Ganeti's NIC ``device`` as the core's NIC dict, its nicparams filled from the
    instance's NIC of the same uuid (the RPC fills the instance's, not the device's)."""
    nic = _nic_dict(device)
    for known in _attr(instance, "nics") or []:
        other = _nic_dict(known)
        if nic.get("uuid") is not None and other.get("uuid") == nic.get("uuid"):
            nic["nicparams"] = {**other["nicparams"], **nic["nicparams"]}
    return nic


def spice_tls_files() -> spice.TlsFiles:
    """Ganeti's SPICE certificate files (``spice_use_tls``): the CA, and one PEM
    file holding the server's certificate and key."""
    return spice.TlsFiles(cacert=_ganeti.SPICE_CACERT_FILE, cert=_ganeti.SPICE_CERT_FILE,
                          key=_ganeti.SPICE_CERT_FILE)


def instance_spec(instance: Any, block_devices: Any = ()) -> InstanceSpec:
    """The core's spec of a Ganeti 3 instance (filled hvparams and beparams, as RPC sends)."""
    name = _name(instance)
    hvparams = params.fill(_attr(instance, "hvparams"))
    params.check_implemented(hvparams)
    beparams = _attr(instance, "beparams") or {}
    # Ganeti 3 starts QEMU with maxmem (minmem only matters to ballooning).
    memory = beparams.get("maxmem", beparams.get(c.BE_MEMORY))
    return InstanceSpec(
        name=name, hvparams=params.to_core(hvparams),
        memory=_positive_int(name, "maxmem", memory),
        vcpus=_positive_int(name, c.BE_VCPUS, beparams.get(c.BE_VCPUS)),
        nics=[_nic_dict(n) for n in _attr(instance, "nics") or []],
        disks=block_devices_of(block_devices),
        tags=sorted(str(t) for t in _attr(instance, "tags") or []),
        uuid=_attr(instance, "uuid"), network_port=_attr(instance, "network_port"))


class KVMHypervisor(_ganeti.BaseHypervisor):
    """QEMU/KVM instances on this node, for Ganeti 3.x's node daemon.

    Ganeti builds it without arguments.  ``run_dir`` relocates all runtime
    state (default: ``GANETI_KVM_RUN_DIR`` or
    /var/run/ganeti/kvm-hypervisor); ``uid_pool``, ``socat_path``,
    ``ifup_script`` and ``netns`` are those of
    :class:`ganeti_kvm.core.node.KvmNode`.
    """

    CAN_MIGRATE = True
    PARAMETERS = params.PARAMETERS
    # The ifup hook ships with the library: Ganeti has no file to copy.
    ANCILLARY_FILES: list[str] = []
    ANCILLARY_FILES_OPT: list[str] = []

    def __init__(self, run_dir: str | None = None, uid_pool: str | None = None,
                 socat_path: str = c.SOCAT_PATH, ifup_script: str = c.KVM_IFUP,
                 netns: str | None = None, spice_tls: spice.TlsFiles | None = None) -> None:
        self.node = KvmNode(run_dir or paths.default_run_dir(), uid_pool=uid_pool,
                            socat_path=socat_path, ifup_script=ifup_script, netns=netns,
                            spice_tls=spice_tls or spice_tls_files())

    # --- parameters ------------------------------------------------------------

    @classmethod
    @_as_ganeti_errors
    def CheckParameterSyntax(cls, hvparams: Mapping[str, Any]) -> None:
        """Ganeti's table, then the refusal of unimplemented values, then the core's checks."""
        if _ganeti.HAVE_GANETI:
            super().CheckParameterSyntax(hvparams)
        else:
            params.apply_table_syntax(cls.PARAMETERS, hvparams)
        params.check_implemented(hvparams)
        core_params.check_all_syntax(params.to_core(hvparams))

    @classmethod
    @_as_ganeti_errors
    def ValidateParameters(cls, hvparams: Mapping[str, Any]) -> None:
        """:meth:`CheckParameterSyntax`, then files, users, devices and QEMU's abilities."""
        cls.CheckParameterSyntax(hvparams)
        core_params.apply_node_checks(cls.PARAMETERS, hvparams)
        KvmNode(paths.default_run_dir(), spice_tls=spice_tls_files()).check_params(
            params.to_core(hvparams))

    @classmethod
    def AssessParameters(cls, hvparams: Mapping[str, Any]) -> list[str]:
        """Warnings about uncommon values (Ganeti 3.1); none so far."""
        return []

    # --- lifecycle -------------------------------------------------------------

    @_as_ganeti_errors
    def StartInstance(self, instance: Any, block_devices: Any, startup_paused: bool) -> None:
        """Start ``instance``; returns when QEMU runs and answers on its monitor.

        ``block_devices`` are Ganeti's ``(disk, link, uri)`` triples.  With
        ``user_shutdown``, Ganeti's ganeti-kvmd is started first if it does not
        run (see :meth:`_start_kvmd`).
        """
        spec = instance_spec(instance, block_devices)
        if spec.hvparams.get(c.HV_KVM_USER_SHUTDOWN):
            self._start_kvmd(spec.name)
        self.node.start(spec, paused=bool(startup_paused))

    @staticmethod
    def _start_kvmd(name: str) -> None:
        """Make sure ganeti-kvmd runs: it tells instance ``name``'s own power-off
        (Ganeti's USER_down) from a stop, on the monitor ``user_shutdown`` adds."""
        problem = _ganeti.start_kvmd()
        if problem is not None:
            raise errors.HypervisorError(
                f"Cannot start instance {name} with user_shutdown: Ganeti's ganeti-kvmd "
                f"does not run and could not be started ({problem}); check "
                "/var/log/ganeti/kvm-daemon.log, or set user_shutdown to false")

    def VerifyInstance(self, instance: Any) -> bool:
        """Whether the running instance matches its configuration: always, so far."""
        return True

    def RestoreInstance(self, instance: Any, block_devices: Any) -> None:
        """Bring a running instance back to its configuration; nothing drifts so far."""

    @_as_ganeti_errors
    def StopInstance(self, instance: Any, force: bool = False, retry: bool = False,
                     name: str | None = None, timeout: int | None = None) -> None:
        """Stop an instance, as Ganeti 3 does.

        With ACPI on and no ``force`` it presses the power button and
        returns; Ganeti's backend polls and forces the stop after its own
        timeout.  ``force`` (or ACPI off) kills QEMU; ``name`` with
        ``force`` stops an instance known only by name.
        """
        if name is not None and not force:
            raise errors.HypervisorError("Cannot shutdown cleanly by name only")
        if name is None:
            name = _name(instance)
        self._adopt(name)
        acpi = False
        try:
            record = self.node.load_record(name)
        except errors.RuntimeStateError as err:
            log.warning("%s; stopping instance %s without it", err, name)
            record = None
        if record is not None:
            acpi = bool(record.hvparams.get(c.HV_ACPI))
        elif instance is not None:
            acpi = bool(params.fill(_attr(instance, "hvparams"))[c.HV_ACPI])
        if self.node.stop(name, acpi=acpi, force=force, timeout=None):
            bundled.remove_leftovers(self.node, name)

    @_as_ganeti_errors
    def CleanupInstance(self, instance_name: str) -> None:
        """Remove everything a stopped instance left behind; refuses while it runs."""
        self.node.cleanup(instance_name)
        bundled.remove_leftovers(self.node, instance_name)

    @_as_ganeti_errors
    def RebootInstance(self, instance: Any) -> None:
        """Stop the instance and start it again from its saved runtime record."""
        name = _name(instance)
        if self._adopt(name):
            # Its QEMU was the bundled driver's: the restart builds ganeti-kvm's from
            # parameters, which must then all be implemented (refused before the stop).
            params.check_implemented(_attr(instance, "hvparams") or {})
        self.node.reboot(name)
        bundled.remove_leftovers(self.node, name, restarted=True)

    def _adopt(self, name: str) -> bool:
        """Take ``name`` over from Ganeti's bundled driver if it started it (see
        :mod:`ganeti_kvm.ganeti3.bundled`); True if its QEMU is the bundled driver's.

        A failure is logged: the calls work on the QEMU without the record.
        """
        try:
            bundled.adopt(self.node, name)
        except errors.HypervisorError as err:
            log.warning("Cannot take instance %s over from the bundled driver: %s", name, err)
        return os.path.exists(bundled.kept_file(self.node.paths(name)))

    # --- listing -------------------------------------------------------------

    @staticmethod
    def _ganeti_tuple(info: Any) -> tuple[str, int, int, int, int, int]:
        # The QEMU process lives (running, paused or not answering): Ganeti's
        # RUNNING.  SHUTDOWN: QEMU is gone after the guest powered itself off
        # (user_shutdown, ganeti-kvmd's marker): Ganeti shows USER_down, or
        # ERROR_down where the cluster or the instance has user shutdown off.
        if info.state == c.HV_STATE_USER_DOWN:
            return (info.name, -1, 0, 0, _ganeti.HvInstanceState.SHUTDOWN, 0)
        return (info.name, info.pid, info.memory, info.vcpus,
                _ganeti.HvInstanceState.RUNNING, int(info.cpu_time))

    @_as_ganeti_errors
    def ListInstances(self, hvparams: Mapping[str, Any] | None = None) -> list[str]:
        """Names of the instances whose QEMU runs on this node."""
        return self.node.list_names()

    @_as_ganeti_errors
    def GetInstanceInfo(self, instance_name: str,
                        hvparams: Mapping[str, Any] | None = None) -> tuple | None:
        """``(name, pid, memory, vcpus, HvInstanceState, cpu_seconds)``, or None.

        An instance whose guest powered itself off, as ganeti-kvmd saw it
        (``user_shutdown``), is ``(name, -1, 0, 0, SHUTDOWN, 0)`` until it is
        started, stopped or cleaned up, as with Ganeti's own driver.
        """
        info = self.node.info(instance_name, user_down=True)
        return self._ganeti_tuple(info) if info else None

    @_as_ganeti_errors
    def GetAllInstancesInfo(self, hvparams: Mapping[str, Any] | None = None) -> list[tuple]:
        """:meth:`GetInstanceInfo` for every running or user-shut-down instance."""
        return [self._ganeti_tuple(info) for info in self.node.all_info(user_down=True)]

    # --- node ------------------------------------------------------------------

    @staticmethod
    @_as_ganeti_errors
    def GetLinuxNodeInfo(meminfo: str = "/proc/meminfo",
                         cpuinfo: str = "/proc/cpuinfo") -> dict[str, int]:
        """Memory (MiB) and CPUs of this node, with the CPU keys Ganeti 3 reads."""
        result = nodeinfo.linux_node_info(meminfo, cpuinfo)
        result.update(cpu_dom0=result["cpu_total"], cpu_nodes=1, cpu_sockets=1)
        return result

    @_as_ganeti_errors
    def GetNodeInfo(self, hvparams: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """:meth:`GetLinuxNodeInfo` plus ``hv_version``, the QEMU of ``hvparams``."""
        result: dict[str, Any] = self.GetLinuxNodeInfo()
        kvm_path = _attr(hvparams, c.HV_KVM_PATH) or c.KVM_PATH
        try:
            result["hv_version"] = tuple(self.node.caps(kvm_path).version)
        except errors.HypervisorError as err:
            log.warning("Cannot tell the version of QEMU %s: %s", kvm_path, err)
        return result

    @_as_ganeti_errors
    def Verify(self, hvparams: Mapping[str, Any] | None = None) -> str | None:
        """None if this node can run instances, else a message saying what is missing."""
        problems = self.node.problems(_attr(hvparams, c.HV_KVM_PATH) or c.KVM_PATH)
        return "; ".join(problems) if problems else None

    @classmethod
    @_as_ganeti_errors
    def LinuxPowercycle(cls) -> None:
        """Reboot the node at once through sysrq."""
        nodeinfo.powercycle()

    @classmethod
    def PowercycleNode(cls, hvparams: Mapping[str, Any] | None = None) -> None:
        """Reboot the node at once (sysrq); for a hung node only."""
        cls.LinuxPowercycle()

    @classmethod
    def GetAncillaryFiles(cls) -> tuple[list[str], list[str]]:
        """``(files, optional files)`` Ganeti copies to every node: none."""
        return (list(cls.ANCILLARY_FILES), list(cls.ANCILLARY_FILES_OPT))

    # --- consoles --------------------------------------------------------------

    @classmethod
    @_as_ganeti_errors
    def GetInstanceConsole(cls, instance: Any, primary_node: Any, node_group: Any,
                           hvparams: Mapping[str, Any], beparams: Mapping[str, Any]) -> Any:
        """Ganeti's ``objects.InstanceConsole``: serial over ssh, VNC, or a message."""
        name = _name(instance)
        hvp = params.fill(hvparams)
        host = _attr(primary_node, "name", primary_node)
        if hvp[c.HV_SERIAL_CONSOLE]:
            ipaths = paths.RunDir(paths.default_run_dir()).instance(name)
            command = [c.KVM_CONSOLE_WRAPPER, c.SOCAT_PATH, name, ipaths.qmp_socket,
                       _SERIAL_SOCAT, "UNIX-CONNECT:" + ipaths.serial_socket]
            port = None
            if node_group is not None and hasattr(node_group, "FillND"):
                port = node_group.FillND(primary_node).get("ssh_port")
            return _ganeti.InstanceConsole(instance=name, kind=_ganeti.CONS_SSH, host=host,
                                           port=port, user="root", command=command)
        address = hvp[c.HV_VNC_BIND_ADDRESS]
        port = _attr(instance, "network_port")
        if address and not address.startswith("/") and isinstance(port, int) \
                and port > c.VNC_BASE_PORT:
            vnc_host = host if address == c.IP4_ADDRESS_ANY else address
            return _ganeti.InstanceConsole(instance=name, kind=_ganeti.CONS_VNC, host=vnc_host,
                                           port=port, display=port - c.VNC_BASE_PORT)
        bind = hvp.get(c.HV_KVM_SPICE_BIND) or ""
        if bind and isinstance(port, int) and not isinstance(port, bool) and port > 0:
            # a wildcard or an interface (whose address is the node's): reach the node
            literal = spice.ip_literal(bind)
            spice_host = bind if literal is not None and not literal.is_unspecified else host
            return _ganeti.InstanceConsole(instance=name, kind=_ganeti.CONS_SPICE,
                                           host=spice_host, port=port)
        return _ganeti.InstanceConsole(instance=name, kind=_ganeti.CONS_MESSAGE,
                                       message=f"No serial shell for instance {name}")

    # --- migration -------------------------------------------------------------

    @staticmethod
    def VersionsSafeForMigration(src: Any, target: Any) -> bool:
        """QEMU migrates between the versions Ganeti runs (machine types pin the guest ABI)."""
        return True

    @_as_ganeti_errors
    def MigrationInfo(self, instance: Any) -> str:
        """The serialized runtime record of the running instance, for its target."""
        name = _name(instance)
        self._adopt(name)
        hotplug.settle(self.node, name)  # the target gets the devices QEMU still has
        return core_migration.migration_info(self.node, name)

    @_as_ganeti_errors
    def AcceptInstance(self, instance: Any, info: str, target: str) -> None:
        """On the target: start QEMU waiting for ``instance`` on ``target``:migration_port."""
        core_migration.accept(self.node, _name(instance), info, target)

    @_as_ganeti_errors
    def MigrateInstance(self, cluster_name: str, instance: Any, target: str,
                        live: bool) -> None:
        """On the source: start the migration; returns once QEMU migrates.

        Ganeti then polls :meth:`GetMigrationStatus`; the library's time
        limit and stall timeout are enforced there.
        """
        name = _name(instance)
        self._adopt(name)
        migration.start(self.node, name, target, bool(live))

    @_as_ganeti_errors
    def GetMigrationStatus(self, instance: Any) -> Any:
        """Ganeti's ``objects.MigrationStatus``: active, completed, failed or cancelled.

        While the migration goes on, the answer comes when it ends, or
        after :data:`~ganeti_kvm.ganeti3.migration.STATUS_WAIT` seconds.
        """
        state, status = migration.poll(self.node, _name(instance))
        return _ganeti.MigrationStatus(status=state, **migration.ganeti_fields(status))

    @_as_ganeti_errors
    def FinalizeMigrationSource(self, instance: Any, success: bool, live: bool) -> None:
        """On the source: stop the stale QEMU, or cancel and let the guest run on here."""
        name = _name(instance)
        migration.finish_source(self.node, name, bool(success))
        bundled.remove_leftovers(self.node, name)

    @_as_ganeti_errors
    def FinalizeMigrationDst(self, instance: Any, info: str, success: bool) -> None:
        """On the target: run the ifup hooks and continue, or stop and clean up."""
        core_migration.finalize(self.node, _name(instance), info, bool(success))

    # --- ballooning -------------------------------------------------------------

    @_as_ganeti_errors
    def BalloonInstanceMemory(self, instance: Any, mem: int) -> None:
        """Give the running ``instance`` ``mem`` MiB through its virtio-balloon device."""
        self.node.balloon(_name(instance), mem)

    # --- hotplug (see ganeti_kvm.core.hotplug) -----------------------------------

    @_as_hotplug_errors
    def HotplugSupported(self, instance: Any) -> None:
        """``HotplugError`` unless the instance runs under a QEMU that can hotplug."""
        hotplug.check_supported(self.node, _name(instance))

    @_as_hotplug_errors
    def VerifyHotplugSupport(self, instance: Any, action: str, dev_type: str) -> None:
        """``HotplugError`` unless ``action`` (hotadd, hotremove, hotmod) on a
        ``dev_type`` (disk, nic) device of the running instance can be done."""
        kind, verb = _hotplug_kind(instance, action, dev_type)
        hotplug.check_supported(self.node, _name(instance), kind, verb)

    @_as_hotplug_errors
    def HotAddDevice(self, instance: Any, dev_type: str, device: Any, extra: Any,
                     seq: int) -> None:
        """Add Ganeti's disk or NIC ``device`` as device ``seq`` of the running instance.

        For a disk ``extra`` is ``(link, uri)``, the assembled disk's path.
        """
        kind, _ = _hotplug_kind(instance, "hotadd", dev_type)
        name = _name(instance)
        if kind == hotplug.NIC:
            hotplug.add_nic(self.node, name, _hotplug_nic(instance, device), seq)
            return
        if not isinstance(extra, (list, tuple)) or len(extra) != 2:
            raise errors.HotplugError(
                f"Cannot hotplug a disk of instance {name}: Ganeti sent {extra!r} instead of "
                "the assembled disk's (link, uri); activate the instance's disks and retry")
        (disk,) = block_devices_of([(device, extra[0], extra[1])])
        hotplug.add_disk(self.node, name, disk, seq)

    @_as_hotplug_errors
    def HotDelDevice(self, instance: Any, dev_type: str, device: Any, extra: Any,
                     seq: int) -> None:
        """Remove Ganeti's disk or NIC ``device`` (by its uuid, else ``seq``)."""
        kind, _ = _hotplug_kind(instance, "hotremove", dev_type)
        remove = hotplug.remove_nic if kind == hotplug.NIC else hotplug.remove_disk
        remove(self.node, _name(instance), _str_or_none(_attr(device, "uuid")), seq)

    @_as_hotplug_errors
    def HotModDevice(self, instance: Any, dev_type: str, device: Any, extra: Any,
                     seq: int) -> None:
        """Apply a changed NIC ``device`` (MAC, IP, mode, link): Ganeti changes no disk."""
        kind, verb = _hotplug_kind(instance, "hotmod", dev_type)
        name = _name(instance)
        problem = hotplug.device_type_problem({}, kind, verb) if kind == hotplug.DISK else None
        if problem:
            raise errors.HotplugError(f"Cannot change a disk of instance {name} by hotplug: "
                                      f"{problem}; change it with a restart")
        hotplug.modify_nic(self.node, name, _hotplug_nic(instance, device), seq)

    @_as_hotplug_errors
    def ResizeDisk(self, instance: Any, disk: Any, new_size: int) -> None:
        """Tell QEMU that ``disk`` of the running instance grew to ``new_size`` bytes
        (Ganeti 3.1's grow-disk): the guest sees the new size without a restart."""
        hotplug.resize_disk(self.node, _name(instance), _str_or_none(_attr(disk, "uuid")),
                            _disk_index(disk), new_size)
