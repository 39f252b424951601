"""Disk keys (disk_aio, disk_discard, scsi_controller_type) and shared storage, without QEMU.

Golden command lines on the capabilities of both QEMU fixtures, the core's
checks (io_uring refused where QEMU or the kernel lacks it), and both
adapters' rule for which disks are on shared storage (never cached).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import pytest

from ganeti_kvm import errors, objects
from ganeti_kvm.core import names as c
from ganeti_kvm.core import params
from ganeti_kvm.ganeti3 import hypervisor as g3
from ganeti_kvm.ganeti3 import params as g3params
from ganeti_kvm.host.paths import RunDir
from ganeti_kvm.hv_kvm import KVMHypervisor
from ganeti_kvm.qemu import caps as qemu_caps
from ganeti_kvm.qemu import cmdline
from ganeti_kvm.qemu.caps import QemuCaps

DATA = Path(__file__).parent / "data"
FILES = {"version": "version.txt", "help": "help.txt", "machine": "machine-help.txt",
         "device": "device-help.txt", "accel": "accel-help.txt", "netdev": "netdev-help.txt"}
PATHS = RunDir("/run/gk").instance("db1")
SPEC = cmdline.MachineSpec(name="db1", memory=512, vcpus=1)


def fixture_caps(version: str, aio_modes: frozenset[str] = frozenset()) -> QemuCaps:
    outputs = {k: (DATA / f"qemu-{version}" / f).read_text(encoding="utf-8")
               for k, f in FILES.items()}
    caps = qemu_caps.build_caps(f"/opt/qemu-{version}", outputs)
    return dataclasses.replace(caps, aio_modes=aio_modes)


@pytest.fixture(params=["7.2", "10.0"], ids=lambda v: f"qemu{v}")
def caps(request: pytest.FixtureRequest) -> QemuCaps:
    return fixture_caps(request.param, frozenset(["io_uring"]))


def hvp(**overrides: Any) -> dict[str, Any]:
    result = params.fill({"kernel_path": "", "root_path": "", "serial_console": False})
    result.update(overrides)
    return result


def disk_argv(argv: list[str]) -> list[str]:
    """The -drive/-device pairs of an argv, without the monitors, display and the rest."""
    keep = []
    for index, arg in enumerate(argv[:-1]):
        if arg in ("-drive", "-device"):
            keep += [arg, argv[index + 1]]
    return keep


def two_disks(shared: bool = False) -> list[cmdline.BlockDevice]:
    return [cmdline.BlockDevice("/dev/vg/db1-0", shared=shared),
            cmdline.BlockDevice("/dev/vg/db1-1", shared=shared)]


# --- golden command lines ---------------------------------------------------------------


def test_golden_defaults_unchanged(caps: QemuCaps) -> None:
    """threads, default discard and lsi add nothing: the argv of instances started before."""
    argv = cmdline.build_argv(SPEC, two_disks(), hvp(), caps, PATHS)
    assert disk_argv(argv) == [
        "-drive", "file=/dev/vg/db1-0,format=raw,if=none,id=disk0",
        "-device", "virtio-blk-pci,drive=disk0,id=disk0-dev,bootindex=1",
        "-drive", "file=/dev/vg/db1-1,format=raw,if=none,id=disk1",
        "-device", "virtio-blk-pci,drive=disk1,id=disk1-dev",
    ]


def test_golden_io_uring_unmap_writeback(caps: QemuCaps) -> None:
    argv = cmdline.build_argv(
        SPEC, two_disks(), hvp(disk_aio="io_uring", disk_discard="unmap",
                               disk_cache="writeback"), caps, PATHS)
    assert disk_argv(argv) == [
        "-drive", "file=/dev/vg/db1-0,format=raw,if=none,id=disk0,cache=writeback,"
                  "aio=io_uring,discard=unmap",
        "-device", "virtio-blk-pci,drive=disk0,id=disk0-dev,bootindex=1",
        "-drive", "file=/dev/vg/db1-1,format=raw,if=none,id=disk1,cache=writeback,"
                  "aio=io_uring,discard=unmap",
        "-device", "virtio-blk-pci,drive=disk1,id=disk1-dev",
    ]


def test_golden_native_forces_cache_none_and_says_so(
        caps: QemuCaps, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="ganeti_kvm.qemu.cmdline"):
        argv = cmdline.build_argv(SPEC, two_disks()[:1],
                                  hvp(disk_aio="native", disk_cache="writethrough",
                                      disk_discard="ignore"), caps, PATHS)
    assert disk_argv(argv)[:2] == [
        "-drive", "file=/dev/vg/db1-0,format=raw,if=none,id=disk0,cache=none,aio=native,"
                  "discard=ignore"]
    (record,) = caplog.records
    assert "db1" in record.getMessage() and "writethrough" in record.getMessage()
    assert "native" in record.getMessage() and "O_DIRECT" in record.getMessage()


def test_native_with_cache_none_logs_nothing(
        caps: QemuCaps, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="ganeti_kvm.qemu.cmdline"):
        argv = cmdline.build_argv(SPEC, two_disks(True), hvp(disk_aio="native",
                                                             disk_cache="none"), caps, PATHS)
    assert "cache=none,aio=native" in disk_argv(argv)[1]
    assert not caplog.records


@pytest.mark.parametrize("cache", ["default", "writeback", "writethrough"])
def test_golden_shared_storage_is_never_cached(
        caps: QemuCaps, cache: str, caplog: pytest.LogCaptureFixture) -> None:
    disks = [cmdline.BlockDevice("/dev/vg/local"),
             cmdline.BlockDevice("/srv/shared/db1.img", shared=True)]
    with caplog.at_level(logging.WARNING, logger="ganeti_kvm.qemu.cmdline"):
        argv = cmdline.build_argv(SPEC, disks, hvp(disk_cache=cache), caps, PATHS)
    local = "file=/dev/vg/local,format=raw,if=none,id=disk0"
    assert disk_argv(argv)[1] == (local if cache == "default" else f"{local},cache={cache}")
    assert disk_argv(argv)[5] == "file=/srv/shared/db1.img,format=raw,if=none,id=disk1,cache=none"
    (record,) = caplog.records  # only the shared disk was overridden
    assert "/srv/shared/db1.img" in record.getMessage()
    assert "shared storage" in record.getMessage() and cache in record.getMessage()


@pytest.mark.parametrize(("controller", "model"), [
    ("lsi", "lsi53c895a"), ("megasas", "megasas"), ("virtio-scsi-pci", "virtio-scsi-pci")])
def test_golden_scsi_controller(caps: QemuCaps, controller: str, model: str) -> None:
    argv = cmdline.build_argv(SPEC, two_disks(), hvp(disk_type="scsi",
                                                     scsi_controller_type=controller),
                              caps, PATHS)
    assert disk_argv(argv) == [
        "-device", f"{model},id=scsi0",
        "-drive", "file=/dev/vg/db1-0,format=raw,if=none,id=disk0",
        "-device", "scsi-hd,drive=disk0,id=disk0-dev,bus=scsi0.0,scsi-id=0,bootindex=1",
        "-drive", "file=/dev/vg/db1-1,format=raw,if=none,id=disk1",
        "-device", "scsi-hd,drive=disk1,id=disk1-dev,bus=scsi0.0,scsi-id=1",
    ]
    assert caps.has_device(model)


def test_records_without_the_keys_build_as_before(caps: QemuCaps) -> None:
    """A record written before the keys existed has none of them: QEMU's defaults, lsi."""
    old = {k: v for k, v in hvp(disk_type="scsi").items()
           if k not in (c.HV_KVM_DISK_AIO, c.HV_DISK_DISCARD, c.HV_KVM_SCSI_CONTROLLER_TYPE)}
    argv = cmdline.build_argv(SPEC, two_disks(), old, caps, PATHS)
    assert disk_argv(argv)[:4] == ["-device", "lsi53c895a,id=scsi0", "-drive",
                                   "file=/dev/vg/db1-0,format=raw,if=none,id=disk0"]


@pytest.mark.parametrize(("key", "value"), [
    ("disk_aio", "posix"), ("disk_discard", "on,x=y"), ("scsi_controller_type", "lsi,x=1")])
def test_cmdline_refuses_unchecked_values(key: str, value: str) -> None:
    with pytest.raises(errors.ParameterError, match=key):
        cmdline.build_argv(SPEC, two_disks(), hvp(disk_type="scsi", **{key: value}),
                           fixture_caps("10.0"), PATHS)


def test_block_device_record_keeps_shared() -> None:
    disk = cmdline.BlockDevice("/srv/x.img", shared=True)
    assert cmdline.BlockDevice.from_dict(disk.to_dict()) == disk
    # records written before: no key, not shared; the key is only written when set
    assert "shared" not in cmdline.BlockDevice("/dev/vg/x").to_dict()
    assert not cmdline.BlockDevice.from_dict({"path": "/dev/vg/x"}).shared


# --- the core's checks --------------------------------------------------------------------


@pytest.mark.parametrize(("key", "value"), [
    ("disk_aio", "posix"), ("disk_discard", "trim"), ("scsi_controller_type", "buslogic"),
    ("scsi_controller_type", "")])
def test_syntax_refuses(key: str, value: str) -> None:
    with pytest.raises(errors.ParameterError, match=key):
        params.check_all_syntax(hvp(**{key: value}))


@pytest.mark.parametrize("value", ["threads", "native", "io_uring", ""])
def test_syntax_accepts_aio(value: str) -> None:
    params.check_all_syntax(hvp(disk_aio=value))


def test_io_uring_refused_without_qemu_support(tmp_path: Path) -> None:
    sysctl = tmp_path / "io_uring_disabled"
    sysctl.write_text("0\n", encoding="ascii")
    with pytest.raises(errors.ParameterError) as err:
        params.check_io_uring(fixture_caps("7.2"), str(sysctl))
    message = str(err.value)
    assert "disk_aio" in message and "/opt/qemu-7.2" in message and "threads" in message
    params.check_io_uring(fixture_caps("7.2", frozenset(["io_uring"])), str(sysctl))


@pytest.mark.parametrize(("value", "refused"), [("0", False), ("1", False), ("2", True)])
def test_io_uring_follows_the_kernel_switch(tmp_path: Path, value: str, refused: bool) -> None:
    sysctl = tmp_path / "io_uring_disabled"
    sysctl.write_text(value + "\n", encoding="ascii")
    caps = fixture_caps("10.0", frozenset(["io_uring"]))
    if refused:
        with pytest.raises(errors.ParameterError, match="disk_aio.*io_uring disabled"):
            params.check_io_uring(caps, str(sysctl))
    else:
        params.check_io_uring(caps, str(sysctl))
    params.check_io_uring(caps, str(tmp_path / "absent"))  # an older kernel: no switch


def test_node_check_asks_for_io_uring_only_when_used() -> None:
    caps = fixture_caps("10.0")  # probed without io_uring
    params.check_node(hvp(disk_aio="threads"), caps)
    with pytest.raises(errors.ParameterError, match="disk_aio"):
        params.check_node(hvp(disk_aio="io_uring"), caps)


def test_node_check_needs_the_chosen_controller() -> None:
    caps = fixture_caps("10.0")
    lacking = dataclasses.replace(caps, devices=caps.devices - {"megasas"})
    params.check_node(hvp(disk_type="scsi", scsi_controller_type="megasas"), caps)
    params.check_node(hvp(disk_type="scsi"), lacking)
    with pytest.raises(errors.ParameterError, match="megasas"):
        params.check_node(hvp(disk_type="scsi", scsi_controller_type="megasas"), lacking)


def test_ganeti3_passes_the_keys_through() -> None:
    for key in (c.HV_KVM_DISK_AIO, c.HV_DISK_DISCARD, c.HV_KVM_SCSI_CONTROLLER_TYPE):
        assert key in g3params.CORE_KEYS and key not in g3params.UNIMPLEMENTED
        assert g3params.DEFAULTS[key] == c.DEFAULTS[key]
    g3params.check_implemented({"disk_aio": "native", "disk_discard": "unmap",
                                "scsi_controller_type": "megasas"})
    core = g3params.to_core({"disk_aio": "native", "disk_discard": "unmap",
                             "scsi_controller_type": "megasas"})
    assert (core["disk_aio"], core["disk_discard"], core["scsi_controller_type"]) == \
        ("native", "unmap", "megasas")


# --- which disks are on shared storage: the adapters ------------------------------------------


class _Disk:
    def __init__(self, dev_type: str) -> None:
        self.dev_type = dev_type
        self.mode = "rw"


@pytest.mark.parametrize(("dev_type", "shared"), [
    ("plain", False), ("drbd", False), ("file", False), ("rbd", False),
    ("sharedfile", True), ("blockdev", True), ("ext", True), ("gluster", True)])
def test_ganeti3_maps_each_disk_dev_type(dev_type: str, shared: bool) -> None:
    disks = g3.block_devices_of([(_Disk("plain"), "/dev/vg/a", None),
                                 (_Disk(dev_type), "/dev/x/b", None)])
    assert [d.shared for d in disks] == [False, shared]
    spec = g3.instance_spec({"name": "db1", "hvparams": {}, "beparams": {"maxmem": 128,
                                                                        "vcpus": 1}},
                            [(_Disk(dev_type), "/dev/x/b", None)])
    assert spec.disks[0].shared is shared


@pytest.mark.parametrize(("template", "shared"), [
    ("plain", False), ("drbd", False), ("file", False), ("diskless", False),
    ("sharedfile", True), ("blockdev", True)])
def test_2011_maps_the_disk_template(template: str, shared: bool) -> None:
    instance = objects.Instance(name="db1", primary_node="n1", hvparams={},
                                beparams={"memory": 128, "vcpus": 1}, nics=[], tags=[],
                                disk_template=template)
    spec = KVMHypervisor._spec(instance, [({"mode": "rw"}, "/dev/x/a"),
                                          ({"mode": "rw"}, "/dev/x/b")])
    assert [d.shared for d in spec.disks] == [shared, shared]
