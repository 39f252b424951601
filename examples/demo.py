"""The ganeti-kvm demo: boot, show, migrate and stop a real VM through the public API.

Run as root from the repository (``make demo``).  Two run directories under
/tmp act as two nodes on this machine.  Each step prints what it did and how
long it took; the demo exits non-zero if any step did not do what it says,
and leaves nothing running.
"""

from __future__ import annotations

import os
import pty
import re
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ganeti_kvm import constants, objects  # noqa: E402
from ganeti_kvm.host import process
from ganeti_kvm.hv_kvm import KVMHypervisor  # noqa: E402
from ganeti_kvm.tools.cli import MigrationProgress  # noqa: E402
from tests.guestimage import build_guest, make_disk  # noqa: E402
from tests.helpers import kill_instances  # noqa: E402

NAME = "demo1"
RESULTS: list[tuple[str, float, str]] = []


def step(title: str, action: Callable[[], str]) -> None:
    """Run one step, print its outcome and time; stop the demo on failure."""
    print(f"==> {title}", flush=True)
    started = time.monotonic()
    detail = action()
    elapsed = time.monotonic() - started
    RESULTS.append((title, elapsed, detail))
    print(f"    ok in {elapsed:.2f} s: {detail}", flush=True)


def read_pty(fd: int, pattern: str, timeout: float) -> str:
    text = ""
    deadline = time.monotonic() + timeout
    while not re.search(pattern, text):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RuntimeError(f"{pattern!r} not seen on the console within {timeout} s")
        ready, _, _ = select.select([fd], [], [], min(remaining, 0.5))
        if ready:
            text += os.read(fd, 65536).decode("utf-8", "replace").replace("\r", "")
    return text


def read_serial(path: str, pattern: str, timeout: float) -> str:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(path)
        sock.settimeout(timeout)
        text = ""
        deadline = time.monotonic() + timeout
        while not re.search(pattern, text):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{pattern!r} not seen on {path}")
            text += sock.recv(65536).decode("utf-8", "replace").replace("\r", "")
        return text


def main() -> int:
    if os.geteuid() != 0:
        print("the demo needs root (TAP devices, /var/cache)", file=sys.stderr)
        return 1
    base = tempfile.mkdtemp(prefix="gk-demo-", dir="/tmp")
    node_a = KVMHypervisor(run_dir=os.path.join(base, "a"))
    node_b = KVMHypervisor(run_dir=os.path.join(base, "b"))
    state: dict[str, object] = {}
    try:
        def build() -> str:
            guest = build_guest()
            state["guest"] = guest
            state["disk"] = make_disk(os.path.join(base, "disk0.raw"), "demo-disk")
            return f"kernel {guest.kernel}"

        def start() -> str:
            guest = state["guest"]
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            hvparams = {"kvm_path": "/usr/bin/qemu-system-x86_64",
                        "kernel_path": guest.kernel, "initrd_path": guest.initrd,
                        "root_path": "/dev/vda1", "kernel_args": "panic=-1 quiet",
                        "kvm_flag": constants.HT_KVM_DISABLED, "migration_port": port,
                        "migration_bandwidth": 1000}
            inst = objects.Instance(name=NAME, primary_node="localhost", hvparams=hvparams,
                                    beparams={"memory": 128, "vcpus": 1})
            state["inst"] = inst
            node_a.StartInstance(inst, [(objects.Disk(mode="rw"), state["disk"])],
                                 startup_paused=True)
            status = node_a.node.qmp(NAME, "query-status")["status"]
            if status != "prelaunch":
                raise RuntimeError(f"expected a paused instance, QMP says {status}")
            return f"QEMU pid {node_a.GetInstanceInfo(NAME)[1]}, QMP status {status}"

        def console() -> str:
            inst = state["inst"]
            cons = KVMHypervisor.GetInstanceConsole(inst, inst.hvparams, inst.beparams,
                                                    run_dir=node_a.node.layout.root)
            cons.Validate()
            master, slave = pty.openpty()
            proc = subprocess.Popen(cons.command, stdin=slave, stdout=slave, stderr=slave,
                                    start_new_session=True)
            os.close(slave)
            try:
                text = read_pty(master, r"READY", 60)
                os.write(master, b"\x1d")  # Ctrl+] leaves the console
                proc.wait(10)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(10)
                os.close(master)
            lines = [line for line in text.splitlines() if line.strip()]
            for line in lines[:12]:
                print(f"    | {line}")
            if "GANETI-KVM TEST GUEST UP" not in text or "unpausing" not in text:
                raise RuntimeError("the console did not show the boot from its first line")
            return f"{len(lines)} lines of boot output, nothing lost"

        def listing() -> str:
            infos = node_a.GetAllInstancesInfo()
            print(f"    {'NAME':10} {'PID':>7} {'MEMORY':>6} {'VCPUS':>5} STATE")
            for name, pid, memory, vcpus, run_state, _ in infos:
                print(f"    {name:10} {pid:>7} {memory:>6} {vcpus:>5} {run_state}")
            if [i[0] for i in infos] != [NAME]:
                raise RuntimeError(f"unexpected listing {infos}")
            return "1 instance running"

        def migrate() -> str:
            inst = state["inst"]
            before = read_serial(node_a.node.paths(NAME).serial_socket, r"COUNTER \d+", 30)
            state["before"] = int(re.findall(r"COUNTER (\d+)", before)[-1])
            info = node_a.MigrationInfo(inst)
            node_b.AcceptInstance(inst, info, "127.0.0.1")

            # The ganeti-kvm command's progress display: a live bar on a
            # terminal, plain lines (here ten a second) in a log.
            progress = MigrationProgress(sys.stdout, interval=0.1)
            try:
                node_a.MigrateInstance(inst, "127.0.0.1", True, progress=progress)
            except Exception:
                node_b.FinalizeMigration(inst, info, False)
                raise
            finally:
                progress.finish()
            node_b.FinalizeMigration(inst, info, True)
            if node_a.ListInstances() or node_b.ListInstances() != [NAME]:
                raise RuntimeError("the instance is not where it should be")
            return "now on node b, gone from node a"

        def counter() -> str:
            after = read_serial(node_b.node.paths(NAME).serial_socket,
                                r"COUNTER \d+\s+COUNTER \d+", 30)
            first = int(re.findall(r"COUNTER (\d+)", after)[0])
            if first < state["before"] or "TEST GUEST UP" in after:
                raise RuntimeError(f"counter went from {state['before']} to {first}")
            return f"counter {state['before']} on node a, {first} on node b: it continued"

        def stop() -> str:
            pid = node_b.GetInstanceInfo(NAME)[1]
            node_b.StopInstance(state["inst"], timeout=60)
            if process.is_alive(pid) or node_b.ListInstances():
                raise RuntimeError("the instance is still running")
            return "the guest powered off by itself (ACPI power button)"

        step("Build the tiny guest (cached)", build)
        step("Start it paused on node a", start)
        step("Attach the serial console (unpauses it)", console)
        step("List the instances of node a", listing)
        step("Live-migrate it to node b", migrate)
        step("Check that the guest kept counting", counter)
        step("Stop it with the ACPI power button", stop)
    except Exception as err:  # the demo reports, then cleans up
        print(f"    FAILED: {err}", file=sys.stderr)
        return 1
    finally:
        kill_instances(node_a.node.layout.root)
        kill_instances(node_b.node.layout.root)
        shutil.rmtree(base, ignore_errors=True)
    print("\nSummary")
    for title, elapsed, detail in RESULTS:
        print(f"  {elapsed:6.2f} s  {title}: {detail}")
    print(f"  {sum(r[1] for r in RESULTS):6.2f} s  in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
