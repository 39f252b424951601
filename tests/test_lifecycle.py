"""Instances for real: start, stop, reboot, list and clean up on QEMU 7.2 and 10.0."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import pytest

from ganeti_kvm import constants as c
from ganeti_kvm import errors, objects
from ganeti_kvm.host import process
from ganeti_kvm.hv_kvm import KVMHypervisor
from ganeti_kvm.qmp.client import qmp_execute
from tests.guestimage import make_disk
from tests.helpers import SerialReader, guest_hvparams, make_instance


@pytest.fixture
def disk(short_dir: str) -> tuple[objects.Disk, str]:
    path = make_disk(os.path.join(short_dir, "disk0.raw"), "lifecycle-marker-42")
    return objects.Disk(size=4, mode="rw"), path


def status(hv: KVMHypervisor, name: str) -> str:
    return hv.node.qmp(name, "query-status")["status"]


def test_start_boots_the_guest_with_disk_and_serial(hv, qemu_bin, guest, disk) -> None:
    inst = make_instance("boot1", guest_hvparams(qemu_bin, guest), memory=160, vcpus=2)
    hv.StartInstance(inst, [disk])
    serial = SerialReader(hv.node.paths("boot1").serial_socket)
    serial.read_until(guest.first_line)
    serial.read_until("DISK MARKER=lifecycle-marker-42")
    serial.read_until(r"COUNTER \d+")
    info = hv.GetInstanceInfo("boot1")
    assert info is not None
    name, pid, memory, vcpus, state, _ = info
    assert (name, memory, vcpus, state) == ("boot1", 160, 2, c.HV_STATE_RUNNING)
    assert hv.ListInstances() == ["boot1"]
    assert [i[0] for i in hv.GetAllInstancesInfo()] == ["boot1"]
    with pytest.raises(errors.HypervisorError, match="already running"):
        hv.StartInstance(inst, [disk])
    serial.close()
    hv.StopInstance(inst, force=True)
    assert not process.is_alive(pid)
    assert hv.ListInstances() == []


def test_paused_start_waits_in_prelaunch(hv, qemu_bin, guest, disk) -> None:
    inst = make_instance("paused1", guest_hvparams(qemu_bin, guest))
    hv.StartInstance(inst, [disk], startup_paused=True)
    assert status(hv, "paused1") == "prelaunch"
    assert hv.GetInstanceInfo("paused1")[4] == c.HV_STATE_PAUSED
    serial = SerialReader(hv.node.paths("paused1").serial_socket)
    hv.node.qmp("paused1", "cont")
    serial.read_until(guest.first_line)
    assert status(hv, "paused1") == "running"
    serial.close()


def test_stop_by_acpi_power_button(hv, qemu_bin, guest, disk) -> None:
    inst = make_instance("acpi1", guest_hvparams(qemu_bin, guest))
    hv.StartInstance(inst, [disk])
    serial = SerialReader(hv.node.paths("acpi1").serial_socket)
    serial.read_until("READY")
    pid = hv.GetInstanceInfo("acpi1")[1]
    started = time.monotonic()
    hv.StopInstance(inst, timeout=60)
    elapsed = time.monotonic() - started
    assert not process.is_alive(pid)
    assert hv.ListInstances() == []
    ipaths = hv.node.paths("acpi1")
    for leftover in ipaths.runtime_files() + [ipaths.runtime_file]:
        assert not os.path.exists(leftover), leftover
    # It powered off by itself: far quicker than the timeout that would force it.
    assert elapsed < 60
    serial.close()


def test_acpi_stop_without_timeout_returns_at_once(hv, qemu_bin, guest, disk) -> None:
    inst = make_instance("acpi2", guest_hvparams(qemu_bin, guest))
    hv.StartInstance(inst, [disk])
    SerialReader(hv.node.paths("acpi2").serial_socket).read_until("READY")
    pid = hv.GetInstanceInfo("acpi2")[1]
    hv.StopInstance(inst)  # presses the button; the caller polls
    assert process.wait_gone(pid, 60)
    assert hv.ListInstances() == []
    hv.CleanupInstance("acpi2")
    assert not os.path.exists(hv.node.paths("acpi2").runtime_file)


@pytest.mark.parametrize("timeout", [None, 600])
def test_acpi_stop_of_a_guest_that_never_ran_ends_qemu_at_once(hv, qemu_bin, guest,
                                                               timeout) -> None:
    """No guest OS hears the button in prelaunch: QEMU is ended, not waited for."""
    inst = make_instance("neverran", guest_hvparams(qemu_bin, guest))
    hv.StartInstance(inst, [], startup_paused=True)
    pid = hv.GetInstanceInfo("neverran")[1]
    hv.StopInstance(inst, timeout=timeout)  # a wait of 600 s would fail the suite's budget
    assert not process.is_alive(pid)
    assert hv.ListInstances() == []
    assert not os.path.exists(hv.node.paths("neverran").runtime_file)


def test_stop_by_name_needs_force(hv, qemu_bin, guest) -> None:
    inst = make_instance("byname", guest_hvparams(qemu_bin, guest))
    hv.StartInstance(inst, [], startup_paused=True)
    with pytest.raises(errors.HypervisorError, match="by name only"):
        hv.StopInstance(None, name="byname")
    pid = hv.GetInstanceInfo("byname")[1]
    hv.StopInstance(None, force=True, name="byname")
    assert not process.is_alive(pid)
    assert hv.ListInstances() == []


def test_reboot_boots_again_and_forgets_the_paused_start(hv, qemu_bin, guest, disk) -> None:
    inst = make_instance("reboot1", guest_hvparams(qemu_bin, guest))
    hv.StartInstance(inst, [disk], startup_paused=True)
    old_pid = hv.GetInstanceInfo("reboot1")[1]
    # Today's configuration changes; the reboot must use what it was started with.
    inst.hvparams = dict(inst.hvparams, kernel_args="this-would-not-boot")
    hv.RebootInstance(inst)
    new_pid = hv.GetInstanceInfo("reboot1")[1]
    assert new_pid != old_pid and not process.is_alive(old_pid)
    serial = SerialReader(hv.node.paths("reboot1").serial_socket)
    serial.read_until(guest.first_line)
    serial.read_until("DISK MARKER=lifecycle-marker-42")
    assert status(hv, "reboot1") == "running"
    assert "this-would-not-boot" not in " ".join(process.cmdline(new_pid))
    serial.close()


def test_kill_behind_our_back(hv, qemu_bin, guest) -> None:
    inst = make_instance("killed", guest_hvparams(qemu_bin, guest))
    hv.StartInstance(inst, [], startup_paused=True)
    pid = hv.GetInstanceInfo("killed")[1]
    os.kill(pid, signal.SIGKILL)
    assert process.wait_gone(pid, 10)
    assert hv.ListInstances() == []
    assert hv.GetInstanceInfo("killed") is None
    assert hv.GetAllInstancesInfo() == []
    hv.CleanupInstance("killed")
    ipaths = hv.node.paths("killed")
    for leftover in ipaths.runtime_files() + [ipaths.runtime_file]:
        assert not os.path.exists(leftover), leftover
    hv.StartInstance(inst, [], startup_paused=True)  # the name is free again
    assert hv.ListInstances() == ["killed"]


def test_cleanup_refuses_a_running_instance(hv, qemu_bin, guest) -> None:
    inst = make_instance("busy1", guest_hvparams(qemu_bin, guest))
    hv.StartInstance(inst, [], startup_paused=True)
    with pytest.raises(errors.HypervisorError, match="still running"):
        hv.CleanupInstance("busy1")


def test_pidfile_of_an_unrelated_process(hv, reaper) -> None:
    hv.node.ensure_dirs()
    sleeper = subprocess.Popen(["sleep", "60"])
    reaper.add(sleeper.pid)
    with open(hv.node.paths("ghost").pidfile, "w") as handle:
        handle.write(f"{sleeper.pid}\n")
    assert hv.ListInstances() == []
    assert hv.GetInstanceInfo("ghost") is None
    hv.StopInstance(None, force=True, name="ghost")  # must not kill the sleeper
    assert sleeper.poll() is None
    for garbage in ("", "not-a-pid", "-5"):
        with open(hv.node.paths("ghost").pidfile, "w") as handle:
            handle.write(garbage)
        assert hv.ListInstances() == []


def test_corrupt_runtime_record(hv, qemu_bin, guest) -> None:
    inst = make_instance("corrupt1", guest_hvparams(qemu_bin, guest))
    hv.StartInstance(inst, [], startup_paused=True)
    runtime_file = hv.node.paths("corrupt1").runtime_file
    with open(runtime_file, "w") as handle:
        handle.write('{"kind": "ganeti-kvm-runti')
    assert hv.ListInstances() == ["corrupt1"]
    assert hv.GetInstanceInfo("corrupt1")[0] == "corrupt1"
    with pytest.raises(errors.RuntimeStateError, match=runtime_file):
        hv.RebootInstance(inst)
    hv.StopInstance(inst, force=True)
    assert hv.ListInstances() == []
    assert not os.path.exists(runtime_file)


def test_sigstopped_qemu_never_hangs_a_call(hv, qemu_bin, guest) -> None:
    inst = make_instance("frozen", guest_hvparams(qemu_bin, guest))
    hv.StartInstance(inst, [], startup_paused=True)
    pid = hv.GetInstanceInfo("frozen")[1]
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        info = hv.GetInstanceInfo("frozen")
        assert info is not None and info[4] == c.HV_STATE_UNKNOWN
        assert hv.ListInstances() == ["frozen"]
        with pytest.raises(errors.MonitorTimeout, match="frozen.qmp"):
            hv.node.qmp("frozen", "query-status", timeout=1.0)
        assert time.monotonic() - started < 10
        hv.StopInstance(inst, force=True)
        assert not process.is_alive(pid)
    finally:
        process.signal_pid(pid, signal.SIGCONT)


def test_ten_concurrent_starts_give_one_qemu(hv, qemu_bin, guest) -> None:
    inst = make_instance("race1", guest_hvparams(qemu_bin, guest))
    outcomes: list[object] = []
    lock = threading.Lock()

    def start() -> None:
        try:
            hv.StartInstance(inst, [], startup_paused=True)
            result: object = "started"
        except errors.HypervisorError as err:
            result = err
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=start) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert outcomes.count("started") == 1
    failures = [o for o in outcomes if o != "started"]
    assert len(failures) == 9
    assert all("already running" in str(f) for f in failures)
    assert hv.ListInstances() == ["race1"]
    def names_race1(pid: int) -> bool:
        argv = process.cmdline(pid) or []
        return any(argv[i:i + 2] == ["-name", "race1"] for i in range(len(argv)))

    qemus = [p for p in os.listdir("/proc") if p.isdigit() and names_race1(int(p))]
    assert len(qemus) == 1


def test_failed_start_carries_qemu_stderr_and_leaves_nothing(hv, qemu_bin, guest) -> None:
    inst = make_instance("broken1", guest_hvparams(qemu_bin, guest))
    missing = (objects.Disk(mode="rw"), "/nonexistent/disk.raw")
    with pytest.raises(errors.QemuLaunchError) as info:
        hv.StartInstance(inst, [missing])
    assert "/nonexistent/disk.raw" in str(info.value)
    assert info.value.exitcode not in (0, None)
    ipaths = hv.node.paths("broken1")
    for leftover in ipaths.runtime_files() + [ipaths.runtime_file]:
        assert not os.path.exists(leftover), leftover
    assert hv.ListInstances() == []


def test_kvm_accelerator_start_without_an_os(hv, qemu_bin) -> None:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("no usable /dev/kvm on this machine")
    hvp = dict(c.HVC_DEFAULTS[c.HT_KVM], kvm_path=qemu_bin, kernel_path="",
               kvm_flag="enabled", serial_console=False)
    inst = make_instance("kvm1", hvp, memory=64)
    hv.StartInstance(inst, [])
    assert status(hv, "kvm1") == "running"
    accel = hv.node.qmp("kvm1", "query-kvm")
    assert accel == {"enabled": True, "present": True}
    hv.StopInstance(inst, force=True)
    assert hv.ListInstances() == []


def test_verify_and_node_info(hv) -> None:
    assert hv.Verify() is None
    info = hv.GetNodeInfo()
    assert info["memory_total"] > 0 and info["cpu_total"] >= 1
    assert len(info["hv_version"]) == 3


def test_qmp_socket_answers_a_direct_client(hv, qemu_bin, guest) -> None:
    inst = make_instance("listq", guest_hvparams(qemu_bin, guest))
    hv.StartInstance(inst, [], startup_paused=True)
    path = hv.node.paths("listq").qmp_socket
    assert qmp_execute(path, "query-status")["status"] == "prelaunch"
