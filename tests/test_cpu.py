"""The CPU and machine keys of Ganeti 3 (cpu_type, cpu_cores/threads/sockets,
cpu_mask, machine_version) without QEMU: parsing, checks, argv, pinning plan.

The golden command lines use the capabilities of the real QEMU 7.2 and 10.0
(tests/data/qemu-*); tests/test_cpu_qemu.py asks real QEMUs.
"""

from __future__ import annotations

from typing import Any

import pytest

from ganeti_kvm import constants, errors, hv_kvm
from ganeti_kvm.core import names as c
from ganeti_kvm.core import params as core_params
from ganeti_kvm.core import pinning, runtime
from ganeti_kvm.core.hardware import pin_machine
from ganeti_kvm.ganeti3 import params as g3_params
from ganeti_kvm.host import affinity
from ganeti_kvm.host.paths import RunDir
from ganeti_kvm.qemu import caps as qemu_caps
from ganeti_kvm.qemu import cmdline
from ganeti_kvm.qemu import cpu as qemu_cpu
from tests.test_qemu_caps import outputs

PATHS = RunDir("/run/gk").instance("web1")
CPU_KEYS = (c.HV_CPU_MASK, c.HV_CPU_TYPE, c.HV_CPU_CORES, c.HV_CPU_THREADS,
            c.HV_CPU_SOCKETS, c.HV_KVM_MACHINE_VERSION)
VERSIONS = ("7.2", "10.0")


def fixture_caps(version: str) -> qemu_caps.QemuCaps:
    return qemu_caps.build_caps("/usr/bin/kvm", outputs(version))


def hvp(**overrides: Any) -> dict[str, Any]:
    result = core_params.fill({"kernel_path": "", "root_path": "", "kvm_flag": "disabled"})
    result.update(overrides)
    return result


def argv_for(version: str, vcpus: int = 4, machine: str | None = None,
             **overrides: Any) -> list[str]:
    spec = cmdline.MachineSpec(name="web1", memory=256, vcpus=vcpus, machine=machine)
    return cmdline.build_argv(spec, [], hvp(**overrides), fixture_caps(version), PATHS)


def value_of(argv: list[str], option: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == option]


# --- which contract has the keys -------------------------------------------------------


def test_the_2011_contract_keeps_its_keys() -> None:
    assert constants.HVS_PARAMETERS == c.KEYS_2011
    assert len(c.KEYS_2011) == 37
    for key in CPU_KEYS:
        assert key in core_params.PARAMETERS and key in c.PARAMETER_KEYS
        assert key not in constants.HVS_PARAMETERS
        assert key not in hv_kvm.KVMHypervisor.PARAMETERS
        assert key not in constants.HVC_DEFAULTS[constants.HT_KVM]
        assert key not in hv_kvm.KVMHypervisor.FillHvParams({})
    filled = hv_kvm.KVMHypervisor.FillHvParams({"kernel_path": ""})
    hv_kvm.KVMHypervisor.CheckParameterSyntax(filled)  # the 2011 keys alone pass
    with pytest.raises(errors.ParameterError, match="cpu_mask") as info:
        hv_kvm.KVMHypervisor.CheckParameterSyntax(dict(filled, cpu_mask="0"))
    assert info.value.name == "cpu_mask"


def test_the_ganeti3_contract_implements_them() -> None:
    for key in CPU_KEYS:
        assert key in g3_params.CORE_KEYS
        assert key not in g3_params.UNIMPLEMENTED
        assert g3_params.DEFAULTS[key] == c.DEFAULTS[key]  # Ganeti 3.0's defaults
    g3_params.check_implemented(dict(g3_params.DEFAULTS, cpu_mask="0:1", cpu_type="max",
                                     cpu_cores=2, machine_version="q35"))
    core = g3_params.to_core(dict(g3_params.DEFAULTS, cpu_mask="0:1", machine_version="q35"))
    assert (core["cpu_mask"], core["machine_version"]) == ("0:1", "q35")


# --- cpu_mask ----------------------------------------------------------------------------


@pytest.mark.parametrize("mask, entries", [
    ("all", [None]),
    ("0", [{0}]),
    ("0-2,5", [{0, 1, 2, 5}]),
    ("0-1:2:all", [{0, 1}, {2}, None]),
    ("3:3", [{3}, {3}]),
])
def test_multi_cpu_mask(mask: str, entries: list[Any]) -> None:
    assert pinning.parse_multi_cpu_mask(mask) == entries
    assert pinning.is_multi_cpu_mask(mask)


@pytest.mark.parametrize("mask", ["", "0:", ":1", "1-0", "a", "0-1-2", "0,,1", "0-99999",
                                  "all,1", " 0", 0, None])
def test_multi_cpu_mask_refused(mask: Any) -> None:
    assert not pinning.is_multi_cpu_mask(mask)
    with pytest.raises(errors.ParameterError, match="cpu_mask") as info:
        pinning.parse_multi_cpu_mask(mask)
    assert info.value.name == "cpu_mask"


def test_cpu_mask_in_the_table() -> None:
    with pytest.raises(errors.ParameterError, match="cpu_mask.*0-1:2:all"):
        core_params.check_all_syntax(hvp(cpu_mask="0-"))
    core_params.check_all_syntax(hvp(cpu_mask="0-1:all"))


def test_pinning_plan() -> None:
    assert pinning.plan("all", 2) == (None, [None, None])
    assert pinning.plan("1", 2) == ({1}, [{1}, {1}])
    assert pinning.plan("1:0", 2) == (None, [{1}, {0}])
    assert pinning.plan("0:all", 2) == (None, [{0}, None])
    with pytest.raises(errors.ParameterError, match=r"3 entries but the instance has 2 vCPUs"):
        pinning.plan("0:1:0", 2)


def test_a_cpu_the_node_lacks_is_refused() -> None:
    caps = fixture_caps("10.0")
    core_params.check_node_cpu(hvp(cpu_mask="0-1:all"), caps, online=frozenset({0, 1}))
    with pytest.raises(errors.ParameterError, match=r"names CPU\(s\) 2, 7.*its CPUs: 0-1") \
            as info:
        core_params.check_node_cpu(hvp(cpu_mask="0:2:7"), caps, online=frozenset({0, 1}))
    assert info.value.name == "cpu_mask"


def test_apply_pins_each_vcpu_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    pinned: dict[int, frozenset[int]] = {}
    monkeypatch.setattr(affinity, "set_thread_affinity",
                        lambda tid, cpus, what: pinned.__setitem__(tid, cpus))
    monkeypatch.setattr(affinity, "threads_of", lambda pid: [pid, 101, 102, 103])
    answer = [{"cpu-index": 1, "thread-id": 102}, {"cpu-index": 0, "thread-id": 101}]

    def execute(command: str) -> Any:
        assert command == "query-cpus-fast"
        return answer

    online = frozenset({0, 1, 2})
    assert not pinning.apply("web1", 100, {"cpu_mask": "all"}, 2, execute, online)
    assert pinned == {}
    assert pinning.apply("web1", 100, {"cpu_mask": "2:all"}, 2, execute, online)
    assert pinned == {101: {2}, 102: online}  # the main thread is left alone
    pinned.clear()
    assert pinning.apply("web1", 100, {"cpu_mask": "1"}, 2, execute, online)
    assert pinned == {100: {1}, 101: {1}, 102: {1}, 103: {1}}  # the whole QEMU
    with pytest.raises(errors.HypervisorError, match="runs 2 vCPU threads"):
        pinning.apply("web1", 100, {"cpu_mask": "1"}, 3, execute, online)
    with pytest.raises(errors.HypervisorError, match="names no vCPU threads"):
        pinning.apply("web1", 100, {"cpu_mask": "1:0"}, 2, lambda command: [{}], online)


def test_affinity_helpers() -> None:
    assert affinity.parse_cpu_list("0-2,5\n") == {0, 1, 2, 5}
    assert affinity.format_cpu_list({0, 1, 2, 5, 7, 8}) == "0-2,5,7-8"
    assert affinity.format_cpu_list(set()) == ""
    assert affinity.online_cpus("/nonexistent") == frozenset(range(len(
        affinity.online_cpus("/nonexistent"))))
    with pytest.raises(errors.HypervisorError, match="Cannot pin vCPU 0 of x"):
        affinity.set_thread_affinity(2 ** 22 + 7, frozenset({0}), "vCPU 0 of x")


# --- topology ------------------------------------------------------------------------------


@pytest.mark.parametrize("vcpus, topology, expected", [
    (4, {}, "4"),
    (4, {"cpu_cores": 2}, "4,cores=2"),
    (4, {"cpu_cores": 2, "cpu_threads": 2, "cpu_sockets": 1}, "4,cores=2,threads=2,sockets=1"),
    (6, {"cpu_sockets": 3}, "6,sockets=3"),
    (8, {"cpu_threads": 2, "cpu_sockets": 2}, "8,threads=2,sockets=2"),
])
def test_smp(vcpus: int, topology: dict[str, int], expected: str) -> None:
    assert qemu_cpu.smp_value(vcpus, topology) == expected


@pytest.mark.parametrize("vcpus, topology, message", [
    (2, {"cpu_sockets": 2, "cpu_cores": 2, "cpu_threads": 1},
     r"cpu_cores 2 x cpu_threads 1 x cpu_sockets 2 make 4 vCPUs but the instance has 2"),
    (4, {"cpu_cores": 3}, r"cpu_cores 3 make 3, which does not divide the instance's 4"),
    (2, {"cpu_cores": 4}, r"cpu_cores 4 make 4, which does not divide the instance's 2"),
    (3, {"cpu_threads": 2}, r"cpu_threads 2 make 2, which does not divide"),
    (4, {"cpu_cores": -1}, r"cpu_cores must be a whole number from 0"),
    (4, {"cpu_cores": True}, r"cpu_cores must be a whole number from 0"),
])
def test_smp_refuses_what_qemu_refuses(vcpus: int, topology: dict[str, Any],
                                       message: str) -> None:
    with pytest.raises(errors.ParameterError, match=message) as info:
        qemu_cpu.smp_value(vcpus, topology)
    assert info.value.name in topology


def test_topology_keys_in_the_table() -> None:
    for key in (c.HV_CPU_CORES, c.HV_CPU_THREADS, c.HV_CPU_SOCKETS):
        with pytest.raises(errors.ParameterError, match=key):
            core_params.check_all_syntax(hvp(**{key: -2}))
        with pytest.raises(errors.ParameterError, match=key):
            core_params.check_all_syntax(hvp(**{key: "2"}))  # the type check


# --- cpu_type and machine_version ------------------------------------------------------------


@pytest.mark.parametrize("value", ["qemu64", "host,+x2apic", "Skylake-Server-v4,-hle,pmu=off",
                                   "max,hv-relaxed"])
def test_cpu_type_syntax(value: str) -> None:
    assert qemu_cpu.is_cpu_type(value)
    assert qemu_cpu.cpu_args({"cpu_type": value}) == ["-cpu", value]


# A comma separates features (",+avx", "pmu=off"); nothing else may end the value
# or start another option: no "=" in the model, no ",,", spaces, newlines or NULs.
@pytest.mark.parametrize("value", ["qemu64 ", "qemu64,,x", ",qemu64", "x\n", "-help",
                                   "a=b", "qemu64,a=b=c", "qemu64\0", "qemu64,=x",
                                   "q" * 2000, 5])
def test_cpu_type_syntax_refused(value: Any) -> None:
    assert not qemu_cpu.is_cpu_type(value)
    with pytest.raises(errors.ParameterError, match="cpu_type"):
        qemu_cpu.cpu_args({"cpu_type": value})


@pytest.mark.parametrize("version", VERSIONS)
def test_cpu_models_of_the_fixtures(version: str) -> None:
    caps = fixture_caps(version)
    assert {"qemu64", "kvm64", "max", "host", "Skylake-Server"} <= caps.cpu_models
    assert len(caps.cpu_models) > 100
    assert qemu_caps.QemuCaps.from_dict(caps.to_dict()) == caps
    assert qemu_caps.parse_cpu_definitions("") == frozenset()
    assert qemu_caps.parse_cpu_definitions('{"QMP": {}}\n{"error": {"class": "x"}}\n') \
        == frozenset()


@pytest.mark.parametrize("version", VERSIONS)
def test_an_unknown_cpu_model_is_refused_naming_the_key(version: str) -> None:
    caps = fixture_caps(version)
    core_params.check_node_cpu(hvp(cpu_type="kvm64,+ssse3"), caps)
    with pytest.raises(errors.ParameterError,
                       match=r"cpu_type is 'Pentium9' .* no CPU model 'Pentium9' .*e\.g\. "
                             r"host, max, qemu64") as info:
        core_params.check_node_cpu(hvp(cpu_type="Pentium9"), caps)
    assert info.value.name == "cpu_type"


@pytest.mark.parametrize("version", VERSIONS)
def test_an_unknown_machine_version_is_refused_naming_the_key(version: str) -> None:
    caps = fixture_caps(version)
    core_params.check_node_cpu(hvp(machine_version="pc"), caps)
    core_params.check_node_cpu(hvp(machine_version="pc-i440fx-7.2"), caps)
    for machine in ("q35", "pc-q35-7.2", "isapc", "microvm"):
        with pytest.raises(errors.ParameterError, match=rf"machine_version is '{machine}' "
                           r"\(.*\), which ganeti-kvm cannot run.*pc-i440fx-\*") as info:
            core_params.check_node_cpu(hvp(machine_version=machine), caps)
        assert info.value.name == "machine_version"
    with pytest.raises(errors.ParameterError, match=r"machine_version is 'pc-i440fx-11.0' "
                       r"but QEMU .* has no machine type pc-i440fx-11.0") as info:
        core_params.check_node_cpu(hvp(machine_version="pc-i440fx-11.0"), caps)
    assert info.value.name == "machine_version"
    with pytest.raises(errors.ParameterError, match="machine_version"):
        core_params.check_all_syntax(hvp(machine_version="pc,accel=kvm"))


@pytest.mark.parametrize("version", VERSIONS)
def test_machine_version_is_pinned_resolved(version: str) -> None:
    caps = fixture_caps(version)
    record = runtime.RuntimeRecord(name="web1", argv=[], nics=[],
                                   hvparams=hvp(machine_version="pc"), beparams={}, disks=[])
    assert pin_machine(record, caps) == f"pc-i440fx-{version}"  # the alias, resolved
    record.hvparams["machine_version"] = "pc-i440fx-7.2"
    assert pin_machine(record, caps) == "pc-i440fx-7.2"
    record.hvparams["machine_version"] = ""
    assert pin_machine(record, caps) == f"pc-i440fx-{version}"
    record.hvparams["machine_version"] = "pc-i440fx-11.0"
    with pytest.raises(errors.ParameterError, match="machine_version is 'pc-i440fx-11.0'"):
        pin_machine(record, caps)
    record.machine = "pc-i440fx-7.2"  # a pinned type wins over the parameter
    assert pin_machine(record, caps) == "pc-i440fx-7.2"


# --- golden argv on both QEMUs ------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_golden_cpu_argv(version: str) -> None:
    argv = argv_for(version, vcpus=4, cpu_type="kvm64,+ssse3", cpu_cores=2, cpu_threads=2,
                    cpu_sockets=1, machine_version="pc-i440fx-7.2", cpu_mask="0:1:0:1")
    start = argv.index("-machine")
    assert argv[start:start + 8] == [
        "-machine", "pc-i440fx-7.2,accel=tcg", "-m", "256", "-smp", "4,cores=2,threads=2,sockets=1",
        "-cpu", "kvm64,+ssse3"]
    # The record's pinned type wins; defaults add nothing.
    argv = argv_for(version, vcpus=2, machine=f"pc-i440fx-{version}", machine_version="pc")
    assert value_of(argv, "-machine") == [f"pc-i440fx-{version},accel=tcg"]
    argv = argv_for(version, vcpus=2)
    assert value_of(argv, "-smp") == ["2"] and "-cpu" not in argv
    assert value_of(argv, "-machine") == ["pc,accel=tcg"]


@pytest.mark.parametrize("version", VERSIONS)
def test_argv_refuses_a_topology_qemu_refuses(version: str) -> None:
    with pytest.raises(errors.ParameterError, match=r"Instance web1: cpu_cores 3 make 3"):
        argv_for(version, vcpus=4, cpu_cores=3)
