"""The hypervisor base class and the declarative parameter checks.

A hypervisor declares its parameters as data: ``PARAMETERS`` maps every key
to a five-tuple ``(required, check_fn, check_msg, prereq_fn, prereq_msg)``.
``check_fn`` is a pure syntax check (run anywhere, touches nothing);
``prereq_fn`` is checked on the node (a file exists, a directory exists).
The generic code here applies the table; hypervisors add cross-checks.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ganeti_kvm import constants, errors

log = logging.getLogger(__name__)

Check = tuple[bool, Callable[[Any], bool] | None, str | None,
              Callable[[Any], bool] | None, str | None]


def _is_clean_abs_path(value: Any) -> bool:
    """An absolute, normalised path without characters that break QEMU options."""
    return (isinstance(value, str) and os.path.isabs(value)
            and os.path.normpath(value) == value
            and not any(c in value for c in ",\n\r\0"))


_ABS_PATH_MSG = "must be an absolute, normalised path without commas or newlines"

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


def apply_node_checks(table: Mapping[str, Check], hvparams: Mapping[str, Any]) -> None:
    """Apply the node half of a parameter table (``prereq_fn``: files, directories)."""
    for name, (required, _, _, check_fn, errstr) in table.items():
        value = hvparams.get(name)
        if not required and not value:
            continue
        if check_fn is not None and not check_fn(value):
            raise errors.ParameterError(
                f"Parameter '{name}' fails validation on this node: {errstr} "
                f"(current value: {value!r})", name, value)


class BaseHypervisor:
    """The contract every hypervisor offers to the node daemon.

    Subclasses fill ``PARAMETERS`` and override the operations; the base
    implementations of the operations raise :class:`errors.HypervisorError`
    so that an unsupported call fails clearly.
    """

    PARAMETERS: dict[str, Check] = {}
    PARAMETER_TYPES: dict[str, str] = {}
    CAN_MIGRATE = False

    # --- parameter checks -------------------------------------------------

    @classmethod
    def CheckParameterSyntax(cls, hvparams: Mapping[str, Any]) -> None:
        """Check the syntax of ``hvparams``; touches nothing on the node.

        Every key of PARAMETERS must be present (callers pass filled
        parameters) and no unknown key may be.  Raises
        :class:`errors.HypervisorError` naming the parameter and its value.
        """
        apply_syntax_checks(cls.PARAMETERS, cls.PARAMETER_TYPES or {
            k: constants.VTYPE_STRING for k in cls.PARAMETERS}, hvparams)

    def ValidateParameters(self, hvparams: Mapping[str, Any]) -> None:
        """Check ``hvparams`` against this node (files and directories exist)."""
        apply_node_checks(self.PARAMETERS, hvparams)

    # --- node information -------------------------------------------------

    @staticmethod
    def GetLinuxNodeInfo(meminfo: str = "/proc/meminfo",
                         cpuinfo: str = "/proc/cpuinfo") -> dict[str, int]:
        """Return memory_total, memory_free, memory_dom0 (MiB) and cpu_total."""
        try:
            with open(meminfo, encoding="ascii") as handle:
                lines = handle.read().splitlines()
        except OSError as err:
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
                cpus = sum(1 for line in handle if line.startswith("processor"))
        except OSError as err:
            raise errors.HypervisorError(f"Cannot read {cpuinfo}: {err}") from err
        result["cpu_total"] = cpus or (os.cpu_count() or 1)
        return result

    @staticmethod
    def LinuxPowercycle(sysrq_trigger: str = "/proc/sysrq-trigger") -> None:
        """Reboot the node at once through sysrq (sync, then reboot); does not return on success."""
        try:
            with open(sysrq_trigger, "w", encoding="ascii") as handle:
                handle.write("s")
            with open(sysrq_trigger, "w", encoding="ascii") as handle:
                handle.write("b")
        except OSError as err:
            raise errors.HypervisorError(
                f"Failed to power-cycle the node through {sysrq_trigger}: {err}") from err

    # --- operations (overridden by hypervisors) -----------------------------

    def _unsupported(self, what: str) -> errors.HypervisorError:
        return errors.HypervisorError(f"{type(self).__name__} does not support {what}")

    def StartInstance(self, instance: Any, block_devices: Any,
                      startup_paused: bool = False) -> None:
        raise self._unsupported("StartInstance")

    def StopInstance(self, instance: Any, force: bool = False, retry: bool = False,
                     name: str | None = None, timeout: float | None = None) -> None:
        raise self._unsupported("StopInstance")

    def CleanupInstance(self, instance_name: str) -> None:
        """Remove what a stopped instance left behind; nothing by default."""

    def RebootInstance(self, instance: Any) -> None:
        raise self._unsupported("RebootInstance")

    def ListInstances(self) -> list[str]:
        raise self._unsupported("ListInstances")

    def GetInstanceInfo(self, instance_name: str) -> tuple | None:
        raise self._unsupported("GetInstanceInfo")

    def GetAllInstancesInfo(self) -> list[tuple]:
        raise self._unsupported("GetAllInstancesInfo")

    def GetNodeInfo(self) -> dict[str, int]:
        raise self._unsupported("GetNodeInfo")

    def Verify(self) -> str | None:
        """Return None when the node can run instances, else a message."""
        return None

    def MigrationInfo(self, instance: Any) -> str:
        """Information the target needs for AcceptInstance; empty by default."""
        return ""

    def AcceptInstance(self, instance: Any, info: str, target: str) -> None:
        raise self._unsupported("AcceptInstance")

    def FinalizeMigration(self, instance: Any, info: str, success: bool) -> None:
        raise self._unsupported("FinalizeMigration")

    def MigrateInstance(self, instance: Any, target: str, live: bool) -> None:
        raise self._unsupported("MigrateInstance")

    def PowercycleNode(self) -> None:
        raise self._unsupported("PowercycleNode")
