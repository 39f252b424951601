"""The disk keys, shared storage and the balloon device on real QEMU 7.2 and 10.0.

Each instance is guest-less (started paused, blank disks), so no guest
boots; what QEMU does with the settings is asked of QEMU itself: its block
layer (``query-block``), its devices (``qom-get``, ``query-pci``), the
file descriptors and mappings of its process (an io_uring ring, a Linux AIO
context), and the image file's allocation after QEMU's own ``qemu-io``
writes and discards through the drive.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from typing import Any

import pytest

from ganeti_kvm import errors
from ganeti_kvm.core import params
from ganeti_kvm.core.node import InstanceSpec, KvmNode
from ganeti_kvm.qemu import caps as qemu_caps
from ganeti_kvm.qemu import cmdline
from tests.helpers import kill_instances

MIB = 1024 * 1024


@pytest.fixture
def node(short_dir: str) -> Iterator[KvmNode]:
    kvm = KvmNode(os.path.join(short_dir, "run"))
    try:
        yield kvm
    finally:
        kill_instances(kvm.layout.root)


def image(directory: str, name: str, size_mib: int = 8) -> str:
    path = os.path.join(directory, name)
    with open(path, "wb") as handle:
        handle.truncate(size_mib * MIB)
    return path


def start(node: KvmNode, qemu_bin: str, disks: list[cmdline.BlockDevice],
          **hvparams: Any) -> int:
    hvp = params.fill({"kvm_path": qemu_bin, "kernel_path": "", "root_path": "",
                       "kvm_flag": "disabled", "serial_console": False, **hvparams})
    node.start(InstanceSpec(name="disks1", hvparams=hvp, memory=64, vcpus=1, disks=disks),
               paused=True)
    pid = node.running_pid("disks1")
    assert pid is not None
    return pid


def block_cache(node: KvmNode) -> dict[str, dict[str, bool]]:
    """Each drive's cache settings, as QEMU's block layer has them."""
    return {d["device"]: d["inserted"]["cache"] for d in node.qmp("disks1", "query-block")
            if d.get("inserted")}


def fd_targets(pid: int) -> list[str]:
    directory = f"/proc/{pid}/fd"
    targets = []
    for fd in os.listdir(directory):
        try:
            targets.append(os.readlink(os.path.join(directory, fd)))
        except OSError:
            continue
    return targets


def qemu_io(node: KvmNode, drive: str, command: str) -> str:
    """Run a qemu-io command on ``drive`` inside the instance's QEMU (through its block layer)."""
    return str(node.qmp("disks1", "human-monitor-command",
                        {"command-line": f'qemu-io {drive} "{command}"'}))


def allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


def written_then_discarded(node: KvmNode, drive: str, path: str) -> tuple[int, int]:
    """Bytes the image holds after 1 MiB written through QEMU, then after discarding it."""
    qemu_io(node, drive, "write -P 0x55 0 1M")
    qemu_io(node, drive, "flush")
    written = allocated(path)
    qemu_io(node, drive, "discard 0 1M")
    qemu_io(node, drive, "flush")
    return written, allocated(path)


def test_io_uring_unmap_writeback_and_a_shared_disk(
        node: KvmNode, qemu_bin: str, short_dir: str) -> None:
    local, shared = image(short_dir, "local.img"), image(short_dir, "shared.img")
    pid = start(node, qemu_bin, [cmdline.BlockDevice(local),
                                 cmdline.BlockDevice(shared, shared=True)],
                disk_aio="io_uring", disk_discard="unmap", disk_cache="writeback")
    cache = block_cache(node)
    assert cache["disk0"] == {"writeback": True, "direct": False, "no-flush": False}
    # the shared disk bypasses the host's page cache whatever disk_cache says
    assert cache["disk1"]["direct"] is True
    assert "anon_inode:[io_uring]" in fd_targets(pid)
    written, after = written_then_discarded(node, "disk0", local)
    assert written >= MIB and after < written  # discard reached the file: holes punched


def test_native_ignore_megasas_forces_direct_io(
        node: KvmNode, qemu_bin: str, short_dir: str) -> None:
    path = image(short_dir, "native.img")
    pid = start(node, qemu_bin, [cmdline.BlockDevice(path)], disk_type="scsi",
                scsi_controller_type="megasas", disk_aio="native", disk_discard="ignore",
                disk_cache="writeback")
    assert block_cache(node)["disk0"]["direct"] is True  # cache=none, as aio=native needs
    assert node.qmp("disks1", "qom-get", {"path": "/machine/peripheral/scsi0",
                                          "property": "type"}) == "megasas"
    written, after = written_then_discarded(node, "disk0", path)
    assert written >= MIB and after == written  # discard=ignore: the data stays
    # The I/O went through a Linux AIO context (set up at the first request
    # since QEMU 8), not through the thread pool.
    with open(f"/proc/{pid}/maps", encoding="utf-8") as handle:
        assert "[aio]" in handle.read()


def test_defaults_thread_pool_lsi(node: KvmNode, qemu_bin: str, short_dir: str) -> None:
    path = image(short_dir, "plain.img")
    pid = start(node, qemu_bin, [cmdline.BlockDevice(path)], disk_type="scsi")
    assert block_cache(node)["disk0"] == {"writeback": True, "direct": False,
                                          "no-flush": False}
    assert "anon_inode:[io_uring]" not in fd_targets(pid)
    assert node.qmp("disks1", "qom-get", {"path": "/machine/peripheral/scsi0",
                                          "property": "type"}) == "lsi53c895a"


def test_balloon_device_has_its_slot(node: KvmNode, qemu_bin: str, short_dir: str) -> None:
    start(node, qemu_bin, [cmdline.BlockDevice(image(short_dir, "b.img"))])
    record = node.load_record("disks1")
    assert record is not None and record.balloon is not None
    assert node.qmp("disks1", "qom-get", {"path": "/machine/peripheral/balloon0",
                                          "property": "type"}) == "virtio-balloon-pci"
    slots = {dev["qdev_id"]: dev["slot"] for bus in node.qmp("disks1", "query-pci")
             for dev in bus["devices"]}
    assert slots["balloon0"] == int(record.balloon["addr"], 16) == 31
    assert node.qmp("disks1", "query-balloon") == {"actual": 64 * MIB}


def test_the_probe_finds_io_uring_where_the_kernel_allows_it(qemu_bin: str) -> None:
    """Both QEMUs are built with io_uring: the probe finds it unless the kernel disables it."""
    try:
        with open(params.IO_URING_SYSCTL, encoding="ascii") as handle:
            disabled = handle.read().strip() == "2"
    except OSError:
        disabled = False
    modes = qemu_caps.probe_aio_modes(qemu_bin)
    assert ("io_uring" in modes) is not disabled
    hvp = params.fill({"kvm_path": qemu_bin, "disk_aio": "io_uring"})
    caps = dataclasses.replace(qemu_caps.probe(qemu_bin), aio_modes=modes)
    if disabled:
        with pytest.raises(errors.ParameterError, match="disk_aio"):
            params.check_node(hvp, caps)
    else:
        params.check_node(hvp, caps)
