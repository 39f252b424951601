"""The CPU and machine keys on real QEMU 7.2 and 10.0, through the Ganeti 3 contract.

Guest-less VMs started paused: QEMU itself is asked (QMP ``query-cpus-fast``,
``qom-get``) whether a setting took effect, and the kernel (``/proc``) which
CPUs each vCPU thread may run on.
"""

from __future__ import annotations

from typing import Any

import pytest

from ganeti_kvm.ganeti3 import KVMHypervisor, _ganeti
from ganeti_kvm.host import affinity
from ganeti_kvm.qemu import caps as qemu_caps
from tests.helpers import free_port, g3_instance
from tests.test_ganeti3 import _poll, g3_hvparams

NODE_CPUS = affinity.online_cpus()
needs_two_cpus = pytest.mark.skipif(len(NODE_CPUS) < 2, reason="needs a node with 2 CPUs")


def instance(name: str, hvparams: dict[str, Any], vcpus: int) -> dict[str, Any]:
    return g3_instance(name, hvparams, vcpus=vcpus)


def vcpu_threads(hv: KVMHypervisor, name: str) -> list[int]:
    cpus = sorted(hv.node.qmp(name, "query-cpus-fast"), key=lambda cpu: cpu["cpu-index"])
    return [cpu["thread-id"] for cpu in cpus]


def allowed(hv: KVMHypervisor, name: str) -> list[set[int]]:
    """Each vCPU thread's Cpus_allowed_list, as the kernel reports it."""
    return [set(affinity.allowed_cpus(tid)) for tid in vcpu_threads(hv, name)]


def test_the_probe_asks_qemu_for_its_cpu_models(qemu_bin: str, short_dir: str) -> None:
    qemu_caps.clear_cache()
    try:
        caps = qemu_caps.probe(qemu_bin, cache_dir=short_dir)
        assert {"qemu64", "kvm64", "max", "Skylake-Server"} <= caps.cpu_models
        qemu_caps.clear_cache()  # the next answer comes from the disk cache, models included
        assert qemu_caps.probe(qemu_bin, cache_dir=short_dir).cpu_models == caps.cpu_models
    finally:
        qemu_caps.clear_cache()


def test_topology_model_and_machine_take_effect(g3: KVMHypervisor, qemu_bin: str) -> None:
    hvp = g3_hvparams(qemu_bin, cpu_type="kvm64", cpu_cores=2, cpu_threads=2, cpu_sockets=1,
                      machine_version="pc-i440fx-7.2")
    KVMHypervisor.ValidateParameters(hvp)
    g3.StartInstance(instance("cpu1", hvp, vcpus=4), [], True)
    cpus = g3.node.qmp("cpu1", "query-cpus-fast")
    assert len(cpus) == 4
    props = sorted((cpu["props"]["socket-id"], cpu["props"]["core-id"],
                    cpu["props"]["thread-id"]) for cpu in cpus)
    assert props == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1)]
    cpu_type = g3.node.qmp("cpu1", "qom-get", {"path": cpus[0]["qom-path"], "property": "type"})
    assert cpu_type == "kvm64-x86_64-cpu"
    # on QEMU 10.0 too, whose pc is pc-i440fx-10.0
    machine = g3.node.qmp("cpu1", "qom-get", {"path": "/machine", "property": "type"})
    assert machine == "pc-i440fx-7.2-machine"
    record = g3.node.load_record("cpu1")
    assert record is not None and record.machine == "pc-i440fx-7.2"  # pinned


def test_machine_version_alias_is_pinned_resolved(g3: KVMHypervisor, qemu_bin: str) -> None:
    g3.StartInstance(instance("cpu4", g3_hvparams(qemu_bin, machine_version="pc"), vcpus=1),
                     [], True)
    major_minor = ".".join(map(str, g3.node.caps(qemu_bin).version[:2]))
    record = g3.node.load_record("cpu4")
    assert record is not None and record.machine == f"pc-i440fx-{major_minor}"
    assert g3.node.qmp("cpu4", "qom-get", {"path": "/machine", "property": "type"}) \
        == f"pc-i440fx-{major_minor}-machine"


def test_defaults_leave_cpu_and_machine_to_qemu(g3: KVMHypervisor, qemu_bin: str) -> None:
    g3.StartInstance(instance("cpu2", g3_hvparams(qemu_bin), vcpus=2), [], True)
    cpus = g3.node.qmp("cpu2", "query-cpus-fast")
    assert len(cpus) == 2
    assert g3.node.qmp("cpu2", "qom-get", {"path": cpus[0]["qom-path"],
                                           "property": "type"}) == "qemu64-x86_64-cpu"
    machine = g3.node.qmp("cpu2", "qom-get", {"path": "/machine", "property": "type"})
    assert machine.startswith("pc-i440fx-")


@pytest.mark.parametrize("hvparams, vcpus, match", [
    ({"cpu_type": "Pentium9"}, 1, r"cpu_type is 'Pentium9' .*no CPU model"),
    ({"machine_version": "pc-i440fx-1.0"}, 1, r"machine_version is 'pc-i440fx-1.0' but"),
    ({"machine_version": "q35"}, 1, r"machine_version is 'q35' .*cannot run"),
    ({"cpu_mask": "0:64"}, 2, r"cpu_mask '0:64' names CPU\(s\) 64"),
])
def test_validate_refuses_what_this_node_lacks(qemu_bin: str, hvparams: dict[str, Any],
                                               vcpus: int, match: str) -> None:
    with pytest.raises(_ganeti.HypervisorError, match=match):
        KVMHypervisor.ValidateParameters(g3_hvparams(qemu_bin, **hvparams))


def test_a_topology_qemu_refuses_is_refused_before_the_start(g3: KVMHypervisor,
                                                              qemu_bin: str) -> None:
    with pytest.raises(_ganeti.HypervisorError, match=r"cpu_cores 3 make 3.*4 vCPUs"):
        g3.StartInstance(instance("cpu3", g3_hvparams(qemu_bin, cpu_cores=3), vcpus=4), [],
                         True)
    with pytest.raises(_ganeti.HypervisorError, match=r"3 entries but the instance has 2"):
        g3.StartInstance(instance("cpu3", g3_hvparams(qemu_bin, cpu_mask="0:1:0"), vcpus=2),
                         [], True)
    assert g3.ListInstances() == []


@needs_two_cpus
def test_one_mask_pins_the_vcpu_threads_and_qemu(g3: KVMHypervisor, qemu_bin: str) -> None:
    # Ganeti 3.0's bundled driver pins only QEMU's main thread here: its vCPU
    # threads stay on every CPU.
    g3.StartInstance(instance("pin1", g3_hvparams(qemu_bin, cpu_mask="0"), vcpus=2), [], True)
    assert allowed(g3, "pin1") == [{0}, {0}]
    pid = g3.node.running_pid("pin1")
    assert pid is not None and affinity.allowed_cpus(pid) == {0}


@needs_two_cpus
def test_one_entry_per_vcpu_survives_a_reboot(g3: KVMHypervisor, qemu_bin: str) -> None:
    inst = instance("pin2", g3_hvparams(qemu_bin, cpu_mask="1:0"), vcpus=2)
    g3.StartInstance(inst, [], True)
    assert allowed(g3, "pin2") == [{1}, {0}]
    pid = g3.node.running_pid("pin2")
    assert pid is not None and affinity.allowed_cpus(pid) == NODE_CPUS  # QEMU itself is free
    threads = vcpu_threads(g3, "pin2")
    g3.RebootInstance(inst)
    assert vcpu_threads(g3, "pin2") != threads  # a new QEMU ...
    assert allowed(g3, "pin2") == [{1}, {0}]  # ... pinned the same


@needs_two_cpus
def test_pinning_is_kept_after_a_migration(g3_nodes: tuple[KVMHypervisor, KVMHypervisor],
                                           qemu_bin: str) -> None:
    source, target = g3_nodes
    inst = instance("pin3", g3_hvparams(qemu_bin, cpu_mask="1:all",
                                        migration_port=free_port()), vcpus=2)
    source.StartInstance(inst, [], True)
    assert allowed(source, "pin3") == [{1}, set(NODE_CPUS)]
    info = source.MigrationInfo(inst)
    target.AcceptInstance(inst, info, "127.0.0.1")
    source.MigrateInstance("cluster1", inst, "127.0.0.1", False)
    assert _poll(source, inst).status == "completed"
    source.FinalizeMigrationSource(inst, True, False)
    target.FinalizeMigrationDst(inst, info, True)
    assert target.ListInstances() == ["pin3"]
    assert allowed(target, "pin3") == [{1}, set(NODE_CPUS)]
