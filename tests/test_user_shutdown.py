"""user_shutdown and use_guest_agent: kvmd's monitor, the guest agent, USER_down.

Unit tests build the command line, the record's identity of the agent's
controller, the agent client against a fake agent and the stop's word to
ganeti-kvmd against a fake monitor.  The real-QEMU tests run on both QEMUs;
the user-shutdown one runs Ganeti's own /usr/sbin/ganeti-kvmd in a private
mount namespace (the run directory bind-mounted where kvmd looks, and
tmpfs or test directories over /run, /var/lib/ganeti and /var/log/ganeti),
and kills it by PID at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from ganeti_kvm import constants as c2011
from ganeti_kvm import errors
from ganeti_kvm.core import names as c
from ganeti_kvm.core import node as core_node
from ganeti_kvm.core import runtime
from ganeti_kvm.core.hardware import give_guest_agent
from ganeti_kvm.core.node import KvmNode
from ganeti_kvm.ganeti3 import _ganeti, params
from ganeti_kvm.host import process
from ganeti_kvm.host.paths import RunDir
from ganeti_kvm.qemu import cmdline, devices, peripherals
from ganeti_kvm.qmp.agent import GuestAgent
from ganeti_kvm.qmp.client import qmp_execute
from tests.conftest import IN_CI
from tests.fakeqmp import FakeQmp, Peer
from tests.helpers import SerialReader, free_port, g3_instance

PATHS = RunDir("/run/gk").instance("web1")
SHUTDOWN = _ganeti.HvInstanceState.SHUTDOWN
RUNNING = _ganeti.HvInstanceState.RUNNING
KVMD = "/usr/sbin/ganeti-kvmd"
BOUND = 120.0  # seconds any wait of these tests takes at most


# --- the command line -------------------------------------------------------------


def test_kvmd_monitor_only_with_user_shutdown() -> None:
    assert cmdline.kvmd_monitor({c.HV_KVM_USER_SHUTDOWN: False}, PATHS) == []
    assert cmdline.kvmd_monitor({}, PATHS) == []  # a record from before the key
    assert cmdline.kvmd_monitor({c.HV_KVM_USER_SHUTDOWN: True}, PATHS) == [
        "-chardev", "socket,id=kvmd,path=/run/gk/ctrl/web1.kvmdl,server=on,wait=off",
        "-mon", "chardev=kvmd,mode=control"]


def test_kvmds_socket_gets_its_name_once_it_listens(short_dir: str) -> None:
    """kvmd connects when NAME.kvmd appears and never again: it must already listen."""
    node = KvmNode(os.path.join(short_dir, "run"))
    node.ensure_dirs()
    ipaths = node.paths("web1")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(ipaths.kvmd_bind_socket)
        listener.listen(1)
        core_node._publish_kvmd_socket(ipaths)
        assert not os.path.exists(ipaths.kvmd_bind_socket)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(ipaths.kvmd_socket)  # reaches the listening socket
    core_node._publish_kvmd_socket(ipaths)  # no bound socket (user_shutdown off): nothing
    assert os.path.exists(ipaths.kvmd_socket)


def test_golden_guest_agent_channel() -> None:
    ident = devices.DeviceId(backend="qga0", id="qgaserial0", bus="pci.0", addr="0x1e")
    spec = cmdline.MachineSpec(name="web1", memory=256, vcpus=1, guest_agent=ident)
    assert cmdline.guest_agent_argv(spec, {c.HV_USE_GUEST_AGENT: True}, PATHS) == [
        "-chardev", "socket,id=qga0,path=/run/gk/ctrl/web1.qga,server=on,wait=off",
        "-device", "virtio-serial-pci,id=qgaserial0,bus=pci.0,addr=0x1e",
        "-device", "virtserialport,bus=qgaserial0.0,chardev=qga0,id=qga0-port,"
                   "name=org.qemu.guest_agent.0"]
    # off, or no identity in the record: no channel
    assert cmdline.guest_agent_argv(spec, {c.HV_USE_GUEST_AGENT: False}, PATHS) == []
    bare = cmdline.MachineSpec(name="web1", memory=256, vcpus=1)
    assert cmdline.guest_agent_argv(bare, {c.HV_USE_GUEST_AGENT: True}, PATHS) == []


def test_a_bad_agent_identity_is_refused_naming_the_instance() -> None:
    ident = devices.DeviceId(backend="qga0", id="bad,id", bus="pci.0", addr="0x1e")
    spec = cmdline.MachineSpec(name="web1", memory=256, vcpus=1, guest_agent=ident)
    with pytest.raises(errors.HypervisorError, match="web1.*guest agent"):
        cmdline.guest_agent_argv(spec, {c.HV_USE_GUEST_AGENT: True}, PATHS)


def test_kvm_extra_cannot_take_the_new_chardev_ids() -> None:
    for chardev in ("kvmd", "qga0"):
        with pytest.raises(errors.ParameterError, match=chardev):
            peripherals.kvm_extra_argv(f"-chardev socket,id={chardev},path=/tmp/x", True)


def test_the_2011_contract_has_neither_key() -> None:
    hvp = c2011.HVC_DEFAULTS[c2011.HT_KVM]
    assert c.HV_KVM_USER_SHUTDOWN not in hvp and c.HV_USE_GUEST_AGENT not in hvp
    assert c.HV_KVM_USER_SHUTDOWN not in params.UNIMPLEMENTED
    assert c.HV_USE_GUEST_AGENT not in params.UNIMPLEMENTED


# --- the record's identity of the agent's controller -----------------------------


def record(**hvparams: Any) -> runtime.RuntimeRecord:
    nic = {"mac": "52:54:00:00:00:01", devices.DEVICE_KEY: devices.DeviceId(
        backend="nic0", id="nic0", bus="pci.0", addr="0xc").to_dict()}
    return runtime.RuntimeRecord(name="web1", argv=["qemu"], nics=[nic],
                                 hvparams=dict(c.DEFAULTS, **hvparams),
                                 balloon=devices.DeviceId(backend="balloon0", id="balloon0",
                                                          bus="pci.0", addr="0x1f").to_dict())


def test_the_agent_controller_takes_the_highest_free_slot_and_keeps_it() -> None:
    rec = record(use_guest_agent=True)
    give_guest_agent(rec)
    assert rec.guest_agent == devices.DeviceId(backend="qga0", id="qgaserial0", bus="pci.0",
                                               addr="0x1e").to_dict()
    # kept through the record (a reboot, a migration target) and never moved
    again = runtime.parse(rec.serialize(), "web1", "test")
    assert again.guest_agent == rec.guest_agent
    give_guest_agent(again)
    assert again.guest_agent == rec.guest_agent


def test_the_agent_controller_never_takes_the_spice_agents_slot() -> None:
    rec = record(use_guest_agent=True)
    rec.spice_agent = devices.DeviceId(backend="vserial0", id="vserial0", bus="pci.0",
                                       addr="0x1e").to_dict()
    give_guest_agent(rec)
    assert rec.guest_agent is not None and rec.guest_agent["addr"] == "0x1d"


def test_no_agent_controller_without_use_guest_agent() -> None:
    rec = record(use_guest_agent=False)
    give_guest_agent(rec)
    assert rec.guest_agent is None
    assert runtime.parse(rec.serialize(), "web1", "test").guest_agent is None


def test_a_bad_agent_identity_in_a_record_is_refused() -> None:
    data = json.loads(record().serialize())
    data["guest_agent"] = {"backend": "qga0", "id": "x y"}
    with pytest.raises(errors.RuntimeStateError, match="guest agent"):
        runtime.parse(json.dumps(data), "web1", "test")


# --- the guest agent client against a fake agent ---------------------------------


class FakeAgent:
    """A unix socket that answers as qemu-ga would, after ``stale`` bytes."""

    def __init__(self, path: str, stale: bytes = b"", answer: bool = True,
                 error: dict[str, Any] | None = None) -> None:
        self.requests: list[dict[str, Any]] = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(1)
        self.listener.settimeout(10)
        self.stale, self.answer, self.error = stale, answer, error
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        conn.settimeout(10)
        if self.stale:
            conn.sendall(self.stale)
        buffer = b""
        with conn:
            while True:
                try:
                    chunk = conn.recv(4096)
                except OSError:
                    return
                if not chunk:
                    return
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    request = json.loads(line.lstrip(b"\xff"))
                    self.requests.append(request)
                    if not self.answer:
                        continue
                    if request["execute"] == "guest-sync-delimited":
                        reply = ({"error": self.error} if self.error
                                 else {"return": request["arguments"]["id"]})
                        conn.sendall(b"\xff" + json.dumps(reply).encode() + b"\n")

    def close(self) -> None:
        self.listener.close()
        self.thread.join(10)


@pytest.fixture
def agent_path(short_dir: str) -> str:
    return os.path.join(short_dir, "web1.qga")


def test_the_agent_is_synced_past_stale_replies_then_asked_to_power_off(
        agent_path: str) -> None:
    # A previous client's unread sync reply and garbage before ours
    stale = b'garbage\xff{"return": 7}\n{"return": {}}\n'
    fake = FakeAgent(agent_path, stale=stale)
    try:
        with GuestAgent(agent_path, "web1", timeout=5) as agent:
            agent.shutdown()
        fake.thread.join(10)
    finally:
        fake.close()
    assert [r["execute"] for r in fake.requests] == ["guest-sync-delimited", "guest-shutdown"]
    assert fake.requests[1]["arguments"] == {"mode": "powerdown"}


def test_a_silent_agent_fails_within_the_bound(agent_path: str) -> None:
    fake = FakeAgent(agent_path, answer=False)
    try:
        with GuestAgent(agent_path, "web1", timeout=0.3) as agent, \
                pytest.raises(errors.GuestAgentError, match="web1.*did not answer"):
            agent.shutdown()
    finally:
        fake.close()
    assert [r["execute"] for r in fake.requests] == ["guest-sync-delimited"]


def test_an_agent_error_is_a_guest_agent_error(agent_path: str) -> None:
    fake = FakeAgent(agent_path, error={"class": "GenericError", "desc": "no"})
    try:
        with GuestAgent(agent_path, "web1", timeout=5) as agent, \
                pytest.raises(errors.GuestAgentError, match="GenericError: no"):
            agent.sync()
    finally:
        fake.close()


def test_no_agent_socket_is_a_guest_agent_error(agent_path: str) -> None:
    with pytest.raises(errors.GuestAgentError, match="web1"):
        GuestAgent(agent_path, "web1", timeout=0.3).sync()
    with pytest.raises(errors.GuestAgentError, match="unknown mode"):
        GuestAgent(agent_path, "web1").shutdown("sleep")


# --- the stop's word to ganeti-kvmd, against a fake monitor ----------------------


@pytest.fixture
def node(short_dir: str) -> KvmNode:
    result = KvmNode(os.path.join(short_dir, "run"))
    result.ensure_dirs()
    return result


def _touch(path: str) -> None:
    with open(path, "w", encoding="ascii"):
        pass


def test_a_force_stop_tells_kvmd_first(node: KvmNode) -> None:
    ipaths = node.paths("web1")
    _touch(ipaths.kvmd_socket)  # QEMU has kvmd's monitor

    def script(peer: Peer) -> None:
        peer.handshake()
        peer.reply(peer.recv(), {})  # stop
        request = peer.recv()  # system_powerdown
        peer.reply(request, {})
        peer.send({"event": "POWERDOWN", "timestamp": {"seconds": 0, "microseconds": 0}})
        with contextlib.suppress(EOFError, TimeoutError, OSError):
            peer.recv(2)

    fake = FakeQmp(ipaths.qmp_socket, script)
    try:
        assert node._announce_admin_stop(ipaths) is True
    finally:
        fake.release.set()
        fake.listener.close()
        fake.thread.join(10)
    assert [r["execute"] for r in fake.peers[0].requests] == [
        "qmp_capabilities", "stop", "system_powerdown"]


def test_an_acpi_stop_asks_the_agent_after_the_button(node: KvmNode) -> None:
    """The button's POWERDOWN first: it is what makes kvmd read the agent's power-off
    (SHUTDOWN alone) as the administrator's."""
    ipaths = node.paths("web1")
    order: list[str] = []

    def script(peer: Peer) -> None:
        peer.handshake()
        peer.reply(peer.recv(), {"status": "running", "running": True})  # query-status
        request = peer.recv()
        order.append(request["execute"])
        peer.reply(request, {})
        peer.send({"event": "POWERDOWN", "timestamp": {"seconds": 0, "microseconds": 0}})
        with contextlib.suppress(EOFError, TimeoutError, OSError):
            peer.recv(2)

    fake = FakeQmp(ipaths.qmp_socket, script)
    agent = FakeAgent(ipaths.guest_agent_socket)
    try:
        assert node._press_power_button(ipaths) is True
        agent.thread.join(10)
    finally:
        fake.release.set()
        fake.listener.close()
        fake.thread.join(10)
        agent.close()
    assert order == ["system_powerdown"]
    assert [r["execute"] for r in agent.requests] == ["guest-sync-delimited", "guest-shutdown"]


def test_a_silent_agent_leaves_the_button_alone(node: KvmNode,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    ipaths = node.paths("web1")
    monkeypatch.setattr(core_node, "GUEST_AGENT_TIMEOUT", 0.2)
    agent = FakeAgent(ipaths.guest_agent_socket, answer=False)
    try:
        node._ask_guest_agent(ipaths)  # logged, not raised: the button acts alone
    finally:
        agent.close()
    assert [r["execute"] for r in agent.requests] == ["guest-sync-delimited"]


def test_nothing_to_tell_without_kvmd_monitor(node: KvmNode) -> None:
    # No QMP socket either: a connect would fail, so None proves none was made.
    assert node._announce_admin_stop(node.paths("web1")) is None


def test_a_qemu_whose_monitor_cannot_tell_kvmd_is_killed_not_terminated(
        node: KvmNode, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM would make QEMU report SHUTDOWN alone, which kvmd reads as the guest's."""
    ipaths = node.paths("web1")
    _touch(ipaths.kvmd_socket)
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.bind(ipaths.qmp_socket)  # accepts, never greets
    silent.listen(1)
    monkeypatch.setattr(core_node, "ADMIN_STOP_TIMEOUT", 0.2)
    sent: list[int] = []
    real_signal_pid = process.signal_pid

    def signal_pid(pid: int, signum: int) -> bool:
        sent.append(signum)
        return real_signal_pid(pid, signum)

    monkeypatch.setattr(process, "signal_pid", signal_pid)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        node._end_qemu("web1", ipaths, child.pid)
        assert not process.is_alive(child.pid)
        assert sent == [signal.SIGKILL]
    finally:
        child.kill()
        child.wait(10)
        silent.close()


def test_admin_stops_remove_the_marker_and_listing_keeps_it(node: KvmNode) -> None:
    ipaths = node.paths("web1")
    _touch(ipaths.shutdown_marker)
    # listing: the QEMU-less instance with a marker is user-down, only where asked
    assert node.info("web1") is None
    down = node.info("web1", user_down=True)
    assert down is not None and down.state == c.HV_STATE_USER_DOWN and down.pid == -1
    assert [i.name for i in node.all_info(user_down=True)] == ["web1"]
    assert node.all_info() == [] and node.list_names() == []
    assert os.path.exists(ipaths.shutdown_marker)  # no listing removes it
    node.stop("web1", acpi=True)  # the administrator's stop of a stopped instance
    assert not os.path.exists(ipaths.shutdown_marker)
    _touch(ipaths.shutdown_marker)
    node.cleanup("web1")
    assert not os.path.exists(ipaths.shutdown_marker)


# --- the Ganeti 3 adapter -----------------------------------------------------------


def test_ganeti3_reports_shutdown_as_ganeti_does(short_dir: str) -> None:
    from ganeti_kvm.ganeti3 import KVMHypervisor

    g3 = KVMHypervisor(run_dir=os.path.join(short_dir, "run"))
    g3.node.ensure_dirs()
    _touch(g3.node.paths("web1").shutdown_marker)
    assert g3.GetInstanceInfo("web1") == ("web1", -1, 0, 0, SHUTDOWN, 0)
    assert g3.GetAllInstancesInfo() == [("web1", -1, 0, 0, SHUTDOWN, 0)]
    assert g3.ListInstances() == []
    g3.CleanupInstance("web1")
    assert g3.GetInstanceInfo("web1") is None


def test_ganeti3_starts_kvmd_for_user_shutdown_only(
        short_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from ganeti_kvm.ganeti3 import KVMHypervisor

    asked: list[bool] = []

    def start_kvmd() -> str | None:
        asked.append(True)
        return "daemon-util said no"

    monkeypatch.setattr(_ganeti, "start_kvmd", start_kvmd)
    g3 = KVMHypervisor(run_dir=os.path.join(short_dir, "run"))
    hvp = dict(params.DEFAULTS, kvm_path="/nonexistent/qemu", user_shutdown=True)
    with pytest.raises(_ganeti.HypervisorError, match="web1.*ganeti-kvmd.*daemon-util said no"):
        g3.StartInstance(g3_instance("web1", hvp), [], False)
    assert asked == [True]
    with pytest.raises(_ganeti.HypervisorError) as info:
        g3.StartInstance(g3_instance("web1", dict(hvp, user_shutdown=False)), [], False)
    assert "kvmd" not in str(info.value) and asked == [True]


def test_without_ganeti_there_is_no_kvmd_to_start() -> None:
    if _ganeti.HAVE_GANETI:
        pytest.skip("Ganeti is importable here: start_kvmd would start the real daemon")
    assert _ganeti.start_kvmd() is None


# --- real QEMU ------------------------------------------------------------------------


def g3_hvparams(qemu_bin: str, guest: Any | None = None, **overrides: Any) -> dict[str, Any]:
    """Ganeti 3 parameters under TCG: the test guest, or none (it sits in the BIOS)."""
    hvp = dict(params.DEFAULTS, kvm_path=qemu_bin, kvm_flag="disabled", vhost_net=False,
               user_shutdown=True, use_guest_agent=True, kernel_path="",
               serial_console=guest is not None)
    if guest is not None:
        hvp.update(kernel_path=guest.kernel, initrd_path=guest.initrd, root_path="/dev/vda1",
                   kernel_args="panic=-1 quiet")
    hvp.update(overrides)
    return hvp


def test_qemu_has_the_agent_channel_and_kvmds_monitor(g3: Any, qemu_bin: str) -> None:
    g3.StartInstance(g3_instance("qga1", g3_hvparams(qemu_bin)), [], True)
    ipaths = g3.node.paths("qga1")
    chardevs = {d["label"]: d["filename"]
                for d in qmp_execute(ipaths.qmp_socket, "query-chardev", timeout=10)}
    assert ipaths.guest_agent_socket in chardevs["qga0"]
    # QEMU's socket, under the name kvmd watches for once QEMU listened
    assert f"unix:{ipaths.kvmd_bind_socket},server=on" in chardevs["kvmd"]
    assert os.path.exists(ipaths.kvmd_socket) and not os.path.exists(ipaths.kvmd_bind_socket)
    assert qmp_execute(ipaths.kvmd_socket, "query-status", timeout=10)["status"] == "prelaunch"
    port = qmp_execute(ipaths.qmp_socket, "qom-get", {
        "path": "/machine/peripheral/qga0-port", "property": "name"}, timeout=10)
    assert port == "org.qemu.guest_agent.0"
    record = g3.node.load_record("qga1")
    ident = devices.DeviceId.from_dict(record.guest_agent, "test")
    addr = qmp_execute(ipaths.qmp_socket, "qom-get", {
        "path": "/machine/peripheral/qgaserial0", "property": "addr"}, timeout=10)
    assert ident.slot is not None and addr == ident.slot * 8  # the slot the record keeps
    # no agent in a guest that never ran: a bounded GuestAgentError
    with pytest.raises(errors.GuestAgentError, match="qga1"):
        GuestAgent(ipaths.guest_agent_socket, "qga1", timeout=0.5).sync()
    g3.StopInstance(g3_instance("qga1", g3_hvparams(qemu_bin)), force=True)
    assert g3.GetInstanceInfo("qga1") is None


_NAMESPACE_SCRIPT = """set -e
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p /run/ganeti/kvm-hypervisor
mount --bind "$1" /run/ganeti/kvm-hypervisor
mount --bind "$2" /var/lib/ganeti
mount --bind "$3" /var/log/ganeti
exec "$4" -f -d --no-user-checks
"""


class Kvmd:
    """Ganeti's ganeti-kvmd watching ``run_dir`` as /var/run/ganeti/kvm-hypervisor,
    in a private mount namespace; its debug log is read to follow it."""

    def __init__(self, run_dir: str, work: str) -> None:
        ssconf, logs = os.path.join(work, "ssconf"), os.path.join(work, "log")
        os.makedirs(ssconf)
        os.makedirs(logs)
        names = {socket.gethostname(), socket.getfqdn(), "localhost"}
        for key, value in (("hypervisor_list", "kvm\n"), ("enabled_user_shutdown", "True\n"),
                           ("node_vm_capable", "".join(f"{n}=True\n" for n in names))):
            with open(os.path.join(ssconf, f"ssconf_{key}"), "w", encoding="ascii") as handle:
                handle.write(value)
        self.log_path = os.path.join(work, "kvmd.out")
        with open(self.log_path, "wb") as out:
            # unshare and sh exec: the PID is kvmd's; the mounts end with it.
            self.proc = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                 _NAMESPACE_SCRIPT, "kvmd-ns", run_dir, ssconf, logs, KVMD],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)

    def text(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as handle:
            return handle.read()

    def wait(self, pattern: str, count: int = 1) -> None:
        """Until kvmd's log matches ``pattern`` ``count`` times (bounded)."""
        deadline = time.monotonic() + BOUND
        while len(re.findall(pattern, self.text())) < count:
            if self.proc.poll() is not None:
                raise AssertionError(f"ganeti-kvmd exited ({self.proc.returncode}):\n"
                                     f"{self.text()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{pattern!r} not seen {count} times in kvmd's log:\n"
                                     f"{self.text()[-3000:]}")
            time.sleep(0.05)

    def decisions(self) -> list[str]:
        return re.findall(r"Detect (user|admin) shutdown", self.text())

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


@contextlib.contextmanager
def running_kvmd(run_dir: str, work: str) -> Iterator[Kvmd]:
    if not os.access(KVMD, os.X_OK) or not os.path.isdir("/var/lib/ganeti") \
            or not os.path.isdir("/var/log/ganeti"):
        message = f"{KVMD} (Debian's ganeti-haskell) is not installed; run 'make setup'"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    kvmd = Kvmd(run_dir, work)
    try:
        kvmd.wait(r"Watch directory \"/var/run/ganeti/kvm-hypervisor/ctrl/?\"")
        yield kvmd
    finally:
        kvmd.stop()


def _wait(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + BOUND
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {BOUND:.0f} s")
        time.sleep(0.05)


def test_kvmd_tells_a_guest_poweroff_from_every_admin_stop(g3: Any, qemu_bin: str, guest: Any,
                                                          short_dir: str) -> None:
    run_dir = g3.node.layout.root
    g3.node.ensure_dirs()
    name = "usd1"
    ipaths = g3.node.paths(name)
    booted = g3_instance(name, g3_hvparams(qemu_bin, guest), maxmem=128)
    monitors = 0

    def start(paused: bool) -> int:
        nonlocal monitors
        g3.StartInstance(booted, [], paused)
        monitors += 1
        # kvmd connected to this QEMU's .kvmd socket and left negotiation
        kvmd.wait(r"Receive QMP message: \{\"return\": \{\}\}", monitors)
        return int(g3.GetInstanceInfo(name)[1])

    def ended(pid: int, decisions: int) -> None:
        _wait(lambda: not process.is_alive(pid), "QEMU's exit")
        kvmd.wait(r"Detect (user|admin) shutdown", decisions)

    with running_kvmd(run_dir, os.path.join(short_dir, "kvmd")) as kvmd:
        # 1. The guest powers itself off: USER_down until Ganeti starts it again.
        pid = start(paused=False)
        serial = SerialReader(ipaths.serial_socket)
        serial.read_until("READY", timeout=BOUND)
        serial.send("poweroff -f\n")
        ended(pid, 1)
        serial.close()
        assert kvmd.decisions() == ["user"]
        assert os.path.exists(ipaths.shutdown_marker)
        assert g3.GetInstanceInfo(name) == (name, -1, 0, 0, SHUTDOWN, 0)
        assert (name, -1, 0, 0, SHUTDOWN, 0) in g3.GetAllInstancesInfo()
        assert name not in g3.ListInstances()

        # 2. gnt-instance start; an ACPI stop (the agent, absent, stays silent)
        pid = start(paused=False)
        assert not os.path.exists(ipaths.shutdown_marker)
        assert g3.GetInstanceInfo(name)[4] == RUNNING
        serial = SerialReader(ipaths.serial_socket)
        serial.read_until("READY", timeout=BOUND)
        g3.StopInstance(booted)  # the button; Ganeti polls
        ended(pid, 2)
        serial.read_until("POWER BUTTON")
        serial.close()
        assert kvmd.decisions() == ["user", "admin"]
        assert not os.path.exists(ipaths.shutdown_marker)
        assert g3.GetInstanceInfo(name) is None
        g3.CleanupInstance(name)

        # 3. A force stop (SIGTERM) of a QEMU whose guest never ran
        pid = start(paused=True)
        g3.StopInstance(booted, force=True)
        ended(pid, 3)
        assert kvmd.decisions() == ["user", "admin", "admin"]
        assert not os.path.exists(ipaths.shutdown_marker)
        assert g3.GetInstanceInfo(name) is None

        # 4. A running guest's QEMU force-stopped
        pid = start(paused=False)
        g3.StopInstance(booted, force=True)
        ended(pid, 4)
        assert kvmd.decisions()[-1] == "admin"

        # 5. QEMU killed (a crash): no SHUTDOWN event, no marker (ERROR_down)
        pid = start(paused=True)
        os.kill(pid, signal.SIGKILL)
        ended(pid, 5)
        assert kvmd.decisions()[-1] == "admin"
        assert not os.path.exists(ipaths.shutdown_marker)
        assert g3.GetInstanceInfo(name) is None
        g3.CleanupInstance(name)


def test_a_migration_target_has_the_same_agent_channel_and_kvmds_monitor(
        g3_nodes: tuple[Any, Any], qemu_bin: str) -> None:
    source, target = g3_nodes
    inst = g3_instance("qgam", g3_hvparams(qemu_bin, migration_port=free_port()))
    source.StartInstance(inst, [], False)
    info = source.MigrationInfo(inst)
    target.AcceptInstance(inst, info, "127.0.0.1")
    source.MigrateInstance("cluster1", inst, "127.0.0.1", True)
    deadline = time.monotonic() + BOUND
    while (status := source.GetMigrationStatus(inst)).status == "active":
        assert time.monotonic() < deadline, "the migration is still active"
        time.sleep(0.05)
    assert status.status == "completed", status
    source.FinalizeMigrationSource(inst, True, True)
    target.FinalizeMigrationDst(inst, info, True)
    assert target.GetInstanceInfo("qgam")[4] == RUNNING
    kept = devices.DeviceId.from_dict(runtime.parse(info, "qgam", "info").guest_agent,
                                      "test").slot
    ipaths = target.node.paths("qgam")
    assert target.node.load_record("qgam").guest_agent == runtime.parse(
        info, "qgam", "info").guest_agent
    addr = qmp_execute(ipaths.qmp_socket, "qom-get", {
        "path": "/machine/peripheral/qgaserial0", "property": "addr"}, timeout=10)
    assert kept is not None and addr == kept * 8
    assert qmp_execute(ipaths.kvmd_socket, "query-status", timeout=10)["running"] is True
    assert source.GetInstanceInfo("qgam") is None  # the source's end was no user shutdown
