"""No value reaches QEMU's option parser unchecked.

A table covers every place in :mod:`ganeti_kvm.qemu.cmdline` where a value from
the instance, its parameters or the node goes into QEMU's command line.
Each value gets a comma, an ``=``, a newline and a NUL; the command line
must then either be refused with a ParameterError naming the parameter,
or carry the value so that QEMU's parser sees the same options as with a
harmless value (a ``key=value`` list with the value escaped, or a whole
argument with the value as it is).  Real QEMUs check the escaping and
the MAC check; the start path leaves nothing behind.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from ganeti_kvm import constants as c
from ganeti_kvm import errors, objects
from ganeti_kvm.core import names
from ganeti_kvm.core import params as validation
from ganeti_kvm.core.node import InstanceSpec
from ganeti_kvm.host.paths import RunDir
from ganeti_kvm.hv_kvm import KVMHypervisor
from ganeti_kvm.qemu import cmdline, macaddr, spice
from ganeti_kvm.qmp import client as qmp
from tests.helpers import kill_instances, make_instance
from tests.netns import netns, skip_unless_netns
from tests.test_cmdline import Caps10, Caps72, hvp

# Options QEMU parses as key=value,... lists, and options it takes whole.
KEYVAL_OPTIONS = frozenset(["-drive", "-chardev", "-device", "-object", "-vnc", "-run-with",
                            "-netdev", "-name", "-machine", "-boot", "-rtc", "-mon", "-m",
                            "-smp", "-spice"])
WHOLE_OPTIONS = frozenset(["-pidfile", "-D", "-kernel", "-initrd", "-append", "-mem-path",
                           "-runas", "-chroot", "-incoming", "-uuid", "-serial", "-display",
                           "-vga", "-k"])
HOSTILE = [",", "=", "\n", "\0"]
PATHS = RunDir("/run/gk").instance("web1")
SPEC = cmdline.MachineSpec(name="web1", memory=128, vcpus=1, network_port=5901)
SPICE_TLS_SPEC = cmdline.MachineSpec(
    name="web1", memory=128, vcpus=1, network_port=5901,
    spice_tls=spice.TlsFiles(cacert="/ca.pem", cert="/s.pem", key="/s.pem"))


def qemu_opts(text: str) -> list[tuple[str, str | None]]:
    """How QEMU's option parser splits ``text``: ``,,`` is a comma, ``,`` a separator."""
    items, current, index = [], "", 0
    while index < len(text):
        if text[index] == ",":
            if text[index + 1:index + 2] == ",":
                current += ","
                index += 2
                continue
            items.append(current)
            current = ""
        else:
            current += text[index]
        index += 1
    items.append(current)
    return [(item.split("=", 1)[0], item.split("=", 1)[1]) if "=" in item else (item, None)
            for item in items]


def build(spec: cmdline.MachineSpec = SPEC, disks: tuple = (), caps: Any = None,
          paths: Any = PATHS, **params: Any) -> list[str]:
    return cmdline.build_argv(spec, list(disks), hvp(**params), caps or Caps72(), paths)


def _run_as(value: str, caps: Any) -> list[str]:
    return build(cmdline.MachineSpec(name="web1", memory=128, vcpus=1, run_as=value),
                 caps=caps, security_model="user", security_domain="x")


# Every value place: parameter name -> (harmless value, argv for a value).
CASES: dict[str, tuple[str, Callable[[str], list[str]]]] = {
    "kvm_path": ("/usr/bin/kvm", lambda v: build(kvm_path=v)),
    "name": ("web1", lambda v: build(cmdline.MachineSpec(name=v, memory=128, vcpus=1))),
    "run_dir": ("/run/gk", lambda v: build(
        cmdline.MachineSpec(name="web1", memory=128, vcpus=1, run_as="nobody"),
        paths=RunDir(v).instance("web1"), security_model="user", security_domain="nobody",
        use_chroot=True)),
    "run_dir (run-with)": ("/run/gk", lambda v: build(
        cmdline.MachineSpec(name="web1", memory=128, vcpus=1, run_as="nobody"),
        paths=RunDir(v).instance("web1"), caps=Caps10(), security_model="user",
        security_domain="nobody", use_chroot=True)),
    "block device #0 path": ("/dev/vg/disk0", lambda v: build(
        disks=(cmdline.BlockDevice(v),))),
    "cdrom_image_path": ("/srv/iso/a.iso", lambda v: build(cdrom_image_path=v)),
    "cdrom2_image_path": ("/srv/iso/b.iso", lambda v: build(
        cdrom_image_path="/srv/iso/a.iso", cdrom2_image_path=v, cdrom_disk_type="paravirtual")),
    "floppy_image_path": ("/srv/fd.img", lambda v: build(floppy_image_path=v)),
    "kernel_path": ("/boot/vmlinuz", lambda v: build(kernel_path=v, root_path="/dev/vda1")),
    "initrd_path": ("/boot/initrd", lambda v: build(
        kernel_path="/boot/vmlinuz", root_path="/dev/vda1", initrd_path=v)),
    "root_path": ("/dev/vda1", lambda v: build(kernel_path="/boot/vmlinuz", root_path=v)),
    "kernel_args": ("ro quiet", lambda v: build(
        kernel_path="/boot/vmlinuz", root_path="/dev/vda1", kernel_args=v)),
    "mem_path": ("/hugepages", lambda v: build(mem_path=v)),
    "vnc_bind_address": ("/srv/vnc", lambda v: build(vnc_bind_address=v)),
    "vnc_bind_address (IP)": ("127.0.0.1", lambda v: build(vnc_bind_address=v)),
    "vnc_x509_path": ("/etc/x509", lambda v: build(
        vnc_bind_address="0.0.0.0", vnc_tls=True, vnc_x509_path=v)),
    "security_domain (-runas)": ("qemu-user", lambda v: _run_as(v, Caps72())),
    "security_domain (run-with)": ("qemu-user", lambda v: _run_as(v, Caps10())),
    "disk_cache": ("writeback", lambda v: build(disks=(cmdline.BlockDevice("/d"),),
                                                 disk_cache=v)),
    "boot_order": ("cdrom", lambda v: build(boot_order=v, cdrom_image_path="/srv/a.iso")),
    "usb_mouse": ("tablet", lambda v: build(usb_mouse=v)),
    "serial_speed": ("38400", lambda v: build(
        kernel_path="/boot/vmlinuz", root_path="/dev/vda1",
        serial_speed=int(v) if v.isdigit() else v)),
    "mac": ("52:54:00:12:34:56", lambda v: cmdline.build_nic_argv(
        [cmdline.NicSpec("virtio-net-pci", v, 5)], boot_network=False, name="web1")),
    "nic_type": ("e1000", lambda v: cmdline.build_nic_argv(
        [cmdline.NicSpec(v, "52:54:00:12:34:56", 5)], boot_network=False, name="web1")),
    "incoming": ("tcp:192.0.2.1:8102", lambda v: cmdline.start_flags(incoming=v)),
    c.HV_KEYMAP: ("en-us", lambda v: build(keymap=v, vnc_bind_address="127.0.0.1")),
    names.HV_KVM_MACHINE_VERSION: ("pc-i440fx-7.2", lambda v: build(machine_version=v)),
    names.HV_SOUNDHW: ("hda", lambda v: build(soundhw=v)),
    names.HV_USB_DEVICES: ("tablet", lambda v: build(usb_devices=v)),
    names.HV_KVM_SPICE_BIND: ("127.0.0.1", lambda v: build(spice_bind=v)),
    f"{names.HV_KVM_SPICE_BIND} (resolved)": ("192.0.2.7", lambda v: build(
        cmdline.MachineSpec(name="web1", memory=128, vcpus=1, network_port=5901,
                            spice_address=v), spice_bind="eth0")),
    names.HV_KVM_SPICE_TLS_CIPHERS: ("HIGH:-DES", lambda v: build(
        SPICE_TLS_SPEC, spice_bind="127.0.0.1", spice_use_tls=True, spice_tls_ciphers=v)),
    f"{names.HV_KVM_SPICE_USE_TLS} (certificate files)": ("/var/lib/ganeti/spice.pem",
                                                           lambda v: build(
        cmdline.MachineSpec(name="web1", memory=128, vcpus=1, network_port=5901,
                            spice_tls=spice.TlsFiles(cacert=v, cert=v, key=v)),
        spice_bind="127.0.0.1", spice_use_tls=True)),
}


def hostile(benign: str, char: str) -> str:
    middle = len(benign) // 2
    return benign[:middle] + char + benign[middle:]


def assert_same_options(base: list[str], argv: list[str], benign: str, bad: str) -> None:
    """``argv`` is ``base`` with ``benign`` replaced by ``bad`` where QEMU will read it."""
    assert len(argv) == len(base), (base, argv)
    changed = 0
    for index, (was, now) in enumerate(zip(base, argv, strict=True)):
        if was == now:
            continue
        changed += 1
        option = argv[index - 1] if index else "(binary)"
        if option in KEYVAL_OPTIONS:
            before, after = qemu_opts(was), qemu_opts(now)
            assert [k for k, _ in after] == [k for k, _ in before], (option, was, now)
            for (_, old), (_, new) in zip(before, after, strict=True):
                assert new == (old.replace(benign, bad) if old is not None else None), \
                    (option, now)
        else:
            assert option in WHOLE_OPTIONS or index == 0, (option, now)
            assert now == was.replace(benign, bad), (option, now)
    assert changed, "the value did not reach the command line"


@pytest.mark.parametrize("char", HOSTILE, ids=["comma", "equals", "newline", "nul"])
@pytest.mark.parametrize("place", sorted(CASES))
def test_every_value_is_refused_or_escaped(place: str, char: str) -> None:
    benign, make = CASES[place]
    base = make(benign)
    bad = hostile(benign, char)
    try:
        argv = make(bad)
    except errors.ParameterError as err:
        assert err.name is not None and place.startswith(err.name), (place, err.name, err)
        assert err.name.lower() in str(err).lower()
        return
    assert char not in "\n\0", f"{place}: a {char!r} reached the command line"
    assert_same_options(base, argv, benign, bad)


def test_the_table_covers_every_free_text_parameter_the_command_line_uses() -> None:
    """A guard: a text parameter that cmdline.py starts to use needs a row in CASES."""
    used = set()
    for module in (cmdline, spice):  # spice builds -spice for cmdline
        with open(module.__file__ or "", encoding="utf-8") as handle:
            used |= {getattr(names, n)
                     for n in re.findall(r"\bc\.(HV_[A-Z0-9_]+)", handle.read())}
    free_text = {key for key, (_, _, message, _, _) in validation.PARAMETERS.items()
                 if names.PARAMETER_TYPES[key] in (c.VTYPE_STRING, c.VTYPE_MAYBE_STRING)
                 and not (message or "").startswith("must be one of")}
    # read by the library, sent over QMP
    never_in_argv = {c.HV_VNC_PASSWORD_FILE, names.HV_KVM_SPICE_PASSWORD_FILE}
    # QEMU options by definition, each word a whole argv element after ours, checked word
    # by word against the library's own options in tests/test_devices_params.py.
    never_in_argv.add(names.HV_KVM_EXTRA)
    covered = {place.split(" (")[0] for place in CASES}
    assert (used & free_text) - never_in_argv <= covered


def test_uuid_that_is_no_uuid_is_left_out() -> None:
    for char in HOSTILE:
        argv = build(cmdline.MachineSpec(name="web1", memory=128, vcpus=1,
                                         uuid=f"5bd2a3b4-1c3e{char}-4f4a"))
        assert "-uuid" not in argv


@pytest.mark.parametrize("field, value", [("memory", "128,maxmem=1G"), ("vcpus", "1,sockets=9"),
                                          ("memory", True), ("vcpus", 0)])
def test_memory_and_vcpus_are_whole_numbers(field: str, value: Any) -> None:
    values = {"memory": 128, "vcpus": 1, field: value}
    with pytest.raises(errors.ParameterError) as info:
        build(cmdline.MachineSpec(name="web1", **values))
    assert info.value.name == field


def test_huge_values_are_refused_naming_the_parameter() -> None:
    huge_args = "x" * 200_000
    with pytest.raises(errors.ParameterError, match="kernel_args") as info:
        build(kernel_path="/boot/vmlinuz", root_path="/dev/vda1", kernel_args=huge_args)
    assert len(str(info.value)) < 1000  # the value is not repeated in full
    with pytest.raises(errors.ParameterError, match="block device #0 path"):
        cmdline.normalize_block_devices([(objects.Disk(), "/" + "d" * 200_000)])
    with pytest.raises(errors.ParameterError, match="block device #0 path"):
        cmdline.normalize_block_devices([(objects.Disk(), "/dev/a\0b")])


# --- MACs ---------------------------------------------------------------------

BAD_MACS = ["52:54:00:15:33:47,romfile=/etc/shadow", "52:54:00:15:33:47,addr=0x1f",
            "52:54:00:15:33:47,id=evil,bootindex=9", "52:54:00:15:33", "52-54-00-15-33-47",
            "525400153347", "01:00:5e:00:00:01", "ff:ff:ff:ff:ff:ff", "00:00:00:00:00:00",
            " 52:54:00:15:33:47", "52:54:00:15:33:47\n", "52:54:00:15:33:4g", "", None, 42,
            "５2:54:00:15:33:47"]


@pytest.mark.parametrize("mac", BAD_MACS)
def test_bad_macs_are_refused_naming_instance_nic_and_value(mac: Any) -> None:
    with pytest.raises(errors.ParameterError) as info:
        macaddr.check_nics("web1", [{"mac": "52:54:00:00:00:01"}, {"mac": mac}])
    message = str(info.value)
    assert "web1" in message and "NIC 1" in message and repr(mac) in message
    with pytest.raises(errors.ParameterError):
        cmdline.build_nic_argv([cmdline.NicSpec("e1000", mac, 5)], False, name="web1")


def test_upper_case_macs_are_normalised_as_the_cluster_manager_does() -> None:
    nics = [{"mac": "52:54:00:AB:cd:EF"}]
    macaddr.check_nics("web1", nics)
    assert nics == [{"mac": "52:54:00:ab:cd:ef"}]


def leftovers(hv: KVMHypervisor) -> list[str]:
    """Files under the run directory besides the layout, locks and the QEMU probe cache."""
    layout = hv.node.layout
    found = []
    for top in layout.all_dirs():
        if top in (layout.root, layout.lock_dir, layout.cache_dir):
            continue
        found += [os.path.join(top, entry) for entry in os.listdir(top)]
    return found


@pytest.fixture
def ns_hv(short_dir: str) -> Iterator[KVMHypervisor]:
    """A hypervisor whose TAP devices would go into a namespace of the test's own."""
    skip_unless_netns()
    with netns("gk-inj") as name:
        hypervisor = KVMHypervisor(run_dir=os.path.join(short_dir, "run"), netns=name)
        try:
            yield hypervisor
        finally:
            kill_instances(hypervisor.node.layout.root)


@pytest.mark.parametrize("mac", BAD_MACS[:3])
def test_start_with_an_injected_mac_starts_nothing(ns_hv, qemu72, mac) -> None:
    hvparams = dict(c.HVC_DEFAULTS[c.HT_KVM], kvm_path=qemu72, kernel_path="",
                    serial_console=False, kvm_flag="disabled")
    nic = objects.NIC(mac=mac, nicparams={"mode": "bridged", "link": "br0"})
    inst = make_instance("inj1", hvparams, memory=64, nics=[nic])
    with pytest.raises(errors.ParameterError) as info:
        ns_hv.StartInstance(inst, [])
    assert "inj1" in str(info.value) and "NIC 0" in str(info.value)
    assert mac in str(info.value)
    assert ns_hv.ListInstances() == []
    assert leftovers(ns_hv) == []


def test_core_start_checks_macs_without_the_adapter(ns_hv, qemu72) -> None:
    """The contract-neutral core refuses a bad MAC too (a future adapter gets it)."""
    hvparams = validation.fill({"kvm_path": qemu72, "kernel_path": "",
                                "serial_console": False, "kvm_flag": "disabled"})
    spec = InstanceSpec(name="inj2", hvparams=hvparams, memory=64, vcpus=1,
                        nics=[{"mac": BAD_MACS[0], "nicparams": {}}])
    with pytest.raises(errors.ParameterError, match="NIC 0"):
        ns_hv.node.start(spec)
    assert leftovers(ns_hv) == []


# --- real QEMU: the escaping is what QEMU reads ------------------------------------

def test_escaped_values_reach_qemu_intact(hv, qemu_bin, short_dir) -> None:
    """A disk path with ',' and '=' and a VNC directory with '=' open exactly those files.

    (The parameter checks refuse commas in the VNC directory.)
    """
    odd = os.path.join(short_dir, "odd=dir")
    os.mkdir(odd)
    disk = os.path.join(short_dir, "disk,format=qcow2,x=y.raw")
    with open(disk, "wb") as handle:
        handle.truncate(1 << 20)
    hvparams = dict(c.HVC_DEFAULTS[c.HT_KVM], kvm_path=qemu_bin, kernel_path="",
                    serial_console=False, kvm_flag="disabled", vnc_bind_address=odd)
    inst = make_instance("esc1", hvparams, memory=64)
    hv.StartInstance(inst, [(objects.Disk(mode="rw"), disk)], startup_paused=True)
    block = hv.node.qmp("esc1", "query-block")
    files = [b["inserted"]["file"] for b in block if "inserted" in b]
    assert files == [disk]
    assert os.path.exists(os.path.join(odd, "esc1.vnc"))
    hv.StopInstance(inst, force=True)


def test_qemu_reads_a_comma_in_name_as_an_option(qemu_bin, short_dir, reaper) -> None:
    """Why -name is refused, not passed: QEMU would read the rest as options."""
    sock = os.path.join(short_dir, "q")
    pidfile = os.path.join(short_dir, "pid")
    subprocess.run([qemu_bin, "-name", "foo,debug-threads=on", "-machine", "none", "-S",
                    "-nodefaults", "-display", "none", "-daemonize", "-pidfile", pidfile,
                    "-qmp", f"unix:{sock},server=on,wait=off"], check=True, timeout=60)
    reaper.add_pidfile(pidfile)
    assert qmp.qmp_execute(sock, "query-name", timeout=10) == {"name": "foo"}
    with pytest.raises(errors.ParameterError, match="name"):
        build(cmdline.MachineSpec(name="foo,debug-threads=on", memory=64, vcpus=1))


# --- the last resort: what the kernel refuses is a QemuLaunchError ----------------

@pytest.mark.parametrize("value, why", [("x" * 200_000, "bytes long"), ("a\0b", "NUL")],
                         ids=["e2big", "nul"])
def test_launch_turns_a_refused_argv_into_a_launch_error(short_dir, value, why) -> None:
    from ganeti_kvm.core.node import KvmNode

    node = KvmNode(os.path.join(short_dir, "run"))
    node.ensure_dirs()
    paths = node.paths("argv1")
    with pytest.raises(errors.QemuLaunchError) as info:
        node._launch(["/bin/true", "-append", value], [], "argv1", paths)
    message = str(info.value)
    assert "argv1" in message and "-append" in message and why in message
    assert len(message) < 1000


@pytest.mark.parametrize("target, host", [("192.0.2.20", "192.0.2.20"), ("::1", "[::1]"),
                                          ("[2001:db8::1]", "[2001:db8::1]"),
                                          ("node2.example.com", "node2.example.com")])
def test_migration_targets_that_are_addresses(target: str, host: str) -> None:
    assert cmdline.uri_host(target) == host
    assert cmdline.start_flags(incoming=f"tcp:{host}:8102")[-1] == f"tcp:{host}:8102"


@pytest.mark.parametrize("target", ["192.0.2.20,to=9000", "192.0.2.20:1", "a b", "x;quit",
                                    "", "-x.example", None, 5])
def test_migration_targets_that_would_inject_are_refused(target: Any) -> None:
    """QEMU reads ``tcp:HOST:PORT,to=...`` options, and HMP splits at blanks."""
    with pytest.raises(errors.ParameterError, match="migration target"):
        cmdline.uri_host(target)
    if isinstance(target, str):
        with pytest.raises(errors.ParameterError, match="incoming"):
            cmdline.start_flags(incoming=f"tcp:{target}:8102")
