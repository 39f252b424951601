"""A rolling QEMU upgrade: the machine type is pinned at the first start and kept.

A guest started on QEMU 7.2 runs ``pc-i440fx-7.2``; a QEMU 10.0 target given
``-machine pc`` would build ``pc-i440fx-10.0`` and the migration would break
with "Broken pipe".  The type is recorded at the first start and used by every
later start (reboot, migration target), so 7.2 -> 10.0 and the rollback
10.0 -> 7.2 both work; a guest first started on 10.0 is refused by a 7.2
target before any QEMU starts there.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from typing import Any

import pytest

from ganeti_kvm import constants as c
from ganeti_kvm import errors
from ganeti_kvm.core import hardware, runtime
from ganeti_kvm.core import node as lifecycle
from ganeti_kvm.host.paths import RunDir
from ganeti_kvm.qemu import caps as qemu_caps
from ganeti_kvm.qmp.client import qmp_execute
from tests.helpers import SerialReader, guest_hvparams, make_instance
from tests.netns import IP
from tests.node_process import NodeProcess, instance_arg
from tests.test_migration_netns import SOURCE_IP, TARGET_IP, link  # noqa: F401 (fixture)
from tests.test_qemu_caps import outputs


def fixture_caps(version: str) -> qemu_caps.QemuCaps:
    """The capabilities of QEMU ``version`` from its recorded help texts."""
    return qemu_caps.build_caps("/usr/bin/kvm", outputs(version))


def machine_of(qmp_socket: str) -> str | None:
    """What the QEMU behind ``qmp_socket`` really emulates (QOM, not the probe)."""
    return qemu_caps.machine_from_qom_type(
        qmp_execute(qmp_socket, "qom-get", {"path": "/machine", "property": "type"}))


def qemu_major(qmp_socket: str) -> int:
    return int(qmp_execute(qmp_socket, "query-version")["qemu"]["major"])


def bare_hvparams(kvm_path: str, **overrides: Any) -> dict[str, Any]:
    """Parameters of a guest-less instance (no kernel, no disk): it waits paused."""
    hvp = dict(c.HVC_DEFAULTS[c.HT_KVM])
    hvp.update(kvm_path=kvm_path, kernel_path="", root_path="", kvm_flag="disabled",
               serial_console=False)
    hvp.update(overrides)
    return hvp


# --- the command line and the record, without QEMU --------------------------------


@pytest.mark.parametrize("version", ["7.2", "10.0"])
def test_golden_argv_with_a_pinned_machine_type(version: str) -> None:
    caps = fixture_caps(version)
    record = runtime.RuntimeRecord(
        name="pin1", argv=[], hvparams=bare_hvparams("/usr/bin/kvm"),
        beparams={c.BE_MEMORY: 128, c.BE_VCPUS: 1}, machine="pc-i440fx-7.2")
    node = lifecycle.KvmNode("/run/gk")
    record.machine = hardware.pin_machine(record, caps)
    argv = node.build_argv(record, caps, RunDir("/run/gk").instance("pin1"))
    assert argv == [
        "/usr/bin/kvm", "-name", "pin1", "-no-user-config", "-nodefaults", "-daemonize",
        "-pidfile", "/run/gk/pid/pin1", "-D", "/run/gk/ctrl/pin1.log",
        "-machine", "pc-i440fx-7.2,accel=tcg",
        "-m", "128", "-smp", "1",
        "-chardev", "socket,id=qmp,path=/run/gk/ctrl/pin1.qmp,server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
        "-chardev", "socket,id=qmpl,path=/run/gk/ctrl/pin1.qmpl,server=on,wait=off",
        "-mon", "chardev=qmpl,mode=control",
        "-chardev", "socket,id=hmp,path=/run/gk/ctrl/pin1.monitor,server=on,wait=off",
        "-mon", "chardev=hmp,mode=readline",
        "-boot", "order=c",
        "-display", "none",
    ]


@pytest.mark.parametrize("version", ["7.2", "10.0"])
def test_a_new_start_pins_the_binarys_pc_type(version: str) -> None:
    record = runtime.RuntimeRecord(name="pin2", argv=[])
    assert hardware.pin_machine(record, fixture_caps(version)) == f"pc-i440fx-{version}"


def test_a_type_the_node_lacks_is_refused_with_what_to_do() -> None:
    record = runtime.RuntimeRecord(name="pin3", argv=[], machine="pc-i440fx-10.0")
    with pytest.raises(errors.HypervisorError) as err:
        hardware.pin_machine(record, fixture_caps("7.2"))
    message = str(err.value)
    assert "pin3" in message and "pc-i440fx-10.0" in message
    assert "newest pc-i440fx-* type is pc-i440fx-7.2" in message
    assert "whose QEMU has pc-i440fx-10.0" in message


def test_an_injected_machine_type_never_reaches_the_command_line() -> None:
    record = runtime.RuntimeRecord(name="pin4", argv=["kvm"], machine="pc,accel=kvm")
    with pytest.raises(errors.RuntimeStateError, match="pin4.*not a machine type"):
        runtime.parse(record.serialize(), "pin4", "migration info")
    with pytest.raises(errors.HypervisorError, match="pin4.*invalid machine type"):
        lifecycle.KvmNode("/run/gk").build_argv(
            runtime.RuntimeRecord(name="pin4", argv=[], hvparams=bare_hvparams("/k"),
                                  beparams={c.BE_MEMORY: 64, c.BE_VCPUS: 1},
                                  machine="pc,accel=kvm"),
            fixture_caps("7.2"), RunDir("/run/gk").instance("pin4"))


def test_the_machine_type_round_trips_and_old_records_still_load() -> None:
    record = runtime.RuntimeRecord(name="pin5", argv=["kvm"], machine="pc-i440fx-7.2")
    assert runtime.parse(record.serialize(), "pin5", "x").machine == "pc-i440fx-7.2"
    old = record.to_dict()
    del old["machine"]  # written by the previous version of this library
    assert runtime.parse(json.dumps(old), "pin5", "x").machine is None
    upgraded = runtime.upgrade([["kvm", "-m", "128", "-smp", "1"], [], {}], "pin5", "x")  # 2011
    assert upgraded.machine is None and upgraded.upgraded_from == 0


# --- real QEMU, no guest ---------------------------------------------------------


def test_start_records_what_qemu_really_runs(hv, qemu_bin) -> None:
    hv.StartInstance(make_instance("real1", bare_hvparams(qemu_bin)), [], startup_paused=True)
    record = hv.node.load_record("real1")
    version = ".".join(map(str, record.qemu_version[:2]))
    assert record.machine == f"pc-i440fx-{version}"
    assert machine_of(hv.node.paths("real1").qmp_socket) == record.machine


def test_a_10_0_target_runs_the_7_2_type_of_its_source(nodes, qemu72, qemu10) -> None:
    source, target = nodes
    inst = make_instance("real2", bare_hvparams(qemu72))
    source.StartInstance(inst, [], startup_paused=True)
    info = source.MigrationInfo(inst)
    assert json.loads(info)["machine"] == "pc-i440fx-7.2"
    info_b = info.replace(qemu72, qemu10)
    target.AcceptInstance(make_instance("real2", bare_hvparams(qemu10)), info_b, "127.0.0.1")
    qmp = target.node.paths("real2").qmp_socket
    assert qemu_major(qmp) == 10 and machine_of(qmp) == "pc-i440fx-7.2"
    assert target.node.load_record("real2").machine == "pc-i440fx-7.2"
    target.FinalizeMigration(inst, info_b, False)
    assert target.ListInstances() == []


def test_a_guest_first_started_on_10_0_is_refused_by_a_7_2_target(hv, qemu72) -> None:
    hvp = bare_hvparams(qemu72)
    info = runtime.RuntimeRecord(name="real3", argv=["kvm"], hvparams=hvp,
                                 beparams={c.BE_MEMORY: 64, c.BE_VCPUS: 1},
                                 qemu_version=[10, 0, 2], machine="pc-i440fx-10.0").serialize()
    with pytest.raises(errors.MigrationError) as err:
        hv.AcceptInstance(make_instance("real3", hvp), info, "127.0.0.1")
    message = str(err.value)
    assert "real3" in message and "pc-i440fx-10.0" in message and qemu72 in message
    assert "Migrate it to a node whose QEMU has pc-i440fx-10.0" in message
    paths = hv.node.paths("real3")
    assert hv.ListInstances() == []
    assert not os.path.exists(paths.runtime_file) and not os.path.exists(paths.pidfile)


def test_a_record_without_a_type_asks_the_running_qemu(hv, qemu_bin) -> None:
    inst = make_instance("real4", bare_hvparams(qemu_bin, acpi=False))  # reboot at once
    hv.StartInstance(inst, [], startup_paused=True)
    record = hv.node.load_record("real4")
    hv.StopInstance(inst, force=True)
    record.machine = "pc-i440fx-7.1"  # not what this QEMU's pc means today
    with hv.node.locked("real4", "test"):
        hv.node.start_from_record(record, paused=True)
    paths = hv.node.paths("real4")
    assert machine_of(paths.qmp_socket) == "pc-i440fx-7.1"
    record.machine = None  # as the previous version of this library wrote it
    record.qemu_version = []
    runtime.save(paths.runtime_file, record)
    assert json.loads(hv.MigrationInfo(inst))["machine"] == "pc-i440fx-7.1"
    hv.RebootInstance(inst)
    assert hv.node.load_record("real4").machine == "pc-i440fx-7.1"
    assert machine_of(paths.qmp_socket) == "pc-i440fx-7.1"


@pytest.mark.parametrize("source_version, machine", [
    ([7, 2, 22], "pc-i440fx-7.2"),  # the type its QEMU version's pc meant
    ([11, 0, 0], "pc-i440fx-10.0"),  # unknown here: a guess never refuses, pc as before
])
def test_info_from_the_previous_library_pins_its_qemu_versions_type(
        nodes, qemu10, source_version: list[int], machine: str) -> None:
    _, target = nodes
    hvp = bare_hvparams(qemu10)
    data = runtime.RuntimeRecord(name="real5", argv=["kvm"], hvparams=hvp,
                                 beparams={c.BE_MEMORY: 64, c.BE_VCPUS: 1},
                                 qemu_version=source_version).to_dict()
    del data["machine"]
    inst = make_instance("real5", hvp)
    target.AcceptInstance(inst, json.dumps(data), "127.0.0.1")
    assert machine_of(target.node.paths("real5").qmp_socket) == machine
    target.FinalizeMigration(inst, json.dumps(data), False)


# --- the rolling upgrade: one kvm_path, QEMU 7.2 on one node and 10.0 on the other ----


def versioned_qemu(directory: str, versions: dict[str, str]) -> str:
    """One kvm_path for both nodes that runs the QEMU of its network namespace."""
    path = os.path.join(directory, "kvm")
    cases = "".join(f'  "{ns}") exec "{binary}" "$@" ;;\n' for ns, binary in versions.items())
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(f'#!/bin/sh\nns=$("{IP}" netns identify)\ncase "$ns" in\n{cases}esac\n'
                     'echo "$0: no QEMU for network namespace \'$ns\'" >&2\nexit 1\n')
    os.chmod(path, stat.S_IRWXU)
    return path


@pytest.fixture
def upgrade(link, short_dir, qemu72, qemu10) -> Iterator[tuple[str, NodeProcess, NodeProcess]]:  # noqa: F811
    """The wrapper, a node on QEMU 7.2 (source namespace) and one on 10.0 (target)."""
    old_ns, new_ns = link
    kvm = versioned_qemu(short_dir, {old_ns: qemu72, new_ns: qemu10})
    with NodeProcess(old_ns, os.path.join(short_dir, "a"), os.path.join(short_dir, "a.log")) \
            as old, NodeProcess(new_ns, os.path.join(short_dir, "b"),
                                os.path.join(short_dir, "b.log")) as new:
        yield kvm, old, new


def move(inst: dict[str, Any], source: NodeProcess, target: NodeProcess,
         target_ip: str) -> None:
    info = source.call("MigrationInfo", inst)
    target.call("AcceptInstance", inst, info, target_ip)
    source.call("MigrateInstance", inst, target_ip, True)
    target.call("FinalizeMigration", inst, info, True)


def counts_on(node: NodeProcess, last: int, first_line: str) -> SerialReader:
    """The serial port of upg1 on ``node``, once it showed the counter going on from ``last``."""
    reader = SerialReader(RunDir(node.run_dir).instance("upg1").serial_socket)
    reader.read_until(r"COUNTER \d+\s+COUNTER \d+", timeout=30)
    counters = reader.counters()
    assert counters[0] >= last and counters == sorted(counters)
    assert first_line not in reader.text  # continued, not rebooted
    return reader


def test_round_trip_from_7_2_to_10_0_and_back(upgrade, guest) -> None:
    kvm, old, new = upgrade
    inst = instance_arg("upg1", guest_hvparams(kvm, guest, migration_port=8102,
                                               migration_bandwidth=1000))
    old.call("StartInstance", inst, [])
    old_paths, new_paths = (RunDir(n.run_dir).instance("upg1") for n in (old, new))
    serial = SerialReader(old_paths.serial_socket)
    serial.read_until(r"COUNTER 2\b")
    assert qemu_major(old_paths.qmp_socket) == 7
    assert machine_of(old_paths.qmp_socket) == "pc-i440fx-7.2"

    move(inst, old, new, TARGET_IP)  # the upgrade
    last = serial.counters()[-1]
    serial.close()
    serial = counts_on(new, last, guest.first_line)
    assert qemu_major(new_paths.qmp_socket) == 10
    assert machine_of(new_paths.qmp_socket) == "pc-i440fx-7.2"
    assert old.call("ListInstances") == [] and new.call("ListInstances") == ["upg1"]

    move(inst, new, old, SOURCE_IP)  # the rollback
    last = serial.counters()[-1]
    serial.close()
    counts_on(old, last, guest.first_line).close()
    assert qemu_major(old_paths.qmp_socket) == 7
    assert new.call("ListInstances") == [] and old.call("ListInstances") == ["upg1"]
