"""The bench's side of bench/peer.py: start a node, send it requests, clean it up.

Each :class:`PeerNode` is one bench/peer.py process in its own private mount
namespace, running Ganeti 3.0's bundled KVM driver and ours under Debian's
/usr/bin/python3 (see bench/peer.py).  Its QEMUs outlive it if it dies, so
the PIDs it reports are remembered and killed at :meth:`PeerNode.close`.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import time
from typing import Any

from ganeti_kvm.host import process
from tests import ganeti_trees

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "bench", "peer.py")
GANETI_VERSION = "3.0"
REPLY_TIMEOUT = 300.0


class PeerError(RuntimeError):
    """A request the worker answered with an error (its traceback attached)."""


def need() -> str:
    """The Python path of the unpacked Ganeti 3.0, or an error saying what is missing."""
    tree = ganeti_trees.find_tree(GANETI_VERSION)
    if tree is None:
        raise PeerError(f"Ganeti {GANETI_VERSION} is not unpacked under "
                        f"{ganeti_trees.tree_dir(GANETI_VERSION)}; run 'make setup'")
    missing = [tool for tool in ("unshare", "mount") if shutil.which(tool) is None]
    if not os.access(ganeti_trees.GANETI_PYTHON, os.X_OK):
        missing.append(ganeti_trees.GANETI_PYTHON)
    if os.geteuid() != 0:
        missing.append("root")
    if missing:
        raise PeerError(f"the side-by-side benchmark needs {', '.join(missing)}")
    return tree


class PeerNode:
    """One bench/peer.py worker: a node with both drivers."""

    def __init__(self, log_path: str, tree: str | None = None) -> None:
        tree = tree or need()
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8",
               "PYTHONPATH": os.pathsep.join([tree, REPO])}
        self.log_path = log_path
        self.log = open(log_path, "w+", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.qemus: dict[int, str] = {}
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--",
             ganeti_trees.GANETI_PYTHON, "-B", WORKER],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
            env=env, cwd="/")
        try:
            if self.receive() != "ready":
                raise PeerError("bench/peer.py did not say it was ready")
        except BaseException:
            self.close()
            raise

    def _stderr(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-3000:]

    def send(self, op: str, **args: Any) -> None:
        """Send one request; :meth:`receive` reads its answer."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(dict(args, op=op)) + "\n")
        self.proc.stdin.flush()

    def receive(self, timeout: float = REPLY_TIMEOUT) -> Any:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            raise PeerError(f"bench/peer.py gave no answer within {timeout:.0f} s; "
                            f"its stderr:\n{self._stderr()}")
        reply = json.loads(line)
        if "error" in reply:
            raise PeerError(f"{reply['error']}\n{reply.get('traceback', '')}")
        return reply["ok"]

    def __call__(self, op: str, **args: Any) -> Any:
        self.send(op, **args)
        try:
            return self.receive()
        finally:
            if op in ("start", "accept"):
                self.remember()

    def remember(self) -> None:
        """Note the PIDs of this node's QEMUs (they would outlive the worker)."""
        self.send("pids")
        for key, pid in self.receive(30).items():
            self.qemus[pid] = key.split("/", 1)[1]

    def close(self) -> None:
        """End the worker (it kills its QEMUs); kill any QEMU it left behind."""
        if self.proc.poll() is None:
            with contextlib.suppress(PeerError, OSError, ValueError):
                self.remember()
            try:
                self.proc.communicate('{"op": "exit"}\n', timeout=30)
            except (subprocess.TimeoutExpired, OSError, ValueError):
                self.proc.kill()
                self.proc.wait(10)
        for pid, name in self.qemus.items():
            argv = process.cmdline(pid) or []
            if "-name" in argv and argv[argv.index("-name") + 1].split(",")[0] == name:
                process.signal_pid(pid, signal.SIGKILL)
                process.wait_gone(pid, 10)
        self.log.close()


def wait_all(nodes: list[tuple[PeerNode, str, dict[str, Any]]],
             timeout: float = REPLY_TIMEOUT) -> list[Any]:
    """Send one request to each of several nodes at once; their answers, in order."""
    for node, op, args in nodes:
        node.send(op, **args)
    deadline = time.monotonic() + timeout
    answers: list[Any] = []
    failure: PeerError | None = None
    for node, _, _ in nodes:
        try:
            answers.append(node.receive(max(1.0, deadline - time.monotonic())))
        except PeerError as err:
            failure = failure or err
            answers.append(None)
    if failure is not None:
        raise failure
    return answers
