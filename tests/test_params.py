"""Parameter checks: every key with a good and a bad value, and the cross-checks."""

from __future__ import annotations

import os
from typing import Any

import pytest

from ganeti_kvm import constants as c
from ganeti_kvm import errors
from ganeti_kvm.core import params as validation
from ganeti_kvm.host import paths
from ganeti_kvm.hv_kvm import KVMHypervisor

GOOD_FILE = os.path.realpath(__file__)
GOOD_DIR = os.path.dirname(GOOD_FILE)


def params(**overrides: Any) -> dict[str, Any]:
    result = dict(c.HVC_DEFAULTS[c.HT_KVM])
    result.update(kernel_path="", root_path="")
    result.update(overrides)
    return result


# (key, a value the syntax check accepts, a value it refuses)
SYNTAX_CASES = [
    (c.HV_KVM_PATH, "/usr/bin/kvm", "kvm"),
    (c.HV_KERNEL_PATH, GOOD_FILE, "boot/vmlinuz"),
    (c.HV_INITRD_PATH, "", "/boot/../initrd"),
    (c.HV_ROOT_PATH, "/dev/vda1", "/dev/vda1\nrw"),
    (c.HV_KERNEL_ARGS, "ro quiet", "ro\ninit=/bin/sh"),
    (c.HV_SERIAL_SPEED, 115200, 12345),
    (c.HV_VNC_BIND_ADDRESS, "127.0.0.1", "not-an-address"),
    (c.HV_VNC_BIND_ADDRESS, "/var/run/vnc", "relative/dir"),
    (c.HV_VNC_X509, "", "x509"),
    (c.HV_VNC_PASSWORD_FILE, "", "/etc/vnc,pw"),
    (c.HV_KVM_FLOPPY_IMAGE_PATH, "", "/img\n"),
    (c.HV_CDROM_IMAGE_PATH, "", "cd.iso"),
    (c.HV_KVM_CDROM2_IMAGE_PATH, "", "/a,b.iso"),
    (c.HV_BOOT_ORDER, c.HT_BO_NETWORK, "usb"),
    (c.HV_NIC_TYPE, c.HT_NIC_E1000, "virtio"),
    (c.HV_DISK_TYPE, c.HT_DISK_IDE, "nvme"),
    (c.HV_KVM_CDROM_DISK_TYPE, c.HT_DISK_SCSI, "sata"),
    (c.HV_USB_MOUSE, c.HT_MOUSE_MOUSE, "trackball"),
    (c.HV_MIGRATION_PORT, 8102, 70000),
    (c.HV_MIGRATION_PORT, 1, 0),
    (c.HV_MIGRATION_BANDWIDTH, 100, 0),
    (c.HV_MIGRATION_DOWNTIME, 30, -5),
    (c.HV_MIGRATION_MODE, c.HT_MIGRATION_NONLIVE, "teleport"),
    (c.HV_DISK_CACHE, c.HT_CACHE_WBACK, "unsafe"),
    (c.HV_SECURITY_MODEL, c.HT_SM_POOL, "selinux"),
    (c.HV_KVM_FLAG, c.HT_KVM_DISABLED, "maybe"),
    (c.HV_MEM_PATH, "", "hugepages"),
    (c.HV_KEYMAP, "de-ch", "de ch"),
    (c.HV_KEYMAP, "en-us", "/usr/share/keymaps/de"),
    (c.HV_REBOOT_BEHAVIOR, c.INSTANCE_REBOOT_EXIT, "halt"),
    (c.HV_KVM_SPICE_BIND, "127.0.0.1", "127.0.0.1,port=1"),
    (c.HV_KVM_SPICE_BIND, "eth0", "eth0 eth1"),
    (c.HV_KVM_SPICE_IP_VERSION, 6, 5),
]

BOOL_KEYS = [c.HV_ACPI, c.HV_SERIAL_CONSOLE, c.HV_VNC_TLS, c.HV_VNC_X509_VERIFY,
             c.HV_USE_LOCALTIME, c.HV_VHOST_NET, c.HV_KVM_USE_CHROOT]


@pytest.mark.parametrize("key, good, bad", SYNTAX_CASES,
                         ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(SYNTAX_CASES)])
def test_syntax_check_per_key(key: str, good: Any, bad: Any) -> None:
    base = params()
    if key == c.HV_KERNEL_PATH:
        base[c.HV_ROOT_PATH] = "/dev/vda1"
    KVMHypervisor.CheckParameterSyntax({**base, key: good})
    with pytest.raises(errors.HypervisorError) as info:
        KVMHypervisor.CheckParameterSyntax({**base, key: bad})
    assert key in str(info.value)
    assert repr(bad) in str(info.value)


@pytest.mark.parametrize("key", BOOL_KEYS)
def test_booleans_refuse_strings(key: str) -> None:
    KVMHypervisor.CheckParameterSyntax(params(**{key: False}))
    with pytest.raises(errors.HypervisorError, match=key):
        KVMHypervisor.CheckParameterSyntax(params(**{key: "yes"}))


@pytest.mark.parametrize("key, value", [
    (c.HV_MIGRATION_PORT, "8102"), (c.HV_SERIAL_SPEED, 38400.0),
    (c.HV_KERNEL_ARGS, 7), (c.HV_MIGRATION_BANDWIDTH, True), (c.HV_NIC_TYPE, None),
])
def test_wrong_types_name_the_key(key: str, value: Any) -> None:
    with pytest.raises(errors.ParameterError, match=key) as info:
        KVMHypervisor.CheckParameterSyntax(params(**{key: value}))
    assert info.value.name == key


def test_unknown_and_missing_keys() -> None:
    with pytest.raises(errors.HypervisorError, match="'turbo' is not supported"):
        KVMHypervisor.CheckParameterSyntax(params(turbo=True))
    incomplete = params()
    del incomplete[c.HV_ACPI]
    with pytest.raises(errors.HypervisorError, match="'acpi' is missing"):
        KVMHypervisor.CheckParameterSyntax(incomplete)
    with pytest.raises(errors.HypervisorError, match="mapping"):
        KVMHypervisor.CheckParameterSyntax(["acpi"])  # type: ignore[arg-type]


@pytest.mark.parametrize("overrides, message", [
    ({c.HV_KERNEL_PATH: GOOD_FILE, c.HV_ROOT_PATH: ""}, "Need a root partition"),
    ({c.HV_VNC_X509_VERIFY: True}, "vnc_x509_path must be defined"),
    ({c.HV_BOOT_ORDER: c.HT_BO_CDROM}, "without an ISO path"),
    ({c.HV_BOOT_ORDER: c.HT_BO_FLOPPY}, "floppy"),
    ({c.HV_SECURITY_MODEL: c.HT_SM_USER}, "security domain"),
    ({c.HV_SECURITY_MODEL: c.HT_SM_NONE, c.HV_SECURITY_DOMAIN: "nobody"},
     "Cannot have a security domain"),
    ({c.HV_SECURITY_MODEL: c.HT_SM_POOL, c.HV_SECURITY_DOMAIN: "nobody"},
     "Cannot have a security domain"),
    ({c.HV_VNC_TLS: True}, "vnc_bind_address"),
    ({c.HV_VHOST_NET: True, c.HV_NIC_TYPE: c.HT_NIC_E1000}, "paravirtual"),
    ({c.HV_INITRD_PATH: GOOD_FILE}, "but kernel_path is empty"),
])
def test_cross_checks(overrides: dict, message: str) -> None:
    with pytest.raises(errors.HypervisorError, match=message):
        KVMHypervisor.CheckParameterSyntax(params(**overrides))


# (overrides, the key the error is about, words every message must carry:
# each key to change and at least one value that would be accepted)
CROSS_CHECK_GUIDANCE = [
    ({c.HV_KERNEL_PATH: GOOD_FILE, c.HV_ROOT_PATH: ""}, c.HV_ROOT_PATH,
     ["kernel_path", "root_path", "/dev/vda1", 'kernel_path to ""']),
    ({c.HV_INITRD_PATH: GOOD_FILE}, c.HV_INITRD_PATH,
     ["initrd_path", "kernel_path", 'initrd_path to ""']),
    ({c.HV_VNC_X509_VERIFY: True}, c.HV_VNC_X509,
     ["vnc_x509_verify", "vnc_x509_path", "vnc_x509_verify to false"]),
    ({c.HV_VNC_X509: GOOD_DIR, c.HV_VNC_BIND_ADDRESS: "127.0.0.1"}, c.HV_VNC_X509,
     ["vnc_x509_path", "vnc_tls to true", 'vnc_x509_path to ""']),
    ({c.HV_VNC_TLS: True}, c.HV_VNC_TLS,
     ["vnc_tls is true", "vnc_bind_address", "IPv4 address", "vnc_tls to false"]),
    ({c.HV_VNC_PASSWORD_FILE: GOOD_FILE}, c.HV_VNC_PASSWORD_FILE,
     ["vnc_password_file", "vnc_bind_address", 'vnc_password_file to ""']),
    ({c.HV_BOOT_ORDER: c.HT_BO_CDROM}, c.HV_BOOT_ORDER,
     ["boot_order is 'cdrom'", "cdrom_image_path", "boot_order to disk, floppy or network"]),
    ({c.HV_BOOT_ORDER: c.HT_BO_FLOPPY}, c.HV_BOOT_ORDER,
     ["boot_order is 'floppy'", "floppy_image_path", "boot_order to cdrom, disk or network"]),
    ({c.HV_KVM_CDROM2_IMAGE_PATH: GOOD_FILE}, c.HV_KVM_CDROM2_IMAGE_PATH,
     ["cdrom2_image_path", "cdrom_image_path", 'cdrom2_image_path to ""']),
    ({c.HV_SECURITY_MODEL: c.HT_SM_USER}, c.HV_SECURITY_DOMAIN,
     ["security_model is 'user'", "security_domain", "security_model to none or pool"]),
    ({c.HV_SECURITY_MODEL: c.HT_SM_NONE, c.HV_SECURITY_DOMAIN: "nobody"},
     c.HV_SECURITY_DOMAIN,
     ["security_model is 'none'", "'nobody'", 'security_domain to ""',
      "security_model to 'user'"]),
    ({c.HV_SECURITY_MODEL: c.HT_SM_POOL, c.HV_SECURITY_DOMAIN: "nobody"},
     c.HV_SECURITY_DOMAIN,
     ["security_model is 'pool'", 'security_domain to ""', "security_model to 'user'"]),
    ({c.HV_VHOST_NET: True, c.HV_NIC_TYPE: c.HT_NIC_E1000}, c.HV_VHOST_NET,
     ["vhost_net is true", "nic_type is 'e1000'", "nic_type to 'paravirtual'",
      "vhost_net to false"]),
]


@pytest.mark.parametrize("overrides, key, words", CROSS_CHECK_GUIDANCE,
                         ids=[f"{k}-{i}" for i, (_, k, _) in enumerate(CROSS_CHECK_GUIDANCE)])
def test_cross_check_messages_name_keys_and_allowed_values(overrides: dict, key: str,
                                                            words: list[str]) -> None:
    with pytest.raises(errors.ParameterError) as info:
        KVMHypervisor.CheckParameterSyntax(params(**overrides))
    for word in words:
        assert word in str(info.value)
    assert info.value.name == key


class FakeCaps:
    path = "/usr/bin/fake-qemu"
    has_runas = True
    has_run_with_user = False
    has_chroot = True
    has_run_with_chroot = False

    def __init__(self, devices: set[str] | None = None, accels=("kvm", "tcg")) -> None:
        self.devices = devices
        self.accels = set(accels)

    def has_device(self, name: str) -> bool:
        return self.devices is None or name in self.devices

    def has_accel(self, name: str) -> bool:
        return name in self.accels


@pytest.mark.parametrize("overrides, message", [
    ({c.HV_DISK_TYPE: c.HT_DISK_MTD}, "no MTD device"),
    ({c.HV_DISK_TYPE: c.HT_DISK_PFLASH}, "replaces the firmware"),
    ({c.HV_SECURITY_MODEL: c.HT_SM_USER, c.HV_SECURITY_DOMAIN: "no-such-user-gk"},
     "Unknown security domain user no-such-user-gk"),
    ({c.HV_VHOST_NET: True}, "/nonexistent/vhost-net does not exist"),
    ({c.HV_KVM_FLAG: c.HT_KVM_ENABLED}, "/nonexistent/kvm is not usable"),
])
def test_node_checks(overrides: dict, message: str) -> None:
    with pytest.raises(errors.HypervisorError, match=message):
        validation.check_node(params(**overrides), FakeCaps(),
                              vhost_device="/nonexistent/vhost-net",
                              kvm_device="/nonexistent/kvm")


class PoorCaps(FakeCaps):
    """A QEMU that can neither drop privileges nor chroot nor use KVM."""
    has_runas = False
    has_chroot = False


@pytest.mark.parametrize("overrides, caps, words", [
    ({c.HV_CDROM_IMAGE_PATH: GOOD_FILE, c.HV_KVM_CDROM_DISK_TYPE: c.HT_DISK_SD}, FakeCaps(),
     ["cdrom_disk_type sd", "cdrom_image_path", "cdrom_disk_type to ide, paravirtual, scsi"]),
    ({c.HV_SECURITY_MODEL: c.HT_SM_USER, c.HV_SECURITY_DOMAIN: "no-such-user-gk"},
     FakeCaps(), ["security_model is 'user'", "security_domain 'no-such-user-gk'"]),
    ({c.HV_SECURITY_MODEL: c.HT_SM_USER, c.HV_SECURITY_DOMAIN: "nobody"}, PoorCaps(),
     ["security_model 'user'", "kvm_path", "security_model to none or pool"]),
    ({c.HV_KVM_USE_CHROOT: True}, PoorCaps(), ["use_chroot", "kvm_path", "use_chroot to false"]),
    ({c.HV_KVM_FLAG: c.HT_KVM_ENABLED}, FakeCaps(),
     ["kvm_flag is enabled", "kvm_flag to disabled"]),
    ({c.HV_KVM_FLAG: c.HT_KVM_ENABLED}, FakeCaps(accels=("tcg",)),
     ["kvm_flag enabled", "kvm_path", "kvm_flag to disabled"]),
    ({c.HV_VNC_BIND_ADDRESS: "127.0.0.1", c.HV_VNC_TLS: True, c.HV_VNC_X509: GOOD_DIR},
     FakeCaps(), ["vnc_x509_path", "server-cert.pem", "vnc_tls true"]),
])
def test_node_check_messages_name_keys_and_allowed_values(overrides: dict, caps: FakeCaps,
                                                          words: list[str]) -> None:
    with pytest.raises(errors.ParameterError) as info:
        validation.check_node(params(**overrides), caps, kvm_device="/nonexistent/kvm"
                              if "kvm_flag is enabled" in words else "/dev/null")
    for word in words:
        assert word in str(info.value)


def test_node_check_names_missing_devices() -> None:
    with pytest.raises(errors.HypervisorError, match="lacks the device.*e1000"):
        validation.check_node(params(**{c.HV_NIC_TYPE: c.HT_NIC_E1000}),
                              FakeCaps(devices={"virtio-blk-pci"}))


def test_node_check_user_and_password_file(tmp_path) -> None:
    validation.check_node(params(**{c.HV_SECURITY_MODEL: c.HT_SM_USER,
                                    c.HV_SECURITY_DOMAIN: "nobody"}), FakeCaps())
    empty = tmp_path / "pw"
    empty.write_text("")
    hv = {c.HV_VNC_BIND_ADDRESS: "127.0.0.1", c.HV_VNC_PASSWORD_FILE: str(empty)}
    with pytest.raises(errors.HypervisorError, match="is empty"):
        validation.check_node(params(**hv), FakeCaps())
    empty.write_text("s3cret-value\n")
    validation.check_node(params(**hv), FakeCaps())
    assert validation.read_vnc_password(str(empty)) == "s3cret-value"
    with pytest.raises(errors.HypervisorError) as info:
        validation.read_vnc_password(str(tmp_path / "missing"))
    assert "s3cret" not in str(info.value)


def test_validate_parameters_checks_files(tmp_path) -> None:
    hv = KVMHypervisor(run_dir=str(tmp_path / "run"))
    with pytest.raises(errors.HypervisorError, match="cdrom_image_path.*existing file"):
        hv.ValidateParameters(params(**{c.HV_CDROM_IMAGE_PATH: "/nonexistent/cd.iso"}))


@pytest.mark.parametrize("name", ["a b", "a/b", "a;rm -rf /", "$(id)", "`id`", "..", "",
                                  "-x", "a" * 64, "inst\n", None, 5])
def test_bad_instance_names(name: Any) -> None:
    with pytest.raises(errors.HypervisorError, match="Invalid instance name"):
        paths.check_instance_name(name)


@pytest.mark.parametrize("name", ["web1", "web1.example.com", "a_b-c", "x" * 63])
def test_good_instance_names(name: str) -> None:
    assert paths.check_instance_name(name) == name


def test_socket_path_length_is_checked() -> None:
    layout = paths.RunDir("/" + "d" * 90)
    with pytest.raises(errors.HypervisorError, match="longer than 107 bytes"):
        layout.instance("instance-name-x")
