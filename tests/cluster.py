"""A real two-node Ganeti 3.0 or 3.1 cluster on this one machine, for end-to-end tests.

:class:`Cluster` builds the cluster (``up``), runs commands in its nodes
(``gnt``, ``run``) and removes every trace of it (``down``).  The pytest
fixture :func:`ganeti_cluster` builds one per test session and removes it at
the end, failed tests or not, and then fails the run if anything is left::

    def test_start(ganeti_cluster: Cluster) -> None:
        cluster = ganeti_cluster
        cluster.gnt("node1", "gnt-instance", "add", "-t", "sharedfile", "-o", "noop",
                    "--disk", "0:size=1G", "--no-name-check", "--no-ip-check",
                    "-n", "node1.example.test", "inst1")
        pid = cluster.instance_pid("node1", "inst1")      # Ganeti's pidfile
        assert cluster.in_namespace(pid, "node1", "net")
        cluster.gnt("node1", "gnt-instance", "remove", "-f", "inst1")

Tests that leave instances behind are harmless to the teardown, but later
tests share the cluster: remove what you add.  The fixture is parametrised
by Ganeti version (:data:`VERSIONS`; ``GANETI_KVM_CLUSTER_VERSIONS="3.0"``
picks some): every test using it runs once on each version's cluster.  ``python3 -m tests.cluster``
removes clusters left by killed sessions.

How the nodes are made
    Each node is a set of persistent network, UTS and mount namespaces
    (``unshare --net=F --uts=F --mount=F --propagation private``).  The
    namespace files live in ``ROOT/ns``, a directory bind-mounted onto itself
    and made private, which the kernel requires for a mount namespace file.
    A third namespace, "lan", holds the bridge ``lan0``; a veth pair joins
    each node's bridge ``gntbr0`` to it.  The addresses (198.51.100.0/24,
    TEST-NET-2) exist only inside these namespaces: nothing is added to the
    machine's own network namespace.

    In its mount namespace a node sees a fresh sysfs (else Ganeti would see
    the machine's links) and its own copies, bind-mounted from ``ROOT/NODE``,
    of ``/etc/ganeti``, ``/var/lib/ganeti``, ``/var/log/ganeti``, ``/etc/ssh``,
    ``/etc/hosts``, ``/run``, ``/srv``, ``/root`` and ``/var/backups``.  Ganeti
    rewrites ssh host keys and ``authorized_keys``, its node join runs
    ``service ssh restart``, and ``gnt-cluster upgrade`` leaves a tar of the
    configuration in ``/var/backups``, so none of these may be the machine's.
    ``/srv`` and ``/root`` are bound whole because ``/srv/ganeti`` and ``/root/.ssh`` need not exist
    on the machine, and making them there would leave files behind.  One host
    directory, ``ROOT/shared``, is bound into both nodes as the ``sharedfile``
    storage directory.

    Which Ganeti a node runs is what Debian's side-by-side packaging makes
    it: every installed version has its own ``/usr/share/ganeti/VERSION``
    and ``/usr/lib/ganeti/VERSION``, and ``/usr/sbin``'s commands and daemons
    reach them through ``/usr/share/ganeti/default`` and
    ``/usr/lib/ganeti/default``, symlinks to ``/etc/ganeti/share`` and
    ``/etc/ganeti/lib``.  The node's own ``/etc/ganeti`` names the cluster's
    version there (``gnt-cluster upgrade`` changes those two links).  When
    the machine has a ``/usr/sbin/policy-rc.d`` (a container's, refusing
    every service action), each node gets one of its own that allows them:
    the nodes are where Ganeti's daemons run, and a package's maintainer
    scripts restart them through ``invoke-rc.d``.

    Every command runs through ``nsenter`` into its node with a clean
    environment (the Python first on the caller's PATH is not Ganeti's); the
    daemons inherit it.  Each node runs its own sshd, listening only on the
    node's address.

How it is removed
    No orderly Ganeti shutdown is needed, since all of Ganeti's state lives
    under ``ROOT``: every process in one of the cluster's namespaces (QEMU,
    the Ganeti daemons, sshd) gets SIGTERM by PID, SIGKILL if it lingers; the
    namespace files and ``ROOT/ns`` are unmounted, and ``ROOT`` is deleted.
    :meth:`Cluster.leftovers` then checks that no process, mount or directory
    is left.  A cluster whose test session died (``kill -9``) is removed by
    the next session (:func:`remove_stale_clusters`).

Limits of the test machine: it has no ``/proc/sysrq-trigger``, so ``gnt-cluster
verify`` always reports one node setup error for it (:data:`SYSRQ_ERROR`);
Linux guests only boot under TCG (``kvm_flag=disabled``); and without
``/dev/vhost-net`` the cluster's default is ``vhost_net=false`` (Ganeti 3.1's
own default is true).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import pytest

from ganeti_kvm.host import process

log = logging.getLogger(__name__)

DOMAIN = "example.test"
SUBNET = "198.51.100"
PREFIX_LENGTH = 24
CLUSTER_NAME = f"cluster.{DOMAIN}"
CLUSTER_IP = f"{SUBNET}.10"
NODE_BRIDGE = "gntbr0"
LAN_BRIDGE = "lan0"
# The lan end of each node's veth pair; the node end is called eth0.
LAN_PORT_PREFIX = "gkv-"

# Paths inside every node.
FILE_STORAGE_DIR = "/srv/ganeti/file-storage"
SHARED_STORAGE_DIR = "/srv/ganeti/shared-file-storage"
KVM_PID_DIR = "/run/ganeti/kvm-hypervisor/pid"

CLEAN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CLEAN_ENV = {"HOME": "/root", "PATH": CLEAN_PATH, "LANG": "C.UTF-8", "TERM": "dumb"}
GANETI_PACKAGES = ("ganeti", "ganeti-os-noop", "openssh-server")
# The Ganeti versions a cluster can run; scripts/setup.sh installs both.
VERSIONS = ("3.0", "3.1")
DEFAULT_VERSION = "3.0"
VERSIONS_ENV = "GANETI_KVM_CLUSTER_VERSIONS"
GANETI_SHARE = "/usr/share/ganeti"
GANETI_LIB = "/usr/lib/ganeti"
POLICY_RC_D = "/usr/sbin/policy-rc.d"
VHOST_NET_DEVICE = "/dev/vhost-net"
# What the cluster needs from the machine; scripts/setup.sh installs it.
REQUIRED_PROGRAMS = {
    "/usr/sbin/gnt-cluster": "Ganeti 3.0 (Debian package ganeti)",
    "/usr/share/ganeti/os/noop/create": "Ganeti's noop OS (Debian package ganeti-os-noop)",
    "/usr/sbin/sshd": "OpenSSH's sshd (Debian package openssh-server)",
    "/usr/bin/nsenter": "nsenter (util-linux)",
    "/usr/bin/unshare": "unshare (util-linux)",
    "/usr/bin/qemu-system-x86_64": "QEMU (Debian package qemu-system-x86)",
}
# Host paths a cluster must leave exactly as it found them.
HOST_PATHS = ("/etc/hosts", "/etc/ssh", "/root/.ssh", "/etc/ganeti", "/var/lib/ganeti",
              "/var/log/ganeti", "/run/ganeti", "/srv/ganeti", "/var/backups")
# The one error `gnt-cluster verify` reports, once per node, on a machine
# without /proc/sysrq-trigger (see machine_has_sysrq).
SYSRQ_ERROR = re.compile(
    r"ERROR: node (\S+): node setup error: .*the file /proc/sysrq-trigger$")

# Every cluster lives in a directory named ROOT_PREFIX* under the base
# directory; OWNER_FILE in it names the process that made it.
ROOT_PREFIX = "gk-gnt-"
OWNER_FILE = "owner"

COMMAND_TIMEOUT = 60.0
JOB_TIMEOUT = 300.0
TERM_TIMEOUT = 10.0
NAMESPACE_KINDS = ("net", "uts", "mnt")


class ClusterError(Exception):
    """The test cluster could not be built, used or removed; the message says why."""


@dataclass(frozen=True)
class Node:
    """One node: its short name (``node1``), its address and its full name."""

    name: str
    address: str

    @property
    def fqdn(self) -> str:
        return f"{self.name}.{DOMAIN}"


@dataclass(frozen=True)
class _Bind:
    """A node directory (or file) bind-mounted over ``target`` inside the node."""

    source: str  # relative to the node's directory
    target: str


# The node's view, in mount order: /srv before the shared storage inside it.
_BINDS = (
    _Bind("etc-ganeti", "/etc/ganeti"),
    _Bind("lib", "/var/lib/ganeti"),
    _Bind("log", "/var/log/ganeti"),
    _Bind("run", "/run"),
    _Bind("srv", "/srv"),
    _Bind("home", "/root"),
    _Bind("etc-ssh", "/etc/ssh"),
    _Bind("hosts", "/etc/hosts"),
    # gnt-cluster upgrade keeps a tar of the configuration there.
    _Bind("backups", "/var/backups"),
)
# Bound only when the machine has one (see the module docstring).
_POLICY_BIND = _Bind("policy-rc.d", POLICY_RC_D)
_NODE_POLICY = """#!/bin/sh
# policy-rc.d of a ganeti-kvm test cluster node (tests/cluster.py): the node's
# services (Ganeti's daemons) may be started and restarted.
exit 0
"""

# The sshd of a node: its own address only, keys only, no PAM (the machine's
# PAM stack would talk to the machine's login records and session manager).
_SSHD_CONFIG = """\
# sshd of a ganeti-kvm test cluster node (tests/cluster.py)
ListenAddress {address}
PidFile /run/sshd.pid
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PrintMotd no
PrintLastLog no
Subsystem sftp /usr/lib/openssh/sftp-server
"""


def version_paths(version: str) -> dict[str, str]:
    """The files that make Ganeti ``version`` runnable, and what provides them."""
    return {os.path.join(GANETI_SHARE, version, "ganeti", "__init__.py"):
            f"Ganeti {version}'s Python code (Debian package ganeti-{version})",
            os.path.join(GANETI_LIB, version, "usr", "sbin", "ganeti-luxid"):
            f"Ganeti {version}'s daemons (Debian package ganeti-haskell-{version})"}


def wanted_versions(env: dict[str, str] | None = None) -> list[str]:
    """The versions to build clusters of: $GANETI_KVM_CLUSTER_VERSIONS, else all."""
    text = (os.environ if env is None else env).get(VERSIONS_ENV, "").strip()
    if not text:
        return list(VERSIONS)
    wanted = text.replace(",", " ").split()
    unknown = [v for v in wanted if v not in VERSIONS]
    if unknown:
        raise ClusterError(f"{VERSIONS_ENV}={text!r}: unknown Ganeti version "
                           f"{', '.join(unknown)}; use some of {', '.join(VERSIONS)}")
    return wanted


def ganeti_missing(version: str = DEFAULT_VERSION) -> list[str]:
    """What of :data:`REQUIRED_PROGRAMS` and Ganeti ``version`` this machine lacks."""
    needed = {**REQUIRED_PROGRAMS, **version_paths(version)}
    missing = [f"{what} at {path}" for path, what in needed.items()
               if not os.path.exists(path)]
    if os.geteuid() != 0:
        missing.append("root (namespaces and mounts)")
    return missing


def require_ganeti(version: str = DEFAULT_VERSION) -> None:
    """Skip the calling test if Ganeti ``version`` is missing here; with CI=true, fail."""
    missing = ganeti_missing(version)
    if not missing:
        return
    message = f"the Ganeti test cluster needs {'; '.join(missing)}; run 'make setup'"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


def machine_has_sysrq() -> bool:
    """Whether Ganeti's node check for /proc/sys and /proc/sysrq-trigger passes here."""
    return os.path.isdir("/proc/sys") and os.path.isfile("/proc/sysrq-trigger")


def _command_text(argv: Sequence[str]) -> str:
    return " ".join(argv)


def _run(argv: Sequence[str], *, check: bool = True, timeout: float = COMMAND_TIMEOUT,
         input_text: str | None = None,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` (never through a shell) within ``timeout`` seconds."""
    try:
        result = subprocess.run(list(argv), input=input_text, capture_output=True, text=True,
                                timeout=timeout, check=False, env=env, cwd="/",
                                stdin=None if input_text is not None else subprocess.DEVNULL)
    except subprocess.TimeoutExpired as err:
        raise ClusterError(f"{_command_text(argv)} did not finish within {timeout:.0f} s; "
                           f"output so far: {err.stdout!r} {err.stderr!r}") from err
    except OSError as err:
        raise ClusterError(f"cannot run {_command_text(argv)}: {err}; "
                           "run 'make setup' to install what the cluster needs") from err
    if check and result.returncode != 0:
        raise ClusterError(f"{_command_text(argv)} exited with {result.returncode}:\n"
                           f"{(result.stdout + result.stderr).strip()}")
    return result


def _ns_identity(path: str) -> tuple[int, int] | None:
    """(device, inode) of a namespace file or /proc/PID/ns link; None if it is gone."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _unescape_mountinfo(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (\\040...)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts_below(path: str) -> list[str]:
    """Mount points at or below ``path`` in this process's mount namespace."""
    prefix = path.rstrip("/") + "/"
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8") as handle:
        for line in handle:
            target = _unescape_mountinfo(line.split()[4])
            if target == path or target.startswith(prefix):
                found.append(target)
    return found


def _tree_digest(path: str) -> str:
    """A hash of everything under ``path``: names, types, modes, owners, contents."""
    digest = hashlib.sha256()

    def add(entry: str) -> None:
        try:
            st = os.lstat(entry)
        except FileNotFoundError:
            digest.update(f"{entry} absent\n".encode())
            return
        digest.update(f"{entry} {st.st_mode:o} {st.st_uid} {st.st_gid}\n".encode())
        if stat.S_ISLNK(st.st_mode):
            digest.update(os.readlink(entry).encode())
        elif stat.S_ISREG(st.st_mode):
            with open(entry, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 16), b""):
                    digest.update(block)

    add(path)
    if os.path.isdir(path) and not os.path.islink(path):
        for directory, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(dirs + files):
                add(os.path.join(directory, name))
    return digest.hexdigest()


def host_snapshot(paths: Iterable[str] = HOST_PATHS) -> dict[str, str]:
    """Digest of each host path the cluster must not change (see :data:`HOST_PATHS`)."""
    return {path: _tree_digest(path) for path in paths}


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _start_time(pid: int) -> str | None:
    """When ``pid`` started (clock ticks since boot), to tell a reused PID apart."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            raw = handle.read()
    except OSError:
        return None
    fields = raw[raw.rfind(b")") + 2:].split()
    return fields[19].decode("ascii") if len(fields) > 19 else None


def _owner_alive(record: str) -> bool:
    """Whether the process an owner record (``PID STARTTIME``) names still runs."""
    try:
        pid_text, started = record.split()
        pid = int(pid_text)
    except ValueError:
        return False
    return process.is_alive(pid) and _start_time(pid) == started


def _describe(pid: int) -> str:
    argv = process.cmdline(pid) or ["?"]
    return f"PID {pid} ({' '.join(argv)[:120]})"


class Cluster:
    """A two-node Ganeti cluster (``version``: 3.0 or 3.1) in namespaces on this machine.

    Use it as a context manager (``with Cluster(...) as cluster:``) or call
    :meth:`up` and :meth:`down`; ``down`` is safe to call at any point, also
    after a failed ``up``, and more than once.

    ``kernel`` and ``initrd`` (the test guest) are copied into the cluster and
    become the cluster's KVM defaults, together with ``kvm_path``,
    ``kvm_flag=disabled`` (Linux guests boot under TCG only here) and a serial
    console; ``hvparams`` adds or overrides cluster KVM defaults.
    """

    def __init__(self, kernel: str | None = None, initrd: str | None = None,
                 kvm_path: str = "/usr/bin/qemu-system-x86_64",
                 hvparams: dict[str, str] | None = None, base_dir: str = "/tmp",
                 version: str = DEFAULT_VERSION) -> None:
        if version not in VERSIONS:
            raise ClusterError(f"no Ganeti {version!r} for the test cluster; use one of "
                               f"{', '.join(VERSIONS)}")
        self.version = version
        self.nodes = {name: Node(name, f"{SUBNET}.{11 + index}")
                      for index, name in enumerate(("node1", "node2"))}
        self.master = "node1"
        self.kernel, self.initrd = kernel, initrd
        self.kvm_path = kvm_path
        self.extra_hvparams = dict(hvparams or {})
        self.base_dir = base_dir
        self.root = ""  # made by up(), emptied by a clean down()
        self.last_root = ""  # kept for leftovers() after down()
        # In-node paths of the copied guest (cluster defaults), set by up().
        self.kernel_path = self.initrd_path = ""
        self.timings: dict[str, float] = {}
        self._namespaces: dict[str, tuple[int, int]] = {}
        self._stragglers: list[str] = []

    # --- paths -------------------------------------------------------------

    @property
    def ns_dir(self) -> str:
        return os.path.join(self.root, "ns")

    @property
    def shared_dir(self) -> str:
        """The host directory that is :data:`SHARED_STORAGE_DIR` in both nodes."""
        return os.path.join(self.root, "shared")

    @property
    def files_dir(self) -> str:
        """Host directory for files every node sees at the same path (see add_file)."""
        return os.path.join(self.root, "files")

    def ns_file(self, node: str, kind: str = "net") -> str:
        """The file holding ``node``'s (or "lan"'s) namespace ``kind``: net, uts or mnt."""
        if kind not in NAMESPACE_KINDS:
            raise ClusterError(f"unknown namespace kind {kind!r}; use one of "
                               f"{', '.join(NAMESPACE_KINDS)}")
        if node != "lan":
            self._node(node)
        return os.path.join(self.ns_dir, f"{node}.{kind}")

    def node_dir(self, node: str) -> str:
        return os.path.join(self.root, self._node(node).name)

    def host_path(self, node: str, path: str) -> str:
        """Where ``path`` as ``node`` sees it lives on the host (for bound directories)."""
        path = os.path.normpath(path)
        for bind in sorted(_BINDS, key=lambda b: len(b.target), reverse=True):
            if path == bind.target or path.startswith(bind.target + "/"):
                if bind.target == "/srv" and (path == SHARED_STORAGE_DIR or
                                              path.startswith(SHARED_STORAGE_DIR + "/")):
                    return self.shared_dir + path[len(SHARED_STORAGE_DIR):]
                return os.path.join(self.node_dir(node), bind.source) + path[len(bind.target):]
        return path

    def _node(self, node: str) -> Node:
        try:
            return self.nodes[node]
        except KeyError:
            raise ClusterError(f"no node {node!r} in the test cluster; nodes are "
                               f"{', '.join(self.nodes)}") from None

    # --- running commands --------------------------------------------------

    def _enter(self, node: str) -> list[str]:
        return ["/usr/bin/nsenter", f"--net={self.ns_file(node, 'net')}",
                f"--uts={self.ns_file(node, 'uts')}", f"--mount={self.ns_file(node, 'mnt')}",
                "--"]

    def run(self, node: str, *argv: str, check: bool = True, timeout: float = COMMAND_TIMEOUT,
            input_text: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` as root inside ``node`` with a clean environment.

        With ``check`` a non-zero exit raises :class:`ClusterError` carrying the
        output; without it the caller reads ``returncode``.
        """
        if not argv:
            raise ClusterError(f"no command given to run in {node}")
        return _run([*self._enter(node), *argv], check=check, timeout=timeout,
                    input_text=input_text, env=dict(CLEAN_ENV))

    def gnt(self, node: str, *argv: str, check: bool = True,
            timeout: float = JOB_TIMEOUT) -> subprocess.CompletedProcess[str]:
        """Run a Ganeti command (``gnt("node1", "gnt-node", "list")``) inside ``node``."""
        if not argv or not argv[0].startswith("gnt-") or "/" in argv[0]:
            raise ClusterError(f"gnt() runs Ganeti's gnt-* commands, not {argv[:1]!r}; "
                               "use run() for anything else")
        return self.run(node, *argv, check=check, timeout=timeout)

    def _lan(self, *argv: str, input_text: str | None = None) -> None:
        _run(["/usr/bin/nsenter", f"--net={self.ns_file('lan', 'net')}", "--", *argv],
             input_text=input_text, env=dict(CLEAN_ENV))

    # --- processes and namespaces -----------------------------------------

    def in_namespace(self, pid: int, node: str, kind: str = "net") -> bool:
        """Whether process ``pid`` lives in ``node``'s namespace ``kind``."""
        ours = _ns_identity(self.ns_file(node, kind))
        return ours is not None and _ns_identity(f"/proc/{pid}/ns/{kind}") == ours

    def members(self) -> dict[int, str]:
        """Every live process in one of the cluster's namespaces: PID -> namespace name."""
        wanted = {identity: name for name, identity in self._namespaces.items()}
        found: dict[int, str] = {}
        if not wanted:
            return found
        for pid in _pids():
            if pid == os.getpid() or process.state(pid) in (None, "Z"):
                continue
            for kind in NAMESPACE_KINDS:
                name = wanted.get(_ns_identity(f"/proc/{pid}/ns/{kind}") or (0, 0))
                if name:
                    found[pid] = name
                    break
        return found

    def instance_pid(self, node: str, instance: str) -> int | None:
        """PID of ``instance``'s QEMU on ``node``, from Ganeti's pidfile (None if none)."""
        path = self.host_path(node, os.path.join(KVM_PID_DIR, instance))
        return process.read_pidfile(path)

    # --- files -------------------------------------------------------------

    def add_file(self, source: str, name: str | None = None) -> str:
        """Copy ``source`` to a path every node sees; return that path."""
        target = os.path.join(self.files_dir, name or os.path.basename(source))
        try:
            shutil.copyfile(source, target)
            os.chmod(target, 0o644)
        except OSError as err:
            raise ClusterError(f"cannot copy {source} into the test cluster: {err}") from err
        return target

    # --- building ----------------------------------------------------------

    def __enter__(self) -> Cluster:
        self.up()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.down()

    def up(self) -> None:
        """Build the cluster (about 10 s); on failure remove what was made, then raise."""
        if self.root:
            raise ClusterError(f"the test cluster in {self.root} is already up")
        started = time.monotonic()
        try:
            self._make_root()
            self._make_namespace_dir()
            self._make_lan()
            for node in self.nodes:
                self._prepare_node(node)
            for node in self.nodes:
                self._make_node_namespaces(node)
                self._connect_node(node)
                self._start_sshd(node)
            self._wait_for_ssh()
            self._copy_guest()
            self.timings["up.namespaces"] = time.monotonic() - started
            self._init_cluster()
            self.timings["up.init"] = time.monotonic() - started
            self._add_nodes()
        except BaseException:
            log.exception("building the test cluster failed; removing it")
            try:
                self.down()
            except ClusterError:
                log.exception("removing the half-built test cluster failed too")
            raise
        self.timings["up"] = time.monotonic() - started
        log.info("test cluster up in %.1f s at %s", self.timings["up"], self.root)

    def _make_root(self) -> None:
        self.root = self.last_root = tempfile.mkdtemp(prefix=ROOT_PREFIX, dir=self.base_dir)
        # Ganeti's daemons run as their own users and must reach the files dir.
        os.chmod(self.root, 0o755)
        with open(os.path.join(self.root, OWNER_FILE), "w", encoding="ascii") as handle:
            handle.write(f"{os.getpid()} {_start_time(os.getpid())}\n")
        for directory in (self.ns_dir, self.shared_dir, self.files_dir):
            os.mkdir(directory, 0o755)

    def _make_namespace_dir(self) -> None:
        _run(["mount", "--bind", self.ns_dir, self.ns_dir])
        _run(["mount", "--make-private", self.ns_dir])

    def _persist(self, name: str, kinds: Sequence[str], argv: Sequence[str] = ("true",)) -> None:
        """Make persistent namespaces ``kinds`` for ``name`` (files in the ns dir)."""
        options = []
        for kind in kinds:
            path = os.path.join(self.ns_dir, f"{name}.{kind}")
            with open(path, "x"):
                pass
            flag = "mount" if kind == "mnt" else kind
            options.append(f"--{flag}={path}")
        if "mnt" in kinds:
            options += ["--propagation", "private"]
        _run(["/usr/bin/unshare", *options, *argv])
        for kind in kinds:
            identity = _ns_identity(os.path.join(self.ns_dir, f"{name}.{kind}"))
            if identity is None:
                raise ClusterError(f"namespace {name}.{kind} vanished right after unshare")
            self._namespaces[f"{name}.{kind}"] = identity

    def _make_lan(self) -> None:
        self._persist("lan", ("net",))
        self._lan("ip", "-batch", "-", input_text=(
            "link set lo up\n"
            f"link add {LAN_BRIDGE} type bridge\n"
            f"link set {LAN_BRIDGE} up\n"))

    def _prepare_node(self, name: str) -> None:
        """The node's private files: Ganeti config dirs, /run, /srv, /root, ssh, hosts."""
        node = self.nodes[name]
        base = self.node_dir(name)
        os.mkdir(base, 0o755)
        shutil.copytree("/etc/ganeti", os.path.join(base, "etc-ganeti"), symlinks=True)
        self._select_version(os.path.join(base, "etc-ganeti"))
        if os.path.exists(POLICY_RC_D):
            path = os.path.join(base, _POLICY_BIND.source)
            with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o755), "w",
                      encoding="ascii") as handle:
                handle.write(_NODE_POLICY)
        # Ganeti 3.0 has one whitelist for both file and sharedfile storage.
        with open(os.path.join(base, "etc-ganeti", "file-storage-paths"), "w",
                  encoding="ascii") as handle:
            handle.write(f"{FILE_STORAGE_DIR}\n{SHARED_STORAGE_DIR}\n")
        for directory, mode in (("lib", 0o755), ("log", 0o755), ("run", 0o755),
                                ("backups", 0o755),
                                ("run/ganeti", 0o755), ("run/lock", 0o1777),
                                ("run/sshd", 0o755), ("srv", 0o755), ("srv/ganeti", 0o755),
                                ("srv/ganeti/file-storage", 0o750),
                                ("srv/ganeti/shared-file-storage", 0o755),
                                ("home", 0o700), ("home/.ssh", 0o700)):
            path = os.path.join(base, directory)
            os.mkdir(path)
            os.chmod(path, mode)  # mkdir's mode is cut by the umask
        os.symlink("/dev/shm", os.path.join(base, "run", "shm"))
        self._prepare_ssh(node, os.path.join(base, "etc-ssh"))
        lines = ["127.0.0.1 localhost", f"{CLUSTER_IP} {CLUSTER_NAME} cluster"]
        lines += [f"{n.address} {n.fqdn} {n.name}" for n in self.nodes.values()]
        with open(os.path.join(base, "hosts"), "w", encoding="ascii") as handle:
            handle.write("\n".join(lines) + "\n")

    def _select_version(self, etc_ganeti: str) -> None:
        """Point the node's /etc/ganeti/share and lib at the cluster's Ganeti version."""
        for link, top in (("share", GANETI_SHARE), ("lib", GANETI_LIB)):
            path = os.path.join(etc_ganeti, link)
            if os.path.lexists(path):
                os.remove(path)
            os.symlink(os.path.join(top, self.version), path)

    def node_version(self, node: str) -> str:
        """The Ganeti version ``node``'s /etc/ganeti/share names (changed by an upgrade)."""
        link = os.readlink(os.path.join(self.node_dir(node), "etc-ganeti", "share"))
        return os.path.basename(os.path.normpath(link))

    @staticmethod
    def _prepare_ssh(node: Node, etc_ssh: str) -> None:
        """The node's /etc/ssh: the client config, fresh host keys and our sshd_config."""
        shutil.copytree("/etc/ssh", etc_ssh, symlinks=True, ignore=shutil.ignore_patterns(
            "ssh_host_*", "sshd_config", "sshd_config.d", "sshd_not_to_be_run"))
        with open(os.path.join(etc_ssh, "sshd_config"), "w", encoding="ascii") as handle:
            handle.write(_SSHD_CONFIG.format(address=node.address))
        for kind in ("ed25519", "rsa"):
            key = os.path.join(etc_ssh, f"ssh_host_{kind}_key")
            bits = ["-b", "2048"] if kind == "rsa" else []
            _run(["ssh-keygen", "-q", "-t", kind, *bits, "-N", "", "-C", f"root@{node.fqdn}",
                  "-f", key], env=dict(CLEAN_ENV))

    def _make_node_namespaces(self, name: str) -> None:
        node = self.nodes[name]
        base = self.node_dir(name)
        self._persist(name, ("net", "uts", "mnt"))
        self.run(name, "hostname", node.fqdn)
        # /sys/class/net must show this node's links: Ganeti looks for bridges there.
        self.run(name, "mount", "-t", "sysfs", "-o", "nosuid,nodev,noexec", "sysfs", "/sys")
        binds = [*_BINDS]
        if os.path.exists(os.path.join(base, _POLICY_BIND.source)):
            binds.append(_POLICY_BIND)
        for bind in binds:
            self.run(name, "mount", "--bind", os.path.join(base, bind.source), bind.target)
        self.run(name, "mount", "--bind", self.shared_dir, SHARED_STORAGE_DIR)
        # The namespace files of the lan and of earlier nodes are mounted in the
        # copy this node got; drop them so only the host's mounts hold them.
        self.run(name, "umount", "--lazy", self.ns_dir)

    def _connect_node(self, name: str) -> None:
        node = self.nodes[name]
        port = f"{LAN_PORT_PREFIX}{name}"
        self._lan("ip", "link", "add", port, "type", "veth", "peer", "name", "eth0",
                  "netns", self.ns_file(name, "net"))
        self._lan("ip", "link", "set", port, "master", LAN_BRIDGE, "up")
        self.run(name, "ip", "-batch", "-", input_text=(
            "link set lo up\n"
            f"link add {NODE_BRIDGE} type bridge\n"
            f"link set eth0 master {NODE_BRIDGE} up\n"
            f"address add {node.address}/{PREFIX_LENGTH} dev {NODE_BRIDGE}\n"
            f"link set {NODE_BRIDGE} up\n"))

    def _start_sshd(self, name: str) -> None:
        # sshd listens before it puts itself in the background.
        self.run(name, "/usr/sbin/sshd", "-E",
                 os.path.join(self.node_dir(name), "sshd.log"))

    def _wait_for_ssh(self, timeout: float = 30.0) -> None:
        """Bounded wait until the master reaches every node's sshd over the lan."""
        probe = ("import socket, sys\n"
                 "socket.create_connection((sys.argv[1], 22), 2).close()\n")
        deadline = time.monotonic() + timeout
        for node in self.nodes.values():
            while True:
                result = self.run(self.master, "python3", "-c", probe, node.address,
                                  check=False)
                if result.returncode == 0:
                    break
                if time.monotonic() > deadline:
                    raise ClusterError(f"{self.master} cannot reach sshd on {node.fqdn} "
                                       f"({node.address}:22) within {timeout:.0f} s: "
                                       f"{result.stderr.strip()}")
                time.sleep(0.2)

    def _copy_guest(self) -> None:
        if self.kernel:
            self.kernel_path = self.add_file(self.kernel, "vmlinuz")
        if self.initrd:
            self.initrd_path = self.add_file(self.initrd, "initrd")

    def hvparams(self) -> dict[str, str]:
        """The cluster's KVM defaults (see the class docstring)."""
        params = {"kvm_path": self.kvm_path, "kvm_flag": "disabled",
                  "serial_console": "true", "vnc_bind_address": ""}
        if self.kernel_path:
            params["kernel_path"] = self.kernel_path
            # Ganeti adds console=ttyS0,SPEED itself (serial_console).
            params["kernel_args"] = "panic=-1 quiet"
        if self.initrd_path:
            params["initrd_path"] = self.initrd_path
        if not os.path.exists(VHOST_NET_DEVICE):
            # Ganeti 3.1 turns vhost_net on by default; its driver then opens
            # /dev/vhost-net for every paravirtual NIC and refuses to start.
            params["vhost_net"] = "false"
        params.update(self.extra_hvparams)
        return params

    @staticmethod
    def _option_list(params: dict[str, str]) -> str:
        """``key=value,...`` as Ganeti's command line reads it (commas escaped)."""
        for key, value in params.items():
            if "\\" in value or "\n" in value or not re.fullmatch(r"[a-z_0-9]+", key):
                raise ClusterError(f"parameter {key}={value!r} cannot be passed on Ganeti's "
                                   "command line: use a plain key and no backslash or newline")
        return ",".join(f"{key}={value.replace(',', chr(92) + ',')}"
                        for key, value in params.items())

    def _init_cluster(self) -> None:
        hvparams = self._option_list(self.hvparams())
        self.gnt(self.master, "gnt-cluster", "init", "--enabled-hypervisors=kvm",
                 "--enabled-disk-templates=sharedfile,file",
                 f"--file-storage-dir={FILE_STORAGE_DIR}",
                 f"--shared-file-storage-dir={SHARED_STORAGE_DIR}",
                 f"--master-netdev={NODE_BRIDGE}", f"--master-netmask={PREFIX_LENGTH}",
                 "--no-etc-hosts", f"--nic-parameters=mode=bridged,link={NODE_BRIDGE}",
                 "-H", f"kvm:{hvparams}", CLUSTER_NAME)

    def _add_nodes(self) -> None:
        """Join every other node; the master's root key is authorized there first."""
        master_ssh = self.host_path(self.master, "/root/.ssh")
        keys = ""
        for name in sorted(os.listdir(master_ssh)):
            if name.startswith("id_") and name.endswith(".pub"):
                with open(os.path.join(master_ssh, name), encoding="ascii") as handle:
                    keys += handle.read()
        if not keys:
            raise ClusterError(f"gnt-cluster init made no root ssh key in {master_ssh}")
        for name, node in self.nodes.items():
            if name == self.master:
                continue
            path = self.host_path(name, "/root/.ssh/authorized_keys")
            with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "w",
                      encoding="ascii") as handle:
                handle.write(keys)
            self.gnt(self.master, "gnt-node", "add", "--no-ssh-key-check", node.fqdn)

    # --- removing ----------------------------------------------------------

    def down(self) -> None:
        """Remove everything ``up`` made (well under a second); raise if something stays.

        Safe at any point of a failed ``up`` and when already down.
        """
        if not self.root:
            return
        started = time.monotonic()
        problems: list[str] = []
        if os.path.isdir(self.ns_dir):
            self._stop_processes()
            problems += self._stragglers
            self._unmount_namespaces(problems)
        left = mounts_below(self.root)
        if left:
            problems.append(f"still mounted, so {self.root} was kept: {', '.join(left)}")
        else:
            shutil.rmtree(self.root, ignore_errors=True)
            if os.path.exists(self.root):
                problems.append(f"could not delete {self.root}")
        self.timings["down"] = time.monotonic() - started
        if problems:
            raise ClusterError("the test cluster was not removed cleanly: " +
                               "; ".join(problems))
        self.root = ""
        log.info("test cluster removed in %.1f s", self.timings["down"])

    def _stop_processes(self) -> None:
        """SIGTERM every process in the cluster's namespaces, SIGKILL after a bound.

        The processes are found by PID: a process whose network, UTS or mount
        namespace is one of the cluster's is the cluster's (QEMU, the Ganeti
        daemons and their children, sshd and its sessions), and nothing else is.
        """
        self._stragglers = []
        for _attempt in range(3):
            # Killing a parent may let a child it was starting escape one sweep.
            pids = self.members()
            if not pids:
                return
            for pid in pids:
                process.signal_pid(pid, signal.SIGTERM)
                process.signal_pid(pid, signal.SIGCONT)
            deadline = time.monotonic() + TERM_TIMEOUT
            for pid in pids:
                if not process.wait_gone(pid, max(0.0, deadline - time.monotonic())):
                    log.warning("%s ignored SIGTERM; killing it", _describe(pid))
                    process.signal_pid(pid, signal.SIGKILL)
                    process.wait_gone(pid, TERM_TIMEOUT)
        self._stragglers = [f"process left in namespace {ns}: {_describe(pid)}"
                            for pid, ns in self.members().items()]

    def _unmount_namespaces(self, problems: list[str]) -> None:
        for entry in sorted(os.listdir(self.ns_dir)):
            path = os.path.join(self.ns_dir, entry)
            if path in mounts_below(path):
                result = _run(["umount", path], check=False)
                if result.returncode != 0:
                    problems.append(f"umount {path}: {result.stderr.strip()}")
        if self.ns_dir in mounts_below(self.ns_dir):
            result = _run(["umount", self.ns_dir], check=False)
            if result.returncode != 0:
                problems.append(f"umount {self.ns_dir}: {result.stderr.strip()}")

    def leftovers(self, root: str | None = None) -> list[str]:
        """What of a cluster (by default this one, or the one that was at ``root``) is left.

        Checks the last process sweep of ``down``, mounts and the directory
        itself, and the lan ports (which only ever exist in the lan namespace)
        in the machine's own network namespace.  Empty when nothing is left.
        """
        root = root or self.root or self.last_root
        found = list(self._stragglers)
        found += [f"mount {path}" for path in mounts_below(root)]
        if os.path.exists(root):
            found.append(f"directory {root}")
        links = _run(["ip", "-o", "link", "show"], check=False, env=dict(CLEAN_ENV)).stdout
        found += [f"host link {line.split(':')[1].strip()}" for line in links.splitlines()
                  if f": {LAN_PORT_PREFIX}" in line]
        return found


    @classmethod
    def adopt(cls, root: str) -> Cluster:
        """A handle on the cluster another process built at ``root``, to remove it."""
        cluster = cls(base_dir=os.path.dirname(root))
        cluster.root = cluster.last_root = root
        for name in ("lan", *cluster.nodes):
            for kind in NAMESPACE_KINDS:
                path = os.path.join(cluster.ns_dir, f"{name}.{kind}")
                identity = _ns_identity(path) if path in mounts_below(path) else None
                if identity is not None:
                    cluster._namespaces[f"{name}.{kind}"] = identity
        return cluster


def remove_stale_clusters(base_dir: str = "/tmp") -> list[str]:
    """Remove every cluster under ``base_dir`` whose maker is gone; return their roots.

    A test session killed before its teardown leaves its cluster running;
    the next session calls this first.  Clusters of live sessions are kept.
    """
    removed = []
    for entry in sorted(os.listdir(base_dir)):
        root = os.path.join(base_dir, entry)
        if not entry.startswith(ROOT_PREFIX) or not os.path.isdir(root):
            continue
        try:
            with open(os.path.join(root, OWNER_FILE), encoding="ascii") as handle:
                owner = handle.read()
        except FileNotFoundError:
            # Made by an up() that died at once, or one writing its owner file now.
            if time.time() - os.stat(root).st_mtime < 60:
                continue
            owner = ""
        if _owner_alive(owner):
            continue
        log.warning("removing the test cluster left at %s by a dead session", root)
        Cluster.adopt(root).down()
        removed.append(root)
    return removed


def _version_params() -> list[Any]:
    try:
        wanted = wanted_versions()
    except ClusterError as err:
        wanted = [f"invalid: {err}"]
    return [pytest.param(v, id=f"ganeti{v}") for v in wanted]


@pytest.fixture(scope="session", params=_version_params())
def ganeti_cluster(guest: Any, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """The session's two-node Ganeti cluster of one version, removed after its tests.

    pytest runs every test of the session that uses it on one version's
    cluster, removes that, then builds the next version's.  The removal is
    checked: if any process, mount or file of the cluster is left, or a host
    path in :data:`HOST_PATHS` changed, the last user of the fixture fails
    at teardown.  With CI=true a machine without that Ganeti fails;
    elsewhere the tests are skipped.
    """
    ganeti_version = str(request.param)
    if ganeti_version not in VERSIONS:
        pytest.fail(ganeti_version)  # the reason wanted_versions() gave
    require_ganeti(ganeti_version)
    remove_stale_clusters()
    before = host_snapshot()
    cluster = Cluster(kernel=guest.kernel, initrd=guest.initrd, version=ganeti_version)
    try:
        cluster.up()
        yield cluster
    finally:
        cluster.down()
    left = cluster.leftovers()
    changed = [path for path, digest in host_snapshot().items() if before[path] != digest]
    assert not left, f"the test cluster left: {left}"
    assert not changed, f"the test cluster changed host paths: {changed}"


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print("\n".join(f"removed {root}" for root in remove_stale_clusters()) or
          "no stale test cluster")
