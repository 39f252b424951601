"""A scripted fake QMP server, for tests of the QMP clients without QEMU."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

GREETING = {"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 10},
                                "package": "fake"},
                    "capabilities": ["oob"]}}


# ----------------------------------------------------------------------
# A scripted fake QMP server


class Peer:
    """The server side of one fake QMP connection, as seen by a test script."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.buffer = b""
        self.requests: list[dict[str, Any]] = []

    def send(self, obj: dict[str, Any]) -> None:
        self.conn.sendall(json.dumps(obj).encode() + b"\r\n")

    def send_raw(self, data: bytes) -> None:
        self.conn.sendall(data)

    def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        """Read one request line (bounded by ``timeout``)."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("the client sent no request")
            self.conn.settimeout(remaining)
            chunk = self.conn.recv(4096)
            if not chunk:
                raise EOFError("the client closed the connection")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        request: dict[str, Any] = json.loads(line)
        self.requests.append(request)
        return request

    def handshake(self) -> None:
        """Send the greeting and answer qmp_capabilities."""
        self.send(GREETING)
        request = self.recv()
        assert request["execute"] == "qmp_capabilities"
        self.reply(request, {})

    def reply(self, request: dict[str, Any], value: Any) -> None:
        message: dict[str, Any] = {"return": value}
        if "id" in request:
            message["id"] = request["id"]
        self.send(message)


class FakeQmp:
    """A unix-socket server running ``script(peer)`` for each accepted connection."""

    def __init__(self, path: str, script: Callable[[Peer], None], connections: int = 1) -> None:
        self.path = path
        self.script = script
        self.errors: list[BaseException] = []
        self.peers: list[Peer] = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(4)
        self.listener.settimeout(10)
        self.release = threading.Event()
        self.thread = threading.Thread(target=self._serve, args=(connections,), daemon=True)
        self.thread.start()

    def _serve(self, connections: int) -> None:
        for _ in range(connections):
            try:
                conn, _ = self.listener.accept()
            except OSError as err:
                self.errors.append(err)
                return
            peer = Peer(conn)
            self.peers.append(peer)
            try:
                self.script(peer)
                # Keep the connection open until the test is done with it.
                self.release.wait(10)
            except BaseException as err:  # noqa: BLE001 - reported by stop()
                self.errors.append(err)
            finally:
                conn.close()

    def stop(self) -> None:
        self.release.set()
        self.listener.close()
        self.thread.join(10)
        assert not self.thread.is_alive(), "fake QMP server did not stop"
        if self.errors:
            raise self.errors[0]
