"""The per-instance QEMU log: QEMU's own words survive its daemonizing.

Real QEMU: a failed start quotes it, a migration target that exits after
it daemonized (a stream that is not a migration) is quoted where the
library reports it (finalize, stop, reboot), and cleanup removes the log.
"""

from __future__ import annotations

import logging
import os
import socket
import stat

import pytest

from ganeti_kvm import constants as c
from ganeti_kvm import errors, objects
from ganeti_kvm.host import process
from ganeti_kvm.hv_kvm import KVMHypervisor
from ganeti_kvm.qemu import log as qemulog
from tests.helpers import free_port, guest_hvparams, kill_instances, make_instance


def bare_hvparams(qemu_bin: str, **overrides: object) -> dict[str, object]:
    """A guest-less instance: no kernel, no serial console, TCG."""
    hvp = dict(c.HVC_DEFAULTS[c.HT_KVM], kvm_path=qemu_bin, kernel_path="",
               serial_console=False, kvm_flag="disabled")
    hvp.update(overrides)
    return hvp


# --- the module, without QEMU ------------------------------------------------------

def test_prepare_empties_the_log_with_mode_0600(tmp_path) -> None:
    path = tmp_path / "i.log"
    path.write_text("an old run\n")
    path.chmod(0o644)
    qemulog.prepare(str(path))
    assert path.read_bytes() == b""
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_prepare_refuses_a_symlink(tmp_path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("keep me\n")
    (tmp_path / "i.log").symlink_to(target)
    with pytest.raises(OSError):
        qemulog.prepare(str(tmp_path / "i.log"))
    assert target.read_text() == "keep me\n"


def test_tail_reads_only_the_end(tmp_path) -> None:
    path = tmp_path / "i.log"
    path.write_text("".join(f"line {n}\n" for n in range(100_000)))
    said = qemulog.tail(str(path), max_bytes=200, max_lines=3)
    assert said == "line 99997\nline 99998\nline 99999"
    assert qemulog.tail(str(tmp_path / "missing.log")) == ""
    assert qemulog.quote(str(tmp_path / "missing.log")) == ""


# --- real QEMU -------------------------------------------------------------------

def test_failed_start_quotes_the_log_and_removes_it(hv, qemu_bin) -> None:
    inst = make_instance("logfail1", bare_hvparams(qemu_bin), memory=64)
    ipaths = hv.node.paths("logfail1")
    hv.node.ensure_dirs()
    with open(ipaths.qemu_log, "w", encoding="utf-8") as handle:
        handle.write("words of an earlier run\n")
    with pytest.raises(errors.QemuLaunchError) as info:
        hv.StartInstance(inst, [(objects.Disk(mode="rw"), "/nonexistent/log-disk.raw")])
    # QEMU wrote this to the -D log, not to the stderr we read
    assert "/nonexistent/log-disk.raw" in str(info.value)
    assert "/nonexistent/log-disk.raw" in info.value.stderr
    assert "earlier run" not in str(info.value)
    assert not os.path.exists(ipaths.qemu_log)


def test_running_instance_has_a_private_log(hv, qemu_bin) -> None:
    inst = make_instance("logrun1", bare_hvparams(qemu_bin), memory=64)
    hv.StartInstance(inst, [], startup_paused=True)
    ipaths = hv.node.paths("logrun1")
    mode = os.stat(ipaths.qemu_log).st_mode
    assert stat.S_ISREG(mode) and stat.S_IMODE(mode) == 0o600
    pid = hv.node.running_pid("logrun1")
    assert pid is not None
    # stderr of the daemonized QEMU is the log, not /dev/null
    assert os.readlink(f"/proc/{pid}/fd/2") == ipaths.qemu_log
    hv.StopInstance(inst, force=True)
    assert not os.path.exists(ipaths.qemu_log)


def test_log_survives_dropping_privileges_and_chroot(short_dir, qemu_bin) -> None:
    """QEMU opens the -D log as root before it drops to the pool uid and chroots."""
    hv = KVMHypervisor(run_dir=os.path.join(short_dir, "run"), uid_pool="61010-61011")
    inst = make_instance("logiso1", bare_hvparams(qemu_bin, security_model="pool",
                                                  use_chroot=True), memory=64)
    try:
        hv.StartInstance(inst, [], startup_paused=True)
        ipaths = hv.node.paths("logiso1")
        pid = hv.node.running_pid("logiso1")
        assert pid is not None
        assert os.stat(f"/proc/{pid}").st_uid in (61010, 61011)
        assert os.readlink(f"/proc/{pid}/fd/2") == ipaths.qemu_log
        info = os.stat(ipaths.qemu_log)
        assert info.st_uid == 0 and stat.S_IMODE(info.st_mode) == 0o600
        assert process.terminate(pid)
        assert "terminating on signal 15" in qemulog.tail(ipaths.qemu_log)
    finally:
        kill_instances(hv.node.layout.root)
        hv.CleanupInstance("logiso1")


def break_incoming(port: int) -> None:
    """Feed the waiting target a stream that is not a migration: QEMU exits."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"this is not a migration stream\n" * 8)


def dead_target(target: KVMHypervisor, source: KVMHypervisor, qemu_bin: str,
                name: str) -> tuple[objects.Instance, str]:
    """Accept ``name`` on ``target`` and make its QEMU fail after it daemonized."""
    port = free_port()
    inst = make_instance(name, bare_hvparams(qemu_bin, migration_port=port), memory=64)
    source.StartInstance(inst, [], startup_paused=True)
    info = source.MigrationInfo(inst)
    target.AcceptInstance(inst, info, "127.0.0.1")
    pid = target.node.running_pid(name)
    assert pid is not None
    break_incoming(port)
    assert process.wait_gone(pid, 30)
    return inst, info


def test_migration_target_that_exits_is_quoted_at_finalize(nodes, qemu_bin) -> None:
    source, target = nodes
    inst, migration_info = dead_target(target, source, qemu_bin, "logmig1")
    with pytest.raises(errors.MigrationError) as info:
        target.FinalizeMigration(inst, migration_info, success=True)
    assert "load of migration failed" in str(info.value)


def test_instance_found_dead_is_quoted_at_reboot_and_stop(nodes, qemu_bin, caplog) -> None:
    source, target = nodes
    inst, _ = dead_target(target, source, qemu_bin, "logmig2")
    with pytest.raises(errors.InstanceNotRunning) as info:
        target.RebootInstance(inst)
    assert "load of migration failed" in str(info.value)
    ipaths = target.node.paths("logmig2")
    with caplog.at_level(logging.WARNING, logger="ganeti_kvm"):
        target.StopInstance(None, force=True, name="logmig2")
    assert any("load of migration failed" in r.getMessage() for r in caplog.records)
    assert not os.path.exists(ipaths.qemu_log)


def test_cleanup_of_a_dead_instance_quotes_and_removes_its_log(nodes, qemu_bin, caplog) -> None:
    source, target = nodes
    dead_target(target, source, qemu_bin, "logmig3")
    ipaths = target.node.paths("logmig3")
    with caplog.at_level(logging.WARNING, logger="ganeti_kvm"):
        target.CleanupInstance("logmig3")
    assert any("load of migration failed" in r.getMessage() for r in caplog.records)
    for leftover in ipaths.runtime_files() + [ipaths.runtime_file]:
        assert not os.path.exists(leftover), leftover


def test_sigterm_message_after_daemonizing_reaches_the_log(hv, qemu_bin, guest) -> None:
    inst = make_instance("logterm1", guest_hvparams(qemu_bin, guest), memory=64)
    hv.StartInstance(inst, [], startup_paused=True)
    pid = hv.node.running_pid("logterm1")
    assert pid is not None
    assert process.terminate(pid)
    assert "terminating on signal 15" in qemulog.tail(hv.node.paths("logterm1").qemu_log)
