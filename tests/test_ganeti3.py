"""The Ganeti 3.x adapter in this process (Ganeti itself need not be importable).

What needs Ganeti's own modules (members, signatures, PARAMETERS against
Ganeti's, Ganeti's objects) is in tests/test_ganeti3_ganeti.py.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

import pytest

from ganeti_kvm import constants as c
from ganeti_kvm import errors
from ganeti_kvm.ganeti3 import KVMHypervisor, _ganeti, migration, params
from tests.helpers import free_port, g3_instance

POLL_BOUND = 120.0  # seconds a test polls a migration at most


def g3_hvparams(qemu_bin: str, **overrides: Any) -> dict[str, Any]:
    """Ganeti 3 parameters of a guest-less VM (no kernel, no disk: it sits in the BIOS)."""
    hvp = dict(params.DEFAULTS, kvm_path=qemu_bin, kernel_path="", kvm_flag="disabled",
               serial_console=False, vhost_net=False)
    hvp.update(overrides)
    return hvp


# --- parameters ------------------------------------------------------------------


def test_every_key_has_a_check_and_a_default() -> None:
    assert set(KVMHypervisor.PARAMETERS) == set(params.DEFAULTS)
    assert len(params.DEFAULTS) == 65
    assert set(params.DEFAULTS) >= params.CORE_KEYS
    assert set(params.DEFAULTS) - params.CORE_KEYS == params.UNIMPLEMENTED
    assert frozenset() == params.UNIMPLEMENTED  # every key of Ganeti 3.0 and 3.1


def test_defaults_pass_the_syntax_check() -> None:
    KVMHypervisor.CheckParameterSyntax(dict(params.DEFAULTS))


@pytest.mark.parametrize("key", ["user_shutdown", "spice_ip_version", "spice_tls_ciphers"])
def test_a_non_default_value_of_an_unimplemented_key_is_refused(
        key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Every key of Ganeti 3.0 and 3.1 is implemented now: a bool, an int and a
    # string key are taken back for this check (a later Ganeti's new key).
    monkeypatch.setattr(params, "UNIMPLEMENTED", frozenset([key]))
    default = params.DEFAULTS[key]
    value: Any = (not default) if isinstance(default, bool) else \
        default + 1 if isinstance(default, int) else default + "1"
    with pytest.raises(errors.ParameterError, match=f"'{key}'.*does not implement") as info:
        params.check_implemented(dict(params.DEFAULTS, **{key: value}))
    assert info.value.name == key
    # The defaults themselves pass.
    params.check_implemented(dict(params.DEFAULTS))


def test_the_class_refuses_an_unimplemented_key_naming_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Every key may be implemented by now: one is taken back for this check.
    monkeypatch.setattr(params, "UNIMPLEMENTED", frozenset(["user_shutdown"]))
    hvp = dict(params.DEFAULTS, user_shutdown=True)
    with pytest.raises(_ganeti.HypervisorError, match="user_shutdown"):
        KVMHypervisor.CheckParameterSyntax(hvp)
    with pytest.raises(_ganeti.HypervisorError, match="user_shutdown"):
        KVMHypervisor.ValidateParameters(hvp)


def test_an_empty_value_matches_an_empty_default_only() -> None:
    assert params.is_default("vga", None) and params.is_default("vga", "")
    assert not params.is_default("cpu_mask", "")
    assert not params.is_default("vnet_hdr", 1)  # a bool key wants a bool


def test_the_core_gets_exactly_its_own_keys() -> None:
    core = params.to_core(dict(params.DEFAULTS, kvm_path="/usr/bin/qemu-system-x86_64"))
    assert set(core) == params.CORE_KEYS
    assert core[c.HV_KVM_PATH] == "/usr/bin/qemu-system-x86_64"


def test_a_shared_key_keeps_the_cores_checks() -> None:
    with pytest.raises(_ganeti.HypervisorError, match="security_domain"):
        KVMHypervisor.CheckParameterSyntax(dict(params.DEFAULTS, security_model="user"))


# --- hotplug (tests/test_hotplug.py has the rest) ---------------------------------------


def test_hotplug_on_a_stopped_instance_is_refused(short_dir: str) -> None:
    hv = KVMHypervisor(run_dir=os.path.join(short_dir, "run"))
    inst = g3_instance("hp1", dict(params.DEFAULTS))
    nic = {"mac": "52:54:00:00:00:01", "uuid": "u1",
           "nicparams": {"mode": "bridged", "link": "br0"}}
    calls = [lambda: hv.HotplugSupported(inst),
             lambda: hv.VerifyHotplugSupport(inst, "hotadd", "disk"),
             lambda: hv.HotAddDevice(inst, "nic", nic, None, 1),
             lambda: hv.HotDelDevice(inst, "nic", nic, None, 1),
             lambda: hv.HotModDevice(inst, "nic", nic, None, 1),
             lambda: hv.ResizeDisk(inst, {"uuid": "d1", "iv_name": "disk/0"}, 1 << 30)]
    for call in calls:
        with pytest.raises(_ganeti.HotplugError, match="instance hp1: it is not running"):
            call()


def test_errors_leave_as_ganetis_hypervisor_error(short_dir: str) -> None:
    hv = KVMHypervisor(run_dir=os.path.join(short_dir, "run"))
    with pytest.raises(_ganeti.HypervisorError, match="by name only"):
        hv.StopInstance(None, name="x1")
    with pytest.raises(_ganeti.HypervisorError) as info:
        hv.StartInstance(g3_instance("../evil", dict(params.DEFAULTS)), [], False)
    # With Ganeti, the library's error is the cause of Ganeti's; without, it is the error.
    library_error = info.value.__cause__ if _ganeti.HAVE_GANETI else info.value
    assert isinstance(library_error, errors.GenericError)


def test_ancillary_files_and_versions() -> None:
    assert KVMHypervisor.GetAncillaryFiles() == ([], [])
    assert KVMHypervisor.VersionsSafeForMigration([7, 2, 0], [10, 0, 0]) is True
    assert KVMHypervisor.AssessParameters(dict(params.DEFAULTS)) == []


# --- the migration: Ganeti's states over the core's steps, without QEMU --------------


@pytest.mark.parametrize("qemu, ganeti", [
    ("setup", "active"), ("active", "active"), ("pre-switchover", "active"),
    ("device", "active"), ("cancelling", "active"), ("completed", "completed"),
    ("failed", "failed"), ("cancelled", "cancelled"), ("none", "failed")])
def test_qemus_migration_states_map_onto_ganetis(qemu: str, ganeti: str) -> None:
    assert migration.ganeti_state(qemu) == ganeti


def test_get_migration_status_reports_the_cores_verdict(
        g3: KVMHypervisor, monkeypatch: pytest.MonkeyPatch) -> None:
    from ganeti_kvm.core import migration as core

    verdict = core.MigrationStatus(status="failed", transferred=30, total=100,
                                   error="the migration made no progress for 30 s")
    polled: list[tuple[str, float]] = []

    def poll(node: Any, name: str, wait: float) -> core.MigrationStatus:
        polled.append((name, wait))
        return verdict

    monkeypatch.setattr(core, "poll", poll)
    status = g3.GetMigrationStatus({"name": "m1"})
    # It waits for the end, so that Ganeti's master sees it when it happens.
    assert polled == [("m1", migration.STATUS_WAIT)] and migration.STATUS_WAIT > 1
    assert (status.status, status.transferred_ram, status.total_ram) == ("failed", 30, 100)


# --- real QEMU ------------------------------------------------------------------------


def test_start_list_info_stop(g3: KVMHypervisor, qemu_bin: str) -> None:
    hvp = g3_hvparams(qemu_bin)
    inst = g3_instance("g3a", hvp)
    g3.StartInstance(inst, [], True)
    assert g3.ListInstances(hvparams=hvp) == ["g3a"]
    info = g3.GetInstanceInfo("g3a", hvparams=hvp)
    assert info is not None
    name, pid, memory, vcpus, state, times = info
    assert (name, memory, vcpus, state) == ("g3a", 64, 1, _ganeti.HvInstanceState.RUNNING)
    assert pid == g3.node.running_pid("g3a") and isinstance(times, int)
    assert g3.GetAllInstancesInfo(hvparams=hvp) == [info]
    assert g3.VerifyInstance(inst) is True
    assert "hv_version" in g3.GetNodeInfo(hvparams=hvp)
    assert g3.Verify(hvparams=hvp) is None
    g3.StopInstance(inst, force=True)
    assert g3.ListInstances(hvparams=hvp) == []
    assert g3.GetInstanceInfo("g3a", hvparams=hvp) is None
    g3.CleanupInstance("g3a")


def test_acpi_stop_returns_at_once_for_ganetis_poll(g3: KVMHypervisor, qemu_bin: str) -> None:
    inst = g3_instance("g3b", g3_hvparams(qemu_bin))
    g3.StartInstance(inst, [], False)
    # A running guest-less VM ignores the power button: Ganeti 3's backend
    # polls and then forces the stop; StopInstance itself must not wait.
    g3.StopInstance(inst, retry=False, timeout=5)
    assert g3.ListInstances() == ["g3b"]
    g3.StopInstance(inst, force=True)
    assert g3.ListInstances() == []


def _poll(hv: KVMHypervisor, inst: Any) -> Any:
    deadline = time.monotonic() + POLL_BOUND
    while True:
        status = hv.GetMigrationStatus(inst)
        if status.status != "active":
            return status
        assert time.monotonic() < deadline, "the migration is still active"
        time.sleep(0.05)


def test_asynchronous_migration(g3_nodes: tuple[KVMHypervisor, KVMHypervisor],
                                qemu_bin: str) -> None:
    source, target = g3_nodes
    inst = g3_instance("g3m", g3_hvparams(qemu_bin, migration_port=free_port()))
    source.StartInstance(inst, [], False)
    info = source.MigrationInfo(inst)
    target.AcceptInstance(inst, info, "127.0.0.1")
    source.MigrateInstance("cluster1", inst, "127.0.0.1", True)
    status = _poll(source, inst)
    assert status.status == "completed", status
    # As Ganeti does: the source QEMU stays until FinalizeMigrationSource.
    assert source.ListInstances() == ["g3m"]
    source.FinalizeMigrationSource(inst, True, True)
    target.FinalizeMigrationDst(inst, info, True)
    assert source.ListInstances() == []
    assert target.ListInstances() == ["g3m"]
    assert target.node.qmp("g3m", "query-status")["status"] == "running"


def test_a_stalled_migration_is_cancelled_and_the_source_runs_on(
        g3_nodes: tuple[KVMHypervisor, KVMHypervisor], qemu_bin: str) -> None:
    source, _ = g3_nodes
    with socket.socket() as sink:  # takes the connection, never reads a byte
        sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sink.bind(("127.0.0.1", 0))
        sink.listen(1)
        port = sink.getsockname()[1]
        inst = g3_instance("g3s", g3_hvparams(qemu_bin, migration_port=port,
                                              migration_bandwidth=1000))
        # Untouched RAM still costs a few bytes a page on the wire: 4 GiB make
        # a stream larger than the socket buffers, so it stalls.
        inst["beparams"].update(maxmem=4096, minmem=4096)
        source.StartInstance(inst, [], False)
        migration.start(source.node, "g3s", "127.0.0.1", live=True, stall_timeout=1.0)
        status = _poll(source, inst)
        assert status.status == "failed"
        source.FinalizeMigrationSource(inst, False, True)
    assert source.node.qmp("g3s", "query-status")["status"] == "running"
    assert source.node.qmp("g3s", "query-migrate")["status"] == "cancelled"
    assert not os.path.exists(source.node.paths("g3s").migration_state)


def test_a_stop_and_a_cleanup_remove_the_migration_state(g3: KVMHypervisor,
                                                        qemu_bin: str) -> None:
    state_file = g3.node.paths("g3c").migration_state
    with socket.socket() as sink:  # takes the connection, never reads a byte
        sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sink.bind(("127.0.0.1", 0))
        sink.listen(1)
        inst = g3_instance("g3c", g3_hvparams(qemu_bin, migration_port=sink.getsockname()[1]))
        inst["beparams"].update(maxmem=4096, minmem=4096)
        g3.StartInstance(inst, [], False)
        g3.MigrateInstance("cluster1", inst, "127.0.0.1", True)
        assert os.path.exists(state_file)
        assert g3.GetMigrationStatus(inst).status == "active"
        g3.StopInstance(inst, force=True)
    assert not os.path.exists(state_file)
    with open(state_file, "w", encoding="utf-8") as handle:  # left by a crash
        handle.write("{}")
    g3.CleanupInstance("g3c")
    assert not os.path.exists(state_file)


def test_a_migration_to_nowhere_fails_and_the_source_runs_on(
        g3_nodes: tuple[KVMHypervisor, KVMHypervisor], qemu_bin: str) -> None:
    source, _ = g3_nodes
    inst = g3_instance("g3n", g3_hvparams(qemu_bin, migration_port=free_port(),
                                          migration_mode="non-live"))
    source.StartInstance(inst, [], False)
    source.MigrateInstance("cluster1", inst, "127.0.0.1", False)
    assert _poll(source, inst).status == "failed"
    source.FinalizeMigrationSource(inst, False, False)
    assert source.node.qmp("g3n", "query-status")["status"] == "running"
