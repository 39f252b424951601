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

import subprocess
from typing import Any, ClassVar

from ganeti_kvm import errors

try:
    from ganeti import constants as ganeti_constants  # type: ignore[import-not-found,unused-ignore]
    from ganeti import errors as ganeti_errors  # type: ignore[import-not-found,unused-ignore]
    from ganeti import objects as ganeti_objects  # type: ignore[import-not-found,unused-ignore]
    from ganeti.hypervisor import hv_base as ganeti_hv_base  # type: ignore[import-not-found,unused-ignore]
except ImportError:
    ganeti_constants = ganeti_errors = ganeti_objects = ganeti_hv_base = None
try:
    from ganeti import pathutils as ganeti_pathutils  # type: ignore[import-not-found,unused-ignore]
except ImportError:
    ganeti_pathutils = None

HAVE_GANETI = ganeti_hv_base is not None

# Where Ganeti keeps the SPICE certificates (its pathutils): the CA, and the
# server's certificate with its key in one PEM file.  Ganeti's defaults without it.
SPICE_CACERT_FILE: str = getattr(ganeti_pathutils, "SPICE_CACERT_FILE",
                                 "/var/lib/ganeti/spice-ca.pem")
SPICE_CERT_FILE: str = getattr(ganeti_pathutils, "SPICE_CERT_FILE", "/var/lib/ganeti/spice.pem")

# Ganeti's console kinds (its constants.CONS_*)
CONS_SSH = "ssh"
CONS_VNC = "vnc"
CONS_SPICE = "spice"
CONS_MESSAGE = "msg"
CONS_ALL = frozenset([CONS_SSH, CONS_VNC, CONS_SPICE, CONS_MESSAGE])


class _Record:
    """A stand-in for a Ganeti configuration object: slots, keyword constructor, ToDict."""

    __slots__: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **kwargs: Any) -> None:
        unknown = set(kwargs) - set(self.__slots__)
        if unknown:
            raise TypeError(f"{type(self).__name__} has no attribute(s) "
                            f"{', '.join(sorted(unknown))}")
        for slot in self.__slots__:
            setattr(self, slot, kwargs.get(slot))

    def __getattr__(self, name: str) -> Any:
        # Only reached for a slot never set: None, as Ganeti's objects answer.
        if name in type(self).__slots__:
            return None
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def ToDict(self) -> dict[str, Any]:
        """The set attributes as a plain dict."""
        return {slot: getattr(self, slot) for slot in self.__slots__
                if getattr(self, slot) is not None}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Record) and type(self) is type(other) \
            and self.ToDict() == other.ToDict()

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.ToDict().items())
        return f"{type(self).__name__}({fields})"


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


class _InstanceConsole(_Record):
    """How to reach an instance's console; Ganeti's ``objects.InstanceConsole``."""

    __slots__ = ("instance", "kind", "message", "host", "port", "user", "command", "display")

    def Validate(self) -> bool:
        """True if the fields this kind needs are set, else ``errors.ConfigurationError``."""
        kind = self.kind
        if kind not in CONS_ALL:
            raise errors.ConfigurationError(f"unknown console kind {kind!r}")
        if not self.instance:
            raise errors.ConfigurationError("console has no instance name")
        needs = {
            "message": kind == CONS_MESSAGE,
            "host": kind != CONS_MESSAGE,
            "port": kind in (CONS_VNC, CONS_SPICE),
            "user": kind == CONS_SSH,
            "command": kind == CONS_SSH,
            "display": kind == CONS_VNC,
        }
        for name, needed in needs.items():
            value = getattr(self, name)
            if needed and (value is None or value == "" or value == []):
                raise errors.ConfigurationError(
                    f"{kind} console for {self.instance} has no {name}")
        return True


class _MigrationStatus(_Record):
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
    InstanceConsole = _InstanceConsole
    MigrationStatus = _MigrationStatus


# Ganeti's name of the daemon that tells a guest's own power-off from a stop
KVMD = "ganeti-kvmd"
KVMD_START_TIMEOUT = 60.0


def start_kvmd() -> str | None:
    """Start Ganeti's ganeti-kvmd unless it runs, as Ganeti's driver does for an
    instance with ``user_shutdown``: through Ganeti's ``daemon-util start``.

    None once it runs, or without Ganeti (nothing to start); else what went
    wrong, in daemon-util's words.  kvmd itself exits at once unless the
    cluster has user shutdown enabled (``gnt-cluster modify --user-shutdown``).
    """
    if not HAVE_GANETI:
        return None
    from ganeti import utils as ganeti_utils  # type: ignore[import-not-found,unused-ignore]

    name = getattr(ganeti_constants, "KVMD", KVMD)
    if ganeti_utils.IsDaemonAlive(name):
        return None
    daemon_util = getattr(ganeti_pathutils, "DAEMON_UTIL", "/usr/lib/ganeti/daemon-util")
    try:
        result = subprocess.run([daemon_util, "start", name], capture_output=True, text=True,
                                stdin=subprocess.DEVNULL, timeout=KVMD_START_TIMEOUT,
                                check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"{daemon_util} start {name} failed: {err}"
    if result.returncode != 0:
        said = (result.stderr or result.stdout).strip()[-500:]
        return f"{daemon_util} start {name} exited with {result.returncode}: {said}"
    return None
