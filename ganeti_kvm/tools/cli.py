"""``ganeti-kvm``: the operator's command for the instances of this node.

Usage::

    ganeti-kvm [--run-dir DIR] [--debug] COMMAND ...

    start SPEC [--paused]     start the instance described by the JSON file SPEC
    list [--json]             the running instances (NAME PID MEMORY VCPUS STATE CPU)
    info NAME [--json]        one running instance
    console NAME              attach to its serial console (or say how to reach it)
    stop NAME [--force] [--timeout S]
                              ACPI power-down, forced after S seconds (default 60);
                              --force terminates QEMU at once
    reboot NAME               stop and start again with the saved parameters
    cleanup NAME              remove what a stopped instance left behind
    verify [--kvm-path PATH]  can this node run instances?  (exit 1 if not)
    migrate NAME --to TARGET_RUN_DIR [--address ADDR] [--non-live] [--timeout S]
                              move a running instance to another run directory
                              (another "node" on this machine) over TCP on ADDR

``--run-dir`` defaults to ``$GANETI_KVM_RUN_DIR`` or /var/run/ganeti/kvm-hypervisor.
Errors are one line on stderr (``ganeti-kvm: error: ...``) and exit status 1;
``--debug`` also prints the traceback and the library's debug log.  Usage
errors exit with status 2.

The instance spec (``start SPEC``) is a JSON object; see examples/instance.json:

``name`` (string, required)
    The instance name: 1-63 letters, digits, ``.``, ``-`` or ``_``.
``memory`` (integer, required)
    RAM in MiB.
``vcpus`` (integer, required)
    Number of virtual CPUs.
``disks`` (list, optional)
    Objects ``{"path": "/dev/vg/disk0", "mode": "rw"}``; ``mode`` is ``rw``
    (default) or ``ro``.  The first disk is ``/dev/vda`` in the guest.
``nics`` (list, optional)
    Objects ``{"mac": "aa:00:00:12:34:56", "ip": "192.0.2.10", "mode":
    "bridged", "link": "br0"}``; only ``mac`` is required; ``mode`` is
    ``bridged`` (default) or ``routed``; ``link`` is the bridge (bridged) or
    routing table (routed).
``tags`` (list of strings, optional)
    Instance tags (passed to the ifup hook).
``network_port`` (integer or null, optional)
    The VNC port (5900 + display) when ``hvparams.vnc_bind_address`` is set.
``hvparams`` (object, optional)
    Hypervisor parameters; the keys not given take the library defaults
    (:data:`ganeti_kvm.constants.HVC_DEFAULTS`), e.g. ``kvm_path``,
    ``kernel_path``, ``initrd_path``, ``root_path``, ``kernel_args``,
    ``kvm_flag``, ``serial_console``, ``migration_port``.
``_comment`` (anything, optional)
    Ignored; JSON has no comments.  Any other key is an error.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import socket
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from ganeti_kvm import __version__, errors, objects
from ganeti_kvm import constants as c
from ganeti_kvm.core.migration import MigrationStatus
from ganeti_kvm.host import paths
from ganeti_kvm.hv_kvm import KVMHypervisor

PROG = "ganeti-kvm"
DEFAULT_STOP_TIMEOUT = 60.0
COMMENT_KEY = "_comment"
SPEC_FIELDS = ("name", "memory", "vcpus", "disks", "nics", "tags", "network_port",
               "hvparams")
NIC_FIELDS = ("mac", "ip", "mode", "link")
DISK_FIELDS = ("path", "mode")
_MAC_RE = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")

log = logging.getLogger(PROG)


class CliError(Exception):
    """An error the command reports as one line (exit status 1)."""


class SpecError(CliError):
    """The instance spec is not valid; the message names the field."""


# --- the instance spec -----------------------------------------------------------

def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _kind(value: Any) -> str:
    """JSON's name for the type of ``value`` (for messages)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _check_keys(data: dict[str, Any], allowed: Sequence[str], where: str) -> None:
    unknown = sorted(set(data) - set(allowed) - {COMMENT_KEY})
    if unknown:
        raise SpecError(f"{where}: unknown field(s) {', '.join(unknown)} "
                        f"(known: {', '.join(allowed)})")


def _positive_int(data: dict[str, Any], key: str) -> int:
    if key not in data:
        raise SpecError(f"field '{key}' is missing (a whole number greater than zero)")
    value = data[key]
    if not _is_int(value) or value <= 0:
        raise SpecError(f"field '{key}' must be a whole number greater than zero, "
                        f"not {value!r}")
    return value


def _optional_list(data: dict[str, Any], key: str) -> list[Any]:
    value = data.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise SpecError(f"field '{key}' must be a list, not {_kind(value)}")
    return value


def _parse_disk(index: int, item: Any) -> tuple[objects.Disk, str]:
    where = f"disks[{index}]"
    if not isinstance(item, dict):
        raise SpecError(f"field '{where}' must be an object, not {_kind(item)}")
    _check_keys(item, DISK_FIELDS, f"field '{where}'")
    path = item.get("path")
    if not isinstance(path, str) or not path:
        raise SpecError(f"field '{where}.path' must be a non-empty string, not {path!r}")
    mode = item.get("mode", c.DISK_RDWR)
    if mode not in c.DISK_ACCESS_SET:
        raise SpecError(f"field '{where}.mode' must be 'rw' or 'ro', not {mode!r}")
    return objects.Disk(mode=mode, iv_name=f"disk/{index}"), path


def _parse_nic(index: int, item: Any) -> objects.NIC:
    where = f"nics[{index}]"
    if not isinstance(item, dict):
        raise SpecError(f"field '{where}' must be an object, not {_kind(item)}")
    _check_keys(item, NIC_FIELDS, f"field '{where}'")
    mac = item.get("mac")
    if not isinstance(mac, str) or not _MAC_RE.fullmatch(mac):
        raise SpecError(f"field '{where}.mac' must be a MAC address like "
                        f"aa:00:00:12:34:56, not {mac!r}")
    ip = item.get("ip")
    if ip is not None and not isinstance(ip, str):
        raise SpecError(f"field '{where}.ip' must be a string or null, not {ip!r}")
    mode = item.get("mode", c.NICC_DEFAULTS[c.NIC_MODE])
    if mode not in c.NIC_VALID_MODES:
        raise SpecError(f"field '{where}.mode' must be one of "
                        f"{', '.join(sorted(c.NIC_VALID_MODES))}, not {mode!r}")
    link = item.get("link", c.NICC_DEFAULTS[c.NIC_LINK])
    if not isinstance(link, str):
        raise SpecError(f"field '{where}.link' must be a string, not {link!r}")
    return objects.NIC(mac=mac.lower(), ip=ip or None,
                       nicparams={c.NIC_MODE: mode, c.NIC_LINK: link})


def parse_spec(data: Any) -> tuple[objects.Instance, list[tuple[objects.Disk, str]]]:
    """Check an instance spec (the decoded JSON) and build what StartInstance takes.

    Returns the instance and its ``(disk, path)`` block devices; raises
    :class:`SpecError` naming the first bad field.
    """
    if not isinstance(data, dict):
        raise SpecError(f"the spec must be a JSON object, not {_kind(data)}")
    _check_keys(data, SPEC_FIELDS, "spec")
    if "name" not in data:
        raise SpecError("field 'name' is missing")
    try:
        name = paths.check_instance_name(data["name"])
    except errors.HypervisorError as err:
        raise SpecError(f"field 'name': {err}") from err
    memory = _positive_int(data, "memory")
    vcpus = _positive_int(data, "vcpus")
    block_devices = [_parse_disk(i, d) for i, d in enumerate(_optional_list(data, "disks"))]
    nics = [_parse_nic(i, n) for i, n in enumerate(_optional_list(data, "nics"))]
    tags = _optional_list(data, "tags")
    for index, tag in enumerate(tags):
        if not isinstance(tag, str) or not tag:
            raise SpecError(f"field 'tags[{index}]' must be a non-empty string, not {tag!r}")
    port = data.get("network_port")
    if port is not None and (not _is_int(port) or not 0 < port < 65536):
        raise SpecError(f"field 'network_port' must be a port number (1-65535) or null, "
                        f"not {port!r}")
    hvparams = data.get("hvparams")
    if hvparams is None:
        hvparams = {}
    if not isinstance(hvparams, dict):
        raise SpecError(f"field 'hvparams' must be an object, not {_kind(hvparams)}")
    unknown = sorted(set(hvparams) - set(KVMHypervisor.PARAMETERS))
    if unknown:
        raise SpecError(f"field 'hvparams': unknown parameter(s) {', '.join(unknown)}")
    try:
        KVMHypervisor.CheckParameterSyntax(KVMHypervisor.FillHvParams(hvparams))
    except errors.GenericError as err:
        raise SpecError(f"field 'hvparams': {err}") from err
    instance = objects.Instance(
        name=name, primary_node=socket.gethostname(), hvparams=dict(hvparams),
        beparams={c.BE_MEMORY: memory, c.BE_VCPUS: vcpus}, nics=nics,
        disks=[disk for disk, _ in block_devices], tags=list(tags), network_port=port)
    return instance, block_devices


def load_spec(path: str) -> tuple[objects.Instance, list[tuple[objects.Disk, str]]]:
    """Read and check the spec file at ``path``; errors name the file."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except OSError as err:
        raise CliError(f"cannot read spec {path}: {err.strerror or err}") from err
    except ValueError as err:
        raise CliError(f"spec {path} is not valid JSON: {err}") from err
    try:
        return parse_spec(data)
    except SpecError as err:
        raise SpecError(f"spec {path}: {err}") from err


# --- progress of a migration -------------------------------------------------------

def human_bytes(count: float) -> str:
    """``count`` bytes in binary units: ``512 B``, ``1.5 MiB``."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_duration(seconds: float) -> str:
    """``seconds`` as ``M:SS`` (or ``H:MM:SS``)."""
    total = max(0, round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class MigrationProgress:
    """Shows a migration's progress: a live bar on a terminal, else a line a second."""

    BAR_WIDTH = 24
    RATE_WINDOW = 0.1  # seconds between the samples a rate is computed from

    def __init__(self, stream: TextIO, tty: bool | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 interval: float | None = None) -> None:
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self.clock = clock
        # A terminal line is redrawn up to 10 times a second; a log gets a line a second.
        self.interval = interval if interval is not None else 0.1 if self.tty else 1.0
        self._last_print: float | None = None
        self._last_sample: tuple[float, int] | None = None
        self._rate: float | None = None
        self._width = 0

    def __call__(self, status: MigrationStatus) -> None:
        now = self.clock()
        self._update_rate(now, status.transferred)
        if self._last_print is not None and now - self._last_print < self.interval:
            return
        self._last_print = now
        line = self.format(status)
        if self.tty:
            padding = " " * max(0, self._width - len(line))
            self._width = len(line)
            self.stream.write(f"\r{line}{padding}")
        else:
            self.stream.write(f"{line}\n")
        self.stream.flush()

    def _update_rate(self, now: float, transferred: int) -> None:
        if self._last_sample is None:
            self._last_sample = (now, transferred)
            return
        then, before = self._last_sample
        if now - then < self.RATE_WINDOW:
            return
        rate = max(0.0, (transferred - before) / (now - then))
        self._rate = rate if self._rate is None else 0.5 * self._rate + 0.5 * rate
        self._last_sample = (now, transferred)

    def format(self, status: MigrationStatus) -> str:
        """One line: state, percent, bytes done/total, rate, time remaining."""
        if status.total > 0:
            done = min(max(status.total - status.remaining, 0), status.total)
            fraction = done / status.total
        else:
            done, fraction = status.transferred, 0.0
        percent = f"{100 * fraction:3.0f}%"
        sizes = f"{human_bytes(done)}/{human_bytes(status.total)}"
        rate = f"{human_bytes(self._rate)}/s" if self._rate else "-- B/s"
        if self._rate:
            eta = f"{human_duration(status.remaining / self._rate)} left"
        else:
            eta = "--:-- left"
        if self.tty:
            filled = int(fraction * self.BAR_WIDTH)
            bar = "#" * filled + "." * (self.BAR_WIDTH - filled)
            return f"[{bar}] {percent} {sizes} {rate} {eta}"
        return f"migration {status.status}: {percent.strip()} {sizes}, {rate}, {eta}"

    def finish(self) -> None:
        """End the live line (on a terminal) so later output starts on a fresh line."""
        if self.tty and self._last_print is not None:
            self.stream.write("\n")
            self.stream.flush()


# --- the commands -----------------------------------------------------------------

def _hypervisor(args: argparse.Namespace) -> KVMHypervisor:
    return KVMHypervisor(run_dir=args.run_dir)


def _name(value: str) -> str:
    """argparse type of an instance name: refuses names the library would refuse."""
    try:
        return paths.check_instance_name(value)
    except errors.HypervisorError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def _seconds(value: str) -> float:
    """argparse type of a timeout: a number of seconds greater than zero."""
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0 or seconds == float("inf"):
        raise argparse.ArgumentTypeError(f"not a number of seconds greater than zero: {value!r}")
    return seconds


INFO_FIELDS = ("name", "pid", "memory", "vcpus", "state", "cpu_time")


def _info_dict(info: Sequence[Any]) -> dict[str, Any]:
    return dict(zip(INFO_FIELDS, info, strict=True))


def cmd_start(args: argparse.Namespace) -> int:
    instance, block_devices = load_spec(args.spec)
    _hypervisor(args).StartInstance(instance, block_devices, startup_paused=args.paused)
    print(f"Instance {instance.ToDict()['name']} started{' (paused)' if args.paused else ''}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    rows = [_info_dict(info) for info in _hypervisor(args).GetAllInstancesInfo()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = [("NAME", "PID", "MEMORY", "VCPUS", "STATE", "CPU")]
    table += [(r["name"], str(r["pid"]), str(r["memory"]), str(r["vcpus"]), r["state"],
               f"{r['cpu_time']:.1f}") for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip())
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    hv = _hypervisor(args)
    info = hv.GetInstanceInfo(args.name)
    if info is None:
        raise CliError(f"instance {args.name} is not running")
    data = _info_dict(info)
    record = hv.node.load_record(args.name)
    if record is not None:
        data["qemu_version"] = ".".join(str(v) for v in record.qemu_version) or None
        data["kvm_path"] = record.hvparams.get(c.HV_KVM_PATH)
        data["disks"] = [d.get("path") for d in record.disks]
        data["nics"] = [n.get("mac") for n in record.nics]
        data["tags"] = list(record.tags)
        data["network_port"] = record.network_port
        data["migration_port"] = record.hvparams.get(c.HV_MIGRATION_PORT)
    data["run_dir"] = hv.node.layout.root
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    for key, value in data.items():
        if isinstance(value, list):
            value = ", ".join(str(v) for v in value) or "-"
        elif isinstance(value, float):
            value = f"{value:.2f}"
        elif value is None:
            value = "-"
        print(f"{key}: {value}")
    return 0


def cmd_console(args: argparse.Namespace) -> int:
    hv = _hypervisor(args)
    if hv.GetInstanceInfo(args.name) is None:
        raise CliError(f"instance {args.name} is not running")
    record = hv.node.load_record(args.name)
    if record is None:
        raise CliError(f"instance {args.name} has no runtime record in "
                       f"{hv.node.layout.root}")
    instance = objects.Instance(name=args.name, primary_node=socket.gethostname(),
                                network_port=record.network_port)
    console = KVMHypervisor.GetInstanceConsole(instance, record.hvparams, record.beparams,
                                               run_dir=hv.node.layout.root)
    console.Validate()
    data = console.ToDict()
    kind = data["kind"]
    if kind == c.CONS_SSH:
        # The command runs on the instance's node, which is this one.
        command = [str(part) for part in data["command"]]
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(command[0], command)
        raise AssertionError("unreachable")  # pragma: no cover - execv does not return
    if kind in (c.CONS_VNC, c.CONS_SPICE):
        print(f"Instance {args.name} has a {kind.upper()} console:")
        for key in ("host", "port", "display"):
            if data.get(key) is not None:
                print(f"{key}: {data[key]}")
        return 0
    print(data["message"])
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    hv = _hypervisor(args)
    was_running = hv.GetInstanceInfo(args.name) is not None
    if args.force:
        hv.StopInstance(None, force=True, name=args.name)
    else:
        # The library reads ACPI from the instance's saved record.
        hv.StopInstance(objects.Instance(name=args.name), timeout=args.timeout)
    if was_running:
        print(f"Instance {args.name} stopped")
    else:
        print(f"Instance {args.name} was not running (cleaned up what it left)")
    return 0


def cmd_reboot(args: argparse.Namespace) -> int:
    _hypervisor(args).RebootInstance(objects.Instance(name=args.name))
    print(f"Instance {args.name} rebooted")
    return 0


def cmd_cleanup(args: argparse.Namespace) -> int:
    _hypervisor(args).CleanupInstance(args.name)
    print(f"Instance {args.name} cleaned up")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    problem = _hypervisor(args).Verify(args.kvm_path)
    if problem:
        raise CliError(problem)
    print("OK")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    source = _hypervisor(args)
    target = KVMHypervisor(run_dir=args.to)
    if os.path.realpath(source.node.layout.root) == os.path.realpath(target.node.layout.root):
        raise CliError(f"the target run directory {args.to} is the source's own")
    instance = objects.Instance(name=args.name)
    info = source.MigrationInfo(instance)
    target.AcceptInstance(instance, info, args.address)
    progress = MigrationProgress(sys.stderr)
    started = time.monotonic()
    try:
        source.MigrateInstance(instance, args.address, not args.non_live,
                               timeout=args.timeout, progress=progress)
    except BaseException:
        progress.finish()
        try:
            target.FinalizeMigration(instance, info, False)
        except Exception as err:  # noqa: BLE001 - the original error matters more
            log.error("Cleaning up the target after the failed migration failed: %s", err)
        raise
    progress.finish()
    target.FinalizeMigration(instance, info, True)
    print(f"Instance {args.name} migrated to {target.node.layout.root} "
          f"in {time.monotonic() - started:.1f} s")
    return 0


def cmd_ganeti(args: argparse.Namespace) -> int:
    """``ganeti install|remove|status``: switch this node's Ganeti 3.x KVM driver."""
    import shlex

    from ganeti_kvm.ganeti3 import install

    if args.action == "status":
        for version, driver in sorted(install.status(args.root).items()):
            print(f"Ganeti {version}: {driver}")
        return 0
    if args.action in ("adopt", "export"):
        from ganeti_kvm.ganeti3 import bundled

        switch = bundled.adopt_all if args.action == "adopt" else bundled.export_all
        for name in switch(args.run_dir or paths.default_run_dir()):
            print(f"instance {name}: switched without a restart")
        return 0
    restart: bool | list[str] = not args.no_restart
    if args.restart_command:
        restart = shlex.split(args.restart_command)
    package = install.DEBIAN_PACKAGE if args.packaged else None
    if args.action == "install":
        report = install.install(args.root, restart=restart, run_dir=args.run_dir,
                                 package=package, restart_always=args.restart_always)
    else:
        if args.restart_always:
            raise CliError("--restart-always is an option of 'ganeti-kvm ganeti install'")
        report = install.remove(args.root, restart=restart, run_dir=args.run_dir,
                                package=package)
    for line in report.lines():
        print(line)
    return 0


# --- the parser and main ------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``ganeti-kvm``."""
    # Global options are accepted before and after the command.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--run-dir", metavar="DIR", default=argparse.SUPPRESS,
                        help="the node's run directory (default: $GANETI_KVM_RUN_DIR "
                             f"or {c.DEFAULT_RUN_DIR})")
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks and the library's debug log")
    parser = argparse.ArgumentParser(
        prog=PROG, parents=[common],
        description="Run QEMU/KVM instances on this node.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, func: Callable[[argparse.Namespace], int],
            help_text: str) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, parents=[common], help=help_text, description=help_text)
        cmd.set_defaults(func=func)
        return cmd

    cmd = add("start", cmd_start, "start an instance described by a JSON spec file")
    cmd.add_argument("spec", metavar="SPEC", help="the JSON spec (see examples/instance.json)")
    cmd.add_argument("--paused", action="store_true",
                     help="start with the guest stopped before its first instruction")

    cmd = add("list", cmd_list, "list the running instances")
    cmd.add_argument("--json", action="store_true", help="print a JSON list")

    cmd = add("info", cmd_info, "show a running instance")
    cmd.add_argument("name", metavar="NAME", type=_name)
    cmd.add_argument("--json", action="store_true", help="print a JSON object")

    cmd = add("console", cmd_console, "attach to an instance's console")
    cmd.add_argument("name", metavar="NAME", type=_name)

    cmd = add("stop", cmd_stop, "stop an instance (ACPI power-down, then forced)")
    cmd.add_argument("name", metavar="NAME", type=_name)
    cmd.add_argument("--force", action="store_true", help="terminate QEMU at once")
    cmd.add_argument("--timeout", metavar="S", type=_seconds, default=DEFAULT_STOP_TIMEOUT,
                     help="seconds to wait for the ACPI power-down before terminating "
                          f"(default {DEFAULT_STOP_TIMEOUT:.0f})")

    cmd = add("reboot", cmd_reboot, "restart an instance with its saved parameters")
    cmd.add_argument("name", metavar="NAME", type=_name)

    cmd = add("cleanup", cmd_cleanup, "remove what a stopped instance left behind")
    cmd.add_argument("name", metavar="NAME", type=_name)

    cmd = add("verify", cmd_verify, "check that this node can run instances")
    cmd.add_argument("--kvm-path", metavar="PATH", default=None,
                     help=f"the QEMU binary to check (default {c.KVM_PATH})")

    cmd = add("migrate", cmd_migrate,
              "migrate a running instance to another run directory on this machine")
    cmd.add_argument("name", metavar="NAME", type=_name)
    cmd.add_argument("--to", metavar="TARGET_RUN_DIR", required=True,
                     help="the target node's run directory")
    cmd.add_argument("--address", default="127.0.0.1",
                     help="the address the target listens on (default 127.0.0.1)")
    cmd.add_argument("--non-live", action="store_true",
                     help="stop the guest during the migration")
    cmd.add_argument("--timeout", metavar="S", type=_seconds, default=None,
                     help="cancel the migration after S seconds (default: from the RAM "
                          "size and migration_bandwidth)")

    cmd = add("ganeti", cmd_ganeti,
              "make ganeti-kvm the KVM driver of this node's Ganeti 3.x, or undo it")
    cmd.add_argument("action", choices=("install", "remove", "status", "adopt", "export"),
                     help="install: divert Ganeti's driver and switch the running "
                          "instances; remove: restore it byte for byte; status: show which; "
                          "adopt/export: only switch the running instances of --run-dir to "
                          "ganeti-kvm's / the bundled driver's runtime files (install and "
                          "remove do it; for nodes whose run directory is elsewhere)")
    cmd.add_argument("--root", metavar="DIR", default="/",
                     help="work on the system under DIR, like dpkg --root (default /); "
                          "nothing is restarted unless --restart-command says so")
    cmd.add_argument("--packaged", action="store_true",
                     help="the Debian package's way (its maintainer scripts use it): "
                          "diversions owned by the package ganeti-kvm, no .pth file, the "
                          "node daemon restarted through invoke-rc.d or deb-systemd-invoke "
                          "only if it runs, and no Ganeti is not an error")
    cmd.add_argument("--restart-always", action="store_true",
                     help="install: restart the node daemon even when every driver is "
                          "switched already, so that it loads this library's code (the "
                          "package's postinst uses it on an upgrade)")
    restart = cmd.add_mutually_exclusive_group()
    restart.add_argument("--no-restart", action="store_true",
                         help="do not restart ganeti-noded (restart it yourself)")
    restart.add_argument("--restart-command", metavar="CMD", default=None,
                         help="how to restart the node daemon (default: systemctl restart "
                              "ganeti-noded, else /etc/init.d/ganeti restart ganeti-noded)")
    return parser


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    if isinstance(err, (errors.GenericError, CliError)):
        return text or type(err).__name__
    if isinstance(err, OSError) and err.strerror:
        where = f": {err.filename}" if err.filename else ""
        return f"{err.strerror}{where}"
    return f"unexpected {type(err).__name__}: {text} (run with --debug for the traceback)"


def main(argv: list[str] | None = None) -> int:
    """Run ``ganeti-kvm`` with ``argv`` (default: the process's); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # usage errors (2), --help and --version (0)
        return exit_.code if isinstance(exit_.code, int) else 2
    args.run_dir = getattr(args, "run_dir", None)
    args.debug = getattr(args, "debug", False)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format=f"{PROG}: %(levelname)s: %(name)s: %(message)s" if args.debug
        else f"{PROG}: %(levelname)s: %(message)s")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if args.debug:
            traceback.print_exc()
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - every error is one line unless --debug
        if args.debug:
            traceback.print_exc()
        print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr)
        return 1
