"""The KVM hypervisor, behind the cluster manager's contract.

:class:`KVMHypervisor` keeps the names and signatures of the cluster
manager's KVM driver (CamelCase methods, ``PARAMETERS``, ``CAN_MIGRATE``) so
that a node daemon ports by changing an import.  It only adapts the
daemon's objects to plain data; the work is done by
:class:`ganeti_kvm.core.node.KvmNode` and the modules below it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

from ganeti_kvm import constants as c
from ganeti_kvm import errors, hv_base, objects
from ganeti_kvm.core import inputs, migration, names, params
from ganeti_kvm.core.node import InstanceSpec, KvmNode
from ganeti_kvm.host import paths
from ganeti_kvm.qemu import caps as qemu_caps
from ganeti_kvm.qemu import cmdline

log = logging.getLogger(__name__)


def _attr(obj: Any, name: str, default: Any = None) -> Any:
    """An attribute of a daemon object, or the key of a dict."""
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _nic_dict(nic: Any) -> dict[str, Any]:
    if isinstance(nic, Mapping):
        data = dict(nic)
    elif hasattr(nic, "ToDict"):
        data = nic.ToDict()
    else:
        data = {k: getattr(nic, k, None) for k in ("mac", "ip", "nicparams")}
    data["nicparams"] = dict(inputs.mapping("nicparams", data.get("nicparams")))
    return data


def _positive_be(name: str, beparams: Mapping[str, Any], key: str) -> int:
    """Backend parameter ``key``: a whole number greater than zero, or ParameterError."""
    value = beparams.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise errors.ParameterError(
            f"Instance {name}: backend parameter {key} must be a whole number "
            f"greater than zero, not {value!r}", key, value)
    return value


def _tag_list(tags: Any) -> list[str]:
    """The instance's tags as a list; the cluster manager keeps a set, which is sorted."""
    if isinstance(tags, (set, frozenset)):
        return sorted(str(t) for t in tags)
    return [str(t) for t in inputs.items("tags", tags)]


def _with_later_keys(hvparams: Mapping[str, Any]) -> dict[str, Any]:
    """2011 ``hvparams`` plus the core's Ganeti 3.x keys: the 2011 driver's hardware.

    The later keys take their defaults, except where Ganeti 3's default adds
    hardware the 2011 driver never gave a guest: its SPICE display is the
    standard VGA, without the vdagent channel.
    """
    filled = {key: value for key, value in names.DEFAULTS.items()
              if key not in c.HVS_PARAMETERS}
    filled.update(hvparams)
    filled[names.HV_KVM_SPICE_USE_VDAGENT] = False
    if filled.get(names.HV_KVM_SPICE_BIND):
        filled[names.HV_VGA] = names.HT_VGA_STD
    return filled


class KVMHypervisor(hv_base.BaseHypervisor):
    """QEMU/KVM instances on this node.

    ``run_dir`` relocates all runtime state (default: ``GANETI_KVM_RUN_DIR``
    or /var/run/ganeti/kvm-hypervisor), so one process can act as several
    nodes.  ``uid_pool`` (e.g. ``"1000-1010, 2000"``) serves the security
    model ``pool``; it defaults to ``GANETI_KVM_UID_POOL``.  ``netns`` names
    the network namespace (``ip netns``) that holds the instances' TAP devices
    and bridges, when that is not this process's own; ``ifup_script``
    replaces the shipped ``kvm-ifup`` hook.
    """

    CAN_MIGRATE = True
    # The 2011 contract's keys, each with the core's check (the core's table,
    # in its order, restricted to constants.HVS_PARAMETERS).
    PARAMETERS = {key: check for key, check in params.PARAMETERS.items()
                  if key in c.HVS_PARAMETERS}
    PARAMETER_TYPES = dict(c.HVS_PARAMETER_TYPES)

    def __init__(self, run_dir: str | None = None, uid_pool: str | None = None,
                 socat_path: str = c.SOCAT_PATH, ifup_script: str = c.KVM_IFUP,
                 netns: str | None = None) -> None:
        self._run_dir = run_dir or paths.default_run_dir()
        self.node = KvmNode(self._run_dir, uid_pool=uid_pool, socat_path=socat_path,
                            ifup_script=ifup_script, netns=netns)

    # --- parameters ------------------------------------------------------------

    @classmethod
    def CheckParameterSyntax(cls, hvparams: Mapping[str, Any]) -> None:
        """Check the syntax of ``hvparams``, including the checks between keys."""
        params.check_types(hvparams, c.HVS_PARAMETER_TYPES)  # a Ganeti 3.x key is refused
        params.check_all_syntax(_with_later_keys(hvparams))

    @hv_base.ClassOrInstanceMethod
    def ValidateParameters(cls_or_self: Any, hvparams: Mapping[str, Any]) -> None:
        """Check ``hvparams`` against this node: files, users, devices, QEMU's abilities.

        A classmethod, as in the cluster manager's driver.  Called on an
        object, QEMU's abilities are cached under that object's run directory.
        """
        hv_base.check_present(cls_or_self.PARAMETERS, hvparams)
        hv_base.apply_node_checks(cls_or_self.PARAMETERS, hvparams)
        kvm_path = hvparams[c.HV_KVM_PATH]
        if isinstance(cls_or_self, type):
            caps = qemu_caps.probe(kvm_path)
        else:
            caps = cls_or_self.node.caps(kvm_path)
        params.check_node(_with_later_keys(hvparams), caps)

    @staticmethod
    def FillHvParams(hvparams: Mapping[str, Any] | None) -> dict[str, Any]:
        """The cluster defaults overlaid with ``hvparams``."""
        filled = params.fill(hvparams)
        return {key: value for key, value in filled.items()
                if key in c.HVS_PARAMETERS or key not in names.PARAMETER_KEYS}

    # --- adapting the daemon's objects ---------------------------------------------

    @classmethod
    def _spec(cls, instance: Any, block_devices: Any = ()) -> InstanceSpec:
        name = paths.check_instance_name(_attr(instance, "name"))
        hvparams = _with_later_keys(params.fill(_attr(instance, "hvparams")))
        beparams = dict(c.BEC_DEFAULTS)
        beparams.update(inputs.mapping(f"Instance {name}: beparams", _attr(instance, "beparams")))
        memory, vcpus = (_positive_be(name, beparams, key) for key in (c.BE_MEMORY, c.BE_VCPUS))
        disks = cmdline.normalize_block_devices(inputs.items("block_devices", block_devices))
        # The 2011 driver's rule: every disk of an externally mirrored
        # template (sharedfile, blockdev) is on shared storage, never cached.
        if _attr(instance, "disk_template") in c.DTS_EXT_MIRROR:
            disks = [dataclasses.replace(d, shared=True) for d in disks]
        return InstanceSpec(
            name=name, hvparams=hvparams, memory=memory, vcpus=vcpus,
            nics=[_nic_dict(n) for n in inputs.items("nics", _attr(instance, "nics"))],
            disks=disks,
            tags=_tag_list(_attr(instance, "tags")),
            uuid=inputs.optional_text("uuid", _attr(instance, "uuid")),
            network_port=_attr(instance, "network_port"))

    # --- lifecycle -------------------------------------------------------------

    def StartInstance(self, instance: Any, block_devices: Any,
                      startup_paused: bool = False) -> None:
        """Start ``instance``; returns when QEMU runs and answers on its monitor.

        ``block_devices`` are ``(disk, path)`` pairs or ``(disk, path, uri)``
        triples.  With ``startup_paused`` the guest waits in QMP state
        ``prelaunch`` until continued (e.g. by the console wrapper).
        """
        self.node.start(self._spec(instance, block_devices), paused=startup_paused)

    def StopInstance(self, instance: Any, force: bool = False, retry: bool = False,
                     name: str | None = None, timeout: float | None = None) -> None:
        """Stop an instance.

        With ACPI on and no ``force``, presses the ACPI power button; with a
        ``timeout`` it then waits that long for the guest to power off before
        terminating QEMU (SIGTERM, then SIGKILL); without one it returns at
        once, as the cluster manager polls (``retry``).  ``name`` with
        ``force`` stops an instance known only by name.
        """
        if name is not None and not force:
            raise errors.HypervisorError("Cannot shutdown cleanly by name only")
        if name is None:
            name = paths.check_instance_name(_attr(instance, "name"))
        acpi = True
        record = None
        try:
            record = self.node.load_record(name)
        except errors.RuntimeStateError as err:
            log.warning("%s; stopping instance %s without it", err, name)
        if record is not None:
            acpi = bool(record.hvparams.get(c.HV_ACPI))
        elif instance is not None:
            acpi = bool(params.fill(_attr(instance, "hvparams"))[c.HV_ACPI])
        self.node.stop(name, acpi=acpi, force=force, timeout=timeout)

    def CleanupInstance(self, instance_name: str) -> None:
        """Remove everything a stopped instance left behind; refuses while it runs."""
        self.node.cleanup(instance_name)

    def RebootInstance(self, instance: Any) -> None:
        """Stop the instance and start it again from its saved runtime record."""
        self.node.reboot(paths.check_instance_name(_attr(instance, "name")))

    # --- listing -------------------------------------------------------------

    def ListInstances(self) -> list[str]:
        """Names of the instances whose QEMU runs on this node."""
        return self.node.list_names()

    def GetInstanceInfo(self, instance_name: str) -> tuple | None:
        """``(name, pid, memory, vcpus, state, cpu_time)`` or None if not running."""
        info = self.node.info(instance_name)
        return info.as_tuple() if info else None

    def GetAllInstancesInfo(self) -> list[tuple]:
        """:meth:`GetInstanceInfo` for every running instance."""
        return [info.as_tuple() for info in self.node.all_info()]

    # --- node ------------------------------------------------------------------

    def GetNodeInfo(self) -> dict[str, Any]:
        """Memory and CPUs of the node, plus the default QEMU's version."""
        result: dict[str, Any] = self.GetLinuxNodeInfo()
        try:
            result["hv_version"] = self.node.caps(c.KVM_PATH).version
        except errors.HypervisorError as err:
            log.warning("Cannot tell the QEMU version: %s", err)
        return result

    def Verify(self, kvm_path: str | None = None) -> str | None:
        """None if this node can run instances, else a message saying what is missing."""
        problems = self.node.problems(kvm_path or c.KVM_PATH)
        return "; ".join(problems) if problems else None

    @classmethod
    def PowercycleNode(cls) -> None:
        """Reboot the node at once (sysrq); for a hung node only."""
        cls.LinuxPowercycle()

    # --- consoles --------------------------------------------------------------

    @hv_base.ClassOrInstanceMethod
    def GetInstanceConsole(cls_or_self: Any, instance: Any, hvparams: Mapping[str, Any],
                           beparams: Mapping[str, Any],
                           run_dir: str | None = None) -> objects.InstanceConsole:
        """How to reach the console of ``instance``: serial over ssh, VNC, or a message.

        A classmethod, as in the cluster manager's driver: called on the
        class it uses the default run directory and socat; called on an
        object, that object's (``run_dir`` overrides either).
        """
        name = paths.check_instance_name(_attr(instance, "name"))
        hvp = params.fill(hvparams)
        node = _attr(instance, "primary_node")
        if isinstance(cls_or_self, type):
            own_run_dir, socat = paths.default_run_dir(), c.SOCAT_PATH
        else:
            own_run_dir, socat = cls_or_self.node.layout.root, cls_or_self.node.socat_path
        if hvp[c.HV_SERIAL_CONSOLE]:
            ipaths = paths.RunDir(run_dir or own_run_dir).instance(name)
            command = [c.KVM_CONSOLE_WRAPPER, socat, name, ipaths.qmp_socket,
                       f"STDIO,raw,echo=0,escape={c.SOCAT_ESCAPE_CODE}",
                       "UNIX-CONNECT:" + ipaths.serial_socket]
            return objects.InstanceConsole(instance=name, kind=c.CONS_SSH, host=node,
                                           user=c.GANETI_RUNAS, command=command)
        address = hvp[c.HV_VNC_BIND_ADDRESS]
        port = _attr(instance, "network_port")
        if address and not address.startswith("/") and isinstance(port, int) \
                and port >= c.VNC_BASE_PORT:
            host = node if address == c.IP4_ADDRESS_ANY else address
            return objects.InstanceConsole(instance=name, kind=c.CONS_VNC, host=host,
                                           port=port, display=port - c.VNC_BASE_PORT)
        return objects.InstanceConsole(instance=name, kind=c.CONS_MESSAGE,
                                       message=f"No serial shell for instance {name}")

    # --- migration (see ganeti_kvm.core.migration) ----------------------------------------

    def MigrationInfo(self, instance: Any) -> str:
        """The serialized runtime record of the running instance, for its target."""
        return migration.migration_info(self.node, paths.check_instance_name(
            _attr(instance, "name")))

    def AcceptInstance(self, instance: Any, info: str, target: str) -> None:
        """Start QEMU waiting for ``instance`` with ``-incoming tcp:TARGET:PORT``.

        TAP devices are opened now; the ifup hook runs in FinalizeMigration.
        """
        migration.accept(self.node, paths.check_instance_name(_attr(instance, "name")),
                         info, target)

    def MigrateInstance(self, instance: Any, target: str, live: bool,
                        timeout: float | None = None, progress: Any = None,
                        stall_timeout: float = migration.STALL_TIMEOUT) -> None:
        """Migrate the instance to ``target``; returns once it runs there.

        ``timeout`` overrides the time limit derived from RAM size and
        bandwidth; a migration that moves no byte for ``stall_timeout``
        seconds (a broken link) is cancelled; ``progress`` is called with a
        :class:`~ganeti_kvm.core.migration.MigrationStatus` while it runs.
        """
        migration.migrate(self.node, paths.check_instance_name(_attr(instance, "name")),
                          target, live, limit=timeout, progress=progress,
                          stall_timeout=stall_timeout)

    def FinalizeMigration(self, instance: Any, info: str, success: bool) -> None:
        """On the target: run the ifup hooks and continue, or stop and clean up."""
        migration.finalize(self.node, paths.check_instance_name(_attr(instance, "name")),
                           info, success)

    def GetMigrationStatus(self, instance: Any) -> dict[str, Any]:
        """The state and progress of the instance's migration (bytes and QEMU's report)."""
        name = paths.check_instance_name(_attr(instance, "name"))
        return migration.status(self.node, name).to_dict()
