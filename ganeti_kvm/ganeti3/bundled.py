"""Switching running instances between Ganeti 3's bundled KVM driver and ganeti-kvm.

Both drivers keep an instance's state in the same run directory
(/var/run/ganeti/kvm-hypervisor) under the same names: ``pid/NAME``,
``ctrl/NAME.qmp``, ``ctrl/NAME.monitor`` (the human monitor),
``ctrl/NAME.serial``, and both find a live QEMU by the ``-name NAME`` of
the process the pidfile names (Ganeti's ``_InstancePidAlive`` also parses
``-m`` and ``-smp`` as plain numbers; ganeti-kvm also wants
``-pidfile pid/NAME``).  So each lists, inspects, stops and gives the
console of the other's QEMUs as they are.  What differs is one file,
``conf/NAME.runtime``: the bundled driver writes a JSON list
``[kvm_cmd, [NIC.ToDict()], hvparams, [[Disk.ToDict(), link, uri]]]``
(``kvm_cmd`` without what ``_ExecuteKVMRuntime`` adds at each start:
NICs, ``-qmp`` monitors, disks, ``-S``, ``-incoming``, ``-runas``, ``-k``),
ganeti-kvm a versioned record (:mod:`ganeti_kvm.core.runtime`).  Migrations
and reboots read it.

The switch converts that file, once, under the instance's lock, and never
touches the QEMU:

* :func:`adopt` (bundled -> ganeti-kvm; at ``install`` and lazily before
  any call that reads the record): the record is built from the bundled
  runtime and the live command line (which, unlike ``kvm_cmd``, has the
  disks), marked ``upgraded_from=0`` (a QEMU another driver started: a
  migration target gets the same devices, a reboot rebuilds from
  parameters); each NIC and disk keeps the bundled QEMU's device identity
  (id, ``pci.0`` slot, option ROM: :func:`_identities`), so a migration
  target and a reboot put it back where it was; the original bytes stay
  in ``conf/NAME.runtime.bundled`` for the rollback, and
  ``ctrl/NAME.qmpl`` (the long-operation monitor the bundled QEMU lacks)
  becomes a symlink to its QMP socket.
* :func:`export` (ganeti-kvm -> bundled; at ``remove``): an adopted
  instance whose bundled QEMU still runs gets its original file back, byte
  for byte; an instance ganeti-kvm started gets a bundled-format file whose
  ``kvm_cmd`` is its command line without ganeti-kvm's QMP monitors, and
  whose NICs carry ``hvinfo`` that makes the bundled driver spell the same
  ``-device`` (so a migration by the bundled driver finds the same devices).

One format on disk at a time (the file is read by the driver that is
loaded), converted at the switch, rather than both written at every save:
the core's record stays the only thing ganeti-kvm writes, and the bundled
driver never sees a file it cannot parse once ``remove`` ran.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ganeti_kvm import errors
from ganeti_kvm.core import legacy, runtime
from ganeti_kvm.core import names as c
from ganeti_kvm.core.node import KvmNode
from ganeti_kvm.ganeti3 import params
from ganeti_kvm.host import fsutil, process
from ganeti_kvm.host.paths import InstancePaths
from ganeti_kvm.qemu import cmdline, devices

log = logging.getLogger(__name__)

KEPT_SUFFIX = ".bundled"  # conf/NAME.runtime.bundled: the bundled driver's file, kept
# Files only the bundled driver makes per instance, removed when it stops.
EXTRA_SOCKETS = (".kvmd", ".qga", ".shutdown")
NIC_KEYS = ("mac", "ip", "network", "nicparams", "netinfo", "name", "uuid")
# Options the bundled driver adds at each start and ganeti-kvm adds its own of.
_PER_START = {"-S": 0, "-incoming": 1, "-qmp": 1}
_OUR_MONITORS = ("qmp", "qmpl")
RUNTIME_LIMIT = 16 << 20
# Where the bundled driver has QEMU write its log (``-D``): Ganeti's
# pathutils.LOG_KVM_DIR in 3.0 and 3.1.  Its stop never removes the file.
BUNDLED_LOG_DIR = "/var/log/ganeti/kvm"
QEMU_LOG_LIMIT = 4 << 20


@dataclass
class BundledRuntime:
    """The bundled driver's runtime file, parsed."""

    kvm_cmd: list[str]
    nics: list[dict[str, Any]]
    hvparams: dict[str, Any]
    disks: list[tuple[dict[str, Any], str, str | None]]

    def serialize(self) -> str:
        """The file's text, as the bundled driver's ``serializer.Dump`` writes it."""
        return json.dumps([self.kvm_cmd, self.nics, self.hvparams,
                           [[d, link, uri] for d, link, uri in self.disks]])


def parse(raw: bytes | str, name: str, source: str) -> BundledRuntime | None:
    """The bundled runtime in ``raw``; None if ``raw`` is in another format."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if not (isinstance(data, list) and len(data) == 4 and isinstance(data[0], list)
            and isinstance(data[1], list) and isinstance(data[2], dict)
            and isinstance(data[3], list)):
        return None
    bad = errors.RuntimeStateError
    if not data[0] or not all(isinstance(a, (str, int)) and not isinstance(a, bool)
                              for a in data[0]):
        raise bad(f"Bundled runtime {source} of instance {name}: its command line is empty "
                  "or not a list of strings; stop the instance with force and start it again")
    if not all(isinstance(n, dict) and isinstance(n.get("mac"), str) for n in data[1]):
        raise bad(f"Bundled runtime {source} of instance {name}: a NIC has no MAC address")
    disks = []
    for entry in data[3]:
        if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], dict)
                and isinstance(entry[1], str)):
            raise bad(f"Bundled runtime {source} of instance {name}: a disk entry is not "
                      "[disk, link, uri]")
        disks.append((entry[0], entry[1], entry[2]))
    return BundledRuntime([str(a) for a in data[0]], list(data[1]), dict(data[2]), disks)


# --- bundled -> ganeti-kvm --------------------------------------------------------


def _number(argv: Sequence[str], option: str, name: str) -> int:
    for value in reversed(legacy.option_values(argv, option)):
        head = value.split(",")[0].removeprefix("cpus=").removeprefix("size=").rstrip("Mm")
        if head.isdigit() and int(head) > 0:
            return int(head)
    raise errors.RuntimeStateError(
        f"Cannot adopt instance {name}: its QEMU command line has no usable {option}; "
        "stop it with the bundled driver (or with force) and start it again")


def _nic_netdevs(argv: Sequence[str]) -> set[str]:
    """The ids of the tap ``-netdev`` of a command line."""
    ids = set()
    for value in legacy.option_values(argv, "-netdev"):
        options = dict(o.split("=", 1) for o in value.split(",") if "=" in o)
        if value.startswith(("tap,", "type=tap")) or options.get("type") == "tap":
            ids.add(options.get("id", ""))
    return ids


def _strip_per_start(argv: Sequence[str]) -> list[str]:
    """The live command line without what a start adds: NICs, -qmp, -S, -incoming."""
    netdevs = _nic_netdevs(argv)
    result: list[str] = []
    index = 0
    while index < len(argv):
        arg = argv[index]
        value = argv[index + 1] if index + 1 < len(argv) else ""
        if arg in _PER_START:
            index += 1 + _PER_START[arg]
            continue
        if arg == "-netdev" and value.split(",")[0] in ("tap", "type=tap"):
            index += 2
            continue
        if arg == "-device" and any(f"netdev={i}" in value.split(",") for i in netdevs):
            index += 2
            continue
        if arg == "-net" and value.startswith(("tap", "nic")):
            index += 2
            continue
        result.append(arg)
        index += 1
    return result


def _taps(paths: InstancePaths, count: int) -> list[str | None]:
    """The TAP names the bundled driver kept in ``nic/NAME/SEQ``."""
    directory = os.path.join(paths.run_dir.root, "nic", paths.name)
    taps: list[str | None] = []
    for seq in range(count):
        raw = fsutil.read_small_file(os.path.join(directory, str(seq)), limit=64)
        taps.append(raw.decode("ascii", "replace").strip() if raw else None)
    return taps


def record_from_bundled(name: str, bundled: BundledRuntime, live_argv: Sequence[str],
                        paths: InstancePaths) -> runtime.RuntimeRecord:
    """Our record of an instance the bundled driver started (its QEMU runs ``live_argv``)."""
    hvparams = params.to_core(bundled.hvparams)
    nic_ids, disk_ids = _identities(live_argv, len(bundled.nics), len(bundled.disks),
                                    hvparams)
    nics = []
    for nic, tap, ident in zip(bundled.nics, _taps(paths, len(bundled.nics)), nic_ids,
                               strict=True):
        entry = {k: nic.get(k) for k in NIC_KEYS if k in nic}
        entry["nicparams"] = dict(nic.get("nicparams") or {})
        entry["tap"] = tap
        if ident is not None:
            entry[devices.DEVICE_KEY] = ident.to_dict()
        nics.append(entry)
    disks = []
    for (disk, link, uri), ident in zip(bundled.disks, disk_ids, strict=True):
        entry = {"path": link, "readonly": disk.get("mode", "rw") != "rw", "uri": uri}
        if ident is not None:
            entry[devices.DEVICE_KEY] = ident.to_dict()
        disks.append(entry)
    # The binary the bundled driver ran (/proc shows what it exec'd, maybe a wrapper's).
    hvparams[c.HV_KVM_PATH] = bundled.kvm_cmd[0]
    argv = [bundled.kvm_cmd[0], *_strip_per_start(live_argv)[1:]]
    uuid = next(iter(legacy.option_values(live_argv, "-uuid")), None)
    return runtime.RuntimeRecord(
        name=name, argv=argv, nics=nics, hvparams=hvparams,
        beparams={c.BE_MEMORY: _number(live_argv, "-m", name),
                  c.BE_VCPUS: _number(live_argv, "-smp", name)},
        disks=disks, uuid=uuid, network_port=legacy.network_port(live_argv), upgraded_from=0)


def _identities(live_argv: Sequence[str], nic_count: int, disk_count: int,
                hvparams: Mapping[str, Any]
                ) -> tuple[list[devices.DeviceId | None], list[devices.DeviceId | None]]:
    """The device identities of the bundled QEMU's NICs and disks, read from ``live_argv``.

    The bundled driver names a NIC ``nic-<uuid prefix>`` (its ``-netdev``
    too) and a disk ``disk-<uuid prefix>`` (its ``-drive`` too), puts each
    on its own ``pci.0`` slot from ``0xc`` on (disks first) and leaves
    QEMU's default option ROM: a migration target and a reboot must keep
    all of it.  None where an identity cannot be read or this library
    could not give the device again the same way (a SCSI disk on the
    bundled driver's own controller, an IDE one without ``-device``): that
    NIC or disk is then named by position.
    """
    nics = devices.parse_nic_devices(live_argv)
    if len(nics) != nic_count:
        nics = [None] * nic_count
    models = set(cmdline.NIC_MODELS.values())
    nics = [i if i is not None and i.driver in models else None for i in nics]
    disks = devices.parse_disk_devices(live_argv)
    if len(disks) != disk_count or hvparams.get(c.HV_DISK_TYPE) != c.HT_DISK_PARAVIRTUAL:
        disks = [None] * disk_count
    disks = [i if i is not None and i.driver == "virtio-blk-pci"
             and i.bus in (None, devices.PCI_BUS) else None for i in disks]
    return nics, disks


def kept_file(paths: InstancePaths) -> str:
    """Where :func:`adopt` keeps the bundled driver's runtime file."""
    return paths.runtime_file + KEPT_SUFFIX


def _started_by_bundled(argv: Sequence[str], paths: InstancePaths) -> bool:
    """Whether a live command line is the bundled driver's: its QMP is a ``-qmp`` option."""
    return any(v.split(",")[0] == f"unix:{paths.qmp_socket}"
               for v in legacy.option_values(argv, "-qmp"))


def _link_long_monitor(paths: InstancePaths) -> None:
    """Make ``ctrl/NAME.qmpl`` reach the bundled QEMU's only QMP monitor."""
    if os.path.lexists(paths.qmp_long_socket):
        return
    try:
        os.symlink(os.path.basename(paths.qmp_socket), paths.qmp_long_socket)
    except OSError as err:
        raise errors.HypervisorError(
            f"Cannot link {paths.qmp_long_socket} to the QMP monitor of instance "
            f"{paths.name}: {err.strerror}; check the run directory") from None


def adopt(node: KvmNode, name: str) -> bool:
    """Take over instance ``name`` from the bundled driver if its runtime is in its format.

    True if it was converted now.  A running QEMU is never touched; a
    stopped instance's file is left for :func:`remove_leftovers`.
    """
    paths = node.paths(name)
    if not _bundled_format(paths):
        return False
    with node.locked(name, "adopt from the bundled driver") as paths:
        raw = fsutil.read_small_file(paths.runtime_file, limit=RUNTIME_LIMIT)
        bundled = None if raw is None else parse(raw, name, paths.runtime_file)
        if raw is None or bundled is None:
            return False  # converted meanwhile, or not the bundled format
        pid = node.running_pid(name)
        argv = None if pid is None else process.cmdline(pid)
        if argv is None:
            return False
        record = record_from_bundled(name, bundled, argv, paths)
        fsutil.atomic_write(kept_file(paths), raw, mode=0o600)
        runtime.save(paths.runtime_file, record)
        if _started_by_bundled(argv, paths):
            _link_long_monitor(paths)
        log.info("Adopted instance %s from Ganeti's bundled KVM driver (its QEMU %d runs on)",
                 name, pid)
        return True


def _bundled_format(paths: InstancePaths) -> bool:
    """A cheap look before taking the lock: is the runtime file a JSON list?"""
    try:
        with open(paths.runtime_file, "rb") as handle:
            head = handle.read(64).lstrip()
    except OSError:
        return False
    return head.startswith(b"[")


def _names(node: KvmNode) -> list[str]:
    return node.list_names()


def adopt_all(run_dir: str) -> list[str]:
    """:func:`adopt` every running instance under ``run_dir``; the names converted."""
    node = KvmNode(run_dir)
    done = []
    for name in _names(node):
        try:
            if adopt(node, name):
                done.append(name)
        except errors.HypervisorError as err:
            log.error("Instance %s stays with the bundled driver's runtime file: %s", name, err)
    return done


# --- ganeti-kvm -> bundled -----------------------------------------------------------


def _without_our_monitors(argv: Sequence[str]) -> list[str]:
    """``argv`` without ganeti-kvm's QMP monitors (the bundled driver adds ``-qmp`` ones)."""
    result: list[str] = []
    index = 0
    while index < len(argv):
        arg, value = argv[index], argv[index + 1] if index + 1 < len(argv) else ""
        if arg == "-chardev" and any(value.startswith(f"socket,id={i},") for i in _OUR_MONITORS):
            index += 2
            continue
        if arg == "-mon" and value in (f"chardev={i},mode=control" for i in _OUR_MONITORS):
            index += 2
            continue
        if arg in ("-S",):
            index += 1
            continue
        if arg == "-incoming":
            index += 2
            continue
        result.append(arg)
        index += 1
    return result


def bundled_log(name: str) -> str:
    """The QEMU log file the bundled driver gives instance ``name``."""
    return os.path.join(BUNDLED_LOG_DIR, name + ".log")


def _with_bundled_log(argv: Sequence[str], name: str) -> list[str]:
    """``argv`` with its ``-D`` log moved to the bundled driver's log directory.

    Our ``ctrl/NAME.log`` lives in the run directory, which the bundled
    driver never cleans: a QEMU it starts from this command line (a reboot,
    a migration target) must log where its own would.
    """
    result = list(argv)
    for index, arg in enumerate(result[:-1]):
        if arg == "-D":
            result[index + 1] = bundled_log(name)
    return result


def _hand_over_log(paths: InstancePaths) -> None:
    """Move the running QEMU's log from the run directory to the bundled driver's place.

    QEMU keeps writing to the file it opened; what it wrote so far is kept
    where the bundled driver keeps its logs, and nothing stays in ``ctrl/``.
    """
    text = fsutil.read_small_file(paths.qemu_log, limit=QEMU_LOG_LIMIT)
    if text is None:
        return
    try:
        os.makedirs(BUNDLED_LOG_DIR, mode=0o750, exist_ok=True)
    except OSError as err:
        raise errors.HypervisorError(
            f"Cannot create {BUNDLED_LOG_DIR} for the QEMU log of instance {paths.name}: "
            f"{err}") from err
    fsutil.atomic_write(bundled_log(paths.name), text, mode=0o600)
    fsutil.remove_file(paths.qemu_log)


def _bundled_nic(nic: Mapping[str, Any], index: int, model: str, rom: bool) -> dict[str, Any]:
    """A NIC dict whose ``hvinfo`` makes the bundled driver spell ganeti-kvm's ``-device``.

    The bundled driver writes ``DRIVER,KEY=VALUE...,netdev=ID,mac=MAC``
    from ``hvinfo`` (in its order) and reads ``bus``/``addr`` to know the
    slots taken when hotplugging; without an ``id`` it writes the bare
    model, as the 2011 driver did.
    """
    entry = {k: nic[k] for k in NIC_KEYS if k in nic and nic[k] is not None}
    entry["nicparams"] = dict(nic.get("nicparams") or {})
    ident = devices.identity_of(nic, f"NIC {index}") or devices.positional_nic(index, rom)
    hvinfo: dict[str, Any] = {"driver": ident.driver or model}
    if ident.id is not None:
        hvinfo["id"] = ident.id
        hvinfo.update((k, v) for k, v in (("bus", ident.bus), ("addr", ident.addr))
                      if v is not None)
        hvinfo.update(ident.props)
        if ident.romfile is not None:
            hvinfo["romfile"] = ident.romfile
    entry["hvinfo"] = hvinfo
    return entry


def bundled_from_record(record: runtime.RuntimeRecord) -> BundledRuntime:
    """The bundled driver's runtime for an instance ganeti-kvm started from ``record``."""
    hvp = params.fill(record.hvparams)
    model = cmdline.NIC_MODELS.get(hvp[c.HV_NIC_TYPE], str(hvp[c.HV_NIC_TYPE]))
    rom = hvp[c.HV_BOOT_ORDER] == c.HT_BO_NETWORK and not hvp[c.HV_KERNEL_PATH]
    return BundledRuntime(
        kvm_cmd=_with_bundled_log(_without_our_monitors(record.argv), record.name),
        nics=[_bundled_nic(n, i, model, rom) for i, n in enumerate(record.nics)],
        hvparams=hvp, disks=[])


def _write_taps(paths: InstancePaths, record: runtime.RuntimeRecord) -> None:
    """``nic/NAME/SEQ`` with each TAP's name, as the bundled driver keeps them."""
    directory = os.path.join(paths.run_dir.root, "nic", paths.name)
    taps = [n.get("tap") for n in record.nics]
    if not any(taps):
        return
    fsutil.ensure_dirs([os.path.dirname(directory), directory], mode=0o755)
    for seq, tap in enumerate(taps):
        if tap:
            fsutil.atomic_write(os.path.join(directory, str(seq)), str(tap), mode=0o644)


def export(node: KvmNode, name: str) -> bool:
    """Give running instance ``name`` a runtime file the bundled driver reads; True if written."""
    with node.locked(name, "hand over to the bundled driver") as paths:
        raw = fsutil.read_small_file(paths.runtime_file, limit=RUNTIME_LIMIT)
        if raw is None or parse(raw, name, paths.runtime_file) is not None:
            return False  # no record, or the bundled format already
        pid = node.running_pid(name)
        if pid is None:
            return False
        record = runtime.parse(raw, name, paths.runtime_file)
        kept = fsutil.read_small_file(kept_file(paths), limit=RUNTIME_LIMIT)
        argv = process.cmdline(pid) or []
        if kept is not None and record.upgraded_from == 0 and _started_by_bundled(argv, paths):
            text: bytes | str = kept  # the bundled driver's own QEMU still runs: its own file
        else:
            text = bundled_from_record(record).serialize()
            _write_taps(paths, record)
        fsutil.atomic_write(paths.runtime_file, text, mode=0o600)
        fsutil.remove_file(kept_file(paths))
        _hand_over_log(paths)
        if os.path.islink(paths.qmp_long_socket):
            fsutil.remove_file(paths.qmp_long_socket)
        return True


def export_all(run_dir: str) -> list[str]:
    """:func:`export` every running instance under ``run_dir``; the names converted."""
    node = KvmNode(run_dir)
    done = []
    for name in _names(node):
        try:
            if export(node, name):
                done.append(name)
        except errors.HypervisorError as err:
            log.error("Could not hand instance %s over to the bundled driver: %s", name, err)
    return done


# --- after a stop -------------------------------------------------------------------


def remove_leftovers(node: KvmNode, name: str, restarted: bool = False) -> None:
    """Remove what only the bundled driver makes per instance, once its QEMU is gone.

    The kept runtime file, the ``.kvmd``/``.qga``/``.shutdown`` sockets and
    the ``nic/NAME`` directory; and the uid it took from Ganeti's uid pool
    (``uid/NAME``), released in Ganeti's pool when Ganeti is importable.
    Nothing while the instance runs, unless ``restarted`` (ganeti-kvm
    started a new QEMU for it: the bundled one is gone).
    """
    paths = node.paths(name)
    if not restarted and node.running_pid(name) is not None:
        return
    for path in [kept_file(paths)] + [os.path.join(paths.run_dir.ctrl_dir, name + s)
                                      for s in EXTRA_SOCKETS]:
        fsutil.remove_file(path)
    uid_file = os.path.join(paths.run_dir.uid_dir, name)
    if not name.isdigit() and os.path.isfile(uid_file):
        _release_ganeti_uid(uid_file, name)
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(os.path.join(paths.run_dir.root, "nic", name))


def _release_ganeti_uid(uid_file: str, name: str) -> None:
    raw = fsutil.read_small_file(uid_file, limit=64)
    fsutil.remove_file(uid_file)
    text = (raw or b"").decode("ascii", "replace").strip()
    if not text.isdigit():
        return
    from ganeti_kvm.ganeti3 import _ganeti

    if not _ganeti.HAVE_GANETI:
        log.warning("Instance %s ran as uid %s of Ganeti's uid pool; Ganeti is not importable "
                    "here, release it with Ganeti's tools", name, text)
        return
    try:
        from ganeti import uidpool  # type: ignore[import-not-found,unused-ignore]

        uidpool.ReleaseUid(int(text))
    except Exception as err:  # noqa: BLE001 - Ganeti's errors are not ours; log and go on
        log.warning("Could not release uid %s of instance %s in Ganeti's uid pool: %s",
                    text, name, err)
