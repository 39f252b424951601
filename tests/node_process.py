"""A node in its own process: a hypervisor that answers calls on stdin/stdout.

Two nodes in one test process share the probe's in-process cache, keyed by
the QEMU binary's file: with one ``kvm_path`` that runs a different QEMU on
each node (a rolling upgrade), the second node would see the first one's
capabilities.  Real nodes are separate machines, so each test node here is
a separate process, started inside its network namespace
(``ip netns exec NS python3 -m tests.node_process RUN_DIR``): its QEMUs,
probes and TCP sockets live there, as on a real node.

One request per line: ``{"method": "StartInstance", "args": [...]}``, where
an argument ``{"instance": {...}}`` becomes an :class:`objects.Instance`;
one reply per line: ``{"result": ...}`` or ``{"error": CLASS, "message": ...}``.
:class:`NodeProcess` is the test side.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys
import time
from types import TracebackType
from typing import Any

from ganeti_kvm import errors, objects
from ganeti_kvm.hv_kvm import KVMHypervisor
from tests.helpers import kill_instances
from tests.netns import IP

CALL_TIMEOUT = 120.0  # one call (a start, a whole migration) must answer within this
METHODS = frozenset(["StartInstance", "MigrationInfo", "AcceptInstance", "MigrateInstance",
                     "FinalizeMigration", "ListInstances", "StopInstance"])


def _argument(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"instance"}:
        return objects.Instance(**value["instance"])
    return value


def serve(run_dir: str) -> None:
    """Answer requests from stdin until it closes."""
    hv = KVMHypervisor(run_dir=run_dir)
    for line in sys.stdin:
        request = json.loads(line)
        method = request["method"]
        try:
            if method not in METHODS:
                raise errors.ProgrammerError(f"{method} is not a call this test node serves")
            result = getattr(hv, method)(*[_argument(a) for a in request["args"]])
            reply: dict[str, Any] = {"result": result}
        except errors.GenericError as err:
            reply = {"error": type(err).__name__, "message": str(err)}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


def instance_arg(name: str, hvparams: dict[str, Any], memory: int = 128) -> dict[str, Any]:
    """An instance as a request argument (the node builds the Instance object)."""
    return {"instance": {"name": name, "primary_node": "node1", "hvparams": hvparams,
                         "beparams": {"memory": memory, "vcpus": 1}, "nics": [], "tags": []}}


class NodeProcess:
    """A test node running :func:`serve` inside network namespace ``netns``.

    Used as a context manager: at exit the process is ended and every QEMU
    of its run directory killed, failed test or not.
    """

    def __init__(self, netns: str, run_dir: str, log_file: str) -> None:
        self.run_dir = run_dir
        self.log_file = log_file
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        with open(log_file, "wb") as log:
            self.proc = subprocess.Popen(
                [IP, "netns", "exec", netns, sys.executable, "-m", "tests.node_process",
                 run_dir], cwd=root, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=log, env=dict(os.environ, PYTHONPATH=root))
        self._buffer = b""

    def __enter__(self) -> NodeProcess:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """End the node process and kill its instances' QEMUs."""
        try:
            if self.proc.stdin:
                with contextlib.suppress(OSError):
                    self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
            if self.proc.stdout:
                self.proc.stdout.close()
        finally:
            kill_instances(self.run_dir)

    def call(self, method: str, *args: Any) -> Any:
        """Run ``method`` on the node; its library error is raised here as the same class."""
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"method": method, "args": list(args)}) + "\n")
                              .encode())
        self.proc.stdin.flush()
        reply = json.loads(self._read_line(method))
        if "error" in reply:
            kind = getattr(errors, reply["error"], errors.GenericError)
            if not (isinstance(kind, type) and issubclass(kind, errors.GenericError)):
                kind = errors.GenericError
            raise kind(reply["message"])
        return reply["result"]

    def _read_line(self, method: str) -> str:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + CALL_TIMEOUT
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{method} did not answer within {CALL_TIMEOUT:.0f} s; "
                                     f"node log:\n{self.log()}")
            ready, _, _ = select.select([fd], [], [], remaining)
            if ready:
                data = os.read(fd, 65536)
                if not data:
                    raise AssertionError(f"the node process died during {method}; "
                                         f"node log:\n{self.log()}")
                self._buffer += data
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def log(self) -> str:
        """The last lines the node process wrote on stderr."""
        with open(self.log_file, encoding="utf-8", errors="replace") as handle:
            return handle.read()[-3000:]


if __name__ == "__main__":
    serve(sys.argv[1])
