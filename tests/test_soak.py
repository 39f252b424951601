"""A soak: many start/stop cycles of every kind, then nothing may be left over.

Mostly guest-less VMs (quick), a few booted test guests (an ACPI power-off
really powers them off), and starts that fail in QEMU.  Afterwards the
process's descriptors and threads, the QEMU processes and every entry of
the run directory must be exactly as before the first cycle.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from ganeti_kvm import errors, objects
from ganeti_kvm.host import process
from ganeti_kvm.hv_kvm import KVMHypervisor
from tests.helpers import SerialReader, guest_hvparams, make_instance
from tests.test_load import bare_hvparams

CYCLES = 200  # per QEMU version
NAMES = 4  # names are reused, so a leftover of one cycle breaks a later start
BOOTED_AT = (37, 101, 173)  # the cycles that boot the Linux test guest


@dataclass(frozen=True)
class Snapshot:
    """What a cycle must not leak."""

    fds: frozenset[str]
    threads: int
    qemus: frozenset[int]
    children: frozenset[int]
    entries: frozenset[str]


def _proc_pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def qemus_under(run_dir: str) -> frozenset[int]:
    """Every process (zombies too) whose command line names ``run_dir``."""
    found = set()
    for pid in _proc_pids():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                raw = handle.read()
        except OSError:
            continue
        if os.fsencode(run_dir) in raw:
            found.add(pid)
    return frozenset(found)


def children() -> frozenset[int]:
    """This process's children, zombies included."""
    mine = set()
    for pid in _proc_pids():
        try:
            with open(f"/proc/{pid}/stat", "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == os.getpid():
            mine.add(pid)
    return frozenset(mine)


def tree(root: str) -> frozenset[str]:
    """Every directory and file under ``root``, relative to it."""
    entries = set()
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            entries.add(os.path.relpath(os.path.join(directory, name), root))
    return frozenset(entries)


def snapshot(run_dir: str) -> Snapshot:
    return Snapshot(fds=frozenset(os.listdir("/proc/self/fd")),
                    threads=threading.active_count(), qemus=qemus_under(run_dir),
                    children=children(), entries=tree(run_dir))


class Soak:
    """The cycles, each a start (that may fail) and a way to stop."""

    def __init__(self, hv: KVMHypervisor, qemu_bin: str, guest: Any, disk: str) -> None:
        self.hv = hv
        self.qemu_bin = qemu_bin
        self.guest = guest
        self.disk = disk
        self.done: dict[str, int] = {}

    def cycle(self, index: int) -> None:
        name = f"soak{index % NAMES}"
        if index in BOOTED_AT:
            kind = "booted guest, ACPI stop with timeout"
            self.booted(name)
        else:
            kinds = self.kinds()
            kind, run = kinds[index % len(kinds)]
            run(name)
        self.done[kind] = self.done.get(kind, 0) + 1
        assert name not in self.hv.ListInstances(), f"cycle {index} ({kind}) left {name}"

    def kinds(self) -> list[tuple[str, Callable[[str], None]]]:
        return [("paused, force stop", self.paused_force),
                ("running, ACPI stop with timeout", self.running_acpi_timeout),
                ("QEMU refuses the memory size", self.refused_memory),
                ("running, ACPI button then force", self.running_acpi_then_force),
                ("paused, stop by name", self.paused_by_name),
                ("QEMU refuses a missing disk", self.missing_disk),
                ("running, reboot, force stop", self.reboot_force),
                ("killed behind our back, cleanup", self.killed_cleanup)]

    def instance(self, name: str, **hvparams: Any) -> objects.Instance:
        return make_instance(name, bare_hvparams(self.qemu_bin, **hvparams), memory=32)

    def paused_force(self, name: str) -> None:
        inst = self.instance(name)
        self.hv.StartInstance(inst, [], startup_paused=True)
        assert self.state(name) == "paused"
        self.hv.StopInstance(inst, force=True)

    def running_acpi_timeout(self, name: str) -> None:
        inst = self.instance(name)
        self.hv.StartInstance(inst, [])
        assert self.state(name) == "running"
        # Nothing in a guest-less VM hears the button: terminated after the timeout.
        self.hv.StopInstance(inst, timeout=0.05)

    def running_acpi_then_force(self, name: str) -> None:
        inst = self.instance(name)
        self.hv.StartInstance(inst, [])
        self.hv.StopInstance(inst)  # presses the button and returns
        self.hv.StopInstance(inst, force=True)

    def paused_by_name(self, name: str) -> None:
        self.hv.StartInstance(self.instance(name), [], startup_paused=True)
        self.hv.StopInstance(None, force=True, name=name)

    def reboot_force(self, name: str) -> None:
        inst = self.instance(name, acpi=False)
        self.hv.StartInstance(inst, [])
        old = self.pid(name)
        self.hv.RebootInstance(inst)
        assert self.pid(name) != old and not process.is_alive(old)
        self.hv.StopInstance(inst, force=True)

    def killed_cleanup(self, name: str) -> None:
        self.hv.StartInstance(self.instance(name), [], startup_paused=True)
        pid = self.pid(name)
        os.kill(pid, signal.SIGKILL)
        assert process.wait_gone(pid, 10)
        self.hv.CleanupInstance(name)

    def refused_memory(self, name: str) -> None:
        inst = make_instance(name, bare_hvparams(self.qemu_bin), memory=1 << 30)
        with pytest.raises(errors.QemuLaunchError):
            self.hv.StartInstance(inst, [])

    def missing_disk(self, name: str) -> None:
        missing = (objects.Disk(mode="rw"), "/nonexistent/soak-disk.raw")
        with pytest.raises(errors.QemuLaunchError, match="soak-disk.raw"):
            self.hv.StartInstance(self.instance(name), [missing])

    def booted(self, name: str) -> None:
        inst = make_instance(name, guest_hvparams(self.qemu_bin, self.guest))
        self.hv.StartInstance(inst, [(objects.Disk(mode="rw"), self.disk)])
        serial = SerialReader(self.hv.node.paths(name).serial_socket)
        try:
            serial.read_until("READY")
        finally:
            serial.close()
        pid = self.pid(name)
        self.hv.StopInstance(inst, timeout=60)
        assert not process.is_alive(pid)

    def pid(self, name: str) -> int:
        info = self.hv.GetInstanceInfo(name)
        assert info is not None, f"{name} is not running"
        return int(info[1])

    def state(self, name: str) -> str:
        [info] = [i for i in self.hv.GetAllInstancesInfo() if i[0] == name]
        return str(info[4])


def test_soak_leaves_nothing_behind(hv: KVMHypervisor, qemu_bin: str, guest: Any,
                                    short_dir: str) -> None:
    from tests.guestimage import make_disk

    disk = make_disk(os.path.join(short_dir, "soak.raw"), "soak-marker")
    root = hv.node.layout.root
    # The node's own state (the layout, the cached capabilities) comes first.
    hv.ValidateParameters(bare_hvparams(qemu_bin))
    assert hv.GetAllInstancesInfo() == []
    before = snapshot(root)
    soak = Soak(hv, qemu_bin, guest, disk)
    for index in range(CYCLES):
        soak.cycle(index)
    after = snapshot(root)

    assert len(soak.done) == len(soak.kinds()) + 1, soak.done
    assert hv.ListInstances() == []
    assert after.qemus == before.qemus == frozenset()
    assert after.children == before.children
    assert after.threads == before.threads
    assert after.fds == before.fds, [os.readlink(f"/proc/self/fd/{fd}")
                                     for fd in after.fds - before.fds
                                     if os.path.exists(f"/proc/self/fd/{fd}")]
    assert sorted(after.entries - before.entries) == []
    assert sorted(before.entries - after.entries) == []
