"""Configuration objects passed to the hypervisor.

These mirror the cluster manager's ``ganeti.objects`` classes of the same
names: keyword constructors, ``ToDict``/``FromDict`` round trips, and every
attribute those classes have had, from Ganeti 2.4/2.5 (2011) to Ganeti 3.0,
so that code written for the cluster manager builds them unchanged.  The
hypervisor reads only what it needs (name, primary_node, hvparams,
beparams, nics, tags, uuid, network_port; a disk's mode) and carries the
rest.  It never insists on these classes: any object with the same
attributes works (a node daemon passes its own objects).
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

    def __getattr__(self, name: str) -> Any:
        # Only reached for a slot never set (an object made without __init__):
        # None, as the cluster manager's objects answer.
        if name in type(self).__slots__:
            return None
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def ToDict(self) -> dict[str, Any]:
        """Return a plain dict (JSON-serialisable) of the set attributes."""
        result: dict[str, Any] = {}
        for slot in self.__slots__:
            value = getattr(self, slot)
            if value is not None:
                result[slot] = _to_plain(value)
        return result

    @classmethod
    def FromDict(cls, data: dict[str, Any]) -> ConfigObject:
        """Build an object from what :meth:`ToDict` returned."""
        if not isinstance(data, dict):
            raise errors.ConfigurationError(
                f"cannot build {cls.__name__} from {type(data).__name__}")
        unknown = set(data) - set(cls.__slots__)
        if unknown:
            raise errors.ConfigurationError(
                f"unknown {cls.__name__} field(s): {', '.join(sorted(unknown))}")
        return cls(**copy.deepcopy(data))

    def Copy(self) -> ConfigObject:
        """Return a deep copy."""
        return type(self).FromDict(self.ToDict())

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.ToDict() == other.ToDict()

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
    """A network interface: MAC, optional IP, and nicparams (mode, link).

    The slots are those of the cluster manager's NIC in 2.5 (mac, ip,
    nicparams) and in 3.0 (name, network, netinfo, pci, hvinfo, uuid).
    """

    __slots__ = ("mac", "ip", "nicparams", "name", "network", "netinfo", "pci",
                 "hvinfo", "uuid")
    _DEFAULTS = {"nicparams": {}}


class Disk(ConfigObject):
    """A disk as the cluster manager describes it; the hypervisor reads ``mode``.

    The slots are those of the cluster manager's Disk in 2.5 (dev_type,
    logical_id, physical_id, children, iv_name, size, mode) and in 3.0
    (forthcoming, name, nodes, params, spindles, pci, hvinfo, serial_no,
    dynamic_params, uuid, ctime, mtime).  ``children`` holds Disks.
    """

    __slots__ = ("dev_type", "logical_id", "physical_id", "children", "iv_name",
                 "size", "mode", "params", "forthcoming", "name", "nodes",
                 "spindles", "pci", "hvinfo", "serial_no", "dynamic_params",
                 "uuid", "ctime", "mtime")
    _DEFAULTS = {"mode": constants.DISK_RDWR, "params": {}}
    children: list[Disk] | None

    @classmethod
    def FromDict(cls, data: dict[str, Any]) -> Disk:
        obj = super().FromDict(data)
        assert isinstance(obj, Disk)
        if obj.children is not None:
            obj.children = _objects_from(cls, obj.children, "children")
        return obj


class Instance(ConfigObject):
    """An instance: name, node, parameters, NICs and disks.

    The slots are those of the cluster manager's Instance (a TaggableObject)
    in 2.5 (name, primary_node, os, hypervisor, hvparams, beparams,
    osparams, admin_up, nics, disks, disk_template, network_port,
    serial_no, ctime, mtime, uuid, tags) and in 3.0 (forthcoming,
    secondary_nodes, osparams_private, admin_state, admin_state_source,
    disks_info, disks_active).  In 3.0's configuration ``disks`` may hold
    disk UUIDs (strings); those are kept as they are.
    """

    __slots__ = ("name", "primary_node", "os", "hypervisor", "hvparams",
                 "beparams", "osparams", "admin_up", "nics", "disks",
                 "disk_template", "network_port", "serial_no", "forthcoming",
                 "secondary_nodes", "osparams_private", "admin_state",
                 "admin_state_source", "disks_info", "disks_active", "tags",
                 "ctime", "mtime", "uuid")
    _DEFAULTS = {"hypervisor": constants.HT_KVM, "hvparams": {}, "beparams": {},
                 "osparams": {}, "nics": [], "disks": [], "tags": []}

    nics: list[NIC]
    disks: list[Disk | str]

    @classmethod
    def FromDict(cls, data: dict[str, Any]) -> Instance:
        obj = super().FromDict(data)
        assert isinstance(obj, Instance)
        obj.nics = _objects_from(NIC, obj.nics, "nics")
        obj.disks = _objects_from(Disk, obj.disks, "disks", keep_strings=True)
        return obj


def _objects_from(kind: type[ConfigObject], items: Any, field: str,
                  keep_strings: bool = False) -> list[Any]:
    """``items`` (a list of dicts or objects) as a list of ``kind`` objects."""
    if items is None:
        return []
    if not isinstance(items, (list, tuple)):
        raise errors.ConfigurationError(
            f"{field} must be a list of {kind.__name__} dicts, not {type(items).__name__}")
    result: list[Any] = []
    for item in items:
        if isinstance(item, kind) or (keep_strings and isinstance(item, str)):
            result.append(item)
        else:
            result.append(kind.FromDict(item))
    return result


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
