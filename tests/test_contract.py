"""The public contract: constants, objects and the parameter table agree."""

from __future__ import annotations

import inspect
import json
import os

import pytest

from ganeti_kvm import constants, errors, hv_base, objects
from ganeti_kvm.hv_kvm import KVMHypervisor
from ganeti_kvm.qemu import caps as qemu_caps

# The 2011 driver's cluster defaults, key by key (Ganeti 2.5 constants.py,
# HVC_DEFAULTS[HT_KVM]).
TWENTY_ELEVEN_DEFAULTS = {
    "kernel_path": "/boot/vmlinuz-2.6-kvmU", "initrd_path": "", "kernel_args": "ro",
    "root_path": "/dev/vda1", "acpi": True, "serial_console": True, "vnc_bind_address": "",
    "vnc_tls": False, "vnc_x509_path": "", "vnc_x509_verify": False,
    "vnc_password_file": "", "spice_bind": "", "spice_ip_version": 0,
    "floppy_image_path": "", "cdrom_image_path": "", "cdrom2_image_path": "",
    "boot_order": "disk", "nic_type": "paravirtual", "disk_type": "paravirtual",
    "cdrom_disk_type": "", "usb_mouse": "", "keymap": "", "migration_port": 8102,
    "migration_bandwidth": 32, "migration_downtime": 30, "migration_mode": "live",
    "use_localtime": False, "disk_cache": "default", "security_model": "none",
    "security_domain": "", "kvm_flag": "", "vhost_net": False, "use_chroot": False,
    "mem_path": "", "reboot_behavior": "reboot",
}
TWENTY_ELEVEN_KEYS = set(TWENTY_ELEVEN_DEFAULTS)
# Keys later versions of the cluster manager added (same names and defaults in 3.0).
LATER_DEFAULTS = {"kvm_path": "/usr/bin/kvm", "serial_speed": 38400}


def test_every_parameter_has_a_check_a_type_and_a_default() -> None:
    keys = TWENTY_ELEVEN_KEYS | set(LATER_DEFAULTS)
    assert set(KVMHypervisor.PARAMETERS) == keys
    assert set(constants.HVS_PARAMETER_TYPES) == keys
    assert set(constants.HVC_DEFAULTS[constants.HT_KVM]) == keys


def test_defaults_equal_the_2011_driver_exactly() -> None:
    defaults = dict(constants.HVC_DEFAULTS[constants.HT_KVM])
    later = {key: defaults.pop(key) for key in LATER_DEFAULTS}
    assert later == LATER_DEFAULTS
    assert defaults == TWENTY_ELEVEN_DEFAULTS
    for key, value in defaults.items():  # bool is not int, nor 0 False
        assert type(value) is type(TWENTY_ELEVEN_DEFAULTS[key]), key


def test_2011_value_constants() -> None:
    assert constants.HV_KVM_SPICE_BIND == "spice_bind"
    assert constants.HV_KVM_SPICE_IP_VERSION == "spice_ip_version"
    assert constants.HV_KEYMAP == "keymap"
    assert constants.HV_REBOOT_BEHAVIOR == "reboot_behavior"
    assert {"reboot", "exit"} == constants.REBOOT_BEHAVIORS
    assert constants.INSTANCE_REBOOT_EXIT == "exit"
    assert constants.IFACE_NO_IP_VERSION_SPECIFIED == 0
    assert {4, 6} == constants.VALID_IP_VERSIONS


def test_parameters_filled_by_a_2011_cluster_pass() -> None:
    KVMHypervisor.CheckParameterSyntax(dict(TWENTY_ELEVEN_DEFAULTS, **LATER_DEFAULTS))


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
    info = hv_base.BaseHypervisor.GetLinuxNodeInfo(str(meminfo), str(cpuinfo),
                                                   str(tmp_path / "no-numa"))
    # The 2011 driver's keys, cpu_nodes and cpu_sockets included.
    assert info == {"memory_total": 2000, "memory_free": 1001, "memory_dom0": 999,
                    "cpu_total": 2, "cpu_nodes": 1, "cpu_sockets": 1}
    cpuinfo.write_text("processor\t: 0\nphysical id\t: 0\n\nprocessor\t: 1\n"
                       "physical id\t: 3\n\nprocessor\t: 2\nphysical id\t: 3\n")
    for node in ("node0", "node1", "possible"):
        (tmp_path / "numa" / node).mkdir(parents=True)
    info = hv_base.BaseHypervisor.GetLinuxNodeInfo(str(meminfo), str(cpuinfo),
                                                   str(tmp_path / "numa"))
    assert (info["cpu_total"], info["cpu_sockets"], info["cpu_nodes"]) == (3, 2, 2)
    with pytest.raises(errors.HypervisorError, match="MemTotal"):
        meminfo.write_text("Nothing: 1 kB\n")
        hv_base.BaseHypervisor.GetLinuxNodeInfo(str(meminfo), str(cpuinfo))


# --- the 2011 driver's members (Ganeti 2.5 hv_kvm.py and hv_base.py) -------------
#
# Written out from the 2011 source: every public member of its KVMHypervisor
# (its own and those inherited from BaseHypervisor), its kind and its
# arguments after self/cls as (name, default); NO_DEFAULT marks a required one.
NO_DEFAULT = object()
TWENTY_ELEVEN_MEMBERS: dict[str, tuple[str, tuple[tuple[str, object], ...]]] = {
    "StartInstance": ("method", (("instance", NO_DEFAULT), ("block_devices", NO_DEFAULT),
                                 ("startup_paused", NO_DEFAULT))),
    "StopInstance": ("method", (("instance", NO_DEFAULT), ("force", False), ("retry", False),
                                ("name", None))),
    "CleanupInstance": ("method", (("instance_name", NO_DEFAULT),)),
    "RebootInstance": ("method", (("instance", NO_DEFAULT),)),
    "ListInstances": ("method", ()),
    "GetInstanceInfo": ("method", (("instance_name", NO_DEFAULT),)),
    "GetAllInstancesInfo": ("method", ()),
    "GetNodeInfo": ("method", ()),
    "GetInstanceConsole": ("classmethod", (("instance", NO_DEFAULT), ("hvparams", NO_DEFAULT),
                                           ("beparams", NO_DEFAULT))),
    "GetAncillaryFiles": ("classmethod", ()),
    "Verify": ("method", ()),
    "MigrationInfo": ("method", (("instance", NO_DEFAULT),)),
    "AcceptInstance": ("method", (("instance", NO_DEFAULT), ("info", NO_DEFAULT),
                                  ("target", NO_DEFAULT))),
    "FinalizeMigration": ("method", (("instance", NO_DEFAULT), ("info", NO_DEFAULT),
                                     ("success", NO_DEFAULT))),
    "MigrateInstance": ("method", (("instance", NO_DEFAULT), ("target", NO_DEFAULT),
                                   ("live", NO_DEFAULT))),
    "CheckParameterSyntax": ("classmethod", (("hvparams", NO_DEFAULT),)),
    "ValidateParameters": ("classmethod", (("hvparams", NO_DEFAULT),)),
    "PowercycleNode": ("classmethod", ()),
    "GetLinuxNodeInfo": ("staticmethod", ()),
    "LinuxPowercycle": ("classmethod", ()),
}
TWENTY_ELEVEN_DATA = {"CAN_MIGRATE": bool, "PARAMETERS": dict, "ANCILLARY_FILES": list}
# Our public members the 2011 driver lacks, each a deliberate addition:
# GetMigrationStatus is the cluster manager's own later method (2.6+, same
# signature); FillHvParams and PARAMETER_TYPES are helpers for node daemons.
OUR_EXTRAS = {"KVMHypervisor": {"GetMigrationStatus", "FillHvParams", "PARAMETER_TYPES"},
              "BaseHypervisor": {"PARAMETER_TYPES"}}


def _kind(cls: type, name: str) -> str:
    raw = inspect.getattr_static(cls, name)
    if isinstance(raw, classmethod):
        return "classmethod"
    if isinstance(raw, staticmethod):
        return "staticmethod"
    if inspect.isfunction(raw):
        return "method"
    return "data"


def _arguments(cls: type, name: str) -> list[inspect.Parameter]:
    """The parameters a caller passes, as seen by ``cls.name(...)`` or ``obj.name(...)``."""
    raw = inspect.getattr_static(cls, name)
    params = list(inspect.signature(getattr(raw, "__func__", raw)).parameters.values())
    return params if isinstance(raw, staticmethod) else params[1:]


@pytest.mark.parametrize("cls", [KVMHypervisor, hv_base.BaseHypervisor],
                         ids=lambda cls: cls.__name__)
@pytest.mark.parametrize("name", sorted(TWENTY_ELEVEN_MEMBERS))
def test_member_kind_and_arguments_match_2011(cls: type, name: str) -> None:
    """Same kind; the 2011 positional arguments in the same order with the same
    defaults.  Ours may add arguments after them only with a default (an old
    call never needs them), and may give a default where 2011 had none (an old
    call always passes the argument, so it still means the same)."""
    kind, expected = TWENTY_ELEVEN_MEMBERS[name]
    assert _kind(cls, name) == kind, f"{cls.__name__}.{name} is a {_kind(cls, name)}"
    ours = _arguments(cls, name)
    positional = [p for p in ours if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    assert [p.name for p in positional[:len(expected)]] == [n for n, _ in expected]
    for param, (_, default) in zip(positional, expected, strict=False):
        if default is not NO_DEFAULT:
            assert param.default == default, f"{name}({param.name}=...)"
    for param in ours[len(expected):]:
        assert param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD), name
        assert param.default is not param.empty, f"{name}: extra {param.name} needs a default"


def test_classmethods_work_on_the_class() -> None:
    for name, (kind, _) in TWENTY_ELEVEN_MEMBERS.items():
        if kind != "method":
            bound = getattr(KVMHypervisor, name)
            assert callable(bound), name
            if kind == "classmethod":
                assert bound.__self__ is KVMHypervisor, name


@pytest.mark.parametrize("cls", [KVMHypervisor, hv_base.BaseHypervisor],
                         ids=lambda cls: cls.__name__)
def test_public_members_are_the_2011_ones_plus_known_extras(cls: type) -> None:
    public = {n for n in dir(cls) if not n.startswith("_")}
    assert set(TWENTY_ELEVEN_MEMBERS) | set(TWENTY_ELEVEN_DATA) <= public
    assert public - set(TWENTY_ELEVEN_MEMBERS) - set(TWENTY_ELEVEN_DATA) \
        == OUR_EXTRAS[cls.__name__]
    for name, kind in TWENTY_ELEVEN_DATA.items():
        assert isinstance(getattr(cls, name), kind), name
    assert KVMHypervisor.CAN_MIGRATE is True


def test_constructor_takes_no_argument_like_2011(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(constants.RUN_DIR_ENV, str(tmp_path / "run"))
    assert isinstance(KVMHypervisor(), KVMHypervisor)


def test_ancillary_files_is_a_fresh_list() -> None:
    files = KVMHypervisor.GetAncillaryFiles()
    assert files == list(KVMHypervisor.ANCILLARY_FILES)
    files.append("/etc/x")
    assert "/etc/x" not in KVMHypervisor.ANCILLARY_FILES


def test_powercycle_node_is_a_classmethod(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(KVMHypervisor, "LinuxPowercycle",
                        classmethod(lambda cls: calls.append(cls)))
    KVMHypervisor.PowercycleNode()
    assert calls == [KVMHypervisor]


def test_linux_powercycle_writes_sync_then_reboot(tmp_path) -> None:
    trigger = tmp_path / "sysrq-trigger"
    trigger.write_text("")
    KVMHypervisor.LinuxPowercycle(str(trigger))
    assert trigger.read_text() == "b"  # "s" first, then "b" (each write truncates)
    with pytest.raises(errors.HypervisorError, match="power-cycle"):
        KVMHypervisor.LinuxPowercycle(str(tmp_path / "missing" / "trigger"))


def test_validate_parameters_on_the_class(tmp_path) -> None:
    hvp = dict(constants.HVC_DEFAULTS[constants.HT_KVM], kernel_path="", root_path="",
               cdrom_image_path="/nonexistent/cd.iso")
    with pytest.raises(errors.HypervisorError, match="cdrom_image_path.*existing file"):
        KVMHypervisor.ValidateParameters(hvp)
    del hvp["acpi"]
    with pytest.raises(errors.ParameterError, match="'acpi' is missing"):
        KVMHypervisor.ValidateParameters(hvp)
    with pytest.raises(errors.ParameterError, match="'acpi' is missing"):
        KVMHypervisor(run_dir=str(tmp_path / "run")).ValidateParameters(hvp)
    with pytest.raises(errors.ParameterError, match="mapping"):
        KVMHypervisor.ValidateParameters(None)  # type: ignore[arg-type]


def test_validate_parameters_on_the_class_asks_qemu(qemu_bin: str, tmp_path) -> None:
    hvp = dict(constants.HVC_DEFAULTS[constants.HT_KVM], kernel_path="", root_path="",
               kvm_path=qemu_bin, kvm_flag="disabled")
    qemu_caps.clear_cache()
    hv = KVMHypervisor(run_dir=str(tmp_path / "run"))
    hv.ValidateParameters(hvp)
    assert os.listdir(hv.node.layout.cache_dir)  # an object caches under its run dir
    qemu_caps.clear_cache()
    KVMHypervisor.ValidateParameters(hvp)  # probes QEMU, with no run directory
    with pytest.raises(errors.HypervisorError, match="Unknown security domain user"):
        KVMHypervisor.ValidateParameters(dict(hvp, security_model="user",
                                              security_domain="no-such-user-gk"))


# --- objects built by code written for the cluster manager -------------------------

# The slots of the cluster manager's objects, Ganeti 2.5 (2011) and 3.0 (today),
# base-class slots included (TaggableObject: tags; _TIMESTAMPS, _UUID).
GANETI_SLOTS = {
    objects.Instance: {
        # 2.5
        "name", "primary_node", "os", "hypervisor", "hvparams", "beparams", "osparams",
        "admin_up", "nics", "disks", "disk_template", "network_port", "serial_no",
        "ctime", "mtime", "uuid", "tags",
        # 3.0
        "forthcoming", "secondary_nodes", "osparams_private", "admin_state",
        "admin_state_source", "disks_info", "disks_active"},
    objects.NIC: {"mac", "ip", "nicparams",
                  "name", "network", "netinfo", "pci", "hvinfo", "uuid"},
    objects.Disk: {"dev_type", "logical_id", "physical_id", "children", "iv_name", "size",
                   "mode",
                   "forthcoming", "name", "nodes", "params", "spindles", "pci", "hvinfo",
                   "serial_no", "dynamic_params", "uuid", "ctime", "mtime"},
    objects.InstanceConsole: {"instance", "kind", "message", "host", "port", "user",
                              "command", "display"},
}


@pytest.mark.parametrize("cls", list(GANETI_SLOTS), ids=lambda cls: cls.__name__)
def test_objects_have_every_cluster_manager_slot(cls: type) -> None:
    assert set(cls.__slots__) == GANETI_SLOTS[cls]
    assert len(cls.__slots__) == len(set(cls.__slots__))


def _ganeti_instance() -> objects.Instance:
    """An instance as the cluster manager's code builds it (2.5 and 3.0 fields)."""
    return objects.Instance(
        name="web1", primary_node="node1", os="debootstrap+default", hypervisor="kvm",
        hvparams={"acpi": False}, beparams={"memory": 256, "vcpus": 1},
        osparams={"mirror": "x"}, osparams_private={}, admin_up=True, admin_state="up",
        admin_state_source="admin", disk_template="plain", disks_active=True,
        disks_info=None, forthcoming=False, secondary_nodes=[], network_port=5901,
        serial_no=3, ctime=1300000000.5, mtime=1300000001.25,
        uuid="0e3c1bbd-7a8e-4bd3-a3c0-4a0c7d1f0e3e", tags={"b", "a"},
        nics=[objects.NIC(mac="aa:00:00:00:00:01", ip=None,
                          nicparams={"mode": "bridged", "link": "br0"},
                          name="eth0", network=None, netinfo=None, pci=5, hvinfo={},
                          uuid="nic-uuid")],
        disks=[objects.Disk(dev_type="drbd", logical_id=["n1", "n2", 11000, 0, 1, "s"],
                            physical_id=None, size=1024, mode="rw", iv_name="disk/0",
                            nodes=["n1", "n2"], spindles=1, serial_no=1, params={},
                            children=[objects.Disk(dev_type="plain", size=1024,
                                                   logical_id=["vg", "data"]),
                                      objects.Disk(dev_type="plain", size=128,
                                                   logical_id=["vg", "meta"])])])


def test_instance_with_every_cluster_manager_field_round_trips() -> None:
    inst = _ganeti_instance()
    assert inst.disk_template == "plain" and inst.admin_up is True
    data = json.loads(json.dumps(inst.ToDict()))
    assert data["tags"] == ["a", "b"] and data["serial_no"] == 3
    again = objects.Instance.FromDict(data)
    assert again == inst
    assert again.ToDict() == data
    child = again.disks[0].children[1]
    assert isinstance(child, objects.Disk) and child.logical_id == ["vg", "meta"]
    assert again.nics[0].uuid == "nic-uuid" and again.ctime == 1300000000.5


def test_instance_from_a_30_config_keeps_disk_uuids() -> None:
    again = objects.Instance.FromDict({"name": "web1", "disks": ["d-uuid-1", "d-uuid-2"]})
    assert again.disks == ["d-uuid-1", "d-uuid-2"]
    with pytest.raises(errors.ConfigurationError, match="nics must be a list"):
        objects.Instance.FromDict({"name": "web1", "nics": "eth0"})


def test_the_hypervisor_reads_what_it_needs_from_a_full_instance() -> None:
    inst = _ganeti_instance()
    spec = KVMHypervisor._spec(inst, [(inst.disks[0], "/dev/vg/web1")])
    assert (spec.name, spec.memory, spec.vcpus, spec.network_port) == ("web1", 256, 1, 5901)
    assert spec.tags == ["a", "b"]  # the cluster manager's tag set, in a stable order
    assert spec.uuid == inst.uuid
    assert spec.nics[0]["mac"] == "aa:00:00:00:00:01"


# --- module-level names the 2011 driver's code uses -------------------------------

# hv_base's check tuples, as the 2011 hv_base.py names them.
TWENTY_ELEVEN_HV_BASE_CHECKS = {
    "NO_CHECK": False, "REQUIRED_CHECK": True, "OPT_FILE_CHECK": False,
    "REQ_FILE_CHECK": True, "OPT_DIR_CHECK": False, "REQ_DIR_CHECK": True,
    "REQ_NET_PORT_CHECK": True, "OPT_NET_PORT_CHECK": False,
    "REQ_CPU_MASK_CHECK": True, "OPT_CPU_MASK_CHECK": False, "MIGRATION_MODE_CHECK": True,
}


@pytest.mark.parametrize("name", sorted(TWENTY_ELEVEN_HV_BASE_CHECKS))
def test_hv_base_check_names_of_2011(name: str) -> None:
    check = getattr(hv_base, name)
    assert len(check) == 5 and check[0] is TWENTY_ELEVEN_HV_BASE_CHECKS[name]
    assert callable(hv_base.ParamInSet)


def test_port_and_cpu_mask_checks() -> None:
    port_ok = hv_base.OPT_NET_PORT_CHECK[1]
    assert port_ok(8102) and not port_ok(0) and not port_ok(65536)
    mask_ok = hv_base.REQ_CPU_MASK_CHECK[1]
    assert mask_ok("0-2,5") and mask_ok("3")
    for bad in ("", "2-1", "0-1-2", "a", "1,,2", None):
        assert not mask_ok(bad), bad
    assert hv_base.parse_cpu_mask("0-2,5") == [0, 1, 2, 5]
    with pytest.raises(errors.ParameterError, match="2 > 1"):
        hv_base.parse_cpu_mask("2-1")


# Constants the 2011 driver reads, with its values.
TWENTY_ELEVEN_CONSTANTS = {
    "GANETI_RUNAS": "root", "SOCAT_ESCAPE_CODE": "0x1d", "SOCAT_USE_ESCAPE": True,
    "DTS_EXT_MIRROR": frozenset(["sharedfile", "blockdev"]), "KVM_PATH": "/usr/bin/kvm",
    "SOCAT_PATH": "/usr/bin/socat", "VNC_BASE_PORT": 5900, "HT_KVM": "kvm",
    "HT_KVM_VALID_DISK_TYPES": frozenset(["paravirtual", "ide", "scsi", "sd", "mtd",
                                          "pflash"]),
    "HT_KVM_VALID_NIC_TYPES": frozenset(["rtl8139", "ne2k_pci", "ne2k_isa", "i82551",
                                         "i82557b", "i82559er", "pcnet", "e1000",
                                         "paravirtual"]),
    "HT_KVM_VALID_BO_TYPES": frozenset(["floppy", "cdrom", "disk", "network"]),
    "HT_KVM_VALID_MOUSE_TYPES": frozenset(["mouse", "tablet"]),
    "HT_KVM_VALID_SM_TYPES": frozenset(["none", "user", "pool"]),
    "HT_VALID_CACHE_TYPES": frozenset(["default", "none", "writethrough", "writeback"]),
    "HT_KVM_FLAG_VALUES": frozenset(["enabled", "disabled"]),
    "HT_MIGRATION_MODES": frozenset(["live", "non-live"]),
    "CONS_ALL": frozenset(["ssh", "vnc", "spice", "msg"]),
    "NIC_VALID_MODES": frozenset(["bridged", "routed"]),
}


@pytest.mark.parametrize("name", sorted(TWENTY_ELEVEN_CONSTANTS))
def test_constants_the_2011_driver_reads(name: str) -> None:
    assert getattr(constants, name) == TWENTY_ELEVEN_CONSTANTS[name]


def test_serial_console_uses_the_2011_user_and_escape() -> None:
    inst = objects.Instance(name="c1", primary_node="node1")
    console = KVMHypervisor.GetInstanceConsole(inst, {"serial_console": True}, {})
    assert console.user == constants.GANETI_RUNAS
    assert console.command[4] == "STDIO,raw,echo=0,escape=" + constants.SOCAT_ESCAPE_CODE
