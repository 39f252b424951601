"""Tests of the QMP client: a scripted fake server, then the real QEMUs."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from ganeti_kvm.errors import MonitorError, MonitorTimeout, QmpCommandError
from ganeti_kvm.qmp import client as qmp_module
from ganeti_kvm.qmp.client import QmpClient, qmp_execute
from tests.fakeqmp import GREETING, FakeQmp, Peer
from tests.helpers import BareVm as Vm


def test_greeting_and_capabilities(fake: Callable[..., FakeQmp]) -> None:
    server = fake(lambda peer: peer.handshake())
    with QmpClient(server.path, timeout=5) as client:
        version = client.connect()
        assert version == GREETING["QMP"]["version"]
        assert client.greeting == GREETING
        assert client.connected
        assert client.connect() == version  # idempotent
    assert not client.connected
    server.stop()
    [capabilities] = server.peers[0].requests
    assert capabilities["execute"] == "qmp_capabilities" and isinstance(capabilities["id"], int)


def test_ids_start_at_random() -> None:
    """Two clients' ids differ, so one cannot take the other's late reply for its own."""
    starts = {next(QmpClient("/nonexistent")._ids) for _ in range(5)}
    assert len(starts) > 1


def test_replies_to_an_earlier_client_are_dropped(fake: Callable[..., FakeQmp]) -> None:
    """What QEMU does after a client gave up on it: the reply to that client's
    request comes on the next connection, even before its greeting, and that
    client's qmp_capabilities may already have left negotiation mode."""
    def script(peer: Peer) -> None:
        peer.send({"return": {}})  # the earlier client's qmp_capabilities
        peer.send(GREETING)
        capabilities = peer.recv()
        peer.send({"return": {"status": "running"}})  # its query-status, no id
        peer.send({"error": {"class": "CommandNotFound",
                             "desc": "Capabilities negotiation is already complete, "
                                     "command ignored"}, "id": capabilities["id"]})
        request = peer.recv()
        peer.reply(request, {"status": "prelaunch"})

    server = fake(script)
    with QmpClient(server.path, timeout=5) as client:
        assert client.execute("query-status") == {"status": "prelaunch"}
    server.stop()


def test_other_capabilities_errors_fail(fake: Callable[..., FakeQmp]) -> None:
    def script(peer: Peer) -> None:
        peer.send(GREETING)
        capabilities = peer.recv()
        peer.send({"error": {"class": "GenericError", "desc": "no"}, "id": capabilities["id"]})

    server = fake(script)
    with pytest.raises(QmpCommandError, match="qmp_capabilities.*GenericError: no"):
        QmpClient(server.path, timeout=5).connect()
    server.stop()


def test_execute_success_sends_id_and_arguments(fake: Callable[..., FakeQmp]) -> None:
    def script(peer: Peer) -> None:
        peer.handshake()
        request = peer.recv()
        peer.reply(request, {"echo": request.get("arguments")})
        request = peer.recv()
        peer.reply(request, {"status": "running", "running": True})

    server = fake(script)
    with QmpClient(server.path, timeout=5) as client:
        assert client.execute("echo", {"a": [1, "x"]}) == {"echo": {"a": [1, "x"]}}
        assert client.execute("query-status")["status"] == "running"
    server.stop()
    first, second = server.peers[0].requests[1:]
    assert first["execute"] == "echo" and first["arguments"] == {"a": [1, "x"]}
    assert "arguments" not in second
    assert first["id"] != second["id"]


def test_execute_many_sends_every_command_before_any_reply(
        fake: Callable[..., FakeQmp]) -> None:
    def script(peer: Peer) -> None:
        peer.handshake()
        # All three must be there before anything is answered.
        first, second, third = (peer.recv(timeout=2) for _ in range(3))
        peer.reply(first, {"n": 1})
        peer.send({"error": {"class": "GenericError", "desc": "refused"},
                   "id": second["id"]})
        peer.send({"event": "MIGRATION", "data": {"status": "setup"},
                   "timestamp": {"seconds": 0, "microseconds": 0}})
        peer.reply(third, {"n": 3})

    server = fake(script)
    with QmpClient(server.path, timeout=5) as client:
        one, refused, three = client.execute_many(
            [("a", None), ("b", {"x": 1}), ("c", None)])
        assert one == {"n": 1} and three == {"n": 3}
        assert isinstance(refused, QmpCommandError) and refused.desc == "refused"
        assert "b" in str(refused)
        event = client.wait_event(["MIGRATION"], timeout=0)
        assert event is not None and event["data"] == {"status": "setup"}
    server.stop()
    assert [r["execute"] for r in server.peers[0].requests[1:]] == ["a", "b", "c"]
    assert server.peers[0].requests[2]["arguments"] == {"x": 1}


def test_execute_many_on_a_new_connection_goes_out_with_the_negotiation(
        fake: Callable[..., FakeQmp]) -> None:
    def script(peer: Peer) -> None:
        # Everything arrives before QEMU has even greeted.
        caps, first, second = (peer.recv(timeout=2) for _ in range(3))
        peer.send(GREETING)
        peer.reply(caps, {})
        peer.reply(first, 1)
        peer.reply(second, 2)

    server = fake(script)
    with QmpClient(server.path, timeout=5) as client:
        assert client.execute_many([("a", None), ("b", None)]) == [1, 2]
        assert client.greeting == GREETING
    server.stop()
    assert [r["execute"] for r in server.peers[0].requests] == ["qmp_capabilities", "a", "b"]


def test_qmp_error_raises_command_error(fake: Callable[..., FakeQmp]) -> None:
    def script(peer: Peer) -> None:
        peer.handshake()
        request = peer.recv()
        peer.send({"error": {"class": "CommandNotFound",
                             "desc": "The command bogus has not been found"},
                   "id": request["id"]})

    server = fake(script)
    with QmpClient(server.path, timeout=5) as client, \
            pytest.raises(QmpCommandError) as info:
        client.execute("bogus")
    server.stop()
    assert info.value.error_class == "CommandNotFound"
    assert info.value.desc == "The command bogus has not been found"
    message = str(info.value)
    assert "bogus" in message and "CommandNotFound" in message
    assert "The command bogus has not been found" in message


def test_events_before_reply_are_queued(fake: Callable[..., FakeQmp]) -> None:
    def script(peer: Peer) -> None:
        peer.handshake()
        request = peer.recv()
        peer.send({"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 0}})
        peer.send({"event": "RESUME", "timestamp": {"seconds": 2, "microseconds": 0}})
        peer.reply(request, {})
        peer.send({"event": "SHUTDOWN", "data": {"guest": True}})
        peer.send({"event": "RESET", "data": {}})

    server = fake(script)
    with QmpClient(server.path, timeout=5) as client:
        assert client.execute("cont") == {}
        resume = client.wait_event(["RESUME"], timeout=1)
        assert resume is not None and resume["timestamp"]["seconds"] == 2
        shutdown = client.wait_event({"SHUTDOWN"}, timeout=5)
        assert shutdown is not None and shutdown["data"] == {"guest": True}
        anything = client.wait_event(None, timeout=5)
        assert anything is not None and anything["event"] == "STOP"
        time.sleep(0.2)  # let RESET arrive; events() takes what is already there
        assert [e["event"] for e in client.events()] == ["RESET"]
        assert client.events() == []
        start = time.monotonic()
        assert client.wait_event(["NEVER"], timeout=0.3) is None
        assert 0.25 < time.monotonic() - start < 2
    server.stop()


def test_partial_lines_are_buffered(fake: Callable[..., FakeQmp]) -> None:
    def script(peer: Peer) -> None:
        greeting = json.dumps(GREETING).encode() + b"\r\n"
        for piece in (greeting[:5], greeting[5:30], greeting[30:]):
            peer.send_raw(piece)
            time.sleep(0.05)
        request = peer.recv()
        peer.reply(request, {})
        request = peer.recv()
        reply = json.dumps({"return": {"status": "paused"}, "id": request["id"]}).encode()
        event = json.dumps({"event": "STOP"}).encode()
        # One chunk ends mid-token, the next holds the rest of the event and the reply.
        peer.send_raw(event[:7])
        time.sleep(0.05)
        peer.send_raw(event[7:] + b"\r\n" + reply[:-3])
        time.sleep(0.05)
        peer.send_raw(reply[-3:] + b"\r\n")

    server = fake(script)
    with QmpClient(server.path, timeout=5) as client:
        client.connect()
        assert client.execute("query-status") == {"status": "paused"}
        assert [e["event"] for e in client.events()] == ["STOP"]
    server.stop()


def test_stale_reply_is_dropped(fake: Callable[..., FakeQmp]) -> None:
    def script(peer: Peer) -> None:
        peer.handshake()
        request = peer.recv()
        peer.send({"return": {"late": True}, "id": 999999})
        peer.reply(request, {"late": False})

    server = fake(script)
    with QmpClient(server.path, timeout=5) as client:
        assert client.execute("query-status") == {"late": False}
    server.stop()


def test_eof_mid_reply(fake: Callable[..., FakeQmp]) -> None:
    def script(peer: Peer) -> None:
        peer.handshake()
        peer.recv()
        peer.send_raw(b'{"return": {"sta')
        peer.conn.shutdown(socket.SHUT_RDWR)

    server = fake(script)
    with QmpClient(server.path, timeout=5) as client:
        client.connect()
        with pytest.raises(MonitorError) as info:
            client.execute("query-status")
        assert not isinstance(info.value, MonitorTimeout)
        assert "QEMU closed the monitor connection" in str(info.value)
        assert server.path in str(info.value) and "query-status" in str(info.value)
        assert not client.connected
    server.stop()


def test_command_timeout(fake: Callable[..., FakeQmp]) -> None:
    def script(peer: Peer) -> None:
        peer.handshake()
        peer.recv()  # and never answer

    server = fake(script)
    with QmpClient(server.path, timeout=5) as client:
        client.connect()
        start = time.monotonic()
        with pytest.raises(MonitorTimeout) as info:
            client.execute("query-status", timeout=0.3)
        elapsed = time.monotonic() - start
    server.stop()
    assert 0.25 < elapsed < 1.5
    assert server.path in str(info.value) and "query-status" in str(info.value)


def test_greeting_timeout(fake: Callable[..., FakeQmp]) -> None:
    server = fake(lambda peer: None)  # accepts, says nothing
    start = time.monotonic()
    with pytest.raises(MonitorTimeout) as info:
        QmpClient(server.path, timeout=0.3).connect()
    assert time.monotonic() - start < 1.5
    assert server.path in str(info.value) and "greeting" in str(info.value)
    server.stop()


@pytest.mark.parametrize("script, expected", [
    (lambda peer: peer.send_raw(b"QEMU 7.2 monitor - type 'help'\r\n"), "invalid JSON"),
    (lambda peer: peer.send({"hello": "world"}), "instead of a QMP greeting"),
], ids=["human-monitor", "other-json"])
def test_not_a_qmp_socket(fake: Callable[..., FakeQmp], script: Callable[[Peer], None],
                          expected: str) -> None:
    server = fake(script)
    with pytest.raises(MonitorError) as info:
        QmpClient(server.path, timeout=2).connect()
    assert server.path in str(info.value) and expected in str(info.value)
    server.stop()


def test_missing_socket(short_dir: str) -> None:
    path = os.path.join(short_dir, "nothing.qmp")
    with pytest.raises(MonitorError) as info:
        QmpClient(path, timeout=1).connect()
    assert not isinstance(info.value, MonitorTimeout)
    assert path in str(info.value)
    with pytest.raises(MonitorError, match="does not exist"):
        qmp_execute(path, "query-status", timeout=1)


def test_connection_refused(short_dir: str) -> None:
    path = os.path.join(short_dir, "stale.qmp")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)  # bound but not listening: what a dead QEMU leaves behind
    try:
        with pytest.raises(MonitorError) as info:
            QmpClient(path, timeout=1).connect()
        assert path in str(info.value) and "refused" in str(info.value)
    finally:
        stale.close()


def test_human_command_and_qmp_execute(fake: Callable[..., FakeQmp]) -> None:
    def human(peer: Peer) -> None:
        peer.handshake()
        request = peer.recv()
        assert request["execute"] == "human-monitor-command"
        assert request["arguments"] == {"command-line": "info status"}
        peer.reply(request, "VM status: running\r\n")

    def status(peer: Peer) -> None:
        peer.handshake()
        peer.reply(peer.recv(), {"status": "running"})

    server = fake(human)
    with QmpClient(server.path, timeout=5) as client:
        assert client.human_command("info status") == "VM status: running\r\n"
    server.stop()
    server = fake(status)
    assert qmp_execute(server.path, "query-status", timeout=5) == {"status": "running"}
    server.stop()


# ----------------------------------------------------------------------
# Real QEMU


@pytest.fixture
def vm(qemu_bin: str, short_dir: str, reaper: Any) -> Vm:
    machine = Vm(qemu_bin, short_dir)
    reaper.add(machine.pid)
    return machine


def serial_filename(client: QmpClient, serial: str) -> str:
    for chardev in client.execute("query-chardev"):
        if chardev["label"] == "serial0":
            assert serial in chardev["filename"]
            return str(chardev["filename"])
    raise AssertionError("no serial0 chardev")


def test_real_status_transitions(vm: Vm) -> None:
    with QmpClient(vm.qmp, timeout=10) as client:
        version = client.connect()
        assert version["qemu"]["major"] in (7, 10)
        status = client.execute("query-status")
        assert status["status"] == "prelaunch" and status["running"] is False
        assert "prelaunch" in client.human_command("info status")
        assert client.execute("cont") == {}
        assert client.execute("query-status")["status"] == "running"
        assert client.human_command("info status") == "VM status: running\r\n"
        assert client.execute("stop") == {}
        assert client.execute("query-status")["status"] == "paused"
        assert client.human_command("info status") == "VM status: paused\r\n"
        events = [e["event"] for e in client.events()]
        assert events == ["RESUME", "STOP"]
        with pytest.raises(QmpCommandError) as info:
            client.execute("no-such-command")
        assert info.value.error_class == "CommandNotFound"
    assert qmp_execute(vm.qmp, "query-status")["status"] == "paused"


def test_real_sigstop_times_out(vm: Vm) -> None:
    os.kill(vm.pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        with pytest.raises(MonitorTimeout) as info:
            QmpClient(vm.qmp, timeout=0.5).connect()
        assert time.monotonic() - start < 2.0
        assert vm.qmp in str(info.value)
    finally:
        os.kill(vm.pid, signal.SIGCONT)

    with QmpClient(vm.qmp, timeout=5) as client:
        client.connect()
        os.kill(vm.pid, signal.SIGSTOP)
        try:
            start = time.monotonic()
            with pytest.raises(MonitorTimeout) as info:
                client.execute("query-status", timeout=0.5)
            assert time.monotonic() - start < 2.0
            assert vm.qmp in str(info.value) and "query-status" in str(info.value)
        finally:
            os.kill(vm.pid, signal.SIGCONT)
        # The late reply to the timed-out command is dropped, not mistaken for this one.
        assert client.execute("query-chardev", timeout=5)[0]["label"]
    os.kill(vm.pid, signal.SIGKILL)


def test_real_query_chardev_connection_state(vm: Vm) -> None:
    disconnected = f"disconnected:unix:{vm.serial},server=on"
    connected = f"unix:{vm.serial},server=on"
    with QmpClient(vm.qmp, timeout=10) as client:
        labels = {c["label"]: c["filename"] for c in client.execute("query-chardev")}
        # The QMP monitor's own chardev shows our connection.
        assert labels["compat_monitor0"] == f"unix:{vm.qmp},server=on"
        assert serial_filename(client, vm.serial) == disconnected
        console = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        console.connect(vm.serial)
        try:
            deadline = time.monotonic() + 5
            while serial_filename(client, vm.serial) != connected:
                assert time.monotonic() < deadline, "serial chardev never showed the client"
                time.sleep(0.01)
        finally:
            console.close()
        deadline = time.monotonic() + 5
        while serial_filename(client, vm.serial) != disconnected:
            assert time.monotonic() < deadline, "serial chardev never showed the disconnect"
            time.sleep(0.01)


# ----------------------------------------------------------------------
# A monitor whose listen backlog is full (another client talks to it)


class _RetrySpy:
    """Stands in for the ``time`` module of ganeti_kvm.qmp.client: counts the pauses
    between connects and tells a waiting server once the client has retried."""

    def __init__(self) -> None:
        self.pauses: list[float] = []
        self.retried = threading.Event()
        self.monotonic = time.monotonic

    def sleep(self, seconds: float) -> None:
        self.pauses.append(seconds)
        self.retried.set()
        time.sleep(seconds)


def fill_backlog(path: str) -> list[socket.socket]:
    """Connect until ``path``'s listen backlog is full; the connections, to close later."""
    pending: list[socket.socket] = []
    while len(pending) < 16:
        extra = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        extra.setblocking(False)
        try:
            extra.connect(path)
        except BlockingIOError:
            extra.close()
            return pending
        pending.append(extra)
    raise AssertionError(f"the backlog of {path} never filled")


@pytest.fixture
def busy_listener(short_dir: str) -> Iterator[tuple[socket.socket, list[socket.socket]]]:
    """A unix socket listening with QEMU's backlog, already full of waiting clients."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(os.path.join(short_dir, "busy.qmp"))
    listener.listen(1)
    pending = fill_backlog(listener.getsockname())
    try:
        yield listener, pending
    finally:
        for sock in pending:
            sock.close()
        listener.close()


def test_connect_retries_while_the_backlog_is_full(
        busy_listener: tuple[socket.socket, list[socket.socket]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A connect that finds the backlog full waits for its turn (issue 11: a
    start failed with EAGAIN because listings kept the monitor busy)."""
    listener, pending = busy_listener
    spy = _RetrySpy()
    monkeypatch.setattr(qmp_module, "time", spy)
    served: list[Peer] = []

    def serve() -> None:
        assert spy.retried.wait(10), "the client never retried"
        listener.settimeout(10)
        for _ in pending:  # the clients ahead in the queue come and go
            listener.accept()[0].close()
        conn, _ = listener.accept()
        peer = Peer(conn)
        peer.handshake()
        peer.reply(peer.recv(), {"status": "running"})
        served.append(peer)

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    with QmpClient(listener.getsockname(), timeout=10) as client:
        assert client.execute("query-status") == {"status": "running"}
    server.join(10)
    assert served and spy.pauses
    assert max(spy.pauses) <= qmp_module.CONNECT_RETRY_MAX
    served[0].conn.close()


def test_connect_gives_up_at_its_deadline_if_the_backlog_stays_full(
        busy_listener: tuple[socket.socket, list[socket.socket]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    listener, _ = busy_listener
    spy = _RetrySpy()
    monkeypatch.setattr(qmp_module, "time", spy)
    path = listener.getsockname()
    with pytest.raises(MonitorTimeout) as info:
        QmpClient(path, timeout=0.2).connect()
    assert path in str(info.value) and "backlog" in str(info.value)
    assert len(spy.pauses) > 1  # retried, with growing pauses
    assert spy.pauses[1] > spy.pauses[0]
    assert sum(spy.pauses) <= 0.2 + 1e-9  # never slept past the deadline


def test_real_connect_waits_for_a_held_monitor(vm: Vm, monkeypatch: pytest.MonkeyPatch) -> None:
    """QEMU's monitor held by one client with a full backlog: the next client
    retries and gets its answer once the others are done."""
    holder = QmpClient(vm.qmp, timeout=10)
    holder.connect()
    pending = fill_backlog(vm.qmp)
    spy = _RetrySpy()
    monkeypatch.setattr(qmp_module, "time", spy)
    results: list[Any] = []

    def ask() -> None:
        try:
            results.append(QmpClient(vm.qmp, timeout=10).execute("query-status"))
        except MonitorError as err:
            results.append(err)

    asker = threading.Thread(target=ask, daemon=True)
    asker.start()
    try:
        assert spy.retried.wait(10), "the client never found the backlog full"
    finally:
        for extra in pending:
            extra.close()
        holder.close()
    asker.join(15)
    assert not asker.is_alive()
    assert isinstance(results[0], dict) and results[0]["status"] == "prelaunch", results


def test_open_monitor_socket_names_the_kind_of_monitor(
        busy_listener: tuple[socket.socket, list[socket.socket]], short_dir: str) -> None:
    """The same wait serves the 2011 human monitor; its errors say which monitor."""
    listener, _ = busy_listener
    with pytest.raises(MonitorTimeout, match="human monitor .*backlog stayed full"):
        qmp_module.open_monitor_socket(listener.getsockname(), 0.05, kind="human monitor")
    missing = os.path.join(short_dir, "gone.monitor")
    with pytest.raises(MonitorError, match=f"human monitor {missing} does not exist"):
        qmp_module.open_monitor_socket(missing, 1.0, kind="human monitor")
