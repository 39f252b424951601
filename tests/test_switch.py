"""Switching a node between Ganeti 3.0's bundled KVM driver and ganeti-kvm, live.

Each "node" is tests/switch_probe.py in its own private mount namespace
with fresh tmpfs over /run, /var/lib/ganeti and /var/log/ganeti, running
Ganeti 3.0's own ``hv_kvm.KVMHypervisor`` (from the unpacked tree) and
:class:`ganeti_kvm.ganeti3.KVMHypervisor` side by side, on the same run
directory /var/run/ganeti/kvm-hypervisor.  Nothing of the machine's is
touched; migrations go over loopback.  The instances are guest-less VMs
(no kernel, no disk: they sit in the BIOS) under TCG.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from ganeti_kvm import errors
from ganeti_kvm.core import runtime
from ganeti_kvm.ganeti3 import bundled
from ganeti_kvm.host import process
from tests import ganeti_trees, netns
from tests.helpers import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = os.path.join(REPO, "tests", "switch_probe.py")
RUN_DIR = "/var/run/ganeti/kvm-hypervisor"
REPLY_TIMEOUT = 180.0
MIGRATION_BOUND = 120.0
IN_CI = os.environ.get("CI", "").lower() == "true"


class ProbeNode:
    """A switch_probe.py process: one node, both drivers."""

    def __init__(self, tree: str, log_path: str, ns: str | None = None) -> None:
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8",
               "PYTHONPATH": os.pathsep.join([tree, REPO])}
        self.log = open(log_path, "w+", encoding="utf-8")  # noqa: SIM115 - closed in close()
        # In a test network namespace (``ns``), the TAP devices are made there.
        in_ns = [] if ns is None else [netns.IP, "netns", "exec", ns]
        self.proc = subprocess.Popen(
            [*in_ns, "unshare", "--mount", "--propagation", "private", "--",
             ganeti_trees.GANETI_PYTHON, "-B", PROBE],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
            env=env, cwd="/")
        self.qemus: dict[int, str] = {}
        assert self._reply() == "ready"

    def _reply(self) -> Any:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], REPLY_TIMEOUT)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.log.seek(0)
            raise AssertionError(f"switch_probe gave no answer; its stderr:\n{self.log.read()}")
        reply = json.loads(line)
        if "error" in reply:
            raise ProbeError(reply["error"], reply.get("traceback", ""))
        return reply["ok"]

    def __call__(self, op: str, **args: Any) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(dict(args, op=op)) + "\n")
        self.proc.stdin.flush()
        try:
            return self._reply()
        finally:
            if op in ("start", "accept"):
                self.remember()

    def remember(self) -> None:
        """Note the PIDs of this node's QEMUs (they outlive the probe)."""
        for name, pid in self("pids").items():
            self.qemus[pid] = name

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.remember()
        except (AssertionError, ProbeError, OSError):
            pass
        for pid, name in self.qemus.items():
            argv = process.cmdline(pid) or []
            if "-name" in argv and argv[argv.index("-name") + 1] == name:
                process.signal_pid(pid, signal.SIGKILL)
                process.wait_gone(pid, 10)
        if self.proc.poll() is None:
            try:
                self.proc.communicate('{"op": "exit"}\n', timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


class ProbeError(AssertionError):
    """A request the probe answered with an error."""

    def __init__(self, error: str, trace: str) -> None:
        super().__init__(f"{error}\n{trace}")
        self.error = error


def _need() -> str:
    tree = ganeti_trees.require_tree("3.0")
    missing = [t for t in ("unshare", "mount") if shutil.which(t) is None]
    if os.geteuid() != 0:
        missing.append("root")
    if missing:
        message = f"the switch tests need {', '.join(missing)}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return tree


@pytest.fixture
def new_node(short_dir: str) -> Iterator[Callable[[], ProbeNode]]:
    """Factory of probe nodes; every QEMU they started is killed at teardown."""
    tree = _need()
    made: list[ProbeNode] = []

    def make() -> ProbeNode:
        made.append(ProbeNode(tree, os.path.join(short_dir, f"probe{len(made)}.log")))
        return made[-1]

    try:
        yield make
    finally:
        for node in made:
            node.close()


def _files_of(node: ProbeNode, name: str) -> list[str]:
    return [f for f in node("files") if os.path.basename(f).split(".")[0] == name]


def _migrate(source: ProbeNode, target: ProbeNode, driver: str, name: str, qemu: str,
             port: int, target_driver: str | None = None) -> None:
    """Ganeti's sequence of calls for a live migration, from ``source`` to ``target``."""
    target_driver = target_driver or driver
    info = source("migration_info", driver=driver, name=name)
    target("accept", driver=target_driver, name=name, info=info, qemu=qemu, port=port)
    source("migrate", driver=driver, name=name)
    deadline = time.monotonic() + MIGRATION_BOUND
    status = source("migration_status", driver=driver, name=name)
    while status == "active":
        assert time.monotonic() < deadline, f"migration of {name} still active"
        time.sleep(0.2)
        status = source("migration_status", driver=driver, name=name)
    assert status == "completed", status
    target("finalize_dst", driver=target_driver, name=name, info=info, success=True)
    source("finalize_src", driver=driver, name=name, success=True)


# --- bundled -> ganeti-kvm ---------------------------------------------------------


def test_ours_lists_consoles_adopts_and_stops_a_bundled_instance(
        new_node: Callable[[], ProbeNode], qemu_bin: str) -> None:
    node = new_node()
    node("start", driver="bundled", name="b1", qemu=qemu_bin, port=free_port())
    pid = node("pids")["b1"]
    original = node("read", path="conf/b1.runtime")
    assert bundled.parse(original, "b1", "test") is not None  # the bundled format

    assert node("list", driver="ours") == ["b1"]
    info = node("info", driver="ours", name="b1")
    assert info[:2] == ["b1", pid] and info[2:5] == [64, 1, 0]  # HvInstanceState.RUNNING
    assert node("all", driver="ours") == [info]
    console = node("console", driver="ours", name="b1")
    assert console["kind"] == "ssh"
    assert console["command"][3] == f"{RUN_DIR}/ctrl/b1.qmp"
    assert console["command"][-1] == f"UNIX-CONNECT:{RUN_DIR}/ctrl/b1.serial"
    assert node("connect", path=f"{RUN_DIR}/ctrl/b1.serial")
    assert node("qmp", name="b1", command="query-status")["running"] is True

    assert node("adopt_all") == ["b1"]
    assert node("adopt_all") == []  # once
    assert node("read", path="conf/b1.runtime.bundled") == original
    record = runtime.parse(node("read", path="conf/b1.runtime"), "b1", "test")
    assert record.upgraded_from == 0 and record.beparams == {"memory": 64, "vcpus": 1}
    assert "-qmp" not in record.argv and "-S" not in record.argv
    assert node("pids")["b1"] == pid  # the same QEMU: nothing restarted
    assert node("list", driver="bundled") == ["b1"]

    node("stop", driver="ours", name="b1", force=True)
    node("cleanup", driver="ours", name="b1")
    assert node("list", driver="ours") == [] == node("list", driver="bundled")
    assert not process.is_alive(pid)
    assert _files_of(node, "b1") == []  # also the .kvmd socket and the kept file


def test_ours_migrates_a_bundled_instance(new_node: Callable[[], ProbeNode],
                                          qemu_bin: str) -> None:
    source, target = new_node(), new_node()
    port = free_port()
    source("start", driver="bundled", name="m1", qemu=qemu_bin, port=port)
    pid = source("pids")["m1"]
    _migrate(source, target, "ours", "m1", qemu_bin, port)
    assert source("list", driver="ours") == [] and not process.is_alive(pid)
    assert _files_of(source, "m1") == []
    assert target("list", driver="ours") == ["m1"]
    assert target("qmp", name="m1", command="query-status")["status"] == "running"
    target("stop", driver="ours", name="m1", force=True)
    target("cleanup", driver="ours", name="m1")
    assert target("list", driver="ours") == []


def test_ours_migrates_a_bundled_instance_with_a_nic(short_dir: str, qemu_bin: str) -> None:
    """The target gets the bundled NIC's own device: its id, slot 0xd and option ROM."""
    tree = _need()
    netns.skip_unless_netns()
    mac = "aa:00:00:00:0b:01"
    with netns.netns("gk-swn") as ns:
        netns.ns_ip(ns, "link", "add", "br0", "type", "bridge")
        netns.ns_ip(ns, "link", "set", "br0", "up")
        source = ProbeNode(tree, os.path.join(short_dir, "src.log"), ns)
        target = ProbeNode(tree, os.path.join(short_dir, "dst.log"), ns)
        try:
            port = free_port()
            source("bundled_ifup", path="/bin/true")
            source("start", driver="bundled", name="n1", qemu=qemu_bin, port=port, nics=[mac])
            pid = source("pids")["n1"]
            device = next(v for v in process.cmdline(pid) or [] if f"mac={mac}" in v)
            assert "addr=0xc" in device.split(",") and "romfile" not in device
            _migrate(source, target, "ours", "n1", qemu_bin, port)
            assert not process.is_alive(pid)
            assert target("list", driver="ours") == ["n1"]
            assert target("qmp", name="n1", command="query-status")["status"] == "running"
            moved = process.cmdline(target("pids")["n1"]) or []
            assert set(next(v for v in moved if f"mac={mac}" in v).split(",")) == \
                set(device.split(","))
            record = runtime.parse(target("read", path="conf/n1.runtime"), "n1", "test")
            assert record.nics[0]["device"]["addr"] == "0xc"
        finally:
            source.close()
            target.close()


def test_adopting_and_handing_back_restores_the_bundled_file_byte_for_byte(
        new_node: Callable[[], ProbeNode], qemu_bin: str) -> None:
    node = new_node()
    node("start", driver="bundled", name="k1", qemu=qemu_bin, port=free_port())
    original = node("read", path="conf/k1.runtime")
    pid = node("pids")["k1"]
    assert node("adopt_all") == ["k1"]
    assert node("export_all") == ["k1"]
    assert node("read", path="conf/k1.runtime") == original
    assert node("read", path="conf/k1.runtime.bundled") is None
    assert "ctrl/k1.qmpl" not in node("files")
    # The bundled driver reads its file again, and still runs the same QEMU.
    assert node("migration_info", driver="bundled", name="k1") == original
    assert node("info", driver="bundled", name="k1")[1] == pid
    node("stop", driver="bundled", name="k1", force=True)
    node("cleanup", driver="bundled", name="k1")


# --- ganeti-kvm -> bundled (the rollback) ---------------------------------------------


def test_the_bundled_driver_sees_and_stops_an_instance_of_ours_after_export(
        new_node: Callable[[], ProbeNode], qemu_bin: str) -> None:
    node = new_node()
    node("start", driver="ours", name="o1", qemu=qemu_bin, port=free_port())
    pid = node("pids")["o1"]
    # Listing needs only the pidfile and the command line: it works before the export.
    assert node("list", driver="bundled") == ["o1"]
    assert node("export_all") == ["o1"]
    assert node("export_all") == []  # once
    text = node("read", path="conf/o1.runtime")
    exported = bundled.parse(text, "o1", "test")
    assert exported is not None
    assert "qmp" not in " ".join(exported.kvm_cmd) and "-S" not in exported.kvm_cmd
    # QEMU's log goes where the bundled driver keeps its own: its stop never cleans ctrl/.
    assert exported.kvm_cmd[exported.kvm_cmd.index("-D") + 1] == "/var/log/ganeti/kvm/o1.log"
    assert "ctrl/o1.log" not in node("files")
    assert node("read", path="/var/log/ganeti/kvm/o1.log") is not None
    info = node("info", driver="bundled", name="o1")
    assert info[:4] == ["o1", pid, 64, 1]
    assert node("all", driver="bundled") == [info]
    assert node("migration_info", driver="bundled", name="o1") == text
    console = node("console", driver="bundled", name="o1")
    assert console["command"][3].strip("'") == f"{RUN_DIR}/ctrl/o1.monitor"
    assert node("connect", path=f"{RUN_DIR}/ctrl/o1.monitor")
    node("stop", driver="bundled", name="o1", force=True)
    node("cleanup", driver="bundled", name="o1")
    assert node("list", driver="bundled") == [] == node("list", driver="ours")
    assert not process.is_alive(pid)
    assert "pid/o1" not in node("files") and "conf/o1.runtime" not in node("files")


def test_the_bundled_driver_migrates_an_instance_of_ours_after_export(
        new_node: Callable[[], ProbeNode], qemu_bin: str) -> None:
    source, target = new_node(), new_node()
    port = free_port()
    source("start", driver="ours", name="r1", qemu=qemu_bin, port=port)
    pid = source("pids")["r1"]
    assert source("export_all") == ["r1"]
    _migrate(source, target, "bundled", "r1", qemu_bin, port)
    assert source("list", driver="bundled") == [] and not process.is_alive(pid)
    assert target("list", driver="bundled") == ["r1"]
    assert target("qmp", name="r1", command="query-status")["status"] == "running"
    target("stop", driver="bundled", name="r1", force=True)
    target("cleanup", driver="bundled", name="r1")


def test_a_reboot_by_ours_replaces_the_bundled_qemu_and_its_leftovers(
        new_node: Callable[[], ProbeNode], qemu72: str) -> None:
    node = new_node()
    # No ACPI: a guest-less VM ignores the power button, the reboot would wait for it.
    # (QEMU 7.2 only: Ganeti 3.0 spells that -no-acpi, which QEMU 10.0 no longer has.)
    node("start", driver="bundled", name="rb1", qemu=qemu72, port=free_port(), acpi=False)
    pid = node("pids")["rb1"]
    assert node("islink", path="ctrl/rb1.qmpl") is False
    node("adopt_all")
    assert node("islink", path="ctrl/rb1.qmpl") is True  # the bundled QEMU's only QMP
    node("reboot", driver="ours", name="rb1")
    new_pid = node("pids")["rb1"]
    node.remember()
    assert new_pid != pid and not process.is_alive(pid)
    assert node("list", driver="ours") == ["rb1"]
    files = node("files")
    assert "conf/rb1.runtime.bundled" not in files and "ctrl/rb1.kvmd" not in files
    assert node("islink", path="ctrl/rb1.qmpl") is False
    assert runtime.parse(node("read", path="conf/rb1.runtime"), "rb1", "t").upgraded_from is None
    node("stop", driver="ours", name="rb1", force=True)
    node("cleanup", driver="ours", name="rb1")


# --- install and remove switch the running instances -----------------------------------


def _root_copy(directory: str) -> str:
    top = os.path.join(directory, "root")
    os.makedirs(os.path.join(top, "var", "lib", "dpkg"))
    open(os.path.join(top, "var", "lib", "dpkg", "status"), "w").close()
    shutil.copytree(ganeti_trees.require_tree("3.0"),
                    os.path.join(top, "usr", "share", "ganeti", "3.0"), symlinks=True)
    for path in (directory, top):
        os.chmod(path, 0o755)  # the import check runs as the daemons' user
    return top


def test_install_and_remove_switch_the_running_instances(
        new_node: Callable[[], ProbeNode], qemu72: str, short_dir: str) -> None:
    if shutil.which("dpkg-divert") is None or shutil.which("runuser") is None:
        if IN_CI:
            pytest.fail("needs dpkg-divert and runuser")
        pytest.skip("needs dpkg-divert and runuser")
    root = _root_copy(short_dir)
    node = new_node()
    node("start", driver="bundled", name="ib1", qemu=qemu72, port=free_port())
    node("start", driver="ours", name="io1", qemu=qemu72, port=free_port())
    pids = node("pids")
    original = node("read", path="conf/ib1.runtime")
    try:
        assert node("install", root=root) == ["ib1"]  # io1 is ganeti-kvm's already
    finally:
        assert sorted(node("remove", root=root)) == ["ib1", "io1"]
    assert node("read", path="conf/ib1.runtime") == original
    assert bundled.parse(node("read", path="conf/io1.runtime"), "io1", "t") is not None
    assert node("pids") == pids  # nothing restarted
    assert sorted(node("list", driver="bundled")) == ["ib1", "io1"]
    for name in ("ib1", "io1"):
        node("stop", driver="bundled", name=name, force=True)
        node("cleanup", driver="bundled", name=name)


# --- the conversions, without QEMU -------------------------------------------------------


def _bundled_argv(run: str, name: str) -> list[str]:
    """A command line as Ganeti 3.0's driver runs it: kvm_cmd, then what a start adds."""
    ctrl = f"{run}/ctrl/{name}"
    return ["/usr/bin/kvm", "-name", name, "-m", "128", "-smp", "2", "-pidfile",
            f"{run}/pid/{name}", "-device", "virtio-balloon", "-daemonize",
            "-machine", "pc-i440fx-7.2", "-monitor", f"unix:{ctrl}.monitor,server,nowait",
            "-serial", f"unix:{ctrl}.serial,server,nowait", "-usb", "-vnc", "127.0.0.1:5",
            "-uuid", "3c5c7a6e-0000-4000-8000-000000000009",
            "-netdev", "type=tap,id=nic-1234,fd=9",
            "-device", "virtio-net-pci,id=nic-1234,bus=pci.0,addr=0xd,netdev=nic-1234,"
                       "mac=aa:00:00:00:00:01",
            "-qmp", f"unix:{ctrl}.qmp,server,nowait", "-qmp", f"unix:{ctrl}.kvmd,server,nowait",
            "-device", "virtio-blk-pci,id=disk-1,bus=pci.0,addr=0xc,drive=disk-1",
            "-drive", "file=/dev/vg/d0,format=raw,if=none,aio=threads,id=disk-1", "-S"]


def test_a_bundled_runtime_becomes_our_record(short_dir: str) -> None:
    from ganeti_kvm.ganeti3 import params
    from ganeti_kvm.host import paths as gpaths

    layout = gpaths.RunDir(short_dir)
    ipaths = layout.instance("c1")
    os.makedirs(os.path.join(short_dir, "nic", "c1"))
    with open(os.path.join(short_dir, "nic", "c1", "0"), "w", encoding="ascii") as handle:
        handle.write("tap7")
    live = _bundled_argv(short_dir, "c1")
    nic = {"mac": "aa:00:00:00:00:01", "ip": None, "uuid": "1234", "nicparams":
           {"mode": "bridged", "link": "br0"}, "hvinfo": {"driver": "virtio-net-pci"}}
    disk = {"mode": "rw", "dev_type": "plain", "uuid": "1"}
    hvp = dict(params.DEFAULTS, kvm_path="/usr/bin/kvm")
    text = json.dumps([live[:17], [nic], hvp, [[disk, "/dev/vg/d0", None]]])
    parsed = bundled.parse(text, "c1", "t")
    assert parsed is not None
    record = bundled.record_from_bundled("c1", parsed, live, ipaths)
    assert record.upgraded_from == 0 and record.name == "c1"
    assert record.beparams == {"memory": 128, "vcpus": 2}
    assert record.uuid == "3c5c7a6e-0000-4000-8000-000000000009"
    assert record.network_port == 5905
    # Each device as the bundled QEMU has it (see tests/test_devices.py for the argv).
    assert record.nics == [{"mac": "aa:00:00:00:00:01", "ip": None, "uuid": "1234",
                            "nicparams": {"mode": "bridged", "link": "br0"}, "tap": "tap7",
                            "device": {"backend": "nic-1234", "id": "nic-1234",
                                       "driver": "virtio-net-pci", "bus": "pci.0",
                                       "addr": "0xd", "romfile": None, "props": []}}]
    assert record.disks == [{"path": "/dev/vg/d0", "readonly": False, "uri": None,
                             "device": {"backend": "disk-1", "id": "disk-1",
                                        "driver": "virtio-blk-pci", "bus": "pci.0",
                                        "addr": "0xc", "romfile": None, "props": []}}]
    assert record.hvparams["kvm_path"] == "/usr/bin/kvm"
    assert set(record.hvparams) == params.CORE_KEYS
    # What a start adds is gone (the core adds its own); the guest's devices stay.
    assert "-qmp" not in record.argv and "-S" not in record.argv
    assert not any("netdev=" in a or a.startswith("type=tap") for a in record.argv)
    assert "virtio-blk-pci,id=disk-1,bus=pci.0,addr=0xc,drive=disk-1" in record.argv
    assert "file=/dev/vg/d0,format=raw,if=none,aio=threads,id=disk-1" in record.argv
    # Our own record and garbage are not the bundled format.
    assert bundled.parse(record.serialize(), "c1", "t") is None
    assert bundled.parse("not json", "c1", "t") is None
    with pytest.raises(errors.RuntimeStateError, match="a disk entry"):
        bundled.parse(json.dumps([["kvm"], [], {}, [["x"]]]), "c1", "t")


def test_our_record_becomes_a_bundled_runtime_with_the_same_nic_device() -> None:
    from ganeti_kvm.ganeti3 import params
    from ganeti_kvm.qemu import cmdline

    ours = ["/usr/bin/qemu-system-x86_64", "-name", "e1", "-m", "64",
            "-chardev", "socket,id=qmp,path=/r/ctrl/e1.qmp,server=on,wait=off",
            "-mon", "chardev=qmp,mode=control",
            "-chardev", "socket,id=qmpl,path=/r/ctrl/e1.qmpl,server=on,wait=off",
            "-mon", "chardev=qmpl,mode=control",
            "-chardev", "socket,id=hmp,path=/r/ctrl/e1.monitor,server=on,wait=off",
            "-mon", "chardev=hmp,mode=readline", "-D", "/r/ctrl/e1.log"]
    record = runtime.RuntimeRecord(
        name="e1", argv=ours, hvparams=params.to_core(dict(params.DEFAULTS)),
        nics=[{"mac": "aa:00:00:00:00:02", "ip": None, "nicparams": {}, "tap": "tap3"}])
    exported = bundled.bundled_from_record(record)
    # The human monitor stays; the log moves to the bundled driver's directory.
    assert exported.kvm_cmd == ours[:5] + ours[13:-1] + ["/var/log/ganeti/kvm/e1.log"]
    assert exported.disks == []
    assert exported.hvparams == params.fill(record.hvparams)
    (nic,) = exported.nics
    assert "tap" not in nic
    # The bundled driver spells a NIC with hvinfo: DRIVER,k=v...,netdev=ID,mac=MAC.
    hvinfo = dict(nic["hvinfo"])
    theirs = ",".join([hvinfo.pop("driver")] + [f"{k}={v}" for k, v in hvinfo.items()]
                      + [f"netdev={nic['hvinfo']['id']}", f"mac={nic['mac']}"])
    mine = cmdline.build_nic_argv(
        [cmdline.NicSpec(model=cmdline.NIC_MODELS["paravirtual"], mac=nic["mac"], fd=9,
                         vhost=False)], boot_network=False, name="e1")[3]

    def device(value: str) -> set[str]:  # the properties QEMU's migration sees
        return {p for p in value.split(",") if not p.startswith("netdev=")}

    assert device(theirs) == device(mine)
