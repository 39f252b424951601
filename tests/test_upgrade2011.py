"""The whole life of an instance the 2011 driver started, on today's QEMU.

Each test makes a genuine 2011 instance: the runtime file and the command
line of Ganeti 2.5's driver (see tests/legacy2011.py) in the run directory,
and a QEMU started with that command line the way that driver did (``-net
none`` added at start, only the human monitor, no QMP).  Only
``-disable-kvm``, which today's QEMU refuses, is given as ``-machine
accel=tcg``.  Then the library must list it, describe it, reboot it into
today's command line, migrate it to a second run directory (the target
gets the same devices) and stop it, leaving nothing behind.
"""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

import pytest

from ganeti_kvm import constants as c
from ganeti_kvm import errors
from ganeti_kvm.core import runtime
from ganeti_kvm.host import process
from ganeti_kvm.hv_kvm import KVMHypervisor
from tests import legacy2011
from tests.guestimage import make_disk
from tests.helpers import SerialReader, free_port, make_instance
from tests.test_state_files import entries_of

MARKER = "upgrade-2011-marker"


def start_2011(hv: KVMHypervisor, name: str, qemu_bin: str, guest: Any, disk: str,
               vnc_dir: str, **hvp_overrides: Any) -> tuple[list[Any], dict[str, Any]]:
    """Write the 2011 files of ``name`` and start its QEMU as the 2011 driver did."""
    hv.node.ensure_dirs()
    root = hv.node.layout.root
    hvp = legacy2011.hvparams_2011(
        kernel_path=guest.kernel, initrd_path=guest.initrd, root_path="/dev/vda1",
        kernel_args="panic=-1 quiet", kvm_flag="disabled", serial_console=True,
        vnc_bind_address=vnc_dir, **hvp_overrides)
    cmd = legacy2011.kvm_cmd_2011(qemu_bin, root, name, hvp, 160, 1, [disk])
    with open(os.path.join(root, "conf", name + ".runtime"), "w") as handle:
        handle.write(legacy2011.record_2011(cmd, [], hvp))
    started = [str(a) for a in cmd] + ["-net", "none"]
    flag = started.index("-disable-kvm")
    started[flag:flag + 1] = ["-machine", "accel=tcg"]
    result = subprocess.run(started, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return cmd, hvp


def read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


@pytest.fixture
def disk(short_dir: str) -> str:
    return make_disk(os.path.join(short_dir, "disk0.raw"), MARKER)


def instance(name: str, hvp: dict[str, Any]) -> Any:
    # What the cluster manager passes today: its configuration may have moved on.
    return make_instance(name, dict(c.HVC_DEFAULTS[c.HT_KVM], kvm_path="/nonexistent/kvm"),
                         memory=999)


def test_list_info_reboot_and_stop(hv, qemu_bin, guest, disk, short_dir) -> None:
    cmd, hvp = start_2011(hv, "old1", qemu_bin, guest, disk, short_dir)
    paths = hv.node.paths("old1")
    assert not os.path.exists(paths.qmp_socket)  # a 2011 QEMU: the human monitor only
    serial = SerialReader(paths.serial_socket)
    serial.read_until(f"DISK MARKER={MARKER}")
    serial.read_until(r"COUNTER \d+")
    assert hv.ListInstances() == ["old1"]
    name, pid, memory, vcpus, state, _ = hv.GetInstanceInfo("old1")
    assert (name, memory, vcpus) == ("old1", 160, 1)
    assert state == c.HV_STATE_UNKNOWN  # no QMP to ask; /proc says it runs
    assert [i[0] for i in hv.GetAllInstancesInfo()] == ["old1"]
    assert "-usbdevice" in process.cmdline(pid)
    serial.close()

    hv.RebootInstance(instance("old1", hvp))
    new_pid = hv.GetInstanceInfo("old1")[1]
    assert new_pid != pid and not process.is_alive(pid)
    argv = process.cmdline(new_pid)
    assert "-usbdevice" not in argv and "-nodefaults" in argv
    assert argv[argv.index("-m") + 1] == "160"  # from the 2011 command line
    assert f"unix:{os.path.join(short_dir, 'old1.vnc')}" in argv[argv.index("-vnc") + 1]
    serial = SerialReader(paths.serial_socket)
    serial.read_until(guest.first_line)
    serial.read_until(f"DISK MARKER={MARKER}")
    serial.read_until("READY")  # the guest now acts on the ACPI power button
    assert hv.node.qmp("old1", "query-status")["status"] == "running"
    saved = read_json(paths.runtime_file)
    assert saved["version"] == 1 and saved.get("upgraded_from") is None
    assert saved["hvparams"]["kvm_path"] == qemu_bin
    assert saved["beparams"] == {"memory": 160, "vcpus": 1}
    serial.close()

    hv.StopInstance(instance("old1", hvp), timeout=60)  # by ACPI, as it was started with
    assert not process.is_alive(new_pid) and hv.ListInstances() == []
    assert entries_of(hv.node.layout.root, "old1") == []


def test_acpi_stop_through_the_human_monitor(hv, qemu_bin, guest, disk, short_dir) -> None:
    start_2011(hv, "old2", qemu_bin, guest, disk, short_dir)
    root = hv.node.layout.root
    os.makedirs(os.path.join(root, "nic", "old2"))  # what 2011 kept per instance
    with open(os.path.join(root, "nic", "old2", "0"), "w") as handle:
        handle.write("tap0")
    paths = hv.node.paths("old2")
    SerialReader(paths.serial_socket).read_until("READY")
    pid = hv.GetInstanceInfo("old2")[1]
    hv.StopInstance(instance("old2", {}))  # presses the button; the caller polls
    assert process.wait_gone(pid, 60)
    hv.CleanupInstance("old2")
    assert entries_of(root, "old2") == []


def test_migrate_then_reboot_on_the_target(nodes, qemu_bin, guest, disk, short_dir) -> None:
    source, target = nodes
    _, hvp = start_2011(source, "old3", qemu_bin, guest, disk, short_dir,
                        migration_port=free_port(), migration_bandwidth=1000)
    paths = source.node.paths("old3")
    serial = SerialReader(paths.serial_socket)
    serial.read_until(r"COUNTER 3\b")
    pid = source.GetInstanceInfo("old3")[1]
    inst = instance("old3", hvp)
    info = source.MigrationInfo(inst)
    target.AcceptInstance(inst, info, "127.0.0.1")
    assert target.node.qmp("old3", "query-status")["status"] == "inmigrate"
    before = serial.counters()
    source.MigrateInstance(inst, "127.0.0.1", True)
    target.FinalizeMigration(inst, info, True)
    serial.close()
    assert not process.is_alive(pid)
    assert source.ListInstances() == [] and target.ListInstances() == ["old3"]
    assert entries_of(source.node.layout.root, "old3") == []
    reader = SerialReader(target.node.paths("old3").serial_socket)
    reader.read_until(r"COUNTER \d+\s+COUNTER \d+", timeout=30)
    assert reader.counters()[0] >= before[-1]  # the guest went on, it did not boot again
    assert guest.first_line not in reader.text
    reader.close()
    # Same devices as the 2011 QEMU, with today's QMP added: the record says so.
    saved = read_json(target.node.paths("old3").runtime_file)
    assert saved["upgraded_from"] == 0
    assert target.GetInstanceInfo("old3")[4] == c.HV_STATE_RUNNING

    target.RebootInstance(inst)
    argv = process.cmdline(target.GetInstanceInfo("old3")[1])
    assert "-nodefaults" in argv and "-usbdevice" not in argv
    reader = SerialReader(target.node.paths("old3").serial_socket)
    reader.read_until(f"DISK MARKER={MARKER}")
    reader.close()
    assert read_json(target.node.paths("old3").runtime_file).get("upgraded_from") is None
    target.StopInstance(None, force=True, name="old3")
    assert entries_of(target.node.layout.root, "old3") == []


def test_a_2011_value_today_refuses_is_named_before_anything_starts(hv, qemu_bin) -> None:
    hvp = legacy2011.hvparams_2011(disk_type="mtd", kernel_path="")
    cmd = legacy2011.kvm_cmd_2011(qemu_bin, hv.node.layout.root, "old4", hvp, 64, 1, ["/d"])
    record = runtime.parse(legacy2011.record_2011(cmd, [], hvp), "old4", "test")
    refused = "earlier driver wrote: disk_type mtd"
    with pytest.raises(errors.HypervisorError, match=refused) as info, \
            hv.node.locked("old4", "test"):
        hv.node.start_from_record(record)
    assert not isinstance(info.value, KeyError)
    assert hv.ListInstances() == [] and entries_of(hv.node.layout.root, "old4") == []
