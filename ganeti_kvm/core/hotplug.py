"""Hotplug: add, remove and change the disks and NICs of a running instance.

Each device added here gets a :class:`~ganeti_kvm.qemu.devices.DeviceId`
(a stable id and a free PCI slot of ``pci.0``) and an entry in the runtime
record, exactly as the devices of a start have: a reboot or a migration
target builds its command line from the record, so the device comes back
with the same id and slot.  QMP does the work:

* a disk: ``blockdev-add`` (the ``raw`` format over a ``file`` or
  ``host_device`` node, with the cache, AIO and discard modes the start
  gives a disk) and ``device_add`` of the instance's disk driver;
* a NIC: a TAP device opened here as a start opens one, handed to QEMU with
  ``getfd`` (``SCM_RIGHTS`` on the monitor socket), ``netdev_add``, the ifup
  hook, and ``device_add`` of the instance's NIC model with its MAC;
* a removal: ``device_del``, then the wait for QEMU's ``DEVICE_DELETED``
  (the guest's OS must release the device), then ``blockdev-del`` or
  ``netdev_del`` (QEMU closes the TAP device, which then vanishes).

A guest that does not release a device within the bound leaves it in
QEMU: its record entry stays, marked :data:`UNPLUG_KEY`, so a migration
target still gets it; a retried removal finishes the job once the guest
let go, and a fresh start (a reboot) leaves the device out
(:func:`drop_unplugged`).  Changing a NIC removes it and adds it again
with its id and slot, as Ganeti's own driver does.

Nothing here knows a cluster manager: callers name a device by its
cluster id (``uuid``, kept in its entry) or, failing that, its index.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import stat
import time
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ganeti_kvm import errors
from ganeti_kvm.core import names as c
from ganeti_kvm.core import runtime
from ganeti_kvm.host import ifup, netdev
from ganeti_kvm.qemu import cmdline, devices, macaddr
from ganeti_kvm.qmp.client import QmpClient

if TYPE_CHECKING:
    from ganeti_kvm.core.node import KvmNode

log = logging.getLogger(__name__)

DISK = "disk"
NIC = "nic"
ADD = "add"
REMOVE = "remove"
MODIFY = "modify"
ACTIONS = {DISK: (ADD, REMOVE), NIC: (ADD, REMOVE, MODIFY)}

QMP_TIMEOUT = 10.0
UNPLUG_TIMEOUT = 30.0
"""Seconds the guest has to release a device after ``device_del``."""
BLOCKDEV_RELEASE_TIMEOUT = 5.0
"""Seconds QEMU has to free a deleted disk device's hold on its block node."""
UNPLUG_KEY = "unplug"
"""Set in a record entry whose removal QEMU was asked for and the guest has not completed."""
VHOST_NET = "/dev/vhost-net"

# The disk types whose disks QEMU can hotplug, with the device each gets.
HOTPLUG_DISK_DRIVERS = {c.HT_DISK_PARAVIRTUAL: "virtio-blk-pci"}
# NIC types QEMU cannot hotplug: an ISA card sits on no hotpluggable bus.
COLD_NIC_TYPES = frozenset([c.HT_NIC_NE2K_ISA])
NEEDED_COMMANDS = {
    DISK: ("blockdev-add", "blockdev-del", "device_add", "device_del",
           "query-named-block-nodes"),
    NIC: ("getfd", "closefd", "netdev_add", "netdev_del", "device_add", "device_del"),
}


def _fail(name: str, what: str, why: str, todo: str) -> errors.HotplugError:
    return errors.HotplugError(f"Cannot {what} of instance {name}: {why}; {todo}")


# --- checks --------------------------------------------------------------------------


def device_type_problem(hvparams: Mapping[str, Any], kind: str, action: str) -> str | None:
    """Why ``action`` on a ``kind`` device of an instance with ``hvparams`` cannot be
    hotplugged, or None if it can."""
    if kind not in ACTIONS:
        return f"device kind {kind!r} is not one of {', '.join(sorted(ACTIONS))}"
    if action not in ACTIONS[kind]:
        return (f"a {kind} cannot be hotplugged with action {action!r} (only "
                f"{', '.join(ACTIONS[kind])})")
    if kind == DISK:
        disk_type = hvparams.get(c.HV_DISK_TYPE)
        if disk_type not in HOTPLUG_DISK_DRIVERS:
            return (f"its {c.HV_DISK_TYPE} is {disk_type}, whose disks QEMU cannot hotplug "
                    f"here (only {', '.join(sorted(HOTPLUG_DISK_DRIVERS))})")
        return None
    nic_type = hvparams.get(c.HV_NIC_TYPE)
    if nic_type in COLD_NIC_TYPES:
        return f"its {c.HV_NIC_TYPE} is {nic_type}, an ISA card QEMU cannot hotplug"
    if nic_type not in cmdline.NIC_MODELS:
        return f"its {c.HV_NIC_TYPE} {nic_type!r} is no NIC model QEMU knows"
    return None


def check_supported(node: KvmNode, name: str, kind: str | None = None,
                    action: str | None = None) -> None:
    """Raise :class:`errors.HotplugError` unless ``action`` on a ``kind`` device (None:
    any) of instance ``name`` can be hotplugged: it runs, under a QEMU this library
    started, whose QMP has the commands needed."""
    what = f"hotplug {kind or 'devices'}"
    if action is not None:
        what = f"{action} a {kind} by hotplug"
    record = _running_record(node, name, what)
    if kind is not None:
        problem = device_type_problem(record.hvparams, kind, action or ADD)
        if problem:
            raise _fail(name, what, problem, "change the device with a restart instead "
                        "(without --hotplug)")
    try:
        with QmpClient(node.paths(name).qmp_socket, timeout=QMP_TIMEOUT) as client:
            known = {entry.get("name") for entry in client.execute("query-commands")}
    except errors.MonitorError as err:
        raise _fail(name, what, f"its QEMU does not answer ({err})",
                    "check the instance, or change the device with a restart") from err
    needed = [cmd for k in ([kind] if kind else sorted(NEEDED_COMMANDS))
              for cmd in NEEDED_COMMANDS[k]]
    missing = sorted({cmd for cmd in needed if cmd not in known})
    if missing:
        raise _fail(name, what, f"its QEMU lacks the QMP command(s) {', '.join(missing)}",
                    "run it on a newer QEMU, or change the device with a restart")


def _running_record(node: KvmNode, name: str, what: str) -> runtime.RuntimeRecord:
    """The record of running instance ``name``; HotplugError if hotplug cannot work on it."""
    if node.running_pid(name) is None:
        raise _fail(name, what, "it is not running", "change the device with a restart "
                    "(without --hotplug), or start the instance first")
    try:
        record = node.load_record(name)
    except errors.RuntimeStateError as err:
        raise _fail(name, what, str(err), "restart the instance") from err
    if record is None or record.upgraded_from is not None \
            or node.human_monitor_only(node.paths(name)):
        raise _fail(name, what, "its QEMU was started by an earlier driver, whose devices "
                    "ganeti-kvm does not track", "reboot the instance once (so ganeti-kvm "
                    "starts it), then hotplug")
    return record


# --- sessions ------------------------------------------------------------------------


@contextlib.contextmanager
def _session(node: KvmNode, name: str, kind: str, action: str,
             what: str) -> Iterator[tuple[str, runtime.RuntimeRecord, QmpClient]]:
    """Under the instance's lock: its runtime file, record and a QMP client.

    The long-operation monitor: listings use the other one, and the only
    other user of this one (a start or migration) needs the lock held here.
    """
    with node.locked(name, "hotplug") as paths:
        record = _running_record(node, name, what)
        problem = device_type_problem(record.hvparams, kind, action)
        if problem:
            raise _fail(name, what, problem, "change the device with a restart instead "
                        "(without --hotplug)")
        with QmpClient(paths.qmp_long_socket, timeout=QMP_TIMEOUT) as client:
            try:
                yield paths.runtime_file, record, client
            except errors.QmpCommandError as err:
                raise _fail(name, what, f"QEMU said: {err.desc or err}",
                            "fix the cause and retry") from err


def _undo_quietly(what: str, action: Callable[[], Any]) -> None:
    try:
        action()
    except Exception:  # keep undoing the rest; this one is logged
        log.exception("Undoing a failed hotplug: %s failed", what)


# --- identities and slots ------------------------------------------------------------


def _identities(record: runtime.RuntimeRecord) -> list[devices.DeviceId | None]:
    found = [devices.identity_of(e, f"device {i} of {record.name}")
             for i, e in enumerate([*record.nics, *record.disks])]
    if record.balloon is not None:
        found.append(devices.DeviceId.from_dict(record.balloon, f"the balloon of {record.name}"))
    return found


def _live_slots(client: QmpClient) -> set[int]:
    """The slots of ``pci.0`` QEMU has devices on (its own ones included)."""
    answer = client.execute("query-pci")
    return {int(d["slot"]) for bus in answer if bus.get("bus") == 0
            for d in bus.get("devices", [])}


def new_identity(record: runtime.RuntimeRecord, kind: str, used_slots: set[int],
                 taken_names: set[str]) -> devices.DeviceId:
    """A new identity for a ``kind`` device of ``record``: the first free name and the
    first PCI slot from kvm_pci_reservations on that no device holds.

    ``used_slots`` and ``taken_names`` are what QEMU itself holds (the record's
    own are added here).
    """
    identities = _identities(record)
    used = devices.used_slots(identities) | used_slots
    first = int(record.hvparams.get(c.HV_KVM_PCI_RESERVATIONS, devices.FIRST_FREE_SLOT))
    slot = devices.free_slot(used, record.name, first)
    names = taken_names | {i.backend for i in identities if i is not None} \
        | {i.id for i in identities if i is not None and i.id is not None}
    prefix = "disk" if kind == DISK else "net"
    number = 0
    while f"{prefix}{number}" in names or _device_id(kind, f"{prefix}{number}") in names:
        number += 1
    backend = f"{prefix}{number}"
    hvp = record.hvparams
    rom = kind == NIC and hvp.get(c.HV_BOOT_ORDER) == c.HT_BO_NETWORK \
        and not hvp.get(c.HV_KERNEL_PATH)
    return devices.DeviceId(backend=backend, id=_device_id(kind, backend), bus=devices.PCI_BUS,
                            addr=hex(slot), romfile=None if rom or kind == DISK else "")


def _device_id(kind: str, backend: str) -> str:
    return f"{backend}-dev" if kind == DISK else "nic" + backend[len("net"):]


def _peripherals(client: QmpClient) -> set[str]:
    """The ids of the devices QEMU has (``-device`` and ``device_add`` ones)."""
    return {str(p.get("name")) for p in client.execute(
        "qom-list", {"path": "/machine/peripheral"})}


def _block_nodes(client: QmpClient) -> set[str]:
    """The names of QEMU's named block nodes (those ``blockdev-add`` made)."""
    return {str(n.get("node-name")) for n in client.execute("query-named-block-nodes")}


def _block_names(client: QmpClient) -> set[str]:
    """Every name of QEMU's block layer: nodes and the drives of its command line."""
    return _block_nodes(client) | {str(b.get("device")) for b in client.execute("query-block")}


def find_entry(entries: Sequence[Mapping[str, Any]], uuid: str | None, index: int | None,
               kind: str, name: str) -> int:
    """The position of the entry with ``uuid``, else (no entry has it) at ``index``."""
    if uuid is not None:
        for position, entry in enumerate(entries):
            if entry.get("uuid") == uuid:
                return position
    if isinstance(index, int) and not isinstance(index, bool) and 0 <= index < len(entries):
        held = entries[index].get("uuid")
        if uuid is None or held is None:
            return index
    raise errors.HotplugError(
        f"Cannot find {kind} {uuid or index} of instance {name} among the {len(entries)} "
        f"{kind}s its QEMU was given (it was added without hotplug, or the instance started "
        "before it existed); restart the instance to apply the change")


# --- disks ---------------------------------------------------------------------------


def _cache_mode(hvp: Mapping[str, Any], disk: cmdline.BlockDevice, name: str) -> str:
    aio = hvp.get(c.HV_KVM_DISK_AIO) or c.HT_KVM_AIO_THREADS
    return cmdline.disk_cache(name, disk, str(hvp.get(c.HV_DISK_CACHE) or c.HT_CACHE_DEFAULT),
                              str(aio))


def blockdev_options(node_name: str, disk: cmdline.BlockDevice, driver: str, cache: str,
                     hvp: Mapping[str, Any]) -> dict[str, Any]:
    """The ``blockdev-add`` arguments of a raw disk, with the modes a start gives it.

    ``cache`` is the disk's cache mode (see :func:`cmdline.disk_cache`):
    ``none`` bypasses the host's page cache (``cache.direct``); the
    guest-visible write cache is the device's (``write-cache``).
    """
    common: dict[str, Any] = {"read-only": disk.readonly,
                              "cache": {"direct": cache == c.HT_CACHE_NONE, "no-flush": False}}
    discard = hvp.get(c.HV_DISK_DISCARD) or c.HT_DISCARD_DEFAULT
    if discard != c.HT_DISCARD_DEFAULT:
        common["discard"] = discard
    protocol = dict(common, driver=driver, filename=disk.path)
    aio = hvp.get(c.HV_KVM_DISK_AIO) or c.HT_KVM_AIO_THREADS
    if aio != c.HT_KVM_AIO_THREADS:
        protocol["aio"] = aio
    return dict(common, driver="raw", **{"node-name": node_name}, file=protocol)


def disk_device_options(ident: devices.DeviceId, driver: str, cache: str) -> dict[str, Any]:
    """The ``device_add`` arguments of a disk with identity ``ident``."""
    options: dict[str, Any] = {"driver": driver, "id": ident.id, "drive": ident.backend,
                               "bus": ident.bus, "addr": ident.addr}
    if cache == c.HT_CACHE_WTHROUGH:
        options["write-cache"] = "off"
    return options


def _protocol_driver(path: str, name: str) -> str:
    """``host_device`` for a block device, ``file`` for a regular file."""
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        raise _fail(name, "hotplug a disk", f"its path {path} cannot be read: "
                    f"{err.strerror}", "check that the disk is assembled") from None
    if stat.S_ISBLK(mode):
        return "host_device"
    if stat.S_ISREG(mode):
        return "file"
    raise _fail(name, "hotplug a disk", f"{path} is neither a block device nor a file",
                "give the disk's block device")


def add_disk(node: KvmNode, name: str, disk: cmdline.BlockDevice,
             index: int | None = None) -> devices.DeviceId:
    """Add ``disk`` to running instance ``name`` (as disk ``index``; None: the last).

    Returns the identity it got, kept in the record with the disk.
    """
    what = f"hotplug disk {disk.path}"
    cmdline.check_value("disk path", disk.path)
    if not disk.path.startswith("/"):
        raise _fail(name, what, "its path is not absolute", "give the disk's absolute path")
    with _session(node, name, DISK, ADD, what) as (runtime_file, record, client):
        driver = HOTPLUG_DISK_DRIVERS[record.hvparams[c.HV_DISK_TYPE]]
        ident = new_identity(record, DISK, _live_slots(client),
                             _peripherals(client) | _block_names(client))
        cache = _cache_mode(record.hvparams, disk, name)
        options = blockdev_options(ident.backend, disk,
                                   _protocol_driver(disk.path, name), cache, record.hvparams)
        with contextlib.ExitStack() as undo:
            client.execute("blockdev-add", options)
            undo.callback(_undo_quietly, f"blockdev-del {ident.backend}",
                          lambda: client.execute("blockdev-del", {"node-name": ident.backend}))
            client.execute("device_add", disk_device_options(ident, driver, cache))
            entry = cmdline.BlockDevice(path=disk.path, readonly=disk.readonly, uri=disk.uri,
                                        device=ident, shared=disk.shared,
                                        uuid=disk.uuid).to_dict()
            _insert(record.disks, entry, index)
            runtime.save(runtime_file, record)
            undo.pop_all()
        log.info("Instance %s: hotplugged disk %s as %s on slot %s", name, disk.path,
                 ident.id, ident.addr)
        return ident


def remove_disk(node: KvmNode, name: str, uuid: str | None, index: int | None,
                timeout: float = UNPLUG_TIMEOUT) -> None:
    """Remove the disk with ``uuid`` (or at ``index``) from running instance ``name``."""
    what = f"hot-remove disk {uuid or index}"
    with _session(node, name, DISK, REMOVE, what) as (runtime_file, record, client):
        position = find_entry(record.disks, uuid, index, DISK, name)
        ident = _identity_for_removal(record.disks[position], name, what)
        _unplug(client, record, record.disks[position], ident, runtime_file, name, what,
                timeout)
        if ident.backend in _block_nodes(client):  # added by blockdev-add
            _blockdev_del(client, ident.backend)
        # a -drive of the command line goes with its device
        del record.disks[position]
        runtime.save(runtime_file, record)
        log.info("Instance %s: hot-removed disk %s (%s)", name, uuid or index, ident.id)


def _sized_target(client: QmpClient, backend: str) -> tuple[dict[str, str], int] | None:
    """How ``block_resize`` names the disk ``backend``, and the size (bytes) QEMU gives
    the guest: a node ``blockdev-add`` made, or a -drive of the command line."""
    for node in client.execute("query-named-block-nodes"):
        if node.get("node-name") == backend:
            return {"node-name": backend}, int(node["image"]["virtual-size"])
    for block in client.execute("query-block"):
        if block.get("device") == backend and "inserted" in block:
            return {"device": backend}, int(block["inserted"]["image"]["virtual-size"])
    return None


def resize_disk(node: KvmNode, name: str, uuid: str | None, index: int | None,
                size: int) -> None:
    """Tell running instance ``name``'s QEMU that its disk ``uuid`` (or at ``index``) grew
    to ``size`` bytes (QMP ``block_resize``); the guest's driver sees the new size.

    The storage has grown already (the cluster manager grows it first).  A
    smaller size is refused: QEMU would cut a file disk down to it.
    """
    what = f"grow disk {uuid or index} in QEMU"
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise _fail(name, what, f"the new size must be a whole number of bytes, not {size!r}",
                    "give the disk's new size")
    with node.locked(name, "resize disk") as paths:
        record = _running_record(node, name, what)
        entry = record.disks[find_entry(record.disks, uuid, index, DISK, name)]
        backend = _identity_for_removal(entry, name, what).backend
        with QmpClient(paths.qmp_long_socket, timeout=QMP_TIMEOUT) as client:
            found = _sized_target(client, backend)
            if found is None:
                raise _fail(name, what, f"QEMU has no disk {backend}",
                            "restart the instance to see the new size")
            target, current = found
            if size < current:
                raise _fail(name, what, f"{size} bytes is less than the {current} bytes it "
                            "has; a disk only grows", "give the grown size")
            if size == current:
                return
            try:
                client.execute("block_resize", {**target, "size": size})
            except errors.QmpCommandError as err:
                raise _fail(name, what, f"QEMU said: {err.desc or err}",
                            "check that the disk grew, then retry or restart the "
                            "instance") from err
    log.info("Instance %s: disk %s grown to %d bytes in QEMU", name, uuid or index, size)


# --- NICs ----------------------------------------------------------------------------


def _tap_shape(hvp: Mapping[str, Any]) -> tuple[bool, int]:
    """``(vnet_hdr, queues)`` of a NIC's TAP device, as a start opens it."""
    paravirtual = hvp[c.HV_NIC_TYPE] == c.HT_NIC_PARAVIRTUAL
    vnet_hdr = paravirtual and hvp.get(c.HV_VNET_HDR, True) is not False
    queues = int(hvp.get(c.HV_VIRTIO_NET_QUEUES, 1)) if paravirtual else 1
    return vnet_hdr, queues


def netdev_options(backend: str, fd_names: Sequence[str],
                   vhost_names: Sequence[str]) -> dict[str, Any]:
    """The ``netdev_add`` arguments of a TAP netdev on descriptors QEMU got with getfd."""
    options: dict[str, Any] = {"type": "tap", "id": backend}
    if len(fd_names) == 1:
        options["fd"] = fd_names[0]
    else:
        options["fds"] = ":".join(fd_names)
    if vhost_names:
        options["vhost"] = True
        if len(vhost_names) == 1:
            options["vhostfd"] = vhost_names[0]
        else:
            options["vhostfds"] = ":".join(vhost_names)
    return options


def nic_device_options(ident: devices.DeviceId, model: str, mac: str,
                       queues: int) -> dict[str, Any]:
    """The ``device_add`` arguments of a NIC with identity ``ident``."""
    options: dict[str, Any] = {"driver": model, "id": ident.id, "netdev": ident.backend,
                               "mac": mac, "bus": ident.bus, "addr": ident.addr}
    if ident.romfile is not None:
        options["romfile"] = ident.romfile
    if queues > 1:
        options.update(mq=True, vectors=2 * queues + 2)
    return options


def _open_vhost(name: str, what: str) -> int:
    try:
        return os.open(VHOST_NET, os.O_RDWR | os.O_CLOEXEC)
    except OSError as err:
        raise _fail(name, what, f"cannot open {VHOST_NET}: {err.strerror}",
                    "load the vhost_net module, or set vhost_net off") from None


def _pass_fds(client: QmpClient, fds: Sequence[int], prefix: str,
              undo: contextlib.ExitStack) -> list[str]:
    """getfd each of ``fds`` as ``PREFIX0``, ``PREFIX1``...; closefd of each on undo."""
    names = []
    for number, fd in enumerate(fds):
        fd_name = f"{prefix}{number}"
        client.pass_fd(fd_name, fd)
        undo.callback(_undo_quietly, f"closefd {fd_name}",
                      functools.partial(client.execute, "closefd", {"fdname": fd_name}))
        names.append(fd_name)
    return names


def add_nic(node: KvmNode, name: str, nic: Mapping[str, Any],
            index: int | None = None, ident: devices.DeviceId | None = None) -> devices.DeviceId:
    """Add ``nic`` (``mac``, ``ip``, ``nicparams``, ``uuid``) to running instance ``name``.

    As NIC ``index`` (None: the last); ``ident`` keeps a given identity (a
    changed NIC), else a new one is allocated.  Returns the identity.
    """
    what = f"hotplug a NIC ({nic.get('mac')})"
    check_nic(name, nic, index or 0)
    with _session(node, name, NIC, ADD, what) as (runtime_file, record, client):
        position = len(record.nics) if index is None else max(0, min(index, len(record.nics)))
        mac = macaddr.check_mac(name, position, nic.get("mac"))
        hvp = record.hvparams
        model = cmdline.NIC_MODELS[hvp[c.HV_NIC_TYPE]]
        if ident is None:
            ident = new_identity(record, NIC, _live_slots(client), _peripherals(client))
        vnet_hdr, queues = _tap_shape(hvp)
        with contextlib.ExitStack() as undo:
            fds, tap = netdev.open_tap_queues(vnet_hdr=vnet_hdr, queues=queues,
                                              netns=node.netns)
            with contextlib.ExitStack() as ours:  # our copies: closed once QEMU has its own
                for fd in fds:
                    ours.callback(os.close, fd)
                fd_names = _pass_fds(client, fds, f"{ident.backend}-fd", undo)
                vhost_names: list[str] = []
                if hvp.get(c.HV_VHOST_NET):
                    vhost_fds = []
                    for _ in fds:
                        vhost_fds.append(_open_vhost(name, what))
                        ours.callback(os.close, vhost_fds[-1])
                    vhost_names = _pass_fds(client, vhost_fds, f"{ident.backend}-vhost", undo)
                client.execute("netdev_add", netdev_options(ident.backend, fd_names,
                                                            vhost_names))
            undo.pop_all()  # netdev_add consumed the named descriptors
            undo.callback(_undo_quietly, f"netdev_del {ident.backend}",
                          lambda: client.execute("netdev_del", {"id": ident.backend}))
            entry = dict(nic, mac=mac, tap=tap)
            entry.pop(UNPLUG_KEY, None)
            entry[devices.DEVICE_KEY] = ident.to_dict()
            env = ifup.nic_environment(name, _NicView(entry), position, tap, record.tags)
            ifup.run_ifup(node.ifup_script, env, netns=node.netns)
            client.execute("device_add", nic_device_options(ident, model, mac, queues))
            _insert(record.nics, entry, position)
            runtime.save(runtime_file, record)
            undo.pop_all()
        log.info("Instance %s: hotplugged NIC %s (%s) as %s on slot %s", name, mac, tap,
                 ident.id, ident.addr)
        return ident


def remove_nic(node: KvmNode, name: str, uuid: str | None, index: int | None,
               timeout: float = UNPLUG_TIMEOUT) -> devices.DeviceId:
    """Remove the NIC with ``uuid`` (or at ``index``) from running instance ``name``.

    Returns the identity it had.  QEMU closes its TAP device, which vanishes.
    """
    what = f"hot-remove NIC {uuid or index}"
    with _session(node, name, NIC, REMOVE, what) as (runtime_file, record, client):
        position = find_entry(record.nics, uuid, index, NIC, name)
        ident = _identity_for_removal(record.nics[position], name, what)
        _unplug(client, record, record.nics[position], ident, runtime_file, name, what,
                timeout)
        try:
            client.execute("netdev_del", {"id": ident.backend})
        except errors.QmpCommandError as err:  # the device is gone: not worth a failure
            log.warning("Instance %s: netdev_del %s after its NIC went failed: %s", name,
                        ident.backend, err)
        del record.nics[position]
        runtime.save(runtime_file, record)
        log.info("Instance %s: hot-removed NIC %s (%s)", name, uuid or index, ident.id)
        return ident


def modify_nic(node: KvmNode, name: str, nic: Mapping[str, Any], index: int | None,
               timeout: float = UNPLUG_TIMEOUT) -> devices.DeviceId:
    """Apply a changed ``nic`` (MAC, IP, mode, link) to running instance ``name``.

    As Ganeti's own driver does: the NIC is removed and added again, with its
    id and PCI slot (the guest sees the same interface come back) and a new
    TAP device configured by the ifup hook for its new mode and link.
    """
    check_nic(name, nic, index or 0)  # before the old NIC goes
    ident = remove_nic(node, name, nic.get("uuid"), index, timeout)
    return add_nic(node, name, nic, index, ident=ident)


def check_nic(name: str, nic: Mapping[str, Any], index: int) -> None:
    """Refuse a NIC without a valid MAC or mode, naming it, before anything is done."""
    macaddr.check_mac(name, index, nic.get("mac"))
    ifup.nic_environment(name, _NicView(nic), index, "tap", [])


class _NicView(types.SimpleNamespace):
    """A NIC entry with attribute access, for the ifup environment."""

    def __init__(self, entry: Mapping[str, Any]) -> None:
        super().__init__(mac=entry.get("mac"), ip=entry.get("ip"),
                         nicparams=dict(entry.get("nicparams") or {}))


# --- removal -------------------------------------------------------------------------


def _identity_for_removal(entry: Mapping[str, Any], name: str, what: str) -> devices.DeviceId:
    ident = devices.identity_of(entry, f"a device of {name}")
    if ident is None or ident.id is None:
        raise _fail(name, what, "its device has no id QEMU knows it by (the instance "
                    "started before ganeti-kvm kept device identities)",
                    "restart the instance to apply the change")
    return ident


def _unplug(client: QmpClient, record: runtime.RuntimeRecord, entry: dict[str, Any],
            ident: devices.DeviceId, runtime_file: str, name: str, what: str,
            timeout: float) -> None:
    """``device_del`` and wait for ``DEVICE_DELETED``; on timeout mark ``entry`` and raise."""
    assert ident.id is not None
    if ident.id in _peripherals(client):
        client.execute("device_del", {"id": ident.id})
        if not _wait_deleted(client, ident.id, timeout):
            entry[UNPLUG_KEY] = True
            runtime.save(runtime_file, record)
            raise _fail(name, what, f"the guest did not release device {ident.id} within "
                        f"{timeout:g} s (its OS ignores or has not yet handled the unplug "
                        "request; QEMU removes the device once it does)",
                        "retry the removal later (the device stays in the runtime record, "
                        "marked for removal, until then), or reboot the instance, which "
                        "starts without it")
    else:
        log.info("Instance %s: device %s was already gone from QEMU", name, ident.id)


def _blockdev_del(client: QmpClient, node_name: str,
                  timeout: float = BLOCKDEV_RELEASE_TIMEOUT) -> None:
    """``blockdev-del`` of a disk's node once its deleted device let go of it.

    QEMU frees a deleted device, and with it its hold on the node, a moment
    after the guest released it (after ``DEVICE_DELETED``, even): until then
    the node is "in use", so that answer is retried within ``timeout``.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.execute("blockdev-del", {"node-name": node_name})
            return
        except errors.QmpCommandError as err:
            if "in use" not in err.desc or time.monotonic() > deadline:
                raise
        time.sleep(0.05)


def _wait_deleted(client: QmpClient, device_id: str, timeout: float) -> bool:
    """Whether QEMU reports ``device_id`` deleted within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        event = client.wait_event(["DEVICE_DELETED"], max(remaining, 0.0))
        if event is not None and (event.get("data") or {}).get("device") == device_id:
            return True
        if event is None or remaining <= 0:
            # The event may have gone to another monitor connection: ask QEMU.
            return device_id not in _peripherals(client)


# --- the record's entries ------------------------------------------------------------


def _insert(entries: list[dict[str, Any]], entry: dict[str, Any], index: int | None) -> None:
    if index is None or not 0 <= index <= len(entries):
        entries.append(entry)
    else:
        entries.insert(index, entry)


def drop_unplugged(record: runtime.RuntimeRecord) -> None:
    """Leave out the devices marked for removal, for a fresh start of ``record``.

    Their removal was asked for and the guest never completed it; a new
    QEMU (a reboot) simply starts without them.  A migration target must
    not call this: its source QEMU may still have them.
    """
    for kind, entries in ((NIC, record.nics), (DISK, record.disks)):
        kept = [e for e in entries if not e.get(UNPLUG_KEY)]
        if len(kept) != len(entries):
            log.info("Instance %s starts without %d %s(s) whose hot-removal was pending",
                     record.name, len(entries) - len(kept), kind)
            entries[:] = kept


def settle(node: KvmNode, name: str) -> None:
    """Finish the removals whose device the guest has released since they were asked.

    Called before the record leaves the node (a migration), so the target
    starts exactly the devices the source QEMU still has.
    """
    with node.locked(name, "hotplug") as paths:
        record = node.load_record(name) if node.running_pid(name) is not None else None
        if record is None or not any(e.get(UNPLUG_KEY) for e in [*record.nics,
                                                                  *record.disks]):
            return
        with QmpClient(paths.qmp_long_socket, timeout=QMP_TIMEOUT) as client:
            present = _peripherals(client)
            nodes = _block_nodes(client)
            for kind, entries in ((NIC, record.nics), (DISK, record.disks)):
                for entry in list(entries):
                    ident = devices.identity_of(entry, f"a {kind} of {name}")
                    if not entry.get(UNPLUG_KEY) or ident is None or ident.id in present:
                        continue
                    if kind == NIC:
                        _undo_quietly(f"netdev_del {ident.backend}", functools.partial(
                            client.execute, "netdev_del", {"id": ident.backend}))
                    elif ident.backend in nodes:
                        _undo_quietly(f"blockdev-del {ident.backend}", functools.partial(
                            _blockdev_del, client, ident.backend))
                    entries.remove(entry)
                    log.info("Instance %s: the guest released %s %s; its removal is done",
                             name, kind, ident.id)
        runtime.save(paths.runtime_file, record)
