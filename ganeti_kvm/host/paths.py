"""Where an instance's runtime state lives under the run directory.

Every per-instance path comes from :class:`RunDir`, so the layout is defined
in one place.  The run directory is ``/var/run/ganeti/kvm-hypervisor`` unless
``GANETI_KVM_RUN_DIR`` or an explicit argument says otherwise, which lets one
process act as several nodes.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ganeti_kvm import errors

# Where every instance's runtime state lives unless told otherwise
RUN_DIR_ENV = "GANETI_KVM_RUN_DIR"
DEFAULT_RUN_DIR = "/var/run/ganeti/kvm-hypervisor"

# Programs shipped with this package (ganeti_kvm/tools/), computed from the
# package location, so they are right for an installed package and for an
# editable checkout alike.
TOOLS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")
KVM_CONSOLE_WRAPPER = os.path.join(TOOLS_DIR, "kvm-console-wrapper")
KVM_IFUP = os.path.join(TOOLS_DIR, "kvm-ifup")

# Instance names are host names: letters, digits, dots, dashes, underscores.
# Anything else (spaces, slashes, shell metacharacters) is refused before it
# can reach a path, a QEMU option or a hook.
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,62}")
_UNIX_PATH_MAX = 107  # sun_path holds 108 bytes including the final NUL

# The suffix of the longest socket file name: NAME + ".serial"
_LONGEST_SOCKET_SUFFIX = ".serial"
# ganeti-kvmd's marker of a guest's own power-off: ctrl/NAME.shutdown
SHUTDOWN_MARKER_SUFFIX = ".shutdown"


def check_instance_name(name: object) -> str:
    """Return ``name`` if it is a usable instance name, else raise HypervisorError."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or name in (".", ".."):
        raise errors.HypervisorError(
            f"Invalid instance name {name!r}: use 1-63 letters, digits, '.', '-' or '_', "
            "starting with a letter, digit or '_' (no spaces, slashes or shell characters)")
    return name


def default_run_dir() -> str:
    """The run directory from ``GANETI_KVM_RUN_DIR`` or the built-in default."""
    return os.environ.get(RUN_DIR_ENV) or DEFAULT_RUN_DIR


@dataclass(frozen=True)
class RunDir:
    """The layout of one node's run directory."""

    root: str

    @property
    def pid_dir(self) -> str:
        return os.path.join(self.root, "pid")

    @property
    def ctrl_dir(self) -> str:
        return os.path.join(self.root, "ctrl")

    @property
    def conf_dir(self) -> str:
        return os.path.join(self.root, "conf")

    @property
    def lock_dir(self) -> str:
        return os.path.join(self.root, "lock")

    @property
    def uid_dir(self) -> str:
        return os.path.join(self.root, "uid")

    @property
    def chroot_dir(self) -> str:
        return os.path.join(self.root, "chroot")

    @property
    def quarantine_dir(self) -> str:
        return os.path.join(self.root, "chroot-quarantine")

    @property
    def cache_dir(self) -> str:
        return os.path.join(self.root, "cache")

    def all_dirs(self) -> list[str]:
        """Every directory of the layout, root first."""
        return [self.root, self.pid_dir, self.ctrl_dir, self.conf_dir, self.lock_dir,
                self.uid_dir, self.chroot_dir, self.quarantine_dir, self.cache_dir]

    def instance(self, name: str) -> InstancePaths:
        """The paths of one instance; validates the name and socket path lengths."""
        check_instance_name(name)
        paths = InstancePaths(self, name)
        longest = paths.serial_socket
        if len(os.fsencode(longest)) > _UNIX_PATH_MAX:
            raise errors.HypervisorError(
                f"Socket path {longest!r} is longer than {_UNIX_PATH_MAX} bytes; "
                "use a shorter run directory or instance name")
        return paths


@dataclass(frozen=True)
class InstancePaths:
    """All files of one instance under a run directory."""

    run_dir: RunDir
    name: str

    @property
    def pidfile(self) -> str:
        return os.path.join(self.run_dir.pid_dir, self.name)

    @property
    def qmp_socket(self) -> str:
        return os.path.join(self.run_dir.ctrl_dir, self.name + ".qmp")

    @property
    def qmp_long_socket(self) -> str:
        """A second QMP monitor for the operations that hold the instance's
        lock (a start's set-up, a migration), so that they never queue behind
        the listing calls on :attr:`qmp_socket`, nor those behind them: a QMP
        socket serves one client at a time."""
        return os.path.join(self.run_dir.ctrl_dir, self.name + ".qmpl")

    @property
    def monitor_socket(self) -> str:
        return os.path.join(self.run_dir.ctrl_dir, self.name + ".monitor")

    @property
    def kvmd_socket(self) -> str:
        """A QMP monitor for Ganeti's ganeti-kvmd (``user_shutdown``), named as Ganeti
        names it: kvmd watches the ``ctrl`` directory for ``*.kvmd`` sockets, reads
        their events and tells a guest's own power-off from an administrator's stop
        (it writes :attr:`shutdown_marker`).  Never used by the library itself."""
        return os.path.join(self.run_dir.ctrl_dir, self.name + ".kvmd")

    @property
    def kvmd_bind_socket(self) -> str:
        """Where QEMU creates :attr:`kvmd_socket`; the library links it to its name
        once QEMU listens.  kvmd connects to a ``*.kvmd`` socket the moment the
        file appears, which QEMU's bind does before its listen: kvmd's connect
        would then be refused, and kvmd never tries again."""
        return os.path.join(self.run_dir.ctrl_dir, self.name + ".kvmdl")

    @property
    def shutdown_marker(self) -> str:
        """The file ganeti-kvmd writes when the guest powered itself off (Ganeti's
        name); removed by every start, stop and clean-up the administrator asks for."""
        return os.path.join(self.run_dir.ctrl_dir, self.name + SHUTDOWN_MARKER_SUFFIX)

    @property
    def guest_agent_socket(self) -> str:
        """The host end of the QEMU guest agent's virtio-serial channel
        (``use_guest_agent``; Ganeti's name)."""
        return os.path.join(self.run_dir.ctrl_dir, self.name + ".qga")

    @property
    def serial_socket(self) -> str:
        return os.path.join(self.run_dir.ctrl_dir, self.name + _LONGEST_SOCKET_SUFFIX)

    @property
    def runtime_file(self) -> str:
        return os.path.join(self.run_dir.conf_dir, self.name + ".runtime")

    @property
    def migration_state(self) -> str:
        """The source's record of a migration in progress (see :mod:`ganeti_kvm.core.migration`)."""
        return os.path.join(self.run_dir.conf_dir, self.name + ".migration")

    @property
    def migration_prepared(self) -> str:
        """What the source set up for the next migration, and for which QEMU (see
        :mod:`ganeti_kvm.core.migration`)."""
        return os.path.join(self.run_dir.conf_dir, self.name + ".migration-ready")

    @property
    def qemu_log(self) -> str:
        """QEMU's own output (``-D``), emptied at every start; see :mod:`ganeti_kvm.qemu.log`."""
        return os.path.join(self.run_dir.ctrl_dir, self.name + ".log")

    @property
    def lock_file(self) -> str:
        return os.path.join(self.run_dir.lock_dir, self.name + ".lock")

    @property
    def chroot(self) -> str:
        return os.path.join(self.run_dir.chroot_dir, self.name)

    def vnc_socket(self, directory: str) -> str:
        """The VNC unix socket when ``vnc_bind_address`` is a directory."""
        return os.path.join(directory, self.name + ".vnc")

    def control_files(self) -> list[str]:
        """The files through which a running QEMU is reached or a migration of it is
        steered: nothing needs them once its process has been told to end."""
        return [self.qmp_socket, self.qmp_long_socket, self.monitor_socket, self.serial_socket,
                self.kvmd_socket, self.kvmd_bind_socket, self.guest_agent_socket,
                self.migration_state, self.migration_prepared]

    def runtime_files(self) -> list[str]:
        """Files that a stopped instance may leave behind."""
        return [self.pidfile, self.qmp_socket, self.qmp_long_socket, self.monitor_socket,
                self.serial_socket, self.qemu_log, self.migration_state,
                self.migration_prepared, self.kvmd_socket, self.kvmd_bind_socket,
                self.guest_agent_socket]
