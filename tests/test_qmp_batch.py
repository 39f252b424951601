"""Tests of qmp_batch.execute_each: scripted fake monitors, then the real QEMUs."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from ganeti_kvm.errors import MonitorError, MonitorTimeout, QmpCommandError
from ganeti_kvm.qmp import batch as qmp_batch
from ganeti_kvm.qmp.batch import execute_each
from ganeti_kvm.qmp.client import QmpClient
from tests.fakeqmp import GREETING, FakeQmp, Peer
from tests.helpers import BareVm

RUNNING = {"status": "running", "running": True}


def answer_status(peer: Peer) -> None:
    """A monitor that answers query-status after an event between the replies."""
    peer.send(GREETING)
    capabilities = peer.recv()
    peer.send({"event": "RESUME", "data": {}, "timestamp": {"seconds": 1, "microseconds": 0}})
    peer.reply(capabilities, {})
    peer.reply(peer.recv(), RUNNING)


def test_pipelined_requests_and_an_event_between(fake: Callable[..., FakeQmp]) -> None:
    server = fake(answer_status)
    assert execute_each([server.path], "query-status", timeout=5) == [RUNNING]
    server.stop()
    capabilities, status = server.peers[0].requests
    # Every byte costs QEMU time: only the command carries an id, of five digits.
    assert capabilities == {"execute": "qmp_capabilities"}
    assert status["execute"] == "query-status" and "arguments" not in status
    assert 10_000 <= status["id"] < 100_000


def test_replies_to_an_earlier_client_are_dropped(fake: Callable[..., FakeQmp]) -> None:
    """See test_qmp: a late reply to another client, before or after the
    greeting, is not the answer; "negotiation already complete" is fine."""
    def script(peer: Peer) -> None:
        peer.send({"return": {}})
        peer.send(GREETING)
        peer.recv()  # qmp_capabilities
        status = peer.recv()
        peer.send({"return": {"status": "paused", "running": False}})
        peer.send({"return": {"status": "paused", "running": False}, "id": 7})
        peer.send({"error": {"class": "CommandNotFound", "desc": "already complete"}})
        peer.reply(status, RUNNING)

    server = fake(script)
    assert execute_each([server.path], "query-status", timeout=5) == [RUNNING]
    server.stop()


def test_one_silent_monitor_does_not_hold_the_others(fake: Callable[..., FakeQmp]) -> None:
    def silent(peer: Peer) -> None:
        peer.send(GREETING)
        peer.recv()  # qmp_capabilities, never answered

    servers = [fake(answer_status), fake(silent), fake(answer_status)]
    start = time.monotonic()
    results = execute_each([server.path for server in servers], "query-status", timeout=0.5)
    elapsed = time.monotonic() - start
    assert results[0] == RUNNING and results[2] == RUNNING
    assert isinstance(results[1], MonitorTimeout)
    assert servers[1].path in str(results[1]) and "query-status" in str(results[1])
    assert 0.5 <= elapsed < 3.0  # bounded by the timeout, not hung
    for server in servers:
        server.stop()


def test_at_most_max_in_flight_connections(fake: Callable[..., FakeQmp],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qmp_batch, "MAX_IN_FLIGHT", 2)
    open_now, most = 0, 0
    connect, close = qmp_batch._Exchange.connect, qmp_batch._Exchange.close

    def counting_connect(self: Any, request: bytes) -> bool:
        nonlocal open_now, most
        connected = connect(self, request)
        open_now += connected
        most = max(most, open_now)
        return connected

    def counting_close(self: Any) -> None:
        nonlocal open_now
        open_now -= self.sock is not None
        close(self)

    monkeypatch.setattr(qmp_batch._Exchange, "connect", counting_connect)
    monkeypatch.setattr(qmp_batch._Exchange, "close", counting_close)
    servers = [fake(answer_status) for _ in range(5)]
    assert execute_each([server.path for server in servers], "query-status",
                        timeout=5) == [RUNNING] * 5
    assert most == 2 and open_now == 0
    for server in servers:
        server.stop()


def test_command_error_is_reported_per_monitor(fake: Callable[..., FakeQmp]) -> None:
    def refuse(peer: Peer) -> None:
        peer.handshake()
        request = peer.recv()
        peer.send({"error": {"class": "CommandNotFound", "desc": "no such command"},
                   "id": request["id"]})

    server = fake(refuse)
    [result] = execute_each([server.path], "query-nothing", timeout=5)
    assert isinstance(result, QmpCommandError)
    assert result.error_class == "CommandNotFound" and "query-nothing" in str(result)
    server.stop()


@pytest.mark.parametrize("script, expected", [
    (lambda peer: peer.send_raw(b"QEMU 7.2 monitor - type 'help'\r\n"), "invalid JSON"),
    (lambda peer: peer.send({"hello": "world"}), "instead of a QMP greeting"),
    (lambda peer: peer.send_raw(b"[1, 2]\n"), "expected a JSON object"),
    (lambda peer: peer.conn.close(), "closed the monitor connection"),
], ids=["human-monitor", "no-greeting", "not-an-object", "closed"])
def test_broken_monitors(fake: Callable[..., FakeQmp], script: Callable[[Peer], None],
                         expected: str) -> None:
    server = fake(script)
    [result] = execute_each([server.path], "query-status", timeout=5)
    assert isinstance(result, MonitorError) and expected in str(result), result
    assert server.path in str(result)


def test_missing_and_refused_sockets(short_dir: str) -> None:
    missing = os.path.join(short_dir, "missing.qmp")
    stale = os.path.join(short_dir, "stale.qmp")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(stale)
    listener.close()  # the path stays; nothing listens on it
    missing_result, stale_result = execute_each([missing, stale], "query-status", timeout=5)
    assert isinstance(missing_result, MonitorError) and "does not exist" in str(missing_result)
    assert isinstance(stale_result, MonitorError) and "connection refused" in str(stale_result)


def test_nothing_to_ask_and_bad_timeout() -> None:
    assert execute_each([], "query-status", timeout=1) == []
    with pytest.raises(ValueError):
        execute_each(["/nonexistent"], "query-status", timeout=0)


# ----------------------------------------------------------------------
# Real QEMU


def start_vms(qemu_bin: str, short_dir: str, reaper: Any, count: int) -> list[BareVm]:
    vms = []
    for index in range(count):
        directory = os.path.join(short_dir, f"vm{index}")
        os.mkdir(directory)
        vm = BareVm(qemu_bin, directory)
        reaper.add(vm.pid)
        vms.append(vm)
    return vms


def test_real_states_at_once(qemu_bin: str, short_dir: str, reaper: Any) -> None:
    prelaunch, running, stopped = start_vms(qemu_bin, short_dir, reaper, 3)
    with QmpClient(running.qmp, timeout=10) as client:
        client.execute("cont")
    os.kill(stopped.pid, signal.SIGSTOP)
    try:
        results = execute_each([prelaunch.qmp, running.qmp, stopped.qmp], "query-status",
                               timeout=1.0)
    finally:
        os.kill(stopped.pid, signal.SIGCONT)
    assert results[0]["status"] == "prelaunch" and results[0]["running"] is False
    assert results[1]["status"] == "running" and results[1]["running"] is True
    assert isinstance(results[2], MonitorTimeout)
    # The monitor that timed out still serves the next client.
    assert execute_each([stopped.qmp], "query-status", timeout=5)[0]["status"] == "prelaunch"


def test_real_late_answers_after_a_stopped_qemu(qemu_bin: str, short_dir: str,
                                                reaper: Any) -> None:
    """Each time a SIGSTOPped QEMU resumes, it answers the request of the batch
    that gave up on it, on the next batch's connection: that must not be taken
    for the next batch's answer (the monitor is shared between connections)."""
    [vm] = start_vms(qemu_bin, short_dir, reaper, 1)
    for _ in range(15):
        os.kill(vm.pid, signal.SIGSTOP)
        try:
            [gave_up] = execute_each([vm.qmp], "query-status", timeout=0.05)
        finally:
            os.kill(vm.pid, signal.SIGCONT)
        assert isinstance(gave_up, MonitorTimeout)
        [answer] = execute_each([vm.qmp], "query-status", timeout=5)
        assert isinstance(answer, dict) and answer["status"] == "prelaunch", answer
        with QmpClient(vm.qmp, timeout=5) as client:
            assert client.execute("query-status")["status"] == "prelaunch"


def test_real_monitor_held_then_released(qemu_bin: str, short_dir: str, reaper: Any) -> None:
    """A monitor held by another client, with a full backlog, answers once released."""
    [vm] = start_vms(qemu_bin, short_dir, reaper, 1)
    holder = QmpClient(vm.qmp, timeout=10)
    holder.connect()
    pending = []
    try:
        while len(pending) < 16:  # fill the listen backlog until connect would block
            extra = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            extra.setblocking(False)
            try:
                extra.connect(vm.qmp)
            except BlockingIOError:
                extra.close()
                break
            pending.append(extra)
        assert len(pending) < 16, "the monitor's backlog never filled"
        assert execute_each([vm.qmp], "query-status", timeout=0.3)[0].__class__ is MonitorTimeout

        results: list[Any] = []
        asker = threading.Thread(
            target=lambda: results.extend(execute_each([vm.qmp], "query-status", timeout=10)))
        asker.start()
        time.sleep(0.2)  # the asker now retries its connect
        for extra in pending:
            extra.close()
        holder.close()
        asker.join(15)
        assert not asker.is_alive()
    finally:
        holder.close()
        for extra in pending:
            extra.close()
    assert results and results[0]["status"] == "prelaunch", results
