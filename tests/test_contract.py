"""The public contract: constants, objects and the parameter table agree."""

from __future__ import annotations

import json

import pytest

from ganeti_kvm import constants, errors, hv_base, objects
from ganeti_kvm.hv_kvm import KVMHypervisor

TWENTY_ELEVEN_KEYS = {
    "kernel_path", "initrd_path", "root_path", "kernel_args", "acpi", "serial_console",
    "vnc_bind_address", "vnc_tls", "vnc_x509_path", "vnc_x509_verify", "vnc_password_file",
    "floppy_image_path", "cdrom_image_path", "cdrom2_image_path", "boot_order", "nic_type",
    "disk_type", "cdrom_disk_type", "usb_mouse", "migration_port", "migration_bandwidth",
    "migration_downtime", "migration_mode", "use_localtime", "disk_cache", "security_model",
    "security_domain", "kvm_flag", "vhost_net", "use_chroot", "mem_path",
}


def test_every_parameter_has_a_check_a_type_and_a_default() -> None:
    keys = TWENTY_ELEVEN_KEYS | {"kvm_path", "serial_speed"}
    assert set(KVMHypervisor.PARAMETERS) == keys
    assert set(constants.HVS_PARAMETER_TYPES) == keys
    assert set(constants.HVC_DEFAULTS[constants.HT_KVM]) == keys


def test_names_and_values_match_the_cluster_manager() -> None:
    assert constants.HV_VNC_X509 == "vnc_x509_path"
    assert constants.HV_KVM_FLOPPY_IMAGE_PATH == "floppy_image_path"
    assert constants.HV_KVM_USE_CHROOT == "use_chroot"
    assert constants.HT_MIGRATION_NONLIVE == "non-live"
    assert constants.HT_NIC_I85557B == "i82557b"
    assert constants.CONS_MESSAGE == "msg"
    assert constants.VNC_BASE_PORT == 5900
    assert constants.HT_KVM == "kvm"
    assert constants.DISK_RDONLY == "ro" and constants.DISK_RDWR == "rw"
    defaults = constants.HVC_DEFAULTS[constants.HT_KVM]
    assert defaults["migration_port"] == 8102
    assert defaults["migration_bandwidth"] == 32
    assert defaults["migration_downtime"] == 30
    assert defaults["boot_order"] == "disk"
    assert defaults["security_model"] == "none"


def test_defaults_pass_the_syntax_check() -> None:
    KVMHypervisor.CheckParameterSyntax(dict(constants.HVC_DEFAULTS[constants.HT_KVM]))


def test_check_tuples_keep_the_five_field_form() -> None:
    for name, check in KVMHypervisor.PARAMETERS.items():
        assert len(check) == 5, name
        required, check_fn, errstr, prereq_fn, prereq_msg = check
        assert isinstance(required, bool)
        assert (check_fn is None) == (errstr is None), name
        assert (prereq_fn is None) == (prereq_msg is None), name


def test_param_in_set() -> None:
    required, check_fn, errstr, _, _ = hv_base.ParamInSet(True, ["a", "b"])
    assert required and check_fn("a") and not check_fn("c")
    assert "a, b" in errstr


def test_instance_round_trip() -> None:
    inst = objects.Instance(
        name="web1", primary_node="node1", hvparams={"acpi": False},
        beparams={"memory": 256, "vcpus": 2},
        nics=[objects.NIC(mac="aa:00:00:00:00:01", ip="10.0.0.2",
                          nicparams={"mode": "bridged", "link": "br0"})],
        disks=[objects.Disk(size=1024, mode="ro")], tags=["a", "b"], network_port=5901)
    data = json.loads(json.dumps(inst.ToDict()))
    again = objects.Instance.FromDict(data)
    assert again == inst
    assert isinstance(again.nics[0], objects.NIC)
    assert again.nics[0].nicparams["link"] == "br0"
    assert again.disks[0].mode == "ro"


def test_objects_refuse_unknown_fields() -> None:
    with pytest.raises(TypeError, match="colour"):
        objects.NIC(mac="aa:00:00:00:00:01", colour="red")
    with pytest.raises(errors.ConfigurationError, match="colour"):
        objects.NIC.FromDict({"colour": "red"})


@pytest.mark.parametrize("fields", [
    {"kind": "ssh", "host": "node1", "user": "root", "command": ["x"]},
    {"kind": "vnc", "host": "node1", "port": 5901, "display": 1},
    {"kind": "vnc", "host": "node1", "port": 5900, "display": 0},
    {"kind": "msg", "message": "no console"},
])
def test_console_validate_accepts_complete_consoles(fields: dict) -> None:
    assert objects.InstanceConsole(instance="i1", **fields).Validate() is True


@pytest.mark.parametrize("fields, missing", [
    ({"kind": "ssh", "host": "node1", "user": "root"}, "command"),
    ({"kind": "ssh", "host": "node1", "command": ["x"]}, "user"),
    ({"kind": "vnc", "host": "node1", "port": 5901}, "display"),
    ({"kind": "vnc", "port": 5901, "display": 1}, "host"),
    ({"kind": "msg"}, "message"),
    ({"kind": "telepathy", "message": "x"}, "unknown console kind"),
])
def test_console_validate_names_the_missing_field(fields: dict, missing: str) -> None:
    with pytest.raises(errors.ConfigurationError, match=missing):
        objects.InstanceConsole(instance="i1", **fields).Validate()


def test_errors_share_one_root() -> None:
    for exc in (errors.HypervisorError, errors.ParameterError, errors.MonitorTimeout,
                errors.QmpCommandError, errors.RuntimeStateError, errors.MigrationError):
        assert issubclass(exc, errors.GenericError)
    assert issubclass(errors.ParameterError, errors.HypervisorError)


def test_node_info_from_proc(tmp_path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 2048000 kB\nMemFree: 1024000 kB\nBuffers: 0 kB\n"
                       "Cached: 1024 kB\n")
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name: x\n\nprocessor\t: 1\n")
    info = hv_base.BaseHypervisor.GetLinuxNodeInfo(str(meminfo), str(cpuinfo))
    assert info == {"memory_total": 2000, "memory_free": 1001, "memory_dom0": 999,
                    "cpu_total": 2}
    with pytest.raises(errors.HypervisorError, match="MemTotal"):
        meminfo.write_text("Nothing: 1 kB\n")
        hv_base.BaseHypervisor.GetLinuxNodeInfo(str(meminfo), str(cpuinfo))
