"""The hypervisor base class and the declarative parameter checks.

A hypervisor declares its parameters as data: ``PARAMETERS`` maps every key
to a five-tuple ``(required, check_fn, check_msg, prereq_fn, prereq_msg)``.
``check_fn`` is a pure syntax check (run anywhere, touches nothing);
``prereq_fn`` is checked on the node (a file exists, a directory exists).
The generic code here applies the table; hypervisors add cross-checks.
"""

from __future__ import annotations

import glob
import logging
import os
import types
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

from ganeti_kvm import constants, errors

log = logging.getLogger(__name__)

Check = tuple[bool, Callable[[Any], bool] | None, str | None,
              Callable[[Any], bool] | None, str | None]


MAX_PATH_BYTES = 4095  # PATH_MAX less the final NUL
MAX_TEXT_BYTES = 4096  # a text value for QEMU's command line (cmdline.MAX_VALUE_BYTES)


def _fits(value: str, limit: int) -> bool:
    """Whether ``value`` is at most ``limit`` bytes in the file system encoding."""
    try:
        return len(os.fsencode(value)) <= limit
    except UnicodeError:
        return False  # not text a path or an argument can carry


def _is_clean_abs_path(value: Any) -> bool:
    """An absolute, normalised path without characters that break QEMU options."""
    return (isinstance(value, str) and not any(c in value for c in ",\n\r\0")
            and _fits(value, MAX_PATH_BYTES) and os.path.isabs(value)
            and os.path.normpath(value) == value)


_ABS_PATH_MSG = (f"must be an absolute, normalised path of at most {MAX_PATH_BYTES} bytes "
                 "without commas or newlines")

NO_CHECK: Check = (False, None, None, None, None)
REQUIRED_CHECK: Check = (True, None, None, None, None)
OPT_FILE_CHECK: Check = (False, _is_clean_abs_path, _ABS_PATH_MSG,
                         os.path.isfile, "must be an existing file")
REQ_FILE_CHECK: Check = (True, _is_clean_abs_path, _ABS_PATH_MSG,
                         os.path.isfile, "must be an existing file")
OPT_DIR_CHECK: Check = (False, _is_clean_abs_path, _ABS_PATH_MSG,
                        os.path.isdir, "must be an existing directory")
REQ_DIR_CHECK: Check = (True, _is_clean_abs_path, _ABS_PATH_MSG,
                        os.path.isdir, "must be an existing directory")


def _is_port(value: Any) -> bool:
    return isinstance(value, int) and 0 < value < 65536


NET_PORT_CHECK: Check = (True, _is_port, "must be a port number from 1 to 65535",
                         None, None)
# The 2011 names of the port checks
REQ_NET_PORT_CHECK: Check = NET_PORT_CHECK
OPT_NET_PORT_CHECK: Check = (False, _is_port, NET_PORT_CHECK[2], None, None)


def parse_cpu_mask(cpu_mask: str) -> list[int]:
    """The CPU numbers of a mask such as ``"0-2,5"`` (``[0, 1, 2, 5]``); empty for ``""``.

    Raises :class:`errors.ParameterError` for anything else.
    """
    if not cpu_mask:
        return []
    cpus: list[int] = []
    for item in cpu_mask.split(","):
        bounds = item.split("-")
        if len(bounds) > 2 or not all(b.strip().isdigit() for b in bounds):
            raise errors.ParameterError(
                f"Invalid CPU mask item {item!r} in {cpu_mask!r}: use CPU numbers and "
                "ranges such as 0-2,5")
        lower, higher = int(bounds[0]), int(bounds[-1])
        if lower > higher:
            raise errors.ParameterError(
                f"Invalid CPU range {item!r} in {cpu_mask!r}: {lower} > {higher}")
        cpus.extend(range(lower, higher + 1))
    return cpus


def _is_cpu_mask_well_formed(cpu_mask: Any) -> bool:
    if not isinstance(cpu_mask, str):
        return False
    try:
        return len(parse_cpu_mask(cpu_mask)) > 0
    except errors.ParameterError:
        return False


_CPU_MASK_MSG = "must be CPU numbers and ranges such as 0-2,5"
REQ_CPU_MASK_CHECK: Check = (True, _is_cpu_mask_well_formed, _CPU_MASK_MSG, None, None)
OPT_CPU_MASK_CHECK: Check = (False, _is_cpu_mask_well_formed, _CPU_MASK_MSG, None, None)
MIGRATION_MODE_CHECK: Check = (
    True, lambda value: value in constants.HT_MIGRATION_MODES,
    "must be one of " + ", ".join(sorted(constants.HT_MIGRATION_MODES)),
    None, None)


def ParamInSet(required: bool, my_set: Iterable[Any]) -> Check:
    """A check that accepts only the values of ``my_set``."""
    allowed = frozenset(my_set)
    return (required, allowed.__contains__,
            "must be one of " + ", ".join(sorted(map(str, allowed))), None, None)


def PositiveInt(required: bool = True) -> Check:
    """A check for a whole number greater than zero."""
    return (required, lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
            "must be a whole number greater than zero", None, None)


_TYPE_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    constants.VTYPE_STRING: (lambda v: isinstance(v, str), "a string"),
    constants.VTYPE_MAYBE_STRING: (lambda v: v is None or isinstance(v, str),
                                   "a string or null"),
    constants.VTYPE_BOOL: (lambda v: isinstance(v, bool), "true or false"),
    constants.VTYPE_INT: (lambda v: isinstance(v, int) and not isinstance(v, bool),
                          "a whole number"),
}


def check_types(hvparams: Mapping[str, Any], types: Mapping[str, str]) -> None:
    """Raise :class:`errors.ParameterError` for an unknown key or a value of the wrong type."""
    if not isinstance(hvparams, Mapping):
        raise errors.ParameterError(
            f"hypervisor parameters must be a mapping, not {type(hvparams).__name__}")
    for name, value in hvparams.items():
        if name not in types:
            raise errors.ParameterError(
                f"Parameter '{name}' is not supported (known: see constants.HVS_PARAMETERS)",
                name, value)
        check, what = _TYPE_CHECKS[types[name]]
        if not check(value):
            raise errors.ParameterError(
                f"Parameter '{name}' must be {what}, not {type(value).__name__} ({value!r})",
                name, value)


def apply_syntax_checks(table: Mapping[str, Check], types: Mapping[str, str],
                        hvparams: Mapping[str, Any]) -> None:
    """Apply the syntax half of a parameter table (types, presence, ``check_fn``)."""
    check_types(hvparams, types)
    for name, (required, check_fn, errstr, _, _) in table.items():
        if name not in hvparams:
            raise errors.ParameterError(f"Parameter '{name}' is missing", name)
        value = hvparams[name]
        if not required and not value:
            continue
        if value is None or value == "":
            raise errors.ParameterError(
                f"Parameter '{name}' is required but is currently not defined", name, value)
        if check_fn is not None and not check_fn(value):
            raise errors.ParameterError(
                f"Parameter '{name}' fails syntax check: {errstr} "
                f"(current value: {value!r})", name, value)


def _node_check_passes(check_fn: Callable[[Any], bool], value: Any) -> bool:
    """``check_fn(value)``; a value of a type the check cannot take fails it."""
    try:
        return bool(check_fn(value))
    except (TypeError, ValueError):
        return False


def apply_node_checks(table: Mapping[str, Check], hvparams: Mapping[str, Any]) -> None:
    """Apply the node half of a parameter table (``prereq_fn``: files, directories)."""
    for name, (required, _, _, check_fn, errstr) in table.items():
        value = hvparams.get(name)
        if not required and not value:
            continue
        if check_fn is not None and not _node_check_passes(check_fn, value):
            raise errors.ParameterError(
                f"Parameter '{name}' fails validation on this node: {errstr} "
                f"(current value: {value!r})", name, value)


def check_present(table: Mapping[str, Check], hvparams: Mapping[str, Any]) -> None:
    """Raise :class:`errors.ParameterError` unless ``hvparams`` is a mapping with every key."""
    if not isinstance(hvparams, Mapping):
        raise errors.ParameterError(
            f"hypervisor parameters must be a mapping, not {type(hvparams).__name__}")
    missing = sorted(set(table) - set(hvparams))
    if missing:
        raise errors.ParameterError(
            f"Parameter '{missing[0]}' is missing (missing: {', '.join(missing)}); "
            "pass the filled parameters (constants.HVC_DEFAULTS overlaid with the "
            "instance's)", missing[0])


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
        for path in (meminfo, cpuinfo, numa_nodes):
            if not isinstance(path, str):  # open(5) would read, then close, fd 5
                raise errors.HypervisorError(f"Node information paths must be text, not {path!r}")
        try:
            with open(meminfo, encoding="ascii") as handle:
                lines = handle.read().splitlines()
        except (OSError, ValueError, TypeError) as err:  # also a NUL, not text, not a path
            raise errors.HypervisorError(f"Cannot read {meminfo}: {err}") from err
        fields: dict[str, int] = {}
        for line in lines:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                fields[key.strip()] = int(parts[0])  # kB
        try:
            total = fields["MemTotal"]
            free = fields["MemFree"] + fields.get("Buffers", 0) + fields.get("Cached", 0)
        except KeyError as err:
            raise errors.HypervisorError(f"{meminfo} has no {err.args[0]} line") from err
        result = {
            "memory_total": total // 1024,
            "memory_free": free // 1024,
            "memory_dom0": (total - free) // 1024,
        }
        try:
            with open(cpuinfo, encoding="utf-8", errors="replace") as handle:
                cpu_lines = handle.read().splitlines()
        except (OSError, ValueError, TypeError) as err:
            raise errors.HypervisorError(f"Cannot read {cpuinfo}: {err}") from err
        cpus = sum(1 for line in cpu_lines if line.startswith("processor"))
        sockets = {line.partition(":")[2].strip() for line in cpu_lines
                   if line.startswith("physical id")}
        result["cpu_total"] = cpus or (os.cpu_count() or 1)
        try:
            result["cpu_nodes"] = len(glob.glob(os.path.join(numa_nodes, "node[0-9]*"))) or 1
        except (ValueError, TypeError) as err:
            raise errors.HypervisorError(f"Cannot list NUMA nodes in {numa_nodes!r}: {err}") \
                from err
        result["cpu_sockets"] = len(sockets) or 1
        return result

    @classmethod
    def LinuxPowercycle(cls, sysrq_trigger: str = "/proc/sysrq-trigger") -> None:
        """Reboot the node at once through sysrq (sync, then reboot); does not return on success."""
        if not isinstance(sysrq_trigger, str):  # open(1) would write to fd 1
            raise errors.HypervisorError(f"The sysrq trigger must be a path, not {sysrq_trigger!r}")
        try:
            with open(sysrq_trigger, "w", encoding="ascii") as handle:
                handle.write("s")
            with open(sysrq_trigger, "w", encoding="ascii") as handle:
                handle.write("b")
        except (OSError, ValueError, TypeError) as err:
            raise errors.HypervisorError(
                f"Failed to power-cycle the node through {sysrq_trigger}: {err}") from err

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
