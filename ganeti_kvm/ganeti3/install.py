"""Making ganeti-kvm the KVM driver of this node's Ganeti 3.x, and undoing it.

``install`` does, for every installed Ganeti 3.x (``/usr/share/ganeti/3.0``,
``3.1``):

1. a ``.pth`` file in Debian's ``dist-packages`` makes this package
   importable by ``/usr/bin/python3`` (through a directory holding only a
   symlink to it, so nothing else of the source tree lands on ``sys.path``);
2. a check, as the user Ganeti's daemons run as (``gnt-masterd``), that
   ``ganeti_kvm.ganeti3`` imports next to that Ganeti: refused here, with
   Ganeti's driver untouched, if it does not;
3. ``dpkg-divert --local --rename`` moves Ganeti's
   ``ganeti/hypervisor/hv_kvm/__init__.py`` aside and a shim importing
   :class:`ganeti_kvm.ganeti3.KVMHypervisor` takes its place (Ganeti's other
   modules import only that name from the package; its ``monitor.py``,
   ``netdev.py`` ... stay where they are);
4. the same check through Ganeti's own ``ganeti.hypervisor`` package; any
   failure from step 1 on undoes everything this run did;
5. the node daemon is restarted (a command given, or systemd's unit, or
   ``/etc/init.d/ganeti``), then the running instances are adopted
   (:func:`ganeti_kvm.ganeti3.bundled.adopt_all`): none is restarted.

``remove`` is the exact reverse: Ganeti's file is renamed back (byte for
byte), the ``.pth`` goes, the daemon is restarted and the runtime files of
running instances are written in the bundled driver's format
(:func:`ganeti_kvm.ganeti3.bundled.export_all`).  Both are idempotent.

``root`` works like dpkg's ``--root``: every path (and dpkg's database) is
under it; with a root other than ``/`` nothing is restarted by default.

``package`` (``--packaged``: the Debian package's maintainer scripts) does
the same the Debian way: the diversions belong to the package
(``dpkg-divert --package ganeti-kvm``, not ``--local``; one made by a
``--local`` install is taken over), there is no ``.pth`` (the library is in
``dist-packages``), the daemon is restarted through ``deb-systemd-invoke`` or
``invoke-rc.d`` (which obey ``policy-rc.d``) and only if it runs, no Ganeti
is not an error, and a Ganeti version whose package was removed is forgotten
(its diversion and the shim go).
"""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ganeti_kvm import errors
from ganeti_kvm.core import names as c
from ganeti_kvm.ganeti3 import bundled
from ganeti_kvm.host import fsutil, paths

log = logging.getLogger(__name__)

SUPPORTED_VERSIONS = ("3.0", "3.1")
SHARE_DIR = "usr/share/ganeti"
DRIVER = "ganeti/hypervisor/hv_kvm/__init__.py"
DIVERT_SUFFIX = ".bundled"
SITE_DIR = "usr/lib/python3/dist-packages"
PTH_NAME = "ganeti-kvm.pth"
LINK_DIR = "usr/lib/ganeti-kvm/python"
CHECK_USER = "gnt-masterd"
GANETI_PYTHON = "/usr/bin/python3"
CHECK_TIMEOUT = 120.0
RESTART_TIMEOUT = 300.0
MARKER_SUFFIX = ".ganeti-kvm"
SHIM_MARKER = "# Installed by `ganeti-kvm ganeti install`"
SHIM = f'''{SHIM_MARKER}; `ganeti-kvm ganeti remove` restores
# Ganeti's own driver, which dpkg-divert keeps at __init__.py{DIVERT_SUFFIX}.
"""The KVM hypervisor of Ganeti, provided by ganeti-kvm."""

from ganeti_kvm.ganeti3 import KVMHypervisor  # noqa: F401

__all__ = ["KVMHypervisor"]
'''
DEBIAN_PACKAGE = "ganeti-kvm"
PACKAGED_SHIM = SHIM.replace(
    "`ganeti-kvm ganeti remove` restores",
    f"removing the package {DEBIAN_PACKAGE} restores", 1)
NODED_PID_FILE = "/var/run/ganeti/ganeti-noded.pid"
PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Run under Ganeti's python, as the daemons' user: import our adapter next to
# one Ganeti tree (sys.argv[1]), with the .pth files of sys.argv[2] processed.
_CHECK_PATHS = """
import site, sys
site.addsitedir(sys.argv[2])
sys.path.insert(0, sys.argv[1])
"""
# Ganeti's package first, as its daemons import: with the shim already in place
# (a second install), importing ganeti_kvm.ganeti3 first would be an import cycle.
_CHECK_BEFORE = _CHECK_PATHS + """
from ganeti.hypervisor import hv_base
import ganeti_kvm.ganeti3 as g3
assert g3._ganeti.HAVE_GANETI, "ganeti_kvm.ganeti3 did not find Ganeti"
assert issubclass(g3.KVMHypervisor, hv_base.BaseHypervisor), "not a Ganeti hypervisor"
print(g3.__file__)
"""
# After the switch, in the order Ganeti's daemons import (ganeti.hypervisor
# first, which imports the shim): Ganeti's registry must hand out our class.
_CHECK_AFTER = _CHECK_PATHS + """
from ganeti import constants, hypervisor
import ganeti_kvm.ganeti3 as g3
assert g3._ganeti.HAVE_GANETI, "ganeti_kvm.ganeti3 did not find Ganeti"
cls = hypervisor.GetHypervisorClass(constants.HT_KVM)
assert cls is g3.KVMHypervisor, "Ganeti's hv_kvm is %r, not ganeti-kvm's" % (cls,)
print(g3.__file__)
"""


@dataclass
class Report:
    """What a run of :func:`install` or :func:`remove` did, for the operator."""

    versions: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    restart: list[str] | None = None
    instances: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"changed: {item}" for item in self.changed]
        out += [f"already so: {item}" for item in self.unchanged]
        if self.restart:
            out.append(f"restarted the node daemon: {' '.join(self.restart)}")
        out += [f"instance {name}: switched without a restart" for name in self.instances]
        return out


@dataclass(frozen=True)
class Layout:
    """The files install and remove touch under ``root``."""

    root: str = "/"
    package: str | None = None  # the Debian package owning the diversions; None: --local

    @property
    def owner(self) -> str:
        """The diversions' owner as ``dpkg-divert --listpackage`` says it."""
        return self.package or "LOCAL"

    @property
    def shim(self) -> str:
        return PACKAGED_SHIM if self.package else SHIM

    def under(self, path: str) -> str:
        return os.path.join(self.root, path.lstrip("/"))

    def driver(self, version: str) -> str:
        """The bundled driver's path as dpkg knows it (absolute, without root)."""
        return "/" + os.path.join(SHARE_DIR, version, DRIVER)

    def diverted(self, version: str) -> str:
        return self.driver(version) + DIVERT_SUFFIX

    def tree(self, version: str) -> str:
        """The directory to put on sys.path for Ganeti ``version`` (with root)."""
        return self.under(os.path.join(SHARE_DIR, version))

    @property
    def site_dir(self) -> str:
        return self.under(SITE_DIR)

    @property
    def pth(self) -> str:
        return os.path.join(self.site_dir, PTH_NAME)

    @property
    def link_dir(self) -> str:
        return self.under(LINK_DIR)

    @property
    def link(self) -> str:
        return os.path.join(self.link_dir, "ganeti_kvm")

    def versions(self) -> list[str]:
        """The Ganeti 3.x versions installed under root (their hv_kvm package is there)."""
        return [v for v in SUPPORTED_VERSIONS
                if os.path.isdir(os.path.dirname(self.under(self.driver(v))))]


# --- small steps --------------------------------------------------------------


def _run(argv: Sequence[str], what: str, timeout: float = CHECK_TIMEOUT,
         user: str | None = None) -> str:
    """Run ``argv`` (as ``user`` if given); its stdout, or ConfigurationError naming ``what``."""
    command = list(argv)
    if user is not None:
        command = ["runuser", "-u", user, "--", *command]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                check=False, cwd="/", stdin=subprocess.DEVNULL,
                                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"})
    except (OSError, subprocess.TimeoutExpired) as err:
        raise errors.ConfigurationError(f"Cannot {what}: {err}") from None
    if result.returncode != 0:
        said = (result.stderr.strip() or result.stdout.strip()).splitlines()[-5:]
        raise errors.ConfigurationError(
            f"Cannot {what}: {' '.join(command[:6])}... exited with code "
            f"{result.returncode}: {' | '.join(said) or '(no output)'}")
    return result.stdout


def _dpkg_divert(layout: Layout, *args: str) -> str:
    return _run(["dpkg-divert", "--root", layout.root, *args],
                f"run dpkg-divert {' '.join(args)}")


def _owner_args(owner: str) -> list[str]:
    """dpkg-divert's options naming a diversion's owner."""
    return ["--local"] if owner == "LOCAL" else ["--package", owner]


def diversion_of(layout: Layout, version: str) -> str | None:
    """Who diverts Ganeti ``version``'s driver: ``LOCAL``, a package name, or None."""
    owner = _dpkg_divert(layout, "--listpackage", layout.driver(version)).strip()
    if not owner:
        return None
    truename = _dpkg_divert(layout, "--truename", layout.driver(version)).strip()
    # The package takes over a --local install's diversion (see _divert).
    ours = {layout.owner, "LOCAL"} if layout.package else {layout.owner}
    if owner == DEBIAN_PACKAGE and not layout.package and truename == layout.diverted(version):
        raise errors.ConfigurationError(
            f"{layout.driver(version)} is diverted by the Debian package {DEBIAN_PACKAGE}: "
            f"ganeti-kvm is installed as a package; remove it with apt-get remove "
            f"{DEBIAN_PACKAGE} instead")
    if owner not in ours or truename != layout.diverted(version):
        raise errors.ConfigurationError(
            f"{layout.driver(version)} is already diverted by {owner} to {truename}, not by "
            f"ganeti-kvm to {layout.diverted(version)}; remove that diversion first "
            "(dpkg-divert --list)")
    return owner


def is_shim(path: str) -> bool:
    """Whether ``path`` is a shim written by :func:`install`."""
    data = fsutil.read_small_file(path)
    return data is not None and data.decode("utf-8", "replace").startswith(SHIM_MARKER)


def check_user() -> str | None:
    """The user to run the import checks as: Ganeti's, if it exists and we can switch."""
    try:
        pwd.getpwnam(CHECK_USER)
    except KeyError:
        log.warning("User %s does not exist: checking the import as %s", CHECK_USER,
                    pwd.getpwuid(os.getuid()).pw_name)
        return None
    return CHECK_USER if os.geteuid() == 0 else None


def check_import(layout: Layout, version: str, after: bool, python: str = GANETI_PYTHON,
                 user: str | None = None) -> str:
    """Import the adapter under ``python`` next to Ganeti ``version``, as ``user``.

    ``after``: through Ganeti's own ``ganeti.hypervisor`` (the shim is in
    place).  Returns where ``ganeti_kvm.ganeti3`` came from.
    """
    code = _CHECK_AFTER if after else _CHECK_BEFORE
    where = _run([python, "-I", "-B", "-c", code, layout.tree(version), layout.site_dir],
                 f"import ganeti_kvm.ganeti3 with {python} and Ganeti {version}"
                 + (f" as user {user}" if user else ""), user=user).strip()
    package_dir = os.path.join(layout.site_dir, "ganeti_kvm") if layout.package else layout.link
    expected = os.path.join(package_dir, "ganeti3", "__init__.py")
    if os.path.realpath(where) != os.path.realpath(expected):
        raise errors.ConfigurationError(
            f"{python} imports ganeti_kvm from {where}, not from {expected}; remove the other "
            "copy (pip uninstall ganeti-kvm, or its .pth file) and install again")
    return where


def _write_pth(layout: Layout, report: Report) -> bool:
    """The symlink to this package and the .pth naming its directory; True if changed."""
    changed = False
    os.makedirs(layout.link_dir, mode=0o755, exist_ok=True)
    os.chmod(layout.link_dir, 0o755)
    if os.path.islink(layout.link) and os.readlink(layout.link) == PACKAGE_DIR:
        report.unchanged.append(layout.link)
    else:
        if os.path.lexists(layout.link):
            os.remove(layout.link)
        os.symlink(PACKAGE_DIR, layout.link)
        report.changed.append(f"{layout.link} -> {PACKAGE_DIR}")
        changed = True
    # Python reads a .pth line as a path: with a root other than /, it points into it.
    text = layout.link_dir
    if fsutil.read_small_file(layout.pth) == (text + "\n").encode():
        report.unchanged.append(layout.pth)
    else:
        os.makedirs(layout.site_dir, mode=0o755, exist_ok=True)
        fsutil.atomic_write(layout.pth, text + "\n", mode=0o644)
        report.changed.append(layout.pth)
        changed = True
    _check_readable(PACKAGE_DIR)
    return changed


def _check_readable(package: str) -> None:
    """Refuse a package directory that other users cannot read (the daemons run as such)."""
    directory = package
    while True:
        mode = os.stat(directory).st_mode
        if not mode & 0o001:
            raise errors.ConfigurationError(
                f"{directory} is not searchable by other users, so Ganeti's daemons "
                f"(user {CHECK_USER}) cannot import ganeti_kvm from {package}; "
                f"chmod o+x {directory} or install the package elsewhere")
        parent = os.path.dirname(directory)
        if parent == directory:
            break
        directory = parent
    for base, _, files in os.walk(package):
        for name in files:
            if name.endswith(".py") and not os.stat(os.path.join(base, name)).st_mode & 0o004:
                raise errors.ConfigurationError(
                    f"{os.path.join(base, name)} is not readable by other users, so "
                    f"Ganeti's daemons cannot import it; chmod o+r it")


def _remove_pth(layout: Layout, report: Report) -> None:
    for path in (layout.pth, layout.link):
        if os.path.lexists(path):
            os.remove(path)
            report.changed.append(f"removed {path}")
    for directory in (layout.link_dir, os.path.dirname(layout.link_dir)):
        try:
            os.rmdir(directory)
        except OSError:
            break


def _write_shim(path: str, text: str = SHIM) -> None:
    fsutil.atomic_write(path, text, mode=0o644)


def _divert(layout: Layout, version: str, report: Report,
            undo: list[Callable[[], None]]) -> None:
    """Move Ganeti ``version``'s driver aside and put the shim in its place."""
    target = layout.under(layout.driver(version))
    owner = diversion_of(layout, version)
    if owner is None:
        if os.path.exists(target) and is_shim(target):
            raise errors.ConfigurationError(
                f"{target} is a ganeti-kvm shim but no diversion keeps Ganeti's driver; "
                f"reinstall the package ganeti-{version} to get it back")
        _dpkg_divert(layout, *_owner_args(layout.owner), "--rename", "--divert",
                     layout.diverted(version), "--add", layout.driver(version))
        undo.append(lambda: _undivert(layout, version, Report()))
        report.changed.append(f"diverted {layout.driver(version)} to {layout.diverted(version)}")
    elif owner != layout.owner:
        # A --local install's diversion becomes the package's: only the record
        # changes hands (no --rename), Ganeti's driver stays where it is.
        _dpkg_divert(layout, *_owner_args(owner), "--divert", layout.diverted(version),
                     "--remove", layout.driver(version))
        _dpkg_divert(layout, *_owner_args(layout.owner), "--divert", layout.diverted(version),
                     "--add", layout.driver(version))
        report.changed.append(f"the diversion of {layout.driver(version)} now belongs to "
                              f"the package {layout.owner}")
    if os.path.exists(target) and is_shim(target) and \
            fsutil.read_small_file(target) == layout.shim.encode():
        report.unchanged.append(f"shim {target}")
        return
    if os.path.exists(target) and not is_shim(target):
        raise errors.ConfigurationError(
            f"{target} exists and is not a ganeti-kvm shim although the driver is diverted; "
            "move it away and run install again")
    _write_shim(target, layout.shim)
    report.changed.append(f"shim {target}")


def _undivert(layout: Layout, version: str, report: Report) -> None:
    """Remove the shim and rename Ganeti ``version``'s driver back."""
    target = layout.under(layout.driver(version))
    owner = diversion_of(layout, version)
    if owner is None:
        if os.path.exists(target) and is_shim(target):
            raise errors.ConfigurationError(
                f"{target} is a ganeti-kvm shim but no diversion keeps Ganeti's driver; "
                f"reinstall the package ganeti-{version} to get it back")
        report.unchanged.append(f"{layout.driver(version)} is Ganeti's own")
        return
    if os.path.exists(target):
        if not is_shim(target):
            raise errors.ConfigurationError(
                f"{target} is not the ganeti-kvm shim; move it away, then run remove again "
                f"(Ganeti's driver is kept at {layout.under(layout.diverted(version))})")
        os.remove(target)
    if not os.path.exists(layout.under(layout.diverted(version))):
        raise errors.ConfigurationError(
            f"Ganeti's driver {layout.under(layout.diverted(version))} is missing; reinstall "
            f"the package ganeti-{version}, then run remove again")
    _dpkg_divert(layout, *_owner_args(owner), "--rename", "--divert", layout.diverted(version),
                 "--remove", layout.driver(version))
    report.changed.append(f"restored {layout.driver(version)}")


def is_orphan(layout: Layout, version: str) -> bool:
    """Whether Ganeti ``version``'s package is gone and only our shim and diversion stay.

    dpkg removes a removed package's files, the diverted driver among them,
    but not the shim, which no package owns.
    """
    tree = layout.tree(version)
    return (not os.path.exists(os.path.join(tree, "ganeti", "__init__.py"))
            and not os.path.exists(layout.under(layout.diverted(version))))


def _forget(layout: Layout, version: str, report: Report) -> None:
    """Drop the shim and the diversion of a Ganeti version that was removed."""
    target = layout.under(layout.driver(version))
    owner = diversion_of(layout, version)
    if os.path.exists(target) and is_shim(target):
        os.remove(target)
    if owner is not None:
        _dpkg_divert(layout, *_owner_args(owner), "--divert", layout.diverted(version),
                     "--remove", layout.driver(version))
    # The directories dpkg left because the shim was in them, up to the version's.
    directory = os.path.dirname(target)
    while os.path.normpath(directory) != os.path.normpath(os.path.dirname(layout.tree(version))):
        pycache = os.path.join(directory, "__pycache__")
        if os.path.isdir(pycache) and not any(
                not name.startswith("__init__.") for name in os.listdir(pycache)):
            shutil.rmtree(pycache, ignore_errors=True)
        try:
            os.rmdir(directory)
        except OSError:
            break
        directory = os.path.dirname(directory)
    report.changed.append(f"forgot Ganeti {version} (its package was removed)")


# --- restarting the node daemon ------------------------------------------------


def default_restart_command(layout: Layout) -> list[str] | None:
    """How this node runs ganeti-noded: systemd, else the init script; None if neither."""
    if layout.root != "/":
        return None
    if os.path.isdir("/run/systemd/system") and shutil.which("systemctl"):
        return ["systemctl", "restart", "ganeti-noded.service"]
    if os.access("/etc/init.d/ganeti", os.X_OK):
        return ["/etc/init.d/ganeti", "restart", "ganeti-noded"]
    return None


def noded_running(pid_file: str = NODED_PID_FILE) -> bool:
    """Whether the node daemon of its pid file lives."""
    data = fsutil.read_small_file(pid_file)
    try:
        pid = int((data or b"").strip() or b"0")
    except ValueError:
        return False
    if pid <= 0:
        return False
    cmdline = fsutil.read_small_file(f"/proc/{pid}/cmdline")
    return cmdline is not None and b"noded" in cmdline


def packaged_restart_command(layout: Layout) -> list[str] | None:
    """In a maintainer script: restart noded only if it runs, obeying policy-rc.d."""
    if layout.root != "/":
        return None
    if os.path.isdir("/run/systemd/system") and shutil.which("deb-systemd-invoke"):
        return ["deb-systemd-invoke", "try-restart", "ganeti-noded.service"]
    if noded_running() and shutil.which("invoke-rc.d") and \
            os.access("/etc/init.d/ganeti", os.X_OK):
        return ["invoke-rc.d", "ganeti", "restart", "ganeti-noded"]
    return None


def _restart(command: Sequence[str] | None, report: Report, packaged: bool = False) -> None:
    if not command and packaged:
        log.info("ganeti-noded not restarted (it does not run here, or --no-restart)")
        return
    if not command:
        log.warning("The node daemon was not restarted: restart ganeti-noded so it "
                    "loads the new driver")
        return
    _run(command, "restart the node daemon", timeout=RESTART_TIMEOUT)
    report.restart = list(command)


# --- the commands ----------------------------------------------------------------


def _versions(layout: Layout) -> list[str]:
    versions = layout.versions()
    if not versions:
        raise errors.ConfigurationError(
            f"No Ganeti {' or '.join(SUPPORTED_VERSIONS)} under "
            f"{layout.under(SHARE_DIR)}: install the package ganeti first")
    return versions


def install(root: str = "/", restart: Sequence[str] | None | bool = True,
            run_dir: str | None = None, python: str = GANETI_PYTHON,
            package: str | None = None, restart_always: bool = False) -> Report:
    """Make ganeti-kvm the KVM driver of every Ganeti 3.x under ``root``.

    ``restart``: True for :func:`default_restart_command`, False (or None)
    for none, or the command to run.  ``run_dir``: where the running
    instances to adopt are (default: the node's).  ``package``: the Debian
    package's way (see the module's docstring).  The daemon is restarted
    when a driver was switched or the node was not switched yet; with
    ``restart_always`` also when nothing changed: after an upgrade of the
    library, whose old code the running daemon still has loaded.
    """
    layout = Layout(os.path.abspath(root), package)
    if package:
        report = Report(versions=layout.versions())
        for version in [v for v in report.versions if is_orphan(layout, v)]:
            _forget(layout, version, report)
            report.versions.remove(version)
        if not report.versions:
            return report  # no Ganeti on this node (yet): the library alone
    else:
        report = Report(versions=_versions(layout))
    for version in report.versions:
        diversion_of(layout, version)  # refuses a diversion that is not ours, up front
    user = check_user()
    undo: list[Callable[[], None]] = []
    pth_existed = os.path.exists(layout.pth) or bool(package)
    try:
        if not package:
            _write_pth(layout, report)
        for version in report.versions:
            check_import(layout, version, after=False, python=python, user=user)
        for version in report.versions:
            _divert(layout, version, report, undo)
        for version in report.versions:
            check_import(layout, version, after=True, python=python, user=user)
    except BaseException as err:
        for step in reversed(undo):
            try:
                step()
            except errors.GenericError as undo_err:
                log.error("Rolling back: %s", undo_err)
        if not pth_existed:
            _remove_pth(layout, Report())
        if isinstance(err, errors.GenericError):
            raise errors.ConfigurationError(
                f"ganeti-kvm was not installed, Ganeti's own KVM driver stays: {err}") from err
        raise
    if package and os.path.lexists(layout.pth):
        _remove_pth(layout, report)  # a --local install's, taken over: not needed any more
    node_run_dir = _run_dir(layout, run_dir)
    if report.changed or restart_always or not os.path.exists(marker(node_run_dir)):
        _restart(_restart_command(layout, restart), report, bool(package))
        # Packaged: no /run/ganeti means no daemon ran since boot; creating it
        # would leave a directory behind after a purge.
        if not package or os.path.isdir(os.path.dirname(marker(node_run_dir))):
            _write_marker(node_run_dir)
    report.instances = bundled.adopt_all(node_run_dir)
    return report


def remove(root: str = "/", restart: Sequence[str] | None | bool = True,
           run_dir: str | None = None, package: str | None = None) -> Report:
    """Give every Ganeti 3.x under ``root`` its own KVM driver back, byte for byte."""
    layout = Layout(os.path.abspath(root), package)
    report = Report(versions=layout.versions())
    for version in report.versions:
        if package and is_orphan(layout, version):
            _forget(layout, version, report)
        else:
            _undivert(layout, version, report)
    if not package:
        _remove_pth(layout, report)
    node_run_dir = _run_dir(layout, run_dir)
    # This node switched (its marker), though another node sharing /usr may have
    # restored the files already: its daemon and instances still need the switch back.
    if report.changed or os.path.exists(marker(node_run_dir)):
        _restart(_restart_command(layout, restart), report, bool(package))
        report.instances = bundled.export_all(node_run_dir)
        fsutil.remove_file(marker(node_run_dir))
    return report


def marker(run_dir: str) -> str:
    """The file saying this node's daemon was switched to ganeti-kvm (next to its run dir).

    Per node, since the run directory is (a node's /run), while /usr may be
    shared between nodes: a second node's install or remove finds the files
    switched already, yet its daemon and instances still need the switch.
    """
    return os.path.normpath(run_dir) + MARKER_SUFFIX


def _write_marker(run_dir: str) -> None:
    path = marker(run_dir)
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    fsutil.atomic_write(path, "ganeti-kvm is this node's KVM driver\n", mode=0o644)


def _restart_command(layout: Layout, restart: Sequence[str] | None | bool) -> list[str] | None:
    if restart is True:
        if layout.package:
            return packaged_restart_command(layout)
        return default_restart_command(layout)
    return list(restart) if restart else None


def status(root: str = "/") -> dict[str, str]:
    """For each Ganeti 3.x under ``root``: ``ganeti-kvm`` or ``bundled``."""
    layout = Layout(os.path.abspath(root), DEBIAN_PACKAGE)  # either kind of diversion
    return {v: "ganeti-kvm" if diversion_of(layout, v) else "bundled"
            for v in layout.versions()}


def _run_dir(layout: Layout, run_dir: str | None) -> str:
    if run_dir:
        return run_dir
    if layout.root == "/":
        return paths.default_run_dir()
    return layout.under(c.DEFAULT_RUN_DIR)


__all__ = ["install", "remove", "status", "Report", "Layout", "SHIM", "SUPPORTED_VERSIONS"]
