"""Isolation for real: security models user and pool, chroot, quarantine, mem_path.

Every instance here starts paused (no guest output is needed) on both QEMUs.
"""

from __future__ import annotations

import logging
import os
import pwd
import random
import re
import signal
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from ganeti_kvm import constants as c
from ganeti_kvm import errors
from ganeti_kvm.host import process, uidpool
from ganeti_kvm.hv_kvm import KVMHypervisor
from tests.helpers import kill_instances, make_instance


def base_hvparams(qemu_bin: str, **overrides: Any) -> dict[str, Any]:
    """No kernel, no disk, TCG: enough for a paused start."""
    hvp = dict(c.HVC_DEFAULTS[c.HT_KVM], kvm_path=qemu_bin, kernel_path="", root_path="",
               kvm_flag="disabled")
    hvp.update(overrides)
    return hvp


def free_uid_pair() -> tuple[int, int]:
    """Two consecutive uids that no process uses and no user has (random, to stay clear
    of other test runs on the same machine)."""
    used = uidpool.uids_in_use()
    for _ in range(200):
        low = random.randrange(42001, 60000)
        pair = (low, low + 1)
        if any(uid in used for uid in pair):
            continue
        try:
            for uid in pair:
                pwd.getpwuid(uid)
        except KeyError:
            return pair
    raise AssertionError("no two free uids found")


def uid_line(pid: int) -> list[int]:
    """Real, effective, saved and filesystem uid of ``pid``."""
    with open(f"/proc/{pid}/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("Uid:"):
                return [int(v) for v in line.split()[1:]]
    raise AssertionError(f"no Uid: line for {pid}")


def qemu_pid(hv: KVMHypervisor, name: str) -> int:
    pid = hv.node.running_pid(name)
    assert pid is not None, f"{name} is not running"
    return pid


def assert_no_instance_files(hv: KVMHypervisor, name: str) -> None:
    ipaths = hv.node.paths(name)
    for leftover in ipaths.runtime_files() + [ipaths.runtime_file]:
        assert not os.path.exists(leftover), leftover
    assert hv.node.running_pid(name) is None


@pytest.fixture
def uids() -> tuple[int, int]:
    return free_uid_pair()


@pytest.fixture
def pool_hv(short_dir: str, uids: tuple[int, int]) -> Iterator[KVMHypervisor]:
    hypervisor = KVMHypervisor(run_dir=os.path.join(short_dir, "run"),
                               uid_pool=f"{uids[0]}-{uids[1]}")
    try:
        yield hypervisor
    finally:
        kill_instances(hypervisor.node.layout.root)


def pool_of(hv: KVMHypervisor) -> uidpool.UidPool:
    return hv.node._uid_pool()


# --- security model user ------------------------------------------------------


def test_security_model_user_runs_qemu_as_that_user(hv, qemu_bin) -> None:
    nobody = pwd.getpwnam("nobody").pw_uid
    hvp = base_hvparams(qemu_bin, security_model="user", security_domain="nobody")
    inst = make_instance("user1", hvp, memory=64)
    hv.StartInstance(inst, [], startup_paused=True)
    pid = qemu_pid(hv, "user1")
    real, effective, saved, fs = uid_line(pid)
    assert real == effective == saved == fs == nobody
    assert hv.node.qmp("user1", "query-status")["status"] == "prelaunch"
    hv.StopInstance(inst, force=True)
    assert not process.is_alive(pid)
    assert_no_instance_files(hv, "user1")


# --- security model pool ------------------------------------------------------


def test_security_model_pool_allocates_and_releases_uids(pool_hv, qemu_bin, uids) -> None:
    hv = pool_hv
    hvp = base_hvparams(qemu_bin, security_model="pool")
    first = make_instance("pool1", hvp, memory=64)
    second = make_instance("pool2", hvp, memory=64)
    third = make_instance("pool3", hvp, memory=64)

    hv.StartInstance(first, [], startup_paused=True)
    uid1 = hv.node.load_record("pool1").uid
    assert uid1 in uids
    assert uid_line(qemu_pid(hv, "pool1")) == [uid1] * 4
    assert pool_of(hv).allocated() == {uid1: "pool1"}

    hv.StartInstance(second, [], startup_paused=True)
    uid2 = hv.node.load_record("pool2").uid
    assert {uid1, uid2} == set(uids)
    assert uid_line(qemu_pid(hv, "pool2")) == [uid2] * 4
    assert pool_of(hv).allocated() == {uid1: "pool1", uid2: "pool2"}

    # The pool is exhausted: a clear error, nothing left behind.
    with pytest.raises(errors.HypervisorError, match="no free uid") as info:
        hv.StartInstance(third, [], startup_paused=True)
    assert f"{uids[0]}-{uids[1]}" in str(info.value)
    assert_no_instance_files(hv, "pool3")
    assert sorted(hv.ListInstances()) == ["pool1", "pool2"]
    assert pool_of(hv).allocated() == {uid1: "pool1", uid2: "pool2"}

    # A forced stop gives the uid back, and the third instance gets it.
    pid1 = qemu_pid(hv, "pool1")
    hv.StopInstance(first, force=True)
    assert not process.is_alive(pid1)
    assert uid1 not in pool_of(hv).allocated()
    assert_no_instance_files(hv, "pool1")
    hv.StartInstance(third, [], startup_paused=True)
    assert hv.node.load_record("pool3").uid == uid1
    assert uid_line(qemu_pid(hv, "pool3")) == [uid1] * 4
    assert pool_of(hv).allocated() == {uid1: "pool3", uid2: "pool2"}

    # Killed behind our back: CleanupInstance releases the uid.
    pid2 = qemu_pid(hv, "pool2")
    os.kill(pid2, signal.SIGKILL)
    assert process.wait_gone(pid2, 10)
    assert hv.ListInstances() == ["pool3"]
    assert pool_of(hv).allocated() == {uid1: "pool3", uid2: "pool2"}  # not yet
    hv.CleanupInstance("pool2")
    assert pool_of(hv).allocated() == {uid1: "pool3"}
    assert_no_instance_files(hv, "pool2")

    hv.StopInstance(third, force=True)
    assert pool_of(hv).allocated() == {}
    assert hv.ListInstances() == []


def test_simultaneous_pool_starts_never_share_a_uid(pool_hv, qemu_bin, uids) -> None:
    hv = pool_hv
    hvp = base_hvparams(qemu_bin, security_model="pool")
    names = ["conc1", "conc2"]
    outcomes: dict[str, object] = {}
    barrier = threading.Barrier(len(names))

    def start(name: str) -> None:
        barrier.wait(10)
        try:
            hv.StartInstance(make_instance(name, hvp, memory=64), [], startup_paused=True)
            outcomes[name] = "started"
        except Exception as err:  # reported by the assertion below
            outcomes[name] = err

    threads = [threading.Thread(target=start, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    assert outcomes == dict.fromkeys(names, "started")
    record_uids = {name: hv.node.load_record(name).uid for name in names}
    assert set(record_uids.values()) == set(uids)
    for name in names:
        assert uid_line(qemu_pid(hv, name)) == [record_uids[name]] * 4
    assert pool_of(hv).allocated() == {uid: name for name, uid in record_uids.items()}


# --- chroot -------------------------------------------------------------------


def test_chroot_is_the_qemu_root_and_is_removed(hv, qemu_bin) -> None:
    inst = make_instance("chroot1", base_hvparams(qemu_bin, use_chroot=True), memory=64)
    hv.StartInstance(inst, [], startup_paused=True)
    chroot = hv.node.paths("chroot1").chroot
    pid = qemu_pid(hv, "chroot1")
    assert os.readlink(f"/proc/{pid}/root") == chroot
    assert os.path.isdir(chroot)
    assert hv.node.qmp("chroot1", "query-status")["status"] == "prelaunch"
    hv.StopInstance(inst, force=True)
    assert not process.is_alive(pid)
    assert not os.path.exists(chroot)
    assert os.listdir(hv.node.layout.quarantine_dir) == []


def test_non_empty_chroot_is_quarantined(hv, qemu_bin, caplog) -> None:
    inst = make_instance("chroot2", base_hvparams(qemu_bin, use_chroot=True), memory=64)
    hv.StartInstance(inst, [], startup_paused=True)
    chroot = hv.node.paths("chroot2").chroot
    pid = qemu_pid(hv, "chroot2")
    assert os.readlink(f"/proc/{pid}/root") == chroot
    with open(os.path.join(chroot, "evil"), "w") as handle:
        handle.write("left by a compromised QEMU\n")
    with caplog.at_level(logging.WARNING, logger="ganeti_kvm"):
        hv.StopInstance(inst, force=True)
    assert not process.is_alive(pid)
    assert not os.path.exists(chroot)
    quarantine = hv.node.layout.quarantine_dir
    entries = os.listdir(quarantine)
    assert len(entries) == 1, entries
    assert re.fullmatch(r"chroot2-\d{8}T\d{6}\.\d{6}Z", entries[0]), entries[0]
    moved = os.path.join(quarantine, entries[0])
    with open(os.path.join(moved, "evil"), encoding="utf-8") as handle:
        assert handle.read() == "left by a compromised QEMU\n"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING
                and "chroot2" in r.getMessage() and moved in r.getMessage()]
    assert warnings, [r.getMessage() for r in caplog.records]
    assert_no_instance_files(hv, "chroot2")


# --- mem_path -----------------------------------------------------------------


def test_mem_path_backs_guest_ram_with_a_file_there(hv, qemu_bin, short_dir) -> None:
    mem_dir = os.path.join(short_dir, "mem")
    os.mkdir(mem_dir)
    inst = make_instance("mem1", base_hvparams(qemu_bin, mem_path=mem_dir), memory=64)
    hv.StartInstance(inst, [], startup_paused=True)
    pid = qemu_pid(hv, "mem1")
    with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as handle:
        mapped = [line.split(None, 5)[-1].strip() for line in handle
                  if mem_dir + "/" in line]
    assert mapped, f"no file of {mem_dir} is mapped by QEMU {pid}"
    assert all(path.startswith(mem_dir + "/") for path in mapped), mapped
    hv.StopInstance(inst, force=True)
    assert not process.is_alive(pid)
