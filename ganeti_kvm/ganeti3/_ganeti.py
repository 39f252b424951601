"""The Ganeti classes this adapter hands to Ganeti, or stand-ins without Ganeti.

This is the only module of ganeti-kvm that imports Ganeti.  Where Ganeti's
code expects its own types it must get them: its base class (``backend``
reads class attributes of it), its exceptions (``backend`` catches
``ganeti.errors.HypervisorError``, and its RPC layer sends an exception by
class name), ``objects.InstanceConsole``, ``objects.MigrationStatus`` and
``hv_base.HvInstanceState``.  Without Ganeti (a test machine, a tool) the
stand-ins below keep the same names and fields.
"""

from __future__ import annotations

from typing import Any

from ganeti_kvm import errors, objects

try:
    from ganeti import constants as ganeti_constants  # type: ignore[import-not-found,unused-ignore]
    from ganeti import errors as ganeti_errors  # type: ignore[import-not-found,unused-ignore]
    from ganeti import objects as ganeti_objects  # type: ignore[import-not-found,unused-ignore]
    from ganeti.hypervisor import hv_base as ganeti_hv_base  # type: ignore[import-not-found,unused-ignore]
except ImportError:
    ganeti_constants = ganeti_errors = ganeti_objects = ganeti_hv_base = None

HAVE_GANETI = ganeti_hv_base is not None


class _HvInstanceState:
    """Ganeti's instance states as GetInstanceInfo reports them."""

    RUNNING = 0
    SHUTDOWN = 1

    @staticmethod
    def IsRunning(state: Any) -> bool:
        return state == _HvInstanceState.RUNNING

    @staticmethod
    def IsShutdown(state: Any) -> bool:
        return state == _HvInstanceState.SHUTDOWN


class _HotplugError(errors.HypervisorError):
    """Hotplug (or a disk resize) is not possible; Ganeti's ``errors.HotplugError``."""


class _MigrationStatus(objects.ConfigObject):
    """A migration's status and RAM progress; Ganeti's ``objects.MigrationStatus``."""

    __slots__ = ("status", "transferred_ram", "total_ram", "postcopy_status")


class _Base:
    """The base class without Ganeti: only the class attributes Ganeti reads."""

    PARAMETERS: dict[str, Any] = {}
    ANCILLARY_FILES: list[str] = []
    ANCILLARY_FILES_OPT: list[str] = []
    CAN_MIGRATE = False


if HAVE_GANETI:
    BaseHypervisor: Any = ganeti_hv_base.BaseHypervisor
    HvInstanceState: Any = ganeti_hv_base.HvInstanceState
    HypervisorError: Any = ganeti_errors.HypervisorError
    HotplugError: Any = ganeti_errors.HotplugError
    InstanceConsole: Any = ganeti_objects.InstanceConsole
    MigrationStatus: Any = ganeti_objects.MigrationStatus
else:
    BaseHypervisor = _Base
    HvInstanceState = _HvInstanceState
    HypervisorError = errors.HypervisorError
    HotplugError = _HotplugError
    InstanceConsole = objects.InstanceConsole
    MigrationStatus = _MigrationStatus
