"""The serial console of a real guest through the wrapper, on a real pseudo-terminal."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import time

from ganeti_kvm import constants as c
from ganeti_kvm.hv_kvm import KVMHypervisor
from tests.guestimage import make_disk
from tests.helpers import guest_hvparams, make_instance

BOOT_LINES = ["BOOT 1 kernel", "BOOT 2 modules loaded", "DISK MARKER=console-disk",
              "NET NONE", "BOOT 3 acpid running", "READY", "COUNTER 1"]


class Terminal:
    """A console command running on a real pseudo-terminal."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave,
                                     env=env, start_new_session=True)
        os.close(slave)
        self.text = ""

    def read_until(self, pattern: str, timeout: float = 60.0) -> str:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while not regex.search(self.text):
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"{pattern!r} not seen; got:\n{self.text[-3000:]}"
            ready, _, _ = select.select([self.master], [], [], min(remaining, 0.5))
            if ready:
                try:
                    data = os.read(self.master, 65536)
                except OSError:  # EIO: the program exited and closed the terminal
                    data = b""
                if not data:
                    assert regex.search(self.text), f"EOF before {pattern!r}:\n{self.text}"
                    break
                self.text += data.decode("utf-8", "replace").replace("\r", "")
        return self.text

    def write(self, data: bytes) -> None:
        os.write(self.master, data)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        os.close(self.master)

    def __enter__(self) -> Terminal:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def console_argv(hv: KVMHypervisor, inst) -> list[str]:
    console = KVMHypervisor.GetInstanceConsole(inst, inst.hvparams, inst.beparams,
                                               run_dir=hv.node.layout.root)
    console.Validate()
    assert console.kind == c.CONS_SSH and console.user == "root"
    return console.command


def test_paused_start_shows_the_whole_boot(hv, qemu_bin, guest, short_dir) -> None:
    disk = make_disk(os.path.join(short_dir, "d.raw"), "console-disk")
    inst = make_instance("cons1", guest_hvparams(qemu_bin, guest))
    hv.StartInstance(inst, [({"mode": "rw"}, disk)],
                     startup_paused=True)
    timing_file = os.path.join(short_dir, "timing.json")
    with Terminal(console_argv(hv, inst),
                  env=dict(os.environ, GANETI_KVM_CONSOLE_TIMING=timing_file)) as term:
        text = term.read_until(r"COUNTER 2\b")
        assert "Ctrl+]" in text.splitlines()[0]
        assert "Instance cons1 is paused, unpausing" in text
        # Nothing before the counter was lost, and it came in order.
        positions = [text.index(guest.first_line)] + [text.index(line) for line in BOOT_LINES]
        assert positions == sorted(positions)
        assert hv.node.qmp("cons1", "query-status")["status"] == "running"
        # Typing at the guest's shell returns its output.
        term.read_until(r"/ # ")
        term.write(b"echo hello-$((6*7))\r")
        term.read_until(r"hello-42")
        # Ctrl+] leaves the console; the instance keeps running.
        term.write(b"\x1d")
        assert term.proc.wait(10) == 0
        assert hv.node.qmp("cons1", "query-status")["status"] == "running"
    with open(timing_file) as handle:
        timing = json.load(handle)
    assert timing["cont_delay"] is not None and 0 <= timing["cont_delay"] < 3.0
    print(f"attach->cont delay: {timing['cont_delay'] * 1000:.2f} ms")


def test_stopped_instance_is_not_unpaused(hv, qemu_bin, guest) -> None:
    inst = make_instance("cons2", guest_hvparams(qemu_bin, guest))
    hv.StartInstance(inst, [])
    hv.node.qmp("cons2", "stop")
    with Terminal(console_argv(hv, inst)) as term:
        term.read_until("Ctrl\\+]")
        time.sleep(0.5)  # give a wrong unpause the chance to happen
        assert hv.node.qmp("cons2", "query-status")["status"] == "paused"
        assert "unpausing" not in term.text


def test_second_console_and_not_running(hv, qemu_bin, guest) -> None:
    inst = make_instance("cons3", guest_hvparams(qemu_bin, guest))
    hv.StartInstance(inst, [], startup_paused=True)
    with Terminal(console_argv(hv, inst)) as first:
        first.read_until("unpausing")
        with Terminal(console_argv(hv, inst)) as second:
            second.read_until("already attached")
            assert second.proc.wait(10) != 0
    hv.StopInstance(inst, force=True)
    with Terminal(console_argv(hv, inst)) as gone:
        gone.read_until("is not running")
        assert gone.proc.wait(10) != 0
