"""The hypervisor base class and the declarative parameter checks (the 2011 contract).

A hypervisor declares its parameters as data: ``PARAMETERS`` maps every key
to a five-tuple ``(required, check_fn, check_msg, prereq_fn, prereq_msg)``.
``check_fn`` is a pure syntax check (run anywhere, touches nothing);
``prereq_fn`` is checked on the node (a file exists, a directory exists).
The check helpers and the generic code that applies a table are the core's
(:mod:`ganeti_kvm.core.params`), offered here under the cluster manager's
names; hypervisors add cross-checks.
"""

from __future__ import annotations

import logging
import types
from collections.abc import Mapping
from typing import Any, ClassVar

from ganeti_kvm import constants, errors
from ganeti_kvm.core.params import MAX_PATH_BYTES as MAX_PATH_BYTES
from ganeti_kvm.core.params import MAX_TEXT_BYTES as MAX_TEXT_BYTES
from ganeti_kvm.core.params import MIGRATION_MODE_CHECK as MIGRATION_MODE_CHECK
from ganeti_kvm.core.params import NET_PORT_CHECK as NET_PORT_CHECK
from ganeti_kvm.core.params import NO_CHECK as NO_CHECK
from ganeti_kvm.core.params import OPT_CPU_MASK_CHECK as OPT_CPU_MASK_CHECK
from ganeti_kvm.core.params import OPT_DIR_CHECK as OPT_DIR_CHECK
from ganeti_kvm.core.params import OPT_FILE_CHECK as OPT_FILE_CHECK
from ganeti_kvm.core.params import OPT_NET_PORT_CHECK as OPT_NET_PORT_CHECK
from ganeti_kvm.core.params import REQ_CPU_MASK_CHECK as REQ_CPU_MASK_CHECK
from ganeti_kvm.core.params import REQ_DIR_CHECK as REQ_DIR_CHECK
from ganeti_kvm.core.params import REQ_FILE_CHECK as REQ_FILE_CHECK
from ganeti_kvm.core.params import REQ_NET_PORT_CHECK as REQ_NET_PORT_CHECK
from ganeti_kvm.core.params import REQUIRED_CHECK as REQUIRED_CHECK
from ganeti_kvm.core.params import Check as Check
from ganeti_kvm.core.params import ParamInSet as ParamInSet
from ganeti_kvm.core.params import PositiveInt as PositiveInt
from ganeti_kvm.core.params import apply_node_checks as apply_node_checks
from ganeti_kvm.core.params import apply_syntax_checks as apply_syntax_checks
from ganeti_kvm.core.params import check_present as check_present
from ganeti_kvm.core.params import check_types as check_types
from ganeti_kvm.core.params import parse_cpu_mask as parse_cpu_mask
from ganeti_kvm.host import nodeinfo

log = logging.getLogger(__name__)


class ClassOrInstanceMethod(classmethod):
    """A classmethod that, reached through an object, binds to that object.

    ``Hypervisor.Method(...)`` receives the class, as the cluster manager's
    classmethods do; ``hypervisor.Method(...)`` receives the object, so the
    method can use that object's settings (its run directory, its socat).
    It stays a :class:`classmethod`, so introspection sees the contract's
    kind.  The method tells the two apart with ``isinstance(x, type)``.
    """

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        if obj is None:
            return super().__get__(obj, objtype)
        return types.MethodType(self.__func__, obj)


def _unsupported(owner: Any, what: str) -> errors.HypervisorError:
    name = owner.__name__ if isinstance(owner, type) else type(owner).__name__
    return errors.HypervisorError(f"{name} does not support {what}")


class BaseHypervisor:
    """The contract every hypervisor offers to the node daemon.

    Subclasses fill ``PARAMETERS`` and override the operations; the base
    implementations of the operations raise :class:`errors.HypervisorError`
    so that an unsupported call fails clearly.  Each member keeps the kind
    (method, classmethod, staticmethod) and the positional arguments it has
    in the cluster manager's 2011 driver (Ganeti 2.5).
    """

    PARAMETERS: dict[str, Check] = {}
    PARAMETER_TYPES: dict[str, str] = {}
    # Files the cluster manager copies to every node (none by default).
    ANCILLARY_FILES: ClassVar[list[str]] = []
    CAN_MIGRATE = False

    # --- parameter checks -------------------------------------------------

    @classmethod
    def CheckParameterSyntax(cls, hvparams: Mapping[str, Any]) -> None:
        """Check the syntax of ``hvparams``; touches nothing on the node.

        Every key of PARAMETERS must be present (callers pass filled
        parameters) and no unknown key may be.  Raises
        :class:`errors.HypervisorError` naming the parameter and its value.
        """
        apply_syntax_checks(cls.PARAMETERS, cls.PARAMETER_TYPES or dict.fromkeys(
            cls.PARAMETERS, constants.VTYPE_STRING), hvparams)

    @classmethod
    def ValidateParameters(cls, hvparams: Mapping[str, Any]) -> None:
        """Check ``hvparams`` against this node (files and directories exist)."""
        check_present(cls.PARAMETERS, hvparams)
        apply_node_checks(cls.PARAMETERS, hvparams)

    @classmethod
    def GetAncillaryFiles(cls) -> list[str]:
        """The files the cluster manager must copy to every node (a new list)."""
        return list(cls.ANCILLARY_FILES)

    # --- node information -------------------------------------------------

    @staticmethod
    def GetLinuxNodeInfo(meminfo: str = "/proc/meminfo",
                         cpuinfo: str = "/proc/cpuinfo",
                         numa_nodes: str = "/sys/devices/system/node") -> dict[str, int]:
        """Return memory_total, memory_free, memory_dom0 (MiB), cpu_total,
        cpu_nodes (NUMA nodes) and cpu_sockets, the keys of the 2011 driver."""
        return nodeinfo.linux_node_info(meminfo, cpuinfo, numa_nodes)

    @classmethod
    def LinuxPowercycle(cls, sysrq_trigger: str = "/proc/sysrq-trigger") -> None:
        """Reboot the node at once through sysrq (sync, then reboot); does not return on success."""
        nodeinfo.powercycle(sysrq_trigger)

    # --- operations (overridden by hypervisors) -----------------------------

    def StartInstance(self, instance: Any, block_devices: Any,
                      startup_paused: bool = False) -> None:
        raise _unsupported(self, "StartInstance")

    def StopInstance(self, instance: Any, force: bool = False, retry: bool = False,
                     name: str | None = None, timeout: float | None = None) -> None:
        raise _unsupported(self, "StopInstance")

    def CleanupInstance(self, instance_name: str) -> None:
        """Remove what a stopped instance left behind; nothing by default."""

    def RebootInstance(self, instance: Any) -> None:
        raise _unsupported(self, "RebootInstance")

    def ListInstances(self) -> list[str]:
        raise _unsupported(self, "ListInstances")

    def GetInstanceInfo(self, instance_name: str) -> tuple | None:
        raise _unsupported(self, "GetInstanceInfo")

    def GetAllInstancesInfo(self) -> list[tuple]:
        raise _unsupported(self, "GetAllInstancesInfo")

    def GetNodeInfo(self) -> dict[str, int]:
        raise _unsupported(self, "GetNodeInfo")

    def Verify(self) -> str | None:
        """Return None when the node can run instances, else a message."""
        return None

    def MigrationInfo(self, instance: Any) -> str:
        """Information the target needs for AcceptInstance; empty by default."""
        return ""

    def AcceptInstance(self, instance: Any, info: str, target: str) -> None:
        raise _unsupported(self, "AcceptInstance")

    def FinalizeMigration(self, instance: Any, info: str, success: bool) -> None:
        raise _unsupported(self, "FinalizeMigration")

    def MigrateInstance(self, instance: Any, target: str, live: bool) -> None:
        raise _unsupported(self, "MigrateInstance")

    @classmethod
    def GetInstanceConsole(cls, instance: Any, hvparams: Mapping[str, Any],
                           beparams: Mapping[str, Any]) -> Any:
        """How to reach the console of ``instance`` (an objects.InstanceConsole)."""
        raise _unsupported(cls, "GetInstanceConsole")

    @classmethod
    def PowercycleNode(cls) -> None:
        """Hard power-cycle the node; the instances on it stop too."""
        raise _unsupported(cls, "PowercycleNode")
