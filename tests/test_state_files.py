"""The run directory holds nothing of a stopped instance, and odd files there are named.

Lock files go with their lock; CleanupInstance, a failed start and a
migration away leave no entry of the instance behind; a directory where a
socket, pidfile, record, lock or uid file belongs is a HypervisorError
naming the path, and the other instances are still listed.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from ganeti_kvm import errors, objects
from ganeti_kvm.core import runtime
from ganeti_kvm.core.node import KvmNode
from ganeti_kvm.host import fsutil, locking, process, uidpool
from ganeti_kvm.hv_kvm import KVMHypervisor
from tests.helpers import guest_hvparams, make_instance


def entries_of(root: str, name: str) -> list[str]:
    """Every path under ``root`` whose name mentions instance ``name``."""
    found = []
    for directory, dirs, files in os.walk(root):
        for entry in dirs + files:
            if name in entry:
                found.append(os.path.join(directory, entry))
    return sorted(found)


# --- locks ------------------------------------------------------------------------


def test_lock_file_goes_with_the_lock(tmp_path) -> None:
    node = KvmNode(str(tmp_path / "run"))
    with node.locked("web1", "test") as paths:
        assert os.path.exists(paths.lock_file)
    assert not os.path.exists(paths.lock_file)
    with pytest.raises(RuntimeError), node.locked("web1", "test"):
        raise RuntimeError("the body failed")
    assert os.listdir(node.layout.lock_dir) == []


def test_shared_lock_file_stays(tmp_path) -> None:
    path = str(tmp_path / ".lock")
    with locking.file_lock(path, 1.0, lambda: errors.HypervisorError("busy")):
        pass
    assert os.path.exists(path)


def test_lock_is_exclusive_while_its_file_comes_and_goes(tmp_path) -> None:
    """Threads take the lock over and over: never two inside, no file left."""
    node = KvmNode(str(tmp_path / "run"))
    inside = []
    overlaps = []
    rounds = []

    def worker() -> None:
        for _ in range(150):
            with node.locked("web1", "test"):
                inside.append(1)
                if len(inside) > 1:
                    overlaps.append(len(inside))
                time.sleep(0)
                inside.pop()
                rounds.append(1)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert len(rounds) == 6 * 150
    assert overlaps == []
    assert os.listdir(node.layout.lock_dir) == []


def test_a_waiter_on_a_removed_lock_file_starts_over(tmp_path) -> None:
    """The holder removes the file while a waiter has it open: the waiter must
    lock the file now at the path, which a third party may hold."""
    path = str(tmp_path / "web1.lock")
    busy = lambda: errors.InstanceBusy("busy")  # noqa: E731
    order = []
    with locking.file_lock(path, 5, busy, remove=True):
        waiter_has_it = threading.Event()

        def waiter() -> None:
            with locking.file_lock(path, 5, busy, remove=True):
                order.append("waiter")
                waiter_has_it.set()

        thread = threading.Thread(target=waiter)
        thread.start()
        time.sleep(0.1)  # the waiter has opened the file and polls its flock
        order.append("holder")
    # The first holder removed the file and released it; whoever comes next
    # holds a new file, and the waiter still gets the lock.
    assert waiter_has_it.wait(10)
    thread.join(10)
    assert order == ["holder", "waiter"]
    assert not os.path.exists(path)


def test_lock_timeout_is_instance_busy_and_leaves_the_holders_file(tmp_path) -> None:
    node = KvmNode(str(tmp_path / "run"))
    with node.locked("web1", "test") as paths:
        with pytest.raises(errors.InstanceBusy, match="web1"), \
                node.locked("web1", "start", timeout=0.1):
            pass
        assert os.path.exists(paths.lock_file)


@pytest.mark.parametrize("make", ["dir", "symlink"])
def test_something_in_place_of_the_lock_file(tmp_path, make) -> None:
    node = KvmNode(str(tmp_path / "run"))
    node.ensure_dirs()
    lock_file = node.paths("web1").lock_file
    if make == "dir":
        os.mkdir(lock_file)
    else:
        os.symlink(str(tmp_path / "elsewhere"), lock_file)
    with pytest.raises(errors.HypervisorError, match=f"lock file {lock_file}.*move|remove"):
        node.cleanup("web1")
    assert not os.path.exists(tmp_path / "elsewhere")


# --- leftovers of a stopped instance ------------------------------------------------


def test_cleanup_removes_every_entry_of_the_instance(tmp_path) -> None:
    node = KvmNode(str(tmp_path / "run"), uid_pool="2000-2001")
    node.ensure_dirs()
    paths = node.paths("web1")
    for path in paths.runtime_files():
        open(path, "w").close()
    os.makedirs(paths.chroot)
    # a record write that a crash interrupted
    open(os.path.join(node.layout.conf_dir, ".web1.runtime.x1y2z3"), "w").close()
    # the 2011 driver's files: TAP names, keymap, uid file
    os.makedirs(os.path.join(node.layout.root, "nic", "web1"))
    open(os.path.join(node.layout.root, "nic", "web1", "0"), "w").close()
    os.makedirs(os.path.join(node.layout.root, "keymap"))
    open(os.path.join(node.layout.root, "keymap", "web1"), "w").close()
    open(os.path.join(node.layout.uid_dir, "web1"), "w").close()
    # a pool uid whose record is gone (unreadable record): found by its owner
    pool = uidpool.UidPool(node.layout.uid_dir, uidpool.parse_uid_pool("2000-2001"))
    uid = pool.request("web1")
    other = pool.request("web2")
    with open(paths.runtime_file, "w") as handle:
        handle.write("{corrupt")
    node.cleanup("web1")
    assert entries_of(node.layout.root, "web1") == []
    assert pool.allocated() == {other: "web2"} and uid != other


def test_pool_uid_is_freed_without_a_configured_pool(tmp_path) -> None:
    run = str(tmp_path / "run")
    pool = uidpool.UidPool(os.path.join(run, "uid"), [(3000, 3000)])
    uid = pool.request("web1")
    record = runtime.RuntimeRecord(name="web1", argv=["kvm"], uid=uid)
    node = KvmNode(run)  # made without uid_pool: the uid must still go
    node.ensure_dirs()
    runtime.save(node.paths("web1").runtime_file, record)
    node.cleanup("web1")
    assert pool.allocated() == {}


def test_all_digit_names_keep_the_pool_records(tmp_path) -> None:
    node = KvmNode(str(tmp_path / "run"))
    pool = uidpool.UidPool(node.layout.uid_dir, [(1000, 1000)])
    assert pool.request("web7") == 1000
    node.cleanup("1000")  # "uid/1000" is the pool's record, not a 2011 uid file
    assert pool.allocated() == {1000: "web7"}


# --- something where a file of ours belongs ----------------------------------------


def test_directories_in_place_of_files_are_named(tmp_path) -> None:
    node = KvmNode(str(tmp_path / "run"))
    node.ensure_dirs()
    paths = node.paths("web1")
    for path in (paths.pidfile, paths.qmp_socket, paths.runtime_file):
        os.mkdir(path)
        with pytest.raises(errors.HypervisorError, match=path) as info:
            node.cleanup("web1")
        assert not isinstance(info.value, OSError)
        assert "directory" in str(info.value)
        os.rmdir(path)
    node.cleanup("web1")
    assert entries_of(node.layout.root, "web1") == []


def test_a_file_in_place_of_the_chroot(tmp_path) -> None:
    node = KvmNode(str(tmp_path / "run"))
    node.ensure_dirs()
    paths = node.paths("web1")
    with open(paths.chroot, "w") as handle:
        handle.write("not a directory")
    with pytest.raises(errors.HypervisorError, match=f"chroot {paths.chroot} .*not a directory"):
        node.cleanup("web1")
    assert os.path.isfile(paths.chroot)  # not quarantined: it is not a chroot
    assert os.listdir(node.layout.quarantine_dir) == []


def test_a_directory_in_place_of_a_pool_uid_record(tmp_path) -> None:
    node = KvmNode(str(tmp_path / "run"), uid_pool="4000")
    node.ensure_dirs()
    os.mkdir(os.path.join(node.layout.uid_dir, "4000"))
    with pytest.raises(errors.HypervisorError, match=os.path.join(node.layout.uid_dir, "4000")):
        node.cleanup("web1")


def test_pid_dir_that_is_not_a_directory(tmp_path) -> None:
    node = KvmNode(str(tmp_path / "run"))
    os.makedirs(node.layout.root)
    open(node.layout.pid_dir, "w").close()
    with pytest.raises(errors.HypervisorError, match=node.layout.pid_dir):
        node.list_names()


# --- real QEMU ---------------------------------------------------------------------


def test_listing_survives_a_directory_pidfile_and_start_names_it(hv, qemu_bin, guest) -> None:
    inst = make_instance("good1", guest_hvparams(qemu_bin, guest))
    hv.StartInstance(inst, [], startup_paused=True)
    bad_pidfile = hv.node.paths("bad1").pidfile
    os.mkdir(bad_pidfile)
    assert hv.ListInstances() == ["good1"]
    assert [i[0] for i in hv.GetAllInstancesInfo()] == ["good1"]
    assert hv.GetInstanceInfo("bad1") is None
    bad = make_instance("bad1", guest_hvparams(qemu_bin, guest))
    with pytest.raises(errors.HypervisorError, match=bad_pidfile):
        hv.StartInstance(bad, [], startup_paused=True)
    with pytest.raises(errors.HypervisorError, match=bad_pidfile):
        hv.CleanupInstance("bad1")
    os.rmdir(bad_pidfile)
    qmp_dir = hv.node.paths("bad1").qmp_socket
    os.mkdir(qmp_dir)
    with pytest.raises(errors.HypervisorError, match=qmp_dir):
        hv.StartInstance(bad, [], startup_paused=True)
    os.rmdir(qmp_dir)
    hv.StartInstance(bad, [], startup_paused=True)
    assert hv.ListInstances() == ["bad1", "good1"]


def test_failed_start_leaves_no_entry(hv, qemu_bin, guest) -> None:
    inst = make_instance("broken2", guest_hvparams(qemu_bin, guest))
    with pytest.raises(errors.QemuLaunchError):
        hv.StartInstance(inst, [(objects.Disk(mode="rw"), "/nonexistent/disk.raw")])
    assert entries_of(hv.node.layout.root, "broken2") == []


def test_hammering_start_and_cleanup_leaves_nothing(hv, qemu_bin, guest) -> None:
    """Threads start, stop and clean up one name at once: one QEMU at most at
    any time, every call ends in success or a HypervisorError, nothing left."""
    inst = make_instance("ham1", guest_hvparams(qemu_bin, guest))
    unexpected: list[BaseException] = []

    def worker(index: int) -> None:
        for round_ in range(3):
            try:
                if (index + round_) % 3 == 0:
                    hv.StartInstance(inst, [], startup_paused=True)
                elif (index + round_) % 3 == 1:
                    hv.CleanupInstance("ham1")
                else:
                    hv.StopInstance(None, force=True, name="ham1")
            except errors.HypervisorError as err:
                if "already running" not in str(err) and "still running" not in str(err):
                    unexpected.append(err)
            except BaseException as err:  # noqa: BLE001 - a bare OSError is the bug
                unexpected.append(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert unexpected == []
    hv.StopInstance(None, force=True, name="ham1")
    assert hv.ListInstances() == []
    assert entries_of(hv.node.layout.root, "ham1") == []


def test_migration_away_leaves_nothing_on_the_source(nodes, qemu_bin, guest) -> None:
    from tests.helpers import free_port

    source, target = nodes
    inst = make_instance("away1", guest_hvparams(qemu_bin, guest, migration_port=free_port(),
                                                 migration_bandwidth=1000))
    source.StartInstance(inst, [], startup_paused=True)
    pid = source.GetInstanceInfo("away1")[1]
    info = source.MigrationInfo(inst)
    target.AcceptInstance(inst, info, "127.0.0.1")
    source.MigrateInstance(inst, "127.0.0.1", True)
    target.FinalizeMigration(inst, info, True)
    assert not process.is_alive(pid)
    assert entries_of(source.node.layout.root, "away1") == []
    assert target.ListInstances() == ["away1"]
    target.StopInstance(None, force=True, name="away1")
    assert entries_of(target.node.layout.root, "away1") == []


def test_fsutil_names_what_it_could_not_remove(tmp_path) -> None:
    target = tmp_path / "sock"
    target.mkdir()
    with pytest.raises(errors.HypervisorError, match=str(target)):
        fsutil.remove_file(str(target))


def test_hypervisor_cleanup_of_a_never_seen_name_leaves_nothing(short_dir) -> None:
    hv = KVMHypervisor(run_dir=os.path.join(short_dir, "run"))
    hv.CleanupInstance("never1")
    assert entries_of(hv.node.layout.root, "never1") == []
