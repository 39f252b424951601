"""The runtime record: atomic, private, versioned, and upgraded from 2011."""

from __future__ import annotations

import json
import os
import stat

import pytest

from ganeti_kvm import errors
from ganeti_kvm.core import legacy, runtime
from ganeti_kvm.core import params as validation
from ganeti_kvm.host import fsutil
from ganeti_kvm.qemu import caps as qemu_caps
from ganeti_kvm.qemu import cmdline, devices
from tests import legacy2011


def record() -> runtime.RuntimeRecord:
    return runtime.RuntimeRecord(name="web1", argv=["/usr/bin/kvm", "-name", "web1"],
                                 nics=[{"mac": "aa:00:00:00:00:01", "tap": "tap0"}],
                                 hvparams={"acpi": True}, beparams={"memory": 128},
                                 disks=[{"path": "/d", "readonly": False, "uri": None}])


def test_round_trip_and_mode(tmp_path) -> None:
    path = str(tmp_path / "web1.runtime")
    runtime.save(path, record())
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    loaded = runtime.load(path, "web1")
    assert loaded == record()
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    assert data["kind"] == "ganeti-kvm-runtime" and data["version"] == 1
    assert os.listdir(tmp_path) == ["web1.runtime"]  # no temp file left


@pytest.mark.parametrize("controller", ["guest_agent", "spice_agent"])
def test_a_record_with_a_serial_controller_is_version_2_and_version_1_refuses_it(
        controller: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """An older library would start a migration target without the controller: it refuses."""
    ident = devices.DeviceId(backend="x", id="ctl0", bus="pci.0", addr="0x1d").to_dict()
    with_it = record()
    setattr(with_it, controller, ident)
    text = with_it.serialize()
    assert json.loads(text)["version"] == 2
    assert runtime.parse(text, "web1", "info") == with_it
    assert json.loads(record().serialize())["version"] == 1  # still moves to older nodes
    monkeypatch.setattr(runtime, "READ_VERSIONS", frozenset([1]))  # the older library
    with pytest.raises(errors.RuntimeStateError, match="version 2.*newer ganeti-kvm"):
        runtime.parse(text, "web1", "info")


def test_missing_record_is_none(tmp_path) -> None:
    assert runtime.load(str(tmp_path / "nothing"), "web1") is None


@pytest.mark.parametrize("content, why", [
    (b'{"kind": "ganeti-kvm-runtime", "vers', "corrupt"),
    (b"\xff\xfe", "corrupt"),
    (b'{"kind": "something-else"}', "kind"),
    (b'{"kind": "ganeti-kvm-runtime", "version": 99, "name": "web1"}', "version 99"),
    (b'{"kind": "ganeti-kvm-runtime", "version": 1, "name": "web2", "argv": ["x"]}',
     "belongs to instance 'web2'"),
    (b'{"kind": "ganeti-kvm-runtime", "version": 1, "name": "web1", "argv": []}', "argv"),
    (b'[1, 2]', "old"),
])
def test_bad_records_name_the_file(tmp_path, content: bytes, why: str) -> None:
    path = tmp_path / "web1.runtime"
    path.write_bytes(content)
    with pytest.raises(errors.RuntimeStateError) as info:
        runtime.load(str(path), "web1")
    assert str(path) in str(info.value) and why in str(info.value)


def test_upgrade_from_the_2011_format(tmp_path) -> None:
    hvp = legacy2011.hvparams_2011(vnc_bind_address="0.0.0.0", disk_cache="writeback",
                                   kvm_flag="disabled", keymap="de")
    cmd = legacy2011.kvm_cmd_2011("/usr/bin/kvm", "/var/run/ganeti/kvm-hypervisor", "web1",
                                  hvp, 512, 2, ["/dev/xenvg/disk0", "/dev/xenvg/a,b"],
                                  network_port=11005)
    nics = [legacy2011.nic_2011("aa:00:00:00:00:01"),
            legacy2011.nic_2011("aa:00:00:00:00:02", ip="192.0.2.9", mode="routed")]
    path = tmp_path / "web1.runtime"
    path.write_text(legacy2011.record_2011(cmd, nics, hvp))
    loaded = runtime.load(str(path), "web1")
    assert loaded is not None and loaded.upgraded_from == 0
    assert loaded.argv == [str(a) for a in cmd]
    assert loaded.beparams == {"memory": 512, "vcpus": 2}
    assert [d["path"] for d in loaded.disks] == ["/dev/xenvg/disk0", "/dev/xenvg/a,b"]
    assert not any(d["readonly"] for d in loaded.disks)
    assert loaded.network_port == 11005
    assert loaded.nics[0] == {"mac": "aa:00:00:00:00:01", "ip": None,
                              "nicparams": {"mode": "bridged", "link": "br0"},
                              "device": legacy.nic_device_2011(0).to_dict()}
    assert loaded.nics[1]["ip"] == "192.0.2.9"
    # The core's keys, all of them (the 2011 ones and the later ones at their
    # defaults): the binary from the command line, the rest as in 2011
    assert set(loaded.hvparams) == set(validation.PARAMETERS)
    assert loaded.hvparams["kvm_path"] == "/usr/bin/kvm"
    assert loaded.hvparams["disk_cache"] == "writeback"
    assert loaded.hvparams["kvm_flag"] == "disabled"
    validation.check_all_syntax(loaded.hvparams)
    # Saved again, it stays marked until a start of this library rebuilds it.
    runtime.save(str(path), loaded)
    again = runtime.load(str(path), "web1")
    assert json.loads(path.read_text())["version"] == 1
    assert again == loaded and again.upgraded_from == 0


def test_upgraded_record_rebuilds_a_current_command_line(tmp_path) -> None:
    from ganeti_kvm.host.paths import RunDir

    hvp = legacy2011.hvparams_2011(vnc_bind_address="0.0.0.0", usb_mouse="tablet",
                                   use_localtime=True, acpi=False)
    cmd = legacy2011.kvm_cmd_2011("/usr/bin/kvm", "/r", "web1", hvp, 256, 1, ["/d0"],
                                  network_port=5901)
    record = runtime.parse(legacy2011.record_2011(cmd, [], hvp), "web1", "test")
    caps = qemu_caps.QemuCaps.from_dict(FAKE_CAPS)
    paths = RunDir(str(tmp_path)).instance("web1")
    spec = cmdline.MachineSpec(name="web1", memory=record.beparams["memory"],
                               vcpus=record.beparams["vcpus"], network_port=record.network_port)
    argv = cmdline.build_argv(spec, [cmdline.BlockDevice.from_dict(d) for d in record.disks],
                              record.hvparams, caps, paths)
    refused = ("-usbdevice", "-localtime", "-no-acpi", "-nographic", "-disable-kvm")
    assert not set(refused) & set(argv)
    assert argv[argv.index("-m") + 1] == "256" and ":1" in argv[argv.index("-vnc") + 1]
    assert any(a.startswith("file=/d0,") for a in argv)


@pytest.mark.parametrize("data, why", [
    ([["/usr/bin/kvm", "-name", "web1", "-smp", 1], [], {}], "no -m"),
    ([["/usr/bin/kvm", "-m", "lots", "-smp", 1], [], {}], "not a whole number"),
    ([["/usr/bin/kvm", "-m", 0, "-smp", 1], [], {}], "not a positive number"),
    ([[], [], {}], "empty"),
    ([["/usr/bin/kvm", "-m", 128, "-smp", 1], [{"ip": None}], {}], "MAC"),
    ([["/usr/bin/kvm", "-m", 128, "-smp", 1], [], []], "old [argv, nics, hvparams]"),
])
def test_bad_2011_records_name_the_file(data, why) -> None:
    with pytest.raises(errors.RuntimeStateError) as info:
        runtime.upgrade(data, "web1", "/run/conf/web1.runtime")
    assert "/run/conf/web1.runtime" in str(info.value) and why in str(info.value)
    assert "2011" in str(info.value)


def test_upgraded_marker_must_be_a_version() -> None:
    data = record().to_dict()
    data["upgraded_from"] = "yes"
    with pytest.raises(errors.RuntimeStateError, match="upgraded_from 'yes'"):
        runtime.upgrade(data, "web1", "test")


FAKE_CAPS = {"path": "/usr/bin/kvm", "version": [7, 2, 0], "version_text": "7.2.0", "options": [
    "runas", "chroot", "rtc", "netdev", "display", "usbdevice", "no-acpi", "machine"],
    "devices": ["virtio-blk-pci", "virtio-net-pci", "usb-tablet"], "machines": ["pc"],
    "accels": ["tcg"], "netdevs": ["tap"]}


def test_target_argv_keeps_the_devices_in_todays_spelling(tmp_path) -> None:
    from ganeti_kvm.host.paths import RunDir

    hvp = legacy2011.hvparams_2011(kvm_flag="disabled", use_localtime=True, acpi=False,
                                   vnc_bind_address="0.0.0.0", use_chroot=True)
    cmd = [str(a) for a in legacy2011.kvm_cmd_2011(
        "/usr/bin/kvm", "/old/run", "web1", hvp, 128, 1, ["/d0"], network_port=5901,
        startup_paused=True, boot_flag=True)]
    paths = RunDir(str(tmp_path)).instance("web1")

    class Caps:
        has_no_acpi = False
        has_localtime = False
        has_usbdevice = False
        has_chroot = False
        has_run_with_chroot = True
        has_runas = True
        has_run_with_user = False

    argv = legacy.target_argv(cmd, paths, Caps(), has_nics=False)
    text = " ".join(argv)
    assert "/old/run" not in text
    for refused in ("-disable-kvm", "-localtime", "-no-acpi", "-usbdevice", "-chroot", "-S",
                    "boot=on"):
        assert refused not in argv and refused not in text.split(","), refused
    assert argv[argv.index("-pidfile") + 1] == paths.pidfile
    assert f"unix:{paths.monitor_socket},server=on,wait=off" in argv
    assert f"unix:{paths.serial_socket},server=on,wait=off" in argv
    assert argv.count("-machine") == 1
    assert set(argv[argv.index("-machine") + 1].split(",")) == {"accel=tcg", "acpi=off"}
    assert argv[argv.index("-rtc"):][:2] == ["-rtc", "base=localtime"]
    assert argv[argv.index("-device"):][:2] == ["-device", "usb-tablet"]
    assert f"chroot={paths.chroot}" in argv
    assert argv.count("-mon") == 2 and f"path={paths.qmp_long_socket}" in text
    assert argv[argv.index("-net"):][:2] == ["-net", "none"]  # as 2011 added at start
    assert legacy.target_argv(argv, paths, Caps(), has_nics=False) == argv  # idempotent
    assert "-net" not in legacy.target_argv(cmd, paths, Caps(), has_nics=True)
    other_qmp = legacy.target_argv(cmd + ["-qmp", "unix:/old/run/ctrl/web1.qmp,server,nowait"],
                                   paths, Caps(), has_nics=False)
    assert "-qmp" not in other_qmp and "/old/run" not in " ".join(other_qmp)
    # The 2011 driver added the user to run as at each start; so does the target.
    as_user = legacy.target_argv(cmd, paths, Caps(), has_nics=False, run_as="2001:2001")
    assert as_user[as_user.index("-runas"):][:2] == ["-runas", "2001:2001"]
    assert legacy.target_argv(as_user, paths, Caps(), False, "2001:2001") == as_user


def test_atomic_write_keeps_old_content_on_failure(tmp_path, monkeypatch) -> None:
    path = str(tmp_path / "f")
    fsutil.atomic_write(path, "old")

    def broken_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        fsutil.atomic_write(path, "new")
    monkeypatch.undo()
    with open(path, encoding="utf-8") as handle:
        assert handle.read() == "old"
    assert os.listdir(tmp_path) == ["f"]


def test_dirs_are_private(tmp_path) -> None:
    target = str(tmp_path / "a" / "b")
    fsutil.ensure_dirs([target])
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o700


def test_a_directory_in_place_of_a_file_is_a_hypervisor_error(tmp_path) -> None:
    target = tmp_path / "web1.runtime"
    target.mkdir()
    with pytest.raises(errors.HypervisorError, match=f"Cannot remove {target}: a directory"):
        fsutil.remove_file(str(target))
    with pytest.raises(errors.HypervisorError, match=f"Cannot read {target}: a directory"):
        fsutil.read_small_file(str(target))
    with pytest.raises(errors.RuntimeStateError, match=str(target)):
        runtime.load(str(target), "web1")
    with pytest.raises(errors.RuntimeStateError, match=str(target)):
        runtime.save(str(target), record())
    assert target.is_dir() and os.listdir(tmp_path) == ["web1.runtime"]
    assert fsutil.read_small_file(str(tmp_path / "file" / "below")) is None
