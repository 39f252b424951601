"""NICs on real TAP devices inside a test network namespace, with the ifup hook."""

from __future__ import annotations

import os
import re
import stat
import time
from collections.abc import Iterator

import pytest

from ganeti_kvm import errors, objects
from ganeti_kvm.host import netdev
from ganeti_kvm.hv_kvm import KVMHypervisor
from tests.helpers import (
    SerialReader,
    guest_hvparams,
    kill_instances,
    make_instance,
    node_hypervisors,
)
from tests.netns import bridged_netns, ns_ip, ns_read, ns_run

BRIDGE_IP = "10.99.0.1"


@pytest.fixture
def ns() -> Iterator[str]:
    with bridged_netns("gk-nic", f"{BRIDGE_IP}/24") as name:
        yield name


@pytest.fixture
def hv(short_dir: str, ns: str) -> Iterator[KVMHypervisor]:
    with node_hypervisors(KVMHypervisor, short_dir, "run", netns=ns) as (hypervisor,):
        yield hypervisor


def read_env(path: str) -> dict[str, str]:
    """The environment a test hook dumped as NUL-separated KEY=VALUE entries."""
    with open(path, encoding="utf-8") as handle:
        return dict(kv.split("=", 1) for kv in handle.read().split("\0") if kv)


def nic(mac: str, mode: str = "bridged", link: str = "br0",
        ip: str | None = None) -> objects.NIC:
    return objects.NIC(mac=mac, ip=ip, nicparams={"mode": mode, "link": link})


def taps(hv: KVMHypervisor, name: str) -> list[str]:
    return [n["tap"] for n in hv.node.load_record(name).nics]


def test_bridged_nic_answers_ping_and_pings_back(hv, ns, qemu_bin, guest) -> None:
    inst = make_instance("net1", guest_hvparams(
        qemu_bin, guest, kernel_args="panic=-1 quiet gk.ip=10.99.0.2/24"),
        nics=[nic("52:54:00:12:34:01", ip="10.99.0.2")])
    hv.StartInstance(inst, [])
    serial = SerialReader(hv.node.paths("net1").serial_socket)
    serial.read_until("NET eth0 10.99.0.2/24")
    serial.read_until("READY")
    (tap,) = taps(hv, "net1")
    link = ns_ip(ns, "-o", "link", "show", "dev", tap).stdout
    assert "master br0" in link and "UP" in link
    flags = int(ns_read(ns, f"/sys/class/net/{tap}/tun_flags").strip(), 16)
    assert flags & netdev.IFF_VNET_HDR and flags & netdev.IFF_TAP
    deadline = time.monotonic() + 60
    while True:
        result = ns_run(ns, ["busybox", "ping", "-c", "1", "-W", "2", "10.99.0.2"], check=False)
        if result.returncode == 0:
            break
        assert time.monotonic() < deadline, result.stdout + result.stderr
    serial.read_until(r"/ # ")
    serial.send(f"ping -c 1 -W 5 {BRIDGE_IP}\n")
    serial.read_until(r"1 packets received", timeout=30)
    serial.close()
    hv.StopInstance(inst, force=True)
    deadline = time.monotonic() + 10
    while netdev.tap_exists(tap, netns=ns):  # removed asynchronously by the kernel
        assert time.monotonic() < deadline, "the TAP device outlived its QEMU"
        time.sleep(0.05)


def test_routed_nic_gets_its_route(hv, ns, qemu_bin, guest) -> None:
    inst = make_instance("net2", guest_hvparams(qemu_bin, guest),
                         nics=[nic("52:54:00:12:34:02", mode="routed", link="", ip="10.99.1.2")])
    hv.StartInstance(inst, [], startup_paused=True)
    (tap,) = taps(hv, "net2")
    routes = ns_ip(ns, "route", "show").stdout
    assert re.search(rf"10\.99\.1\.2 dev {re.escape(tap)}", routes), routes
    assert ns_read(ns, f"/proc/sys/net/ipv4/conf/{tap}/proxy_arp").strip() == "1"


@pytest.mark.parametrize("nic_type, model", [("e1000", "e1000"), ("rtl8139", "rtl8139"),
                                             ("paravirtual", "virtio-net-pci")])
def test_two_nics_with_emulated_and_paravirtual_models(hv, ns, qemu_bin, guest, nic_type,
                                                       model) -> None:
    inst = make_instance("net3", guest_hvparams(qemu_bin, guest, nic_type=nic_type),
                         nics=[nic("52:54:00:12:34:03"), nic("52:54:00:12:34:04")])
    hv.StartInstance(inst, [], startup_paused=True)
    names = taps(hv, "net3")
    assert len(set(names)) == 2
    for tap in names:
        assert "master br0" in ns_ip(ns, "-o", "link", "show", "dev", tap).stdout
        flags = int(ns_read(ns, f"/sys/class/net/{tap}/tun_flags").strip(), 16)
        assert bool(flags & netdev.IFF_VNET_HDR) == (nic_type == "paravirtual")
    network = hv.node.qmp("net3", "human-monitor-command", {"command-line": "info network"})
    assert network.count(f"model={model}") == 2
    assert "52:54:00:12:34:03" in network and "52:54:00:12:34:04" in network


def write_hook(path: str, body: str) -> str:
    with open(path, "w") as handle:
        handle.write("#!/bin/sh\n" + body)
    os.chmod(path, stat.S_IRWXU)
    return path


def test_hook_environment_is_exact_and_data_stays_data(short_dir, ns, qemu_bin, guest) -> None:
    dump = os.path.join(short_dir, "env")
    hook = write_hook(os.path.join(short_dir, "hook"),
                      f'env -0 > "{dump}.$INTERFACE_INDEX"\n')
    hv = KVMHypervisor(run_dir=os.path.join(short_dir, "run"), netns=ns, ifup_script=hook)
    canary = os.path.join(short_dir, "owned")
    tags = [f"x;touch {canary}", "$(touch " + canary + ")", "`id`"]
    try:
        inst = make_instance("net4", guest_hvparams(qemu_bin, guest), tags=tags, nics=[
            nic("52:54:00:12:34:05", ip="10.99.0.5"),
            nic("52:54:00:12:34:06", mode="routed", link="100")])
        hv.StartInstance(inst, [], startup_paused=True)
        tap0, tap1 = taps(hv, "net4")
        env0, env1 = (read_env(dump + suffix) for suffix in (".0", ".1"))
    finally:
        kill_instances(hv.node.layout.root)
    for env in (env0, env1):
        for noise in ("PATH", "PWD", "SHLVL", "_", "OLDPWD"):
            env.pop(noise, None)
    assert env0 == {"INSTANCE": "net4", "MAC": "52:54:00:12:34:05", "MODE": "bridged",
                    "INTERFACE": tap0, "INTERFACE_INDEX": "0", "TAGS": " ".join(tags),
                    "IP": "10.99.0.5", "LINK": "br0", "BRIDGE": "br0"}
    assert env1 == {"INSTANCE": "net4", "MAC": "52:54:00:12:34:06", "MODE": "routed",
                    "INTERFACE": tap1, "INTERFACE_INDEX": "1", "TAGS": " ".join(tags),
                    "LINK": "100"}
    assert not os.path.exists(canary)


def test_failing_hook_leaves_nothing_running(short_dir, ns, qemu_bin, guest) -> None:
    hook = write_hook(os.path.join(short_dir, "hook"),
                      'echo "cannot attach $INTERFACE: bridge on fire" >&2\nexit 3\n')
    hv = KVMHypervisor(run_dir=os.path.join(short_dir, "run"), netns=ns, ifup_script=hook)
    inst = make_instance("net5", guest_hvparams(qemu_bin, guest),
                         nics=[nic("52:54:00:12:34:07")])
    try:
        with pytest.raises(errors.HypervisorError, match="bridge on fire") as info:
            hv.StartInstance(inst, [])
        assert "3" in str(info.value)
        assert hv.ListInstances() == []
        ipaths = hv.node.paths("net5")
        for leftover in ipaths.runtime_files() + [ipaths.runtime_file]:
            assert not os.path.exists(leftover), leftover
        # The kernel removes a TAP device asynchronously once its last fd closes.
        deadline = time.monotonic() + 10
        while "gnt.tap" in ns_ip(ns, "-o", "link", "show").stdout:
            assert time.monotonic() < deadline, "the TAP device outlived its QEMU"
            time.sleep(0.05)
    finally:
        kill_instances(hv.node.layout.root)


def test_migrated_nic_is_attached_on_the_target(short_dir, ns, qemu_bin, guest) -> None:
    source = KVMHypervisor(run_dir=os.path.join(short_dir, "a"), netns=ns)
    target = KVMHypervisor(run_dir=os.path.join(short_dir, "b"), netns=ns)
    from tests.helpers import free_port

    inst = make_instance("net6", guest_hvparams(qemu_bin, guest, migration_port=free_port(),
                                                migration_bandwidth=1000),
                         nics=[nic("52:54:00:12:34:08")])
    try:
        source.StartInstance(inst, [], startup_paused=True)
        (source_tap,) = taps(source, "net6")
        info = source.MigrationInfo(inst)
        target.AcceptInstance(inst, info, "127.0.0.1")
        (target_tap,) = taps(target, "net6")
        assert target_tap != source_tap
        # ifup is deferred: the target's tap is not on the bridge yet
        assert "master br0" not in ns_ip(ns, "-o", "link", "show", "dev", target_tap).stdout
        source.MigrateInstance(inst, "127.0.0.1", True)
        target.FinalizeMigration(inst, info, True)
        assert "master br0" in ns_ip(ns, "-o", "link", "show", "dev", target_tap).stdout
        deadline = time.monotonic() + 10
        while netdev.tap_exists(source_tap, netns=ns):
            assert time.monotonic() < deadline, "the source TAP outlived its QEMU"
            time.sleep(0.05)
        assert target.ListInstances() == ["net6"] and source.ListInstances() == []
    finally:
        kill_instances(source.node.layout.root)
        kill_instances(target.node.layout.root)
