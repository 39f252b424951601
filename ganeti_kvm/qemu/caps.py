"""What a QEMU binary can do, probed once per binary and answered by name.

The rest of the library never compares QEMU versions to decide how to spell
an option; it asks a :class:`QemuCaps` (``caps.has_run_with_user``,
``caps.has_device("virtio-net-pci")``, ...).  :func:`probe` builds one by
running the binary's help commands (``-version``, ``-help``,
``-machine help``, ``-device help``, ``-accel help``, ``-netdev help``)
concurrently, and caches the answer twice:

* in this process, keyed by the binary's real path and ``stat`` identity, so
  a repeated call with an unchanged binary runs no process at all;
* optionally in a JSON file under ``cache_dir``, so that other processes on
  the node (every ``gnt-instance`` call is a new process) run no probe either.

Everything that turns QEMU's output into data is a pure function
(``parse_*``) and is tested against the real help texts of QEMU 7.2 and 10.0.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import subprocess
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ganeti_kvm import errors
from ganeti_kvm.host import fsutil

logger = logging.getLogger(__name__)

#: Seconds one uncached probe may take in total before the binary is declared broken.
PROBE_TIMEOUT = 20.0

#: Format of the on-disk cache document.  Bump it whenever a parser changes
#: what it extracts, so that caches written by an older library are re-probed.
CACHE_FORMAT = 3
CACHE_KIND = "ganeti-kvm-qemu-caps"
CACHE_PREFIX = "qemu-caps-"

#: The probe invocations: name -> arguments after the binary.  Every one of
#: them prints and exits before QEMU creates a machine, so no VM, display,
#: accelerator or default device is ever set up and no flags such as
#: ``-machine none`` are needed.
PROBE_COMMANDS: dict[str, tuple[str, ...]] = {
    "version": ("-version",),
    "help": ("-help",),
    "machine": ("-machine", "help"),
    "device": ("-device", "help"),
    "accel": ("-accel", "help"),
    "netdev": ("-netdev", "help"),
    # The one QMP question: a QEMU without a machine answers on stdio what
    # PROBE_INPUTS asks (the CPU models for -cpu), then quits.
    "cpu": ("-machine", "none", "-nodefaults", "-no-user-config", "-display", "none", "-S",
            "-qmp", "stdio"),
}
#: What the probe commands that read their standard input are given.
PROBE_INPUTS: dict[str, bytes] = {
    "cpu": b'{"execute": "qmp_capabilities"}\n{"execute": "query-cpu-definitions"}\n'
           b'{"execute": "quit"}\n',
}

_VERSION_RE = re.compile(r"\bversion\s+(\d+)\.(\d+)(?:\.(\d+))?")
# An option line: a dash at column 0 followed by the option name.
_OPTION_RE = re.compile(r"-([A-Za-z0-9][A-Za-z0-9_.-]*)")
# Further names of the same entry: "-h or -help", "-fda/-fdb file".
_ALIAS_RE = re.compile(r"(?:/|\s+or\s+)-([A-Za-z0-9][A-Za-z0-9_.-]*)")
# A key of a "[key=value][,key=value]" synopsis; "uid:gid" or "<file>" are not keys.
_SYNOPSIS_KEY_RE = re.compile(r"(?:^|[\s\[,{|])([A-Za-z][A-Za-z0-9_.-]*)=")
# A description line that documents one key: "chroot=dir chroot to dir ...".
_DESCRIPTION_KEY_RE = re.compile(r"^([A-Za-z][A-Za-z0-9_.-]*)=\S")
_DEVICE_NAME_RE = re.compile(r'^name\s+"([^"]+)"')
_DEVICE_ALIAS_RE = re.compile(r'\balias\s+"([^"]+)"')
_MACHINE_ALIAS_RE = re.compile(r"\(alias of ([^\s)]+)\)")
_MACHINE_DEFAULT_RE = re.compile(r"\(default\)")
_WORD_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
# A machine type name as it may reach ``-machine``: no comma, ``=`` or space.
_MACHINE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# A versioned machine type: family and version (``pc-i440fx`` and ``7.2``).
_MACHINE_VERSION_RE = re.compile(r"(.+)-(\d+)\.(\d+)")

#: The alias the 2011 driver's command line left QEMU to resolve (no ``-M``).
DEFAULT_MACHINE = "pc"
#: What QOM appends to a machine type's name (``qom-get /machine type``).
QOM_MACHINE_SUFFIX = "-machine"


# --- the capabilities -------------------------------------------------------------------------


@dataclass(frozen=True)
class QemuCaps:
    """The capabilities of one QEMU binary, as reported by its help output.

    Ask by name (``has_option``, ``has_device``, the ``has_*`` properties)
    rather than by version: distributions backport and remove features.
    """

    path: str
    version: tuple[int, int, int]
    version_text: str
    options: frozenset[str]
    run_with_keys: frozenset[str] = frozenset()
    machines: frozenset[str] = frozenset()
    default_machine: str | None = None
    machine_aliases: tuple[tuple[str, str], ...] = ()
    devices: frozenset[str] = frozenset()
    accels: frozenset[str] = frozenset()
    netdevs: frozenset[str] = frozenset()
    tap_vhost: bool = False
    # The CPU models -cpu takes (QMP query-cpu-definitions)
    cpu_models: frozenset[str] = frozenset()
    # Disk AIO modes beyond threads and native that this QEMU opened a file
    # with when probed (``io_uring``); see :func:`probe_aio_modes`.
    aio_modes: frozenset[str] = frozenset()
    # The keys of -spice (QMP query-command-line-options), empty if this QEMU
    # cannot run a SPICE server; see :func:`probe_spice`.
    spice_keys: frozenset[str] = frozenset()
    # The chardev backends (QMP query-chardev-backends) once SPICE's are loaded
    chardev_backends: frozenset[str] = frozenset()

    # --- generic questions -----------------------------------------------------------------

    def has_option(self, name: str) -> bool:
        """Whether the binary accepts the top-level option ``name`` (with or without dash)."""
        return name.lstrip("-") in self.options

    def has_device(self, name: str) -> bool:
        """Whether ``-device name`` names a device model (or alias) of this binary."""
        return name in self.devices

    def has_machine(self, name: str) -> bool:
        """Whether ``-machine name`` names a machine type (or alias such as ``pc``)."""
        return name in self.machines

    def has_accel(self, name: str) -> bool:
        """Whether the accelerator ``name`` (``kvm``, ``tcg``) is compiled in."""
        return name in self.accels

    def has_aio(self, mode: str) -> bool:
        """Whether disks can use ``aio=mode``: threads and native always, others if probed."""
        return mode in ("threads", "native") or mode in self.aio_modes

    def has_cpu_model(self, name: str) -> bool:
        """Whether ``-cpu name`` names a CPU model of this QEMU (``qemu64``, ``max``...)."""
        return name in self.cpu_models

    @property
    def has_spice(self) -> bool:
        """Whether this QEMU can run a SPICE server (``-spice``)."""
        return bool(self.spice_keys)

    def has_spice_key(self, name: str) -> bool:
        """Whether ``-spice`` takes the key ``name`` (``tls-ciphers``, ``streaming-video``)."""
        return name in self.spice_keys

    def has_chardev_backend(self, name: str) -> bool:
        """Whether ``-chardev name,...`` names a backend (``spicevmc``, ``socket``)."""
        return name in self.chardev_backends

    def has_netdev_backend(self, name: str) -> bool:
        """Whether ``-netdev name,...`` names a network backend type (``tap``, ``bridge``)."""
        return name in self.netdevs

    def resolve_machine(self, name: str) -> str:
        """The versioned machine type behind an alias (``pc`` -> ``pc-i440fx-7.2``).

        Names that are not aliases come back unchanged.  Migration pins the
        resolved name so that the destination emulates the same machine.
        """
        return dict(self.machine_aliases).get(name, name)

    def pinned_machine(self, alias: str = DEFAULT_MACHINE) -> str | None:
        """The versioned type this binary runs for ``alias``, or None if it names none.

        This is ``-machine help``'s own alias table, the one QEMU applies to
        ``-machine pc``: a new start pins its answer, so that every later
        start of the instance (reboot, migration target) emulates the same
        machine whatever QEMU the node has by then.
        """
        resolved = self.resolve_machine(alias)
        return resolved if resolved != alias and resolved in self.machines else None

    def missing_machine(self, machine: str) -> str | None:
        """Why this binary cannot run machine type ``machine``, or None if it can.

        The reason names the binary, its version and the newest type of the
        same family it has (``pc-i440fx-7.2`` for ``pc-i440fx-10.0``).
        """
        if machine in self.machines:
            return None
        version = ".".join(map(str, self.version))
        reason = f"QEMU {self.path} (version {version}) has no machine type {machine}"
        family = _machine_family(machine)
        same = [(number, m) for m in self.machines
                if _machine_family(m) == family and (number := _machine_version(m))]
        if same:
            reason += f" (its newest {family}-* type is {max(same)[1]})"
        return reason

    # --- named options the driver asks about --------------------------------------------------

    @property
    def throttles_tcg_guests_safely(self) -> bool:
        """Whether throttling a TCG guest's vCPUs during a migration keeps its RAM intact.

        QEMU 7.2 did not: guests under TCG migrated with auto-converge's
        throttle crashed on the target in 4 of 7 runs (tests/test_convergence.py,
        "kernel BUG", "Fatal exception in interrupt"), while post-copy moved
        them intact; 10.0 moved them intact in every run.  Under KVM the dirty
        log comes from the kernel and this does not apply.
        """
        return self.version >= (10, 0, 0)

    @property
    def has_run_with(self) -> bool:
        """Whether ``-run-with`` exists (QEMU >= 9.0)."""
        return "run-with" in self.options

    @property
    def has_run_with_user(self) -> bool:
        """Whether ``-run-with user=`` can drop privileges (replaces ``-runas``)."""
        return self.has_run_with and "user" in self.run_with_keys

    @property
    def has_run_with_chroot(self) -> bool:
        """Whether ``-run-with chroot=`` exists (replaces ``-chroot``)."""
        return self.has_run_with and "chroot" in self.run_with_keys

    @property
    def has_runas(self) -> bool:
        """Whether the old ``-runas user`` option exists (removed in QEMU 9.1)."""
        return "runas" in self.options

    @property
    def has_chroot(self) -> bool:
        """Whether the old ``-chroot dir`` option exists (removed in QEMU 9.1)."""
        return "chroot" in self.options

    @property
    def has_no_acpi(self) -> bool:
        """Whether ``-no-acpi`` exists (removed in QEMU 9.0; use ``-machine acpi=off``)."""
        return "no-acpi" in self.options

    @property
    def has_rtc(self) -> bool:
        """Whether ``-rtc`` exists (the replacement of ``-localtime``)."""
        return "rtc" in self.options

    @property
    def has_localtime(self) -> bool:
        """Whether the ancient ``-localtime`` option exists."""
        return "localtime" in self.options

    @property
    def has_netdev(self) -> bool:
        """Whether the ``-netdev`` option exists (the replacement of ``-net``)."""
        return "netdev" in self.options

    @property
    def has_display(self) -> bool:
        """Whether ``-display`` exists."""
        return "display" in self.options

    @property
    def has_usbdevice(self) -> bool:
        """Whether the legacy ``-usbdevice`` option exists."""
        return "usbdevice" in self.options

    @property
    def has_audiodev(self) -> bool:
        """Whether ``-audiodev`` exists (sound cards then take ``audiodev=ID``)."""
        return "audiodev" in self.options

    @property
    def has_soundhw(self) -> bool:
        """Whether the old ``-soundhw`` option exists (removed in QEMU 7.1)."""
        return "soundhw" in self.options

    @property
    def has_vga(self) -> bool:
        """Whether ``-vga`` exists (the machine then creates the display adapter)."""
        return "vga" in self.options

    # --- serialisation ---------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible dict (sets become sorted lists); inverse of :meth:`from_dict`."""
        return {
            "path": self.path,
            "version": list(self.version),
            "version_text": self.version_text,
            "options": sorted(self.options),
            "run_with_keys": sorted(self.run_with_keys),
            "machines": sorted(self.machines),
            "default_machine": self.default_machine,
            "machine_aliases": [list(pair) for pair in self.machine_aliases],
            "devices": sorted(self.devices),
            "accels": sorted(self.accels),
            "netdevs": sorted(self.netdevs),
            "tap_vhost": self.tap_vhost,
            "cpu_models": sorted(self.cpu_models),
            "aio_modes": sorted(self.aio_modes),
            "spice_keys": sorted(self.spice_keys),
            "chardev_backends": sorted(self.chardev_backends),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QemuCaps:
        """Rebuild capabilities from :meth:`to_dict` output.

        Raises :class:`ValueError` when the data is incomplete or mistyped
        (a damaged cache file), so the caller can probe again.
        """
        try:
            version = tuple(int(part) for part in data["version"])
            if len(version) != 3:
                raise ValueError(f"version must have three parts, not {data['version']!r}")
            aliases = tuple((_text(a), _text(b)) for a, b in data.get("machine_aliases", ()))
            default = data.get("default_machine")
            return cls(
                path=_text(data["path"]),
                version=(version[0], version[1], version[2]),
                version_text=_text(data["version_text"]),
                options=_names(data["options"]),
                run_with_keys=_names(data.get("run_with_keys", ())),
                machines=_names(data.get("machines", ())),
                default_machine=None if default is None else _text(default),
                machine_aliases=aliases,
                devices=_names(data.get("devices", ())),
                accels=_names(data.get("accels", ())),
                netdevs=_names(data.get("netdevs", ())),
                tap_vhost=_flag(data.get("tap_vhost", False)),
                cpu_models=_names(data.get("cpu_models", ())),
                aio_modes=_names(data.get("aio_modes", ())),
                spice_keys=_names(data.get("spice_keys", ())),
                chardev_backends=_names(data.get("chardev_backends", ())),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"Invalid QEMU capabilities record: {err!r}") from err


def is_machine_name(name: object) -> bool:
    """Whether ``name`` can be a machine type on QEMU's command line (no ``,``/``=``)."""
    return isinstance(name, str) and _MACHINE_NAME_RE.fullmatch(name) is not None


def _machine_family(name: str) -> str:
    match = _MACHINE_VERSION_RE.fullmatch(name)
    return match.group(1) if match else name


def _machine_version(name: str) -> tuple[int, int] | None:
    match = _MACHINE_VERSION_RE.fullmatch(name)
    return (int(match.group(2)), int(match.group(3))) if match else None


def machine_from_qom_type(type_name: object) -> str | None:
    """The machine type from ``qom-get /machine type`` (``pc-i440fx-7.2-machine``).

    This is what a running QEMU really emulates.  ``query-machines`` would
    be the documented way, but QEMU 7.2 and 10.0 do not fill its
    ``is-current`` flag, so the object's QOM type is asked instead.
    None when the answer is not a machine type name.
    """
    if not isinstance(type_name, str) or not type_name.endswith(QOM_MACHINE_SUFFIX):
        return None
    name = type_name[:-len(QOM_MACHINE_SUFFIX)]
    return name if is_machine_name(name) else None


def machine_of_version(version: Sequence[int], alias: str = DEFAULT_MACHINE) -> str | None:
    """The type upstream QEMU ``version`` resolves ``pc`` to (7.2.22 -> ``pc-i440fx-7.2``).

    Upstream QEMU points ``pc`` at the i440FX type of its own major.minor
    release; distributions that patch the table (RHEL's ``pc-i440fx-rhel7.6.0``)
    do not, so this is only a best guess for records that say nothing better.
    """
    if alias != DEFAULT_MACHINE or len(version) < 2:
        return None
    return f"pc-i440fx-{int(version[0])}.{int(version[1])}"


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value


def _flag(value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected a boolean, got {value!r}")
    return value


def _names(values: object) -> frozenset[str]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise TypeError(f"expected a list of names, got {values!r}")
    return frozenset(_text(value) for value in values)


# --- pure parsers ---------------------------------------------------------------------------


@dataclass(frozen=True)
class HelpEntry:
    """One option line of ``qemu -help`` with the lines that belong to it.

    ``synopsis`` is the option line joined with its wrapped syntax
    continuation lines (those starting with ``[``, ``,``, ``{`` or ``|``);
    ``description`` holds the indented prose below it.
    """

    names: tuple[str, ...]
    synopsis: str
    description: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """The option's first (canonical) name, without the dash."""
        return self.names[0]


def _lines(text: str) -> list[str]:
    """Lines of ``text`` with Windows/Mac line ends and trailing blanks removed."""
    return [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]


def parse_version(text: str) -> tuple[int, int, int]:
    """The ``(major, minor, micro)`` version from ``qemu -version`` output.

    Raises :class:`ValueError` if the text holds no version number.
    """
    match = _VERSION_RE.search(text)
    if match is None:
        raise ValueError(f"No QEMU version number in {text.strip()[:200]!r}")
    major, minor, micro = match.groups()
    return int(major), int(minor), int(micro or 0)


def version_line(text: str) -> str:
    """The first non-empty line of ``qemu -version`` output (what a human would quote)."""
    for line in _lines(text):
        if line.strip():
            return line.strip()
    return ""


def parse_help_entries(text: str) -> tuple[HelpEntry, ...]:
    """Split ``qemu -help`` output into one :class:`HelpEntry` per option line.

    An entry starts at a line with a dash in column 0.  Indented lines
    continue the current entry: they are never options themselves, even if
    they start with ``-`` after the indentation (QEMU 10.2 wraps long lines
    this way).  Blank lines and unindented text (section headers such as
    ``Network options:``, notes, the key binding table) end the current
    entry and are otherwise ignored.  An option that appears on several lines
    (``-netdev user,...``, ``-netdev tap,...``) yields several entries.
    """
    entries: list[HelpEntry] = []
    names: tuple[str, ...] = ()
    synopsis: list[str] = []
    description: list[str] = []

    def flush() -> None:
        if names:
            entries.append(HelpEntry(names, " ".join(synopsis), tuple(description)))

    for line in _lines(text):
        if line[:1] == "-":
            match = _OPTION_RE.match(line)
            flush()
            names, synopsis, description = (), [], []
            if match is None:
                continue
            found = [match.group(1)]
            rest = line[match.end():]
            while alias := _ALIAS_RE.match(rest):
                found.append(alias.group(1))
                rest = rest[alias.end():]
            names = tuple(found)
            synopsis = [line.strip()]
        elif line[:1] in (" ", "\t"):
            if not names:
                continue
            stripped = line.strip()
            if not description and stripped[:1] in ("[", ",", "{", "|"):
                synopsis.append(stripped)
            else:
                description.append(stripped)
        else:
            flush()
            names, synopsis, description = (), [], []
    flush()
    return tuple(entries)


def parse_help_options(text: str) -> frozenset[str]:
    """The names of all top-level options in ``qemu -help`` output, without the dash."""
    return frozenset(name for entry in parse_help_entries(text) for name in entry.names)


def parse_option_keys(help_text: str, option: str, kind: str | None = None) -> frozenset[str]:
    """The ``key=`` sub-options documented for ``-option`` in ``qemu -help`` output.

    Keys come from the synopsis (including wrapped continuation lines, and
    tolerating QEMU's occasional missing comma as in
    ``[,chroot=dir][user=...]``) and from description lines that start with
    ``key=``.  With ``kind`` (e.g. ``"tap"`` for ``-netdev tap,...``) only
    the entries whose synopsis starts with ``-option kind`` count.
    """
    option = option.lstrip("-")
    keys: set[str] = set()
    for entry in parse_help_entries(help_text):
        if option not in entry.names:
            continue
        body = entry.synopsis.split(None, 1)[1] if " " in entry.synopsis else ""
        if kind is not None and re.split(r"[,\s\[]", body, maxsplit=1)[0] != kind:
            continue
        keys.update(_SYNOPSIS_KEY_RE.findall(body))
        for line in entry.description:
            if match := _DESCRIPTION_KEY_RE.match(line):
                keys.add(match.group(1))
    return frozenset(keys)


def parse_run_with_keys(help_text: str) -> frozenset[str]:
    """The sub-options of ``-run-with`` (``user``, ``chroot``, ``async-teardown``, ...).

    Empty when the binary has no ``-run-with`` (QEMU < 9.0).
    """
    return parse_option_keys(help_text, "run-with")


def parse_tap_vhost(help_text: str) -> bool:
    """Whether the ``tap`` network backend documents ``vhost=on|off``."""
    return "vhost" in parse_option_keys(help_text, "netdev", kind="tap")


def parse_machines(text: str) -> frozenset[str]:
    """Machine type names from ``qemu -machine help`` output, aliases (``pc``) included."""
    return frozenset(name for name, _ in _machine_rows(text))


def parse_machine_aliases(text: str) -> tuple[tuple[str, str], ...]:
    """``(alias, machine)`` pairs from ``-machine help``, e.g. ``("pc", "pc-i440fx-7.2")``."""
    pairs = []
    for name, rest in _machine_rows(text):
        if match := _MACHINE_ALIAS_RE.search(rest):
            pairs.append((name, match.group(1)))
    return tuple(sorted(pairs))


def parse_default_machine(text: str) -> str | None:
    """The machine type marked ``(default)`` in ``-machine help``, if any."""
    for name, rest in _machine_rows(text):
        if _MACHINE_DEFAULT_RE.search(rest):
            return name
    return None


def _machine_rows(text: str) -> list[tuple[str, str]]:
    rows = []
    for line in _lines(text):
        if not line or line[:1].isspace() or line.endswith(":"):
            continue  # blank, wrapped, or a header ("Supported machines are:")
        name, _, rest = line.partition(" ")
        if _WORD_RE.match(name):
            rows.append((name, rest))
    return rows


def parse_devices(text: str) -> frozenset[str]:
    """Device model names and their aliases from ``qemu -device help`` output."""
    devices: set[str] = set()
    for line in _lines(text):
        line = line.strip()
        if match := _DEVICE_NAME_RE.match(line):
            devices.add(match.group(1))
            devices.update(_DEVICE_ALIAS_RE.findall(line[match.end():]))
    return frozenset(devices)


def parse_accels(text: str) -> frozenset[str]:
    """Accelerator names (``kvm``, ``tcg``) from ``qemu -accel help`` output."""
    return _parse_word_list(text)


def parse_netdevs(text: str) -> frozenset[str]:
    """Network backend types (``tap``, ``user``, ``bridge``) from ``qemu -netdev help``."""
    return _parse_word_list(text)


def _parse_word_list(text: str) -> frozenset[str]:
    """One bare word per line after a ``...:`` header; headers and prose are skipped."""
    words = set()
    for line in _lines(text):
        word = line.strip()
        if word and not word.endswith(":") and _WORD_RE.match(word):
            words.add(word)
    return frozenset(words)


def parse_cpu_definitions(text: str) -> frozenset[str]:
    """The CPU model names of a QMP session's ``query-cpu-definitions`` answer.

    ``text`` is QMP's output, one JSON document a line (greeting, replies,
    events); the answer is the reply whose ``return`` is a list.
    """
    for line in _lines(text):
        try:
            reply = json.loads(line)
        except ValueError:
            continue
        models = reply.get("return") if isinstance(reply, dict) else None
        if isinstance(models, list):
            return frozenset(str(model["name"]) for model in models
                             if isinstance(model, dict) and isinstance(model.get("name"), str))
    return frozenset()


def build_caps(path: str, outputs: Mapping[str, str]) -> QemuCaps:
    """Assemble :class:`QemuCaps` from the outputs of :data:`PROBE_COMMANDS`.

    ``outputs`` maps the command names (``"version"``, ``"help"``, ...) to
    their standard output; missing optional ones count as empty.  Raises
    :class:`ValueError` when the version cannot be read.
    """
    version_text = outputs.get("version") or outputs.get("help", "")
    help_text = outputs.get("help", "")
    machine_text = outputs.get("machine", "")
    return QemuCaps(
        path=path,
        version=parse_version(version_text),
        version_text=version_line(version_text),
        options=parse_help_options(help_text),
        run_with_keys=parse_run_with_keys(help_text),
        machines=parse_machines(machine_text),
        default_machine=parse_default_machine(machine_text),
        machine_aliases=parse_machine_aliases(machine_text),
        devices=parse_devices(outputs.get("device", "")),
        accels=parse_accels(outputs.get("accel", "")),
        netdevs=parse_netdevs(outputs.get("netdev", "")),
        tap_vhost=parse_tap_vhost(help_text),
        cpu_models=parse_cpu_definitions(outputs.get("cpu", "")),
    )


# --- probing (side effects) ------------------------------------------------------------------

# The identity of a binary: (realpath, st_dev, st_ino, st_size, st_mtime_ns).
#
# Note: for a wrapper script (such as the QEMU 10.0 wrapper that execs a
# binary elsewhere with -L/module-dir settings) this is the identity of the
# *script*; upgrading the binary behind it without touching the script is
# not noticed.  Resolving the real binary would mean parsing the script, so
# whoever replaces the binary behind a wrapper must touch the wrapper (or
# delete the cache files).  A symlink such as /usr/bin/kvm is resolved, so it
# shares its entry with the binary it points to.
StatKey = tuple[str, int, int, int, int]

_cache: dict[StatKey, QemuCaps] = {}
_cache_lock = threading.Lock()
_probe_locks: dict[StatKey, threading.Lock] = {}


def clear_cache() -> None:
    """Forget every in-process probe result (for tests; disk caches are left alone)."""
    with _cache_lock:
        _cache.clear()
        _probe_locks.clear()


def stat_key(path: str) -> StatKey:
    """The cache key of the binary at ``path``; raises :class:`HypervisorError` if it is absent."""
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except OSError as err:
        raise errors.HypervisorError(f"Cannot probe QEMU binary {path}: {err.strerror}") from err
    return (real, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def probe(path: str, cache_dir: str | None = None, *,
          timeout: float = PROBE_TIMEOUT) -> QemuCaps:
    """The capabilities of the QEMU binary at ``path``, probed at most once.

    A result is reused while the binary's real path, device, inode, size and
    mtime stay the same: first from this process's memory (no process, no
    file read), then from ``cache_dir``'s JSON file if given (so that other
    processes skip the probe too).  An unreadable or stale cache file is
    ignored and rewritten.  Raises :class:`~ganeti_kvm.errors.HypervisorError`
    when the binary is missing, not executable, fails, or times out.
    """
    key = stat_key(path)
    with _cache_lock:
        caps = _cache.get(key)
        if caps is None:
            lock = _probe_locks.setdefault(key, threading.Lock())
    if caps is not None:
        return _with_path(caps, path)
    # One probe per binary at a time; other threads wait and reuse its result.
    with lock:
        with _cache_lock:
            caps = _cache.get(key)
        if caps is not None:
            return _with_path(caps, path)
        caps = _read_disk_cache(cache_dir, key) if cache_dir else None
        if caps is None:
            caps = _probe_binary(path, timeout)
            if cache_dir:
                _write_disk_cache(cache_dir, key, caps)
        with _cache_lock:
            _cache[key] = caps
    return _with_path(caps, path)


def _with_path(caps: QemuCaps, path: str) -> QemuCaps:
    """``caps`` as seen through ``path`` (a symlink shares the entry of its target)."""
    return caps if caps.path == path else dataclasses.replace(caps, path=path)


def _probe_binary(path: str, timeout: float) -> QemuCaps:
    """Run all :data:`PROBE_COMMANDS` concurrently and parse their output."""
    started = time.monotonic()
    outputs = run_probe_commands(path, PROBE_COMMANDS, timeout, inputs=PROBE_INPUTS)
    try:
        caps = build_caps(path, outputs)
    except ValueError as err:
        raise errors.HypervisorError(
            f"Cannot probe QEMU binary {path}: {path} -version printed no version: {err}") from err
    caps = dataclasses.replace(caps, aio_modes=probe_aio_modes(
        path, max(1.0, timeout - (time.monotonic() - started))))
    spice_keys, backends = probe_spice(path, max(1.0, timeout - (time.monotonic() - started)))
    caps = dataclasses.replace(caps, spice_keys=spice_keys, chardev_backends=backends)
    logger.info("Probed %s: QEMU %s, %d options, %d devices in %.3f s", path,
                ".".join(map(str, caps.version)), len(caps.options), len(caps.devices),
                time.monotonic() - started)
    return caps


#: Disk AIO modes a QEMU may lack (built without liburing, or a kernel that refuses it)
PROBED_AIO_MODES = ("io_uring",)
_QUIT = b'{"execute": "qmp_capabilities"}\n{"execute": "quit"}\n'
#: Processes one uncached probe runs: the help commands, one per probed AIO mode, SPICE's
PROBE_PROCESSES = len(PROBE_COMMANDS) + len(PROBED_AIO_MODES) + 1
#: What the SPICE probe asks over QMP
SPICE_PROBE_INPUT = (b'{"execute": "qmp_capabilities"}\n'
                     b'{"execute": "query-command-line-options", '
                     b'"arguments": {"option": "spice"}}\n'
                     b'{"execute": "query-chardev-backends"}\n{"execute": "quit"}\n')


def aio_probe_argv(path: str, mode: str) -> list[str]:
    """A QEMU with no machine that opens its own binary read-only with ``aio=mode``.

    QMP on stdio quits it at once; it exits 0 only if the file could be
    opened so (for io_uring, QEMU sets up its ring when it opens the file,
    so the kernel's refusal shows here too).
    """
    return [path, "-machine", "none", "-nodefaults", "-display", "none", "-S",
            "-qmp", "stdio", "-blockdev",
            f"driver=file,node-name=probe,read-only=on,aio={mode},"
            f"filename={path.replace(',', ',,')}"]


def probe_aio_modes(path: str, timeout: float = PROBE_TIMEOUT) -> frozenset[str]:
    """The modes of :data:`PROBED_AIO_MODES` QEMU ``path`` can open a disk with."""
    env = dict(os.environ, LC_ALL="C", LANG="C")
    found = set()
    for mode in PROBED_AIO_MODES:
        try:
            result = subprocess.run(aio_probe_argv(path, mode), input=_QUIT,
                                    capture_output=True, env=env, timeout=timeout, check=False)
        except (OSError, subprocess.TimeoutExpired) as err:
            logger.warning("Cannot probe aio=%s of QEMU %s: %s", mode, path, err)
            continue
        if result.returncode == 0:
            found.add(mode)
        else:
            logger.info("QEMU %s cannot open disks with aio=%s: %s", path, mode,
                        result.stderr.decode("utf-8", "replace").strip()[:300])
    return frozenset(found)


def spice_probe_argv(path: str) -> list[str]:
    """A QEMU with no machine, a SPICE server on no port and a ``spicevmc`` chardev.

    QEMU loads its SPICE modules (Debian ships them apart) only for a
    ``-spice`` on the command line, and only then does QMP list the keys
    of ``-spice`` and the ``spicevmc`` backend; QMP on stdio quits it at
    once.  It exits non-zero if this QEMU has no SPICE (or no spicevmc).
    """
    return [path, "-machine", "none", "-nodefaults", "-no-user-config", "-display", "none",
            "-S", "-qmp", "stdio", "-spice", "port=0,disable-ticketing=on",
            "-chardev", "spicevmc,id=probe0,name=vdagent"]


def parse_spice_probe(text: str) -> tuple[frozenset[str], frozenset[str]]:
    """The ``-spice`` keys and the chardev backends from the SPICE probe's QMP output."""
    keys: frozenset[str] = frozenset()
    backends: frozenset[str] = frozenset()
    for line in _lines(text):
        try:
            reply = json.loads(line)
        except ValueError:
            continue
        answer = reply.get("return") if isinstance(reply, dict) else None
        if not isinstance(answer, list):
            continue
        options = [o for o in answer if isinstance(o, dict) and o.get("option") == "spice"]
        if options and isinstance(options[0].get("parameters"), list):
            keys = frozenset(str(p["name"]) for p in options[0]["parameters"]
                             if isinstance(p, dict) and isinstance(p.get("name"), str))
        elif answer and all(isinstance(b, dict) and "option" not in b for b in answer):
            backends = frozenset(str(b["name"]) for b in answer
                                 if isinstance(b.get("name"), str))
    return keys, backends


def probe_spice(path: str, timeout: float = PROBE_TIMEOUT) -> tuple[frozenset[str],
                                                                     frozenset[str]]:
    """``(spice_keys, chardev_backends)`` of QEMU ``path``; empty if it cannot run SPICE."""
    env = dict(os.environ, LC_ALL="C", LANG="C")
    try:
        result = subprocess.run(spice_probe_argv(path), input=SPICE_PROBE_INPUT,
                                capture_output=True, env=env, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        logger.warning("Cannot probe SPICE of QEMU %s: %s", path, err)
        return frozenset(), frozenset()
    if result.returncode != 0:
        logger.info("QEMU %s cannot run SPICE: %s", path,
                    result.stderr.decode("utf-8", "replace").strip()[:300])
        return frozenset(), frozenset()
    return parse_spice_probe(result.stdout.decode("utf-8", "replace"))


def run_probe_commands(path: str, commands: Mapping[str, Sequence[str]],
                       timeout: float = PROBE_TIMEOUT,
                       inputs: Mapping[str, bytes] | None = None) -> dict[str, str]:
    """Run ``path`` once per entry of ``commands`` (all at once) and return their stdout.

    Each command is an argv list (never a shell) run with ``LC_ALL=C`` and
    stdin from ``/dev/null``, or fed its entry of ``inputs``.  All of them share one deadline of
    ``timeout`` seconds.  Any failure to start, non-zero exit or timeout
    raises :class:`~ganeti_kvm.errors.HypervisorError` naming the binary,
    the command and QEMU's stderr; the remaining processes are killed.
    """
    env = dict(os.environ, LC_ALL="C", LANG="C")
    deadline = time.monotonic() + timeout
    running: dict[str, tuple[list[str], subprocess.Popen[bytes]]] = {}
    try:
        for name, args in commands.items():
            argv = [path, *args]
            try:
                stdin = subprocess.PIPE if inputs and name in inputs else subprocess.DEVNULL
                proc = subprocess.Popen(argv, stdin=stdin, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, env=env, close_fds=True)
            except OSError as err:
                raise errors.HypervisorError(
                    f"Cannot probe QEMU binary {path}: running {_show(argv)} failed: "
                    f"{err.strerror or err}") from err
            running[name] = (argv, proc)
        outputs = {}
        for name, (argv, proc) in list(running.items()):
            try:
                out, err_out = proc.communicate(
                    input=(inputs or {}).get(name) if proc.stdin else None,
                    timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise errors.HypervisorError(
                    f"Cannot probe QEMU binary {path}: {_show(argv)} did not finish "
                    f"within {timeout:g} s") from None
            del running[name]
            stderr = err_out.decode("utf-8", "replace").strip()
            if proc.returncode != 0:
                raise errors.HypervisorError(
                    f"Cannot probe QEMU binary {path}: {_show(argv)} exited with "
                    f"{_exit_text(proc.returncode)}; stderr: {stderr or '(empty)'}")
            if stderr:
                logger.debug("%s printed on stderr: %s", _show(argv), stderr)
            outputs[name] = out.decode("utf-8", "replace")
        return outputs
    finally:
        for _, proc in running.values():
            _kill(proc)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """Kill and reap a probe process that is no longer wanted."""
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    try:
        proc.communicate(timeout=5)
    except (subprocess.TimeoutExpired, OSError, ValueError):
        logger.warning("Probe process %s did not exit after SIGKILL", proc.pid)


def _show(argv: Sequence[str]) -> str:
    return "'" + " ".join(argv) + "'"


def _exit_text(returncode: int) -> str:
    return f"signal {-returncode}" if returncode < 0 else f"status {returncode}"


# --- the on-disk cache --------------------------------------------------------------------------


def cache_file(cache_dir: str, real_path: str) -> str:
    """The cache file of the binary whose real path is ``real_path``.

    One file per binary path (not per version), so upgrades overwrite it
    instead of piling up files.
    """
    digest = hashlib.sha256(real_path.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return os.path.join(cache_dir, f"{CACHE_PREFIX}{digest}.json")


def _key_dict(key: StatKey) -> dict[str, Any]:
    real, dev, ino, size, mtime_ns = key
    return {"realpath": real, "dev": dev, "ino": ino, "size": size, "mtime_ns": mtime_ns}


def _read_disk_cache(cache_dir: str, key: StatKey) -> QemuCaps | None:
    """The cached capabilities for ``key``, or ``None`` if absent, stale or damaged."""
    filename = cache_file(cache_dir, key[0])
    try:
        with open(filename, encoding="utf-8") as handle:
            document = json.load(handle)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        logger.warning("Ignoring unreadable QEMU capability cache %s: %s", filename, err)
        return None
    if not isinstance(document, dict) or document.get("kind") != CACHE_KIND:
        logger.warning("Ignoring QEMU capability cache %s: not a capability record", filename)
        return None
    if document.get("format") != CACHE_FORMAT or document.get("key") != _key_dict(key):
        logger.debug("QEMU capability cache %s is stale", filename)
        return None
    try:
        return QemuCaps.from_dict(document["caps"])
    except (KeyError, TypeError, ValueError) as err:
        logger.warning("Ignoring damaged QEMU capability cache %s: %s", filename, err)
        return None


def _write_disk_cache(cache_dir: str, key: StatKey, caps: QemuCaps) -> None:
    """Store ``caps`` atomically (mode 0600); a failure only costs a later re-probe."""
    filename = cache_file(cache_dir, key[0])
    document = {"kind": CACHE_KIND, "format": CACHE_FORMAT, "key": _key_dict(key),
                "caps": caps.to_dict()}
    try:
        os.makedirs(cache_dir, mode=0o700, exist_ok=True)
        fsutil.atomic_write(filename, json.dumps(document, indent=1, sort_keys=True) + "\n",
                            mode=0o600)
    except OSError as err:
        logger.warning("Cannot write QEMU capability cache %s: %s", filename, err)
