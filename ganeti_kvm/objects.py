"""Configuration objects passed to the hypervisor.

These mirror the cluster manager's ``ganeti.objects`` classes of the same
names: keyword constructors, ``ToDict``/``FromDict`` round trips, and only
the attributes a hypervisor reads.  The hypervisor itself never insists on
these classes: any object with the same attributes works (a node daemon
passes its own objects).
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

from ganeti_kvm import constants, errors


class ConfigObject:
    """Base of the configuration objects: slots, keyword constructor, dict round trip."""

    __slots__: ClassVar[tuple[str, ...]] = ()
    _DEFAULTS: ClassVar[dict[str, Any]] = {}

    def __init__(self, **kwargs: Any) -> None:
        for slot in self.__slots__:
            value = kwargs.pop(slot, copy.deepcopy(self._DEFAULTS.get(slot)))
            setattr(self, slot, value)
        if kwargs:
            raise TypeError(f"{type(self).__name__} has no attribute(s) "
                            f"{', '.join(sorted(kwargs))}")

    def ToDict(self) -> dict[str, Any]:
        """Return a plain dict (JSON-serialisable) of the set attributes."""
        result: dict[str, Any] = {}
        for slot in self.__slots__:
            value = getattr(self, slot)
            if value is not None:
                result[slot] = _to_plain(value)
        return result

    @classmethod
    def FromDict(cls, data: dict[str, Any]) -> "ConfigObject":
        """Build an object from what :meth:`ToDict` returned."""
        if not isinstance(data, dict):
            raise errors.ConfigurationError(
                f"cannot build {cls.__name__} from {type(data).__name__}")
        unknown = set(data) - set(cls.__slots__)
        if unknown:
            raise errors.ConfigurationError(
                f"unknown {cls.__name__} field(s): {', '.join(sorted(unknown))}")
        return cls(**copy.deepcopy(data))

    def Copy(self) -> "ConfigObject":
        """Return a deep copy."""
        return type(self).FromDict(self.ToDict())

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.ToDict() == other.ToDict()  # type: ignore[union-attr]

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.ToDict().items())
        return f"{type(self).__name__}({fields})"


def _to_plain(value: Any) -> Any:
    if isinstance(value, ConfigObject):
        return value.ToDict()
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(_to_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    return value


class NIC(ConfigObject):
    """A network interface: MAC, optional IP, and nicparams (mode, link)."""

    __slots__ = ("mac", "ip", "nicparams", "uuid", "name")
    _DEFAULTS = {"nicparams": {}}


class Disk(ConfigObject):
    """A disk as the cluster manager describes it; the hypervisor reads ``mode``."""

    __slots__ = ("dev_type", "logical_id", "iv_name", "size", "mode", "params",
                 "uuid", "name")
    _DEFAULTS = {"mode": constants.DISK_RDWR, "params": {}}


class Instance(ConfigObject):
    """An instance: name, node, parameters, NICs and disks."""

    __slots__ = ("name", "primary_node", "os", "hypervisor", "hvparams",
                 "beparams", "osparams", "nics", "disks", "tags",
                 "network_port", "uuid", "admin_state")
    _DEFAULTS = {"hypervisor": constants.HT_KVM, "hvparams": {}, "beparams": {},
                 "osparams": {}, "nics": [], "disks": [], "tags": []}

    @classmethod
    def FromDict(cls, data: dict[str, Any]) -> "Instance":
        obj = super().FromDict(data)
        assert isinstance(obj, Instance)
        obj.nics = [n if isinstance(n, NIC) else NIC.FromDict(n) for n in obj.nics or []]
        obj.disks = [d if isinstance(d, Disk) else Disk.FromDict(d) for d in obj.disks or []]
        return obj


class InstanceConsole(ConfigObject):
    """How to reach an instance's console: over ssh, VNC, or only a message."""

    __slots__ = ("instance", "kind", "message", "host", "port", "user",
                 "command", "display")

    def Validate(self) -> bool:
        """Check that the fields needed by this console kind are set.

        Returns True, or raises :class:`errors.ConfigurationError` naming the
        missing field.
        """
        kind = self.kind
        if kind not in constants.CONS_ALL:
            raise errors.ConfigurationError(f"unknown console kind {kind!r}")
        if not self.instance:
            raise errors.ConfigurationError("console has no instance name")
        needs = {
            "message": kind == constants.CONS_MESSAGE,
            "host": kind != constants.CONS_MESSAGE,
            "port": kind in (constants.CONS_VNC, constants.CONS_SPICE),
            "user": kind == constants.CONS_SSH,
            "command": kind == constants.CONS_SSH,
            "display": kind == constants.CONS_VNC,
        }
        for field, needed in needs.items():
            value = getattr(self, field)
            if needed and (value is None or value == "" or value == []):
                raise errors.ConfigurationError(
                    f"{kind} console for {self.instance} has no {field}")
        return True
