"""Every parameter value against both real QEMUs.

Each combination is started paused through the public API, must answer
``query-status`` with ``prelaunch``, and is stopped.  Combinations QEMU cannot
do must be refused by ValidateParameters with a clear message, never by QEMU.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from ganeti_kvm import constants as c
from ganeti_kvm import errors, objects
from ganeti_kvm.hv_kvm import KVMHypervisor
from tests.certs import make_x509_dir
from tests.guestimage import build_guest, make_disk
from tests.helpers import free_vnc_port, make_instance


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    base = tmp_path_factory.mktemp("matrix")
    guest = build_guest()
    iso = base / "cd.iso"
    iso.write_bytes(b"\0" * 2048 * 16)
    floppy = base / "floppy.img"
    floppy.write_bytes(b"\0" * 1474560)
    password = base / "vnc-password"
    password.write_text("matrix-secret\n")
    mem = base / "hugepages"
    mem.mkdir()
    vnc_dir = base / "vnc"
    vnc_dir.mkdir()
    return {"kernel": guest.kernel, "initrd": guest.initrd, "iso": str(iso),
            "floppy": str(floppy), "password": str(password), "mem": str(mem),
            "vnc_dir": str(vnc_dir), "x509": make_x509_dir(str(base / "x509"))}


F = "{%s}"  # a placeholder replaced by a path from the files fixture

# (id, hvparams overrides, number of disks) -- together they use every value of
# every key that QEMU can do.
CASES: list[tuple[str, dict[str, Any], int]] = [
    ("defaults-disk-boot", {}, 1),
    ("kernel-initrd", {"kernel_path": F % "kernel", "initrd_path": F % "initrd",
                       "root_path": "/dev/vda1", "kernel_args": "ro quiet"}, 1),
    ("no-acpi-no-serial", {"acpi": False, "serial_console": False}, 1),
    ("serial-115200", {"serial_speed": 115200, "kernel_path": F % "kernel",
                       "root_path": "/dev/vda1"}, 0),
    ("boot-network", {"boot_order": "network"}, 1),
    ("boot-cdrom", {"boot_order": "cdrom", "cdrom_image_path": F % "iso"}, 1),
    ("boot-floppy", {"boot_order": "floppy", "floppy_image_path": F % "floppy"}, 0),
    ("two-cdroms-ide", {"cdrom_image_path": F % "iso", "cdrom2_image_path": F % "iso",
                        "cdrom_disk_type": "ide"}, 2),
    ("cdrom-paravirtual", {"cdrom_image_path": F % "iso",
                           "cdrom_disk_type": "paravirtual"}, 1),
    ("cdrom-scsi-boot", {"cdrom_image_path": F % "iso", "cdrom_disk_type": "scsi",
                         "boot_order": "cdrom"}, 1),
    ("disk-ide", {"disk_type": "ide"}, 2),
    ("disk-ide-full", {"disk_type": "ide", "cdrom_image_path": F % "iso"}, 3),
    ("disk-scsi", {"disk_type": "scsi"}, 2),
    ("disk-sd", {"disk_type": "sd"}, 1),
    ("cache-none", {"disk_cache": "none"}, 1),
    ("cache-writethrough", {"disk_cache": "writethrough"}, 1),
    ("cache-writeback", {"disk_cache": "writeback"}, 1),
    ("usb-mouse", {"usb_mouse": "mouse"}, 0),
    ("usb-tablet", {"usb_mouse": "tablet"}, 0),
    ("vnc-loopback", {"vnc_bind_address": "127.0.0.1"}, 0),
    ("vnc-any", {"vnc_bind_address": "0.0.0.0", "usb_mouse": "mouse"}, 0),
    ("vnc-unix", {"vnc_bind_address": F % "vnc_dir"}, 0),
    ("vnc-tls-anon", {"vnc_bind_address": "127.0.0.1", "vnc_tls": True}, 0),
    ("vnc-tls-x509-verify", {"vnc_bind_address": "127.0.0.1", "vnc_tls": True,
                             "vnc_x509_path": F % "x509", "vnc_x509_verify": True}, 0),
    ("vnc-tls-x509", {"vnc_bind_address": "127.0.0.1", "vnc_tls": True,
                      "vnc_x509_path": F % "x509"}, 0),
    ("vnc-password", {"vnc_bind_address": "127.0.0.1",
                      "vnc_password_file": F % "password"}, 0),
    ("localtime", {"use_localtime": True}, 0),
    ("mem-path", {"mem_path": F % "mem"}, 0),
    ("kvm-enabled", {"kvm_flag": "enabled"}, 1),
    ("kvm-default", {"kvm_flag": ""}, 0),
    ("user-nobody", {"security_model": "user", "security_domain": "nobody"}, 1),
    ("chroot", {"use_chroot": True}, 1),
    ("chroot-user", {"use_chroot": True, "security_model": "user",
                     "security_domain": "nobody"}, 0),
    ("migration-params", {"migration_port": 9999, "migration_bandwidth": 1,
                          "migration_downtime": 1000, "migration_mode": "non-live"}, 0),
]


def resolve(overrides: dict[str, Any], files: dict[str, str]) -> dict[str, Any]:
    result = {}
    for key, value in overrides.items():
        if isinstance(value, str) and value.startswith("{") and value.endswith("}"):
            value = files[value[1:-1]]
        result[key] = value
    return result


@pytest.mark.parametrize("case, overrides, ndisks", CASES, ids=[c[0] for c in CASES])
def test_matrix_combination_starts(hv, qemu_bin, files, short_dir, case, overrides,
                                   ndisks) -> None:
    if overrides.get("kvm_flag") == "enabled" and not os.access("/dev/kvm", os.W_OK):
        pytest.skip("no usable /dev/kvm")
    hvp = dict(c.HVC_DEFAULTS[c.HT_KVM], kvm_path=qemu_bin, kernel_path="",
               root_path="", kvm_flag="disabled")
    hvp.update(resolve(overrides, files))
    KVMHypervisor.CheckParameterSyntax(hvp)
    hv.ValidateParameters(hvp)
    # The first disk is read-only where the disk type allows it
    readonly_ok = hvp["disk_type"] not in ("ide", "sd")
    disks = [(objects.Disk(mode="rw" if i or not readonly_ok else "ro"),
              make_disk(os.path.join(short_dir, f"d{i}.raw"), f"m{i}")) for i in range(ndisks)]
    inst = make_instance("matrix1", hvp, memory=64, network_port=free_vnc_port())
    hv.StartInstance(inst, disks, startup_paused=True)
    assert hv.node.qmp("matrix1", "query-status")["status"] == "prelaunch"
    argv = hv.node.load_record("matrix1").argv
    assert "matrix-secret" not in " ".join(argv)
    hv.StopInstance(inst, force=True)
    assert hv.ListInstances() == []


@pytest.mark.parametrize("overrides, message", [
    ({"disk_type": "mtd"}, "no MTD device"),
    ({"disk_type": "pflash"}, "replaces the firmware"),
    ({"cdrom_image_path": "{iso}", "cdrom_disk_type": "sd"}, "SD card"),
    ({"cdrom_image_path": "{iso}", "cdrom_disk_type": "mtd"}, "MTD"),
    ({"cdrom_image_path": "{iso}", "cdrom_disk_type": "pflash"}, "pflash"),
    ({"vhost_net": True}, "/dev/vhost-net"),
])
def test_matrix_impossible_combinations_fail_validation(hv, qemu_bin, files, overrides,
                                                        message) -> None:
    if overrides.get("vhost_net") and os.path.exists("/dev/vhost-net"):
        pytest.skip("this node has /dev/vhost-net")
    hvp = dict(c.HVC_DEFAULTS[c.HT_KVM], kvm_path=qemu_bin, kernel_path="", root_path="")
    hvp.update(resolve(overrides, files))
    KVMHypervisor.CheckParameterSyntax(hvp)
    with pytest.raises(errors.HypervisorError, match=message):
        hv.ValidateParameters(hvp)
    with pytest.raises(errors.HypervisorError, match=message):
        hv.StartInstance(make_instance("matrix2", hvp, memory=64), [])
    assert hv.ListInstances() == []
