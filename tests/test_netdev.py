"""TAP devices through /dev/net/tun, created inside throw-away network namespaces."""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from ganeti_kvm import errors
from ganeti_kvm.host import netdev
from tests.netns import IP, netns, ns_ip, ns_read, run, skip_unless_netns

VIRTIO_NET_HDR_SIZE = 10


def _tun_available() -> bool:
    try:
        fd = os.open(netdev.TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


@pytest.fixture
def ns() -> Iterator[str]:
    """A fresh network namespace, deleted after the test."""
    skip_unless_netns()
    if not _tun_available():
        pytest.skip(f"{netdev.TUN_DEVICE} cannot be opened here")
    with netns("gk-test") as name:
        yield name


class FdCloser:
    """Closes every registered descriptor at teardown."""

    def __init__(self) -> None:
        self.fds: list[int] = []

    def add(self, fd: int) -> int:
        self.fds.append(fd)
        return fd

    def close(self, fd: int) -> None:
        self.fds.remove(fd)
        os.close(fd)


@pytest.fixture
def fds() -> Iterator[FdCloser]:
    closer = FdCloser()
    try:
        yield closer
    finally:
        for fd in closer.fds:
            with contextlib.suppress(OSError):
                os.close(fd)


def _tun_flags(ns: str, name: str) -> int:
    return int(ns_read(ns, f"/sys/class/net/{name}/tun_flags").strip(), 16)


def test_open_tap_with_vnet_hdr(ns: str, fds: FdCloser) -> None:
    fd, name = netdev.open_tap(vnet_hdr=True, netns=ns)
    fds.add(fd)
    assert name.startswith("gnt.tap")
    assert netdev.tap_exists(name, netns=ns)
    assert not netdev.tap_exists(name), "the device leaked into the host namespace"
    flags = _tun_flags(ns, name)
    assert flags & netdev.IFF_TAP and flags & netdev.IFF_NO_PI
    assert flags & netdev.IFF_VNET_HDR
    assert netdev.tap_info(fd) == (name, flags)
    assert "vnet_hdr on" in ns_ip(ns, "-d", "link", "show", "dev", name).stdout


def test_open_tap_without_vnet_hdr(ns: str, fds: FdCloser) -> None:
    fd, name = netdev.open_tap(vnet_hdr=False, netns=ns)
    fds.add(fd)
    flags = _tun_flags(ns, name)
    assert flags & netdev.IFF_TAP
    assert not flags & netdev.IFF_VNET_HDR
    assert not netdev.tap_info(fd)[1] & netdev.IFF_VNET_HDR


def test_fd_is_close_on_exec(ns: str, fds: FdCloser) -> None:
    fd = fds.add(netdev.open_tap(netns=ns)[0])
    assert not os.get_inheritable(fd)


def test_open_in_host_namespace_then_move(ns: str, fds: FdCloser) -> None:
    """The default (no netns) path, moved out of the host namespace at once.

    The device lives in the host namespace only between the two calls; the
    descriptor keeps working after the move.
    """
    fd, name = netdev.open_tap("gk.mv%d", vnet_hdr=True)
    fds.add(fd)
    try:
        run([IP, "link", "set", "dev", name, "netns", ns])
    finally:
        if netdev.tap_exists(name):  # the move failed: do not leave it behind
            fds.close(fd)
    assert not netdev.tap_exists(name)
    assert netdev.tap_exists(name, netns=ns)
    assert netdev.tap_info(fd)[0] == name
    assert _tun_flags(ns, name) & netdev.IFF_VNET_HDR
    ns_ip(ns, "link", "set", "dev", name, "up")
    # A broadcast ARP frame behind an empty 10-byte virtio-net header.
    frame = bytes(VIRTIO_NET_HDR_SIZE) + b"\xff" * 6 + b"\x02" + bytes(5) + b"\x08\x06" + bytes(28)
    assert os.write(fd, frame) == len(frame)
    stats = json.loads(ns_ip(ns, "-s", "-j", "link", "show", "dev", name).stdout)
    assert stats[0]["stats64"]["rx"]["packets"] == 1
    fds.close(fd)
    assert not netdev.tap_exists(name, netns=ns)


def test_given_name_and_template(ns: str, fds: FdCloser) -> None:
    fd, name = netdev.open_tap("gk.fixed", netns=ns)
    fds.add(fd)
    assert name == "gk.fixed"
    fd1, first = netdev.open_tap("gk.t%d", netns=ns)
    fds.add(fd1)
    fd2, second = netdev.open_tap("gk.t%d", netns=ns)
    fds.add(fd2)
    assert {first, second} == {"gk.t0", "gk.t1"}


def test_name_in_use_fails(ns: str, fds: FdCloser) -> None:
    fds.add(netdev.open_tap("gk.busy", netns=ns)[0])
    with pytest.raises(errors.HypervisorError, match=r"/dev/net/tun.*busy"):
        netdev.open_tap("gk.busy", netns=ns)


def test_close_removes_tap(ns: str, fds: FdCloser) -> None:
    fd, name = netdev.open_tap(netns=ns)
    fds.add(fd)
    assert netdev.tap_exists(name, netns=ns)
    fds.close(fd)
    assert not netdev.tap_exists(name, netns=ns)


def test_probe_vnet_hdr_on_unattached_fd() -> None:
    if not _tun_available():
        pytest.skip(f"{netdev.TUN_DEVICE} cannot be opened here")
    fd = os.open(netdev.TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    try:
        assert netdev.probe_vnet_hdr(fd) is True
    finally:
        os.close(fd)


def test_probe_vnet_hdr_not_a_tun_fd(tmp_path: Path) -> None:
    with open(tmp_path / "f", "wb") as handle:
        assert netdev.probe_vnet_hdr(handle.fileno()) is False


@pytest.mark.parametrize("bad", [
    "a" * 16, "bad name", "bad/name", "bad:name", "..", ".", "tap%s", "t%d%d", "tä",
    "tab\tx", "nl\n",
])
def test_bad_names(bad: str) -> None:
    with pytest.raises(errors.HypervisorError, match="Invalid TAP device name"):
        netdev.open_tap(bad)
    assert not netdev.tap_exists(bad)


def test_fifteen_byte_name_is_fine() -> None:
    netdev.validate_tap_name("a" * 15)


def test_missing_namespace() -> None:
    with pytest.raises(errors.HypervisorError, match="ip netns add"):
        netdev.open_tap(netns="gk-test-does-not-exist")
    with pytest.raises(errors.HypervisorError, match="Invalid network namespace"):
        netdev.open_tap(netns="../etc")


def test_other_threads_stay_in_their_namespace(ns: str, fds: FdCloser) -> None:
    before = os.readlink("/proc/thread-self/ns/net")
    seen: list[str] = []
    stop = threading.Event()

    def watcher() -> None:
        while not stop.is_set():
            seen.append(os.readlink("/proc/thread-self/ns/net"))
            stop.wait(0.001)

    thread = threading.Thread(target=watcher)
    thread.start()
    try:
        for _ in range(5):
            fds.add(netdev.open_tap(netns=ns)[0])
    finally:
        stop.set()
        thread.join(5)
    assert os.readlink("/proc/thread-self/ns/net") == before
    assert set(seen) == {before}


@pytest.mark.parametrize("nic_type, expected", [
    ("paravirtual", True), ("virtio-net-pci", True), ("e1000", False),
    ("rtl8139", False), ("ne2k_pci", False), ("i82551", False),
])
def test_wants_vnet_hdr(nic_type: str, expected: bool) -> None:
    assert netdev.wants_vnet_hdr(nic_type) is expected
