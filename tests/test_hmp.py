"""The human monitor client (QEMUs of the 2011 driver) against a scripted peer."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator

import pytest

from ganeti_kvm import errors
from ganeti_kvm.core.migration import _hmp_status
from ganeti_kvm.qmp import hmp

GREETING = b"QEMU 7.2.22 monitor - type 'help' for more information\r\n(qemu) "


@pytest.fixture
def monitor(short_dir: str) -> Iterator[tuple[str, list[bytes], dict[bytes, bytes]]]:
    """A fake human monitor: echoes each line as QEMU does, then the scripted answer."""
    path = os.path.join(short_dir, "mon")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(4)
    received: list[bytes] = []
    answers: dict[bytes, bytes] = {}

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.sendall(GREETING)
                data = b""
                while True:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                    while b"\n" in data:
                        line, data = data.split(b"\n", 1)
                        received.append(line)
                        if line == b"hang":
                            continue
                        echo = line[:1] + b"\x1b[K\x1b[D" + line + b"\x1b[K\r\n"
                        conn.sendall(echo + answers.get(line, b"") + b"(qemu) ")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield path, received, answers
    listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() of the serving thread
    listener.close()
    thread.join(5)


def test_command_output_without_echo_or_escapes(monitor) -> None:
    path, received, answers = monitor
    answers[b"info status"] = b"VM status: paused (prelaunch)\r\n"
    with hmp.HmpClient(path) as client:
        assert client.command("info status") == "VM status: paused (prelaunch)"
        assert client.command("system_powerdown") == ""
    assert received == [b"info status", b"system_powerdown"]
    assert hmp.run_state("VM status: paused (prelaunch)") == "prelaunch"
    assert hmp.run_state("VM status: paused (postmigrate)") == "postmigrate"
    assert hmp.run_state("VM status: paused") == "paused"
    assert hmp.run_state("VM status: running") == "running"


def test_no_answer_is_a_timeout_naming_the_socket(monitor) -> None:
    path, _, _ = monitor
    with hmp.HmpClient(path, timeout=0.3) as client, \
            pytest.raises(errors.MonitorTimeout, match=path):
        client.command("hang")


def test_line_breaks_are_refused(monitor) -> None:
    path, received, _ = monitor
    with hmp.HmpClient(path) as client, pytest.raises(errors.MonitorError, match="line break"):
        client.command("info status\nquit")
    assert received == []


def test_missing_socket_is_a_monitor_error(short_dir) -> None:
    with pytest.raises(errors.MonitorError, match="nothing-here"):
        hmp.hmp_command(os.path.join(short_dir, "nothing-here"), "info status")


def test_info_migrate_is_parsed() -> None:
    status = _hmp_status("globals:\nstore-global-state: on\nMigration status: active\n"
                         "total time: 120 ms\ntransferred ram: 589 kbytes\n"
                         "remaining ram: 10 kbytes\ntotal ram: 49992 kbytes\n")
    assert (status.status, status.transferred, status.remaining, status.total,
            status.total_time_ms) == ("active", 589 * 1024, 10 * 1024, 49992 * 1024, 120)
    failed = _hmp_status("Migration status: failed (Unable to write to socket)\n")
    assert failed.status == "failed" and failed.error == "Unable to write to socket"
    assert _hmp_status("").status == "none"
