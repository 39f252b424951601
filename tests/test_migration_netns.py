"""Migration across a real link: two network namespaces joined by a veth pair."""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Iterator

import pytest

from ganeti_kvm import errors
from tests.helpers import SerialReader, guest_hvparams, make_instance
from tests.netns import IP, netns, ns_ip, skip_unless_netns

SOURCE_IP, TARGET_IP = "10.98.0.1", "10.98.0.2"


def qemu_in(ns: str, qemu_bin: str, directory: str) -> str:
    """A kvm_path that runs QEMU inside namespace ``ns``."""
    path = os.path.join(directory, f"qemu-{ns}")
    with open(path, "w") as handle:
        handle.write(f'#!/bin/sh\nexec "{IP}" netns exec "{ns}" "{qemu_bin}" "$@"\n')
    os.chmod(path, stat.S_IRWXU)
    return path


@pytest.fixture
def link(short_dir: str) -> Iterator[tuple[str, str]]:
    skip_unless_netns()
    with netns("gk-src") as src, netns("gk-dst") as dst:
        ns_ip(src, "link", "add", "veth-s", "type", "veth", "peer", "name", "veth-d",
              "netns", dst)
        ns_ip(src, "addr", "add", f"{SOURCE_IP}/24", "dev", "veth-s")
        ns_ip(dst, "addr", "add", f"{TARGET_IP}/24", "dev", "veth-d")
        ns_ip(src, "link", "set", "veth-s", "up")
        ns_ip(dst, "link", "set", "veth-d", "up")
        yield src, dst


def instance(qemu: str, guest, bandwidth: int):
    hvp = guest_hvparams(qemu, guest, migration_port=8102, migration_bandwidth=bandwidth)
    return make_instance("far1", hvp)


def start_counting(link, source, qemu, guest, short_dir, bandwidth: int):
    """Start far1 in the source namespace and wait until it counts; return it,
    its serial reader and its migration info with the target namespace's QEMU."""
    src, dst = link
    inst = instance(qemu_in(src, qemu, short_dir), guest, bandwidth)
    source.StartInstance(inst, [])
    serial = SerialReader(source.node.paths("far1").serial_socket)
    serial.read_until(r"COUNTER 2\b")
    info = source.MigrationInfo(inst)
    return inst, serial, info.replace(qemu_in(src, qemu, short_dir),
                                      qemu_in(dst, qemu, short_dir))


def test_live_migration_over_a_veth_link(link, nodes, qemu72, guest, short_dir) -> None:
    _, dst = link
    source, target = nodes
    inst, serial, info_b = start_counting(link, source, qemu72, guest, short_dir, 1000)
    inst_b = instance(qemu_in(dst, qemu72, short_dir), guest, 1000)
    target.AcceptInstance(inst_b, info_b, TARGET_IP)
    source.MigrateInstance(inst, TARGET_IP, True)
    target.FinalizeMigration(inst_b, info_b, True)
    last = serial.counters()[-1]
    serial.close()
    after = SerialReader(target.node.paths("far1").serial_socket)
    after.read_until(r"COUNTER \d+\s+COUNTER \d+", timeout=30)
    assert after.counters()[0] >= last
    assert source.ListInstances() == [] and target.ListInstances() == ["far1"]


def test_link_down_mid_migration_is_cancelled(link, nodes, qemu72, guest, short_dir) -> None:
    src, _ = link
    source, target = nodes
    inst, serial, info_b = start_counting(link, source, qemu72, guest, short_dir, 1)
    target.AcceptInstance(inst, info_b, TARGET_IP)
    cut = threading.Timer(1.5, ns_ip, (src, "link", "set", "veth-s", "down"))
    cut.start()
    try:
        with pytest.raises(errors.MigrationError, match="no progress|failed"):
            source.MigrateInstance(inst, TARGET_IP, True, stall_timeout=3.0)
    finally:
        cut.cancel()
    target.FinalizeMigration(inst, info_b, False)
    assert target.ListInstances() == [] and source.ListInstances() == ["far1"]
    assert source.node.qmp("far1", "query-status")["status"] == "running"
    last = serial.counters()[-1]
    serial.read_until(rf"COUNTER {last + 2}\b", timeout=30)
