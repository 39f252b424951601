"""The two-node Ganeti test cluster (tests/cluster.py, on 3.0 and 3.1) and Ganeti's own KVM driver.

The cluster is the session fixture ``ganeti_cluster``; its teardown fails the
session if removing it leaves a process, mount, directory or changed host
file.  ``test_leftover_checks_see_the_running_cluster`` shows that those
checks do see a cluster that is there.
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from ganeti_kvm.host import process
from tests import cluster as gc
from tests.cluster import Cluster, ClusterError

INSTANCE = "gk-inst1"


def _lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line.strip() for line in result.stdout.splitlines() if line.strip()]


# --- without a cluster --------------------------------------------------------


def test_host_path_maps_bound_directories() -> None:
    cluster = Cluster()
    cluster.root = "/tmp/gk-gnt-x"
    assert cluster.host_path("node2", "/var/lib/ganeti/config.data") == \
        "/tmp/gk-gnt-x/node2/lib/config.data"
    assert cluster.host_path("node1", "/run/ganeti/kvm-hypervisor/pid/a") == \
        "/tmp/gk-gnt-x/node1/run/ganeti/kvm-hypervisor/pid/a"
    assert cluster.host_path("node1", "/root/.ssh") == "/tmp/gk-gnt-x/node1/home/.ssh"
    assert cluster.host_path("node1", gc.SHARED_STORAGE_DIR + "/i/disk0") == \
        "/tmp/gk-gnt-x/shared/i/disk0"
    assert cluster.host_path("node1", gc.FILE_STORAGE_DIR) == \
        "/tmp/gk-gnt-x/node1/srv/ganeti/file-storage"
    assert cluster.host_path("node1", "/usr/bin/kvm") == "/usr/bin/kvm"
    with pytest.raises(ClusterError, match="no node 'node3'"):
        cluster.host_path("node3", "/etc/hosts")


def test_option_list_escapes_commas_and_refuses_newlines() -> None:
    assert Cluster._option_list({"kernel_args": "console=ttyS0,38400 ro", "acpi": "true"}) == \
        "kernel_args=console=ttyS0\\,38400 ro,acpi=true"
    with pytest.raises(ClusterError, match="kernel_args"):
        Cluster._option_list({"kernel_args": "ro\ninit=/bin/sh"})


def test_gnt_runs_only_ganeti_commands() -> None:
    with pytest.raises(ClusterError, match="use run"):
        Cluster().gnt("node1", "/bin/sh", "-c", "true")


def test_versions_to_build_come_from_the_environment(short_dir: str) -> None:
    assert gc.wanted_versions({}) == ["3.0", "3.1"]
    assert gc.wanted_versions({gc.VERSIONS_ENV: "3.1"}) == ["3.1"]
    assert gc.wanted_versions({gc.VERSIONS_ENV: " 3.0,3.1 "}) == ["3.0", "3.1"]
    with pytest.raises(ClusterError, match="unknown Ganeti version 2.16"):
        gc.wanted_versions({gc.VERSIONS_ENV: "3.0 2.16"})
    with pytest.raises(ClusterError, match="no Ganeti '2.16'"):
        Cluster(version="2.16")
    # A node's /etc/ganeti names the cluster's version (links replaced, not followed).
    cluster = Cluster(version="3.1")
    cluster.root = short_dir
    etc = os.path.join(short_dir, "node1", "etc-ganeti")
    os.makedirs(etc)
    os.symlink("/usr/share/ganeti/3.0", os.path.join(etc, "share"))
    cluster._select_version(etc)
    assert os.readlink(os.path.join(etc, "share")) == "/usr/share/ganeti/3.1"
    assert os.readlink(os.path.join(etc, "lib")) == "/usr/lib/ganeti/3.1"
    assert cluster.node_version("node1") == "3.1"


# --- on the cluster -------------------------------------------------------------


def test_cluster_runs_its_ganeti_version(ganeti_cluster: Cluster) -> None:
    """Both nodes run the cluster's Ganeti version; the machine's own default stays 3.0."""
    cluster = ganeti_cluster
    for name in cluster.nodes:
        assert cluster.node_version(name) == cluster.version
        first = cluster.gnt(name, "gnt-cluster", "--version").stdout.splitlines()[0]
        assert f"(ganeti {cluster.version}." in first, first
        luxid = cluster.run(name, "readlink", "-f", "/usr/sbin/ganeti-luxid").stdout.strip()
        assert luxid == f"/usr/lib/ganeti/{cluster.version}/usr/sbin/ganeti-luxid"
    master = process.read_pidfile(cluster.host_path(cluster.master,
                                                    "/run/ganeti/ganeti-luxid.pid"))
    assert master is not None
    assert os.readlink(f"/proc/{master}/exe").startswith(f"/usr/lib/ganeti/{cluster.version}/")
    assert os.readlink("/etc/ganeti/share") == "/usr/share/ganeti/3.0"



def test_cluster_is_up_in_its_own_namespaces(ganeti_cluster: Cluster) -> None:
    cluster = ganeti_cluster
    master = cluster.gnt("node1", "gnt-cluster", "getmaster")
    assert master.stdout.strip() == "node1.example.test"
    for name, node in cluster.nodes.items():
        assert cluster.run(name, "hostname").stdout.strip() == node.fqdn
        # sshd listens on the node's address only
        listening = cluster.run(name, "ss", "-Hltn", "sport = :22").stdout.split()
        assert [word for word in listening if word.endswith(":22")] == [f"{node.address}:22"]
    # nothing of the cluster's network is in the machine's own namespace
    host = subprocess.run(["ip", "-o", "address", "show"], capture_output=True, text=True,
                          check=True).stdout
    assert gc.SUBNET not in host


def test_verify_reports_only_the_sysrq_error(ganeti_cluster: Cluster) -> None:
    """Clean, but for the node setup error of a machine without /proc/sysrq-trigger."""
    result = ganeti_cluster.gnt("node1", "gnt-cluster", "verify", check=False)
    errors = [line for line in result.stdout.splitlines() if "ERROR:" in line]
    unexpected = [line for line in errors if not gc.SYSRQ_ERROR.search(line)]
    assert not unexpected, result.stdout + result.stderr
    nodes = sorted(match.group(1) for line in errors if (match := gc.SYSRQ_ERROR.search(line)))
    if gc.machine_has_sysrq():
        assert (nodes, result.returncode) == ([], 0), result.stdout + result.stderr
    else:
        assert nodes == ["node1.example.test", "node2.example.test"], result.stdout


def test_node_list_shows_both_nodes(ganeti_cluster: Cluster) -> None:
    result = ganeti_cluster.gnt("node1", "gnt-node", "list", "--no-headers",
                                "-o", "name,master_candidate")
    assert _lines(result) == ["node1.example.test Y", "node2.example.test Y"]


def test_kvm_instance_runs_in_node1(ganeti_cluster: Cluster) -> None:
    """Ganeti's own KVM driver starts QEMU inside node1's namespaces, on shared storage."""
    cluster = ganeti_cluster
    cluster.gnt("node1", "gnt-instance", "add", "-t", "sharedfile", "-o", "noop",
                "--disk", "0:size=1G", "-B", "memory=128M", "--no-name-check",
                "--no-ip-check", "--no-start", "-n", "node1.example.test", INSTANCE)
    try:
        disk_dir = os.path.join(cluster.shared_dir, INSTANCE)
        disks = os.listdir(disk_dir)
        assert len(disks) == 1
        cluster.gnt("node1", "gnt-instance", "startup", INSTANCE)
        status = cluster.gnt("node1", "gnt-instance", "list", "--no-headers",
                             "-o", "name,pnode,status", INSTANCE)
        assert _lines(status) == [f"{INSTANCE} node1.example.test running"]

        pid = cluster.instance_pid("node1", INSTANCE)
        assert pid is not None and process.is_alive(pid)
        argv = process.cmdline(pid) or []
        assert os.path.basename(argv[0]) == "qemu-system-x86_64"
        assert cluster.kernel_path and cluster.kernel_path in argv
        for kind in ("net", "uts", "mnt"):
            assert cluster.in_namespace(pid, "node1", kind)
            assert not cluster.in_namespace(pid, "node2", kind)
        assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
        # the disk QEMU opened is the file on the storage both nodes share
        opened = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        shared_path = os.path.join(gc.SHARED_STORAGE_DIR, INSTANCE, disks[0])
        assert shared_path in opened
    finally:
        cluster.gnt("node1", "gnt-instance", "remove", "-f", "--shutdown-timeout=0", INSTANCE,
                    check=False)
    assert pid is not None and process.wait_gone(pid, 10)
    assert not os.path.exists(disk_dir)
    listing = cluster.gnt("node1", "gnt-instance", "list", "--no-headers", "-o", "name")
    assert _lines(listing) == []


def test_leftover_checks_see_the_running_cluster(ganeti_cluster: Cluster) -> None:
    """The checks the fixture's teardown runs after ``down`` find a live cluster."""
    cluster = ganeti_cluster
    members = cluster.members()
    sshd = process.read_pidfile(cluster.host_path("node2", "/run/sshd.pid"))
    noded = process.read_pidfile(cluster.host_path("node1", "/run/ganeti/ganeti-noded.pid"))
    assert sshd is not None and members.get(sshd) == "node2.net"
    assert noded is not None and members.get(noded) == "node1.net"
    left = cluster.leftovers()
    assert f"directory {cluster.root}" in left
    assert f"mount {cluster.ns_file('node1', 'mnt')}" in left
    assert f"mount {cluster.ns_dir}" in left
    before = gc.host_snapshot([cluster.files_dir])
    with open(os.path.join(cluster.files_dir, "marker"), "w", encoding="ascii") as handle:
        handle.write("x")
    assert gc.host_snapshot([cluster.files_dir]) != before


def test_a_dead_sessions_cluster_is_removed(short_dir: str) -> None:
    """remove_stale_clusters() stops what a killed session left and keeps live clusters."""
    if os.geteuid() != 0:
        pytest.skip("namespaces and mounts need root")
    live = Cluster(base_dir=short_dir)
    dead = Cluster(base_dir=short_dir)
    sleeper = None
    try:
        for cluster in (live, dead):
            cluster._make_root()
            cluster._make_namespace_dir()
            cluster._make_lan()
        with open(os.path.join(dead.root, gc.OWNER_FILE), "w", encoding="ascii") as handle:
            handle.write("1 0\n")  # PID 1, but not the PID 1 that runs now
        sleeper = subprocess.Popen(["nsenter", f"--net={dead.ns_file('lan')}", "--",
                                    "sleep", "600"])
        deadline = time.monotonic() + 10  # nsenter enters, then execs sleep
        while not dead.in_namespace(sleeper.pid, "lan") and time.monotonic() < deadline:
            time.sleep(0.01)
        assert dead.in_namespace(sleeper.pid, "lan")

        assert gc.remove_stale_clusters(short_dir) == [dead.root]
        assert sleeper.poll() is not None
        assert gc.mounts_below(dead.root) == [] and not os.path.exists(dead.root)
        assert os.path.isdir(live.root) and gc.mounts_below(live.ns_dir)
    finally:
        if sleeper is not None and sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait(10)
        live.down()
        if dead.root and os.path.exists(dead.root):
            dead.down()
    assert live.leftovers() == []


def test_missing_ganeti_skips_but_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gc, "REQUIRED_PROGRAMS", {"/nonexistent/gnt-cluster": "Ganeti 3.0"})
    assert any("Debian package ganeti-haskell-9.9" in m for m in gc.ganeti_missing("9.9"))
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="Ganeti 3.0 at /nonexistent/gnt-cluster"):
        gc.require_ganeti()
    monkeypatch.setenv("CI", "")
    with pytest.raises(pytest.skip.Exception, match="make setup"):
        gc.require_ganeti()
