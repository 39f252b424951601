"""SPICE: the command line, the checks, the console, and real QEMUs serving it.

The real-QEMU tests start guest-less instances paused (no guest is needed
for the SPICE server) and read the effect back from QEMU: ``query-spice``
(address, port, TLS port, authentication), ``query-chardev`` and QOM (the
agent's channel), ``query-pci`` (its controller's slot), a SPICE client's
link handshake on the port (the server's answer, and with a password the
ticket check), a TLS handshake on the TLS port, and where QMP has no
query for an option (the compressions), QEMU's own list of ``-spice`` keys
(``query-command-line-options``, asked when probed) and the value QEMU
took on its command line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import ssl
import struct
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from ganeti_kvm import errors
from ganeti_kvm.core import hardware, runtime
from ganeti_kvm.core import names as c
from ganeti_kvm.core import params as core_params
from ganeti_kvm.ganeti3 import KVMHypervisor as G3Hypervisor
from ganeti_kvm.ganeti3 import _ganeti
from ganeti_kvm.ganeti3 import params as g3params
from ganeti_kvm.host import ifaddr
from ganeti_kvm.host.paths import RunDir
from ganeti_kvm.hv_kvm import KVMHypervisor
from ganeti_kvm.qemu import caps as qemu_caps
from ganeti_kvm.qemu import cmdline, devices, spice
from tests.certs import make_x509_dir
from tests.helpers import free_vnc_port, g3_instance, make_instance, node_hypervisors, recv_exact
from tests.test_cmdline import Caps72, hvp

PATHS = RunDir("/run/gk").instance("web1")
SPEC = cmdline.MachineSpec(name="web1", memory=256, vcpus=1, network_port=5901)
TLS = spice.TlsFiles(cacert="/var/lib/ganeti/spice-ca.pem", cert="/var/lib/ganeti/spice.pem",
                     key="/var/lib/ganeti/spice.pem")
SPICE_KEYS = frozenset([
    "addr", "port", "tls-port", "ipv4", "ipv6", "disable-ticketing", "x509-cacert-file",
    "x509-cert-file", "x509-key-file", "tls-ciphers", "image-compression",
    "jpeg-wan-compression", "zlib-glz-wan-compression", "streaming-video",
    "playback-compression", "agent-mouse"])
SPICE_LINK_OK = 0
SPICE_LINK_PERMISSION_DENIED = 7


def after(argv: list[str], option: str) -> list[str]:
    return argv[argv.index(option):]


def spice_value(argv: list[str]) -> list[str]:
    return argv[argv.index("-spice") + 1].split(",")


# --- the command line ------------------------------------------------------------------


def test_golden_spice_with_the_agent_and_qxl() -> None:
    argv = cmdline.build_argv(SPEC, [], hvp(spice_bind="127.0.0.1", serial_console=False),
                              Caps72(), PATHS)
    assert "-display" not in argv and "-vnc" not in argv
    assert after(argv, "-vga")[:10] == [
        "-vga", "qxl",
        "-device", "virtio-serial-pci,id=vdagent-serial0",
        "-chardev", "spicevmc,id=vdagent0,name=vdagent",
        "-device", "virtserialport,bus=vdagent-serial0.0,nr=1,chardev=vdagent0,"
                   "id=vdagent0-port,name=com.redhat.spice.0",
        "-spice", "addr=127.0.0.1,ipv4=on,port=5901,disable-ticketing=on"]


def test_golden_spice_with_tls_password_compression_and_no_agent() -> None:
    spec = cmdline.MachineSpec(name="web1", memory=256, vcpus=1, network_port=5901,
                               spice_tls=TLS)
    argv = cmdline.build_argv(spec, [], hvp(
        spice_bind="::1", vga="std", spice_use_tls=True, spice_tls_ciphers="HIGH:!aNULL",
        spice_password_file="/etc/ganeti/spice-pw", spice_image_compression="auto_glz",
        spice_jpeg_wan_compression="never", spice_zlib_glz_wan_compression="always",
        spice_streaming_video="filter", spice_playback_compression=False,
        spice_use_vdagent=False), Caps72(), PATHS)
    assert after(argv, "-vga")[:4] == ["-vga", "std", "-spice", ",".join([
        "addr=::1", "ipv6=on", "tls-port=5901",
        "x509-cacert-file=/var/lib/ganeti/spice-ca.pem",
        "x509-cert-file=/var/lib/ganeti/spice.pem", "x509-key-file=/var/lib/ganeti/spice.pem",
        "tls-ciphers=HIGH:!aNULL", "image-compression=auto_glz", "jpeg-wan-compression=never",
        "zlib-glz-wan-compression=always", "streaming-video=filter",
        "playback-compression=off", "agent-mouse=off"])]
    assert not any("spice-pw" in a for a in argv)  # the password goes over QMP only
    assert "virtio-serial-pci" not in " ".join(argv)


def test_the_agent_controller_takes_its_kept_slot_and_an_interface_its_address() -> None:
    spec = cmdline.MachineSpec(name="web1", memory=256, vcpus=1, network_port=5901,
                               spice_address="192.0.2.7",
                               spice_agent=spice.serial_identity(0x1e))
    argv = cmdline.build_argv(spec, [], hvp(spice_bind="eth0"), Caps72(), PATHS)
    assert "virtio-serial-pci,id=vdagent-serial0,bus=pci.0,addr=0x1e" in argv
    assert spice_value(argv)[:2] == ["addr=192.0.2.7", "ipv4=on"]


@pytest.mark.parametrize("spec, overrides, match", [
    (SPEC, {"spice_bind": "eth0"}, "spice_bind"),  # an interface the node did not look up
    (cmdline.MachineSpec(name="web1", memory=256, vcpus=1), {"spice_bind": "127.0.0.1"},
     "network_port"),
    (SPEC, {"spice_bind": "127.0.0.1", "spice_use_tls": True}, "certificate"),
])
def test_what_the_command_line_cannot_build_is_refused(spec: Any, overrides: dict[str, Any],
                                                        match: str) -> None:
    with pytest.raises(errors.HypervisorError, match=match):
        cmdline.build_argv(spec, [], hvp(**overrides), Caps72(), PATHS)


def test_an_interface_resolves_to_its_address_of_the_asked_version() -> None:
    assert core_params.resolve_spice_bind(hvp(spice_bind="lo")) == "127.0.0.1"
    assert core_params.resolve_spice_bind(hvp(spice_bind="127.0.0.1")) == "127.0.0.1"
    assert core_params.resolve_spice_bind(hvp()) is None
    if ifaddr.ipv6_addresses("lo"):
        assert core_params.resolve_spice_bind(
            hvp(spice_bind="lo", spice_ip_version=6)) == "::1"
    with pytest.raises(errors.ParameterError, match="spice_bind") as info:
        core_params.resolve_spice_bind(hvp(spice_bind="gk-nosuch0"))
    assert info.value.name == c.HV_KVM_SPICE_BIND


def test_ipv6_table_skips_link_local_addresses(tmp_path: Any) -> None:
    table = tmp_path / "if_inet6"
    table.write_text("fe800000000000000000000000000001 02 40 20 80     eth0\n"
                     "20010db8000000000000000000000007 02 40 00 80     eth0\n"
                     "00000000000000000000000000000001 01 80 10 80       lo\n", encoding="ascii")
    assert ifaddr.ipv6_addresses("eth0", str(table)) == ["2001:db8::7"]


# --- the checks ------------------------------------------------------------------------


def g3_params(**overrides: Any) -> dict[str, Any]:
    return g3params.fill(dict(kvm_path="/usr/bin/qemu-system-x86_64", kernel_path="",
                              root_path="", **overrides))


def test_the_spice_keys_are_implemented_now() -> None:
    for key in (c.HV_KVM_SPICE_BIND, c.HV_KVM_SPICE_PASSWORD_FILE, c.HV_KVM_SPICE_USE_TLS,
                c.HV_KVM_SPICE_TLS_CIPHERS, c.HV_KVM_SPICE_USE_VDAGENT,
                c.HV_KVM_SPICE_LOSSLESS_IMG_COMPR, c.HV_KVM_SPICE_JPEG_IMG_COMPR,
                c.HV_KVM_SPICE_ZLIB_GLZ_IMG_COMPR, c.HV_KVM_SPICE_STREAMING_VIDEO_DETECTION,
                c.HV_KVM_SPICE_AUDIO_COMPR):
        assert key in g3params.CORE_KEYS and key not in g3params.UNIMPLEMENTED
        assert c.DEFAULTS[key] == g3params.FALLBACK_DEFAULTS[key]  # Ganeti 3.0's defaults
    G3Hypervisor.CheckParameterSyntax(g3_params(
        spice_bind="10.0.0.1", spice_use_tls=True, spice_image_compression="glz",
        spice_jpeg_wan_compression="auto", spice_zlib_glz_wan_compression="never",
        spice_streaming_video="all", spice_playback_compression=False,
        spice_use_vdagent=False, spice_tls_ciphers="HIGH"))
    # the 2011 contract: spice_bind works, the Ganeti 3 keys stay unknown to it
    KVMHypervisor.CheckParameterSyntax(dict(hvp(spice_bind="eth0", spice_ip_version=4)))
    with pytest.raises(errors.ParameterError, match="spice_use_tls"):
        KVMHypervisor.CheckParameterSyntax(dict(hvp(spice_use_tls=True)))


@pytest.mark.parametrize("overrides, key", [
    ({"spice_bind": "127.0.0.1,port=1"}, "spice_bind"),
    ({"spice_bind": "a-very-long-interface-name"}, "spice_bind"),
    ({"spice_bind": "10.0.0.1", "spice_ip_version": 6}, "spice_ip_version"),
    ({"spice_bind": "::1", "spice_ip_version": 4}, "spice_ip_version"),
    ({"spice_bind": "10.0.0.1", "vnc_bind_address": "0.0.0.0"}, "spice_bind"),
    ({"spice_bind": "10.0.0.1", "spice_image_compression": "zip"}, "spice_image_compression"),
    ({"spice_bind": "10.0.0.1", "spice_jpeg_wan_compression": "sometimes"},
     "spice_jpeg_wan_compression"),
    ({"spice_bind": "10.0.0.1", "spice_zlib_glz_wan_compression": "on"},
     "spice_zlib_glz_wan_compression"),
    ({"spice_bind": "10.0.0.1", "spice_streaming_video": "most"}, "spice_streaming_video"),
    ({"spice_bind": "10.0.0.1", "spice_tls_ciphers": "HIGH\nLOW"}, "spice_tls_ciphers"),
    ({"spice_use_tls": True}, "spice_use_tls"),  # needs spice_bind
    ({"spice_streaming_video": "all"}, "spice_streaming_video"),
    ({"spice_password_file": "/etc/hosts"}, "spice_password_file"),
])
def test_syntax_refusals_name_the_key(overrides: dict[str, Any], key: str) -> None:
    with pytest.raises(_ganeti.HypervisorError, match=key):
        G3Hypervisor.CheckParameterSyntax(g3_params(**overrides))


def spice_caps(**changes: Any) -> qemu_caps.QemuCaps:
    """What the node check reads of a QEMU: SPICE with every key, the agent's parts,
    qxl; ``changes`` replace fields."""
    caps = qemu_caps.QemuCaps(
        path="/usr/bin/qemu-system-x86_64", version=(7, 2, 0), version_text="7.2",
        options=frozenset(["spice"]), spice_keys=SPICE_KEYS,
        chardev_backends=frozenset(["socket", "spicevmc"]),
        devices=frozenset(["virtio-serial-pci", "virtserialport", "qxl-vga"]))
    return dataclasses.replace(caps, **changes)


@pytest.fixture
def cert_files(tmp_path: Any) -> spice.TlsFiles:
    for name in ("ca.pem", "spice.pem"):
        (tmp_path / name).write_text("x", encoding="ascii")
    return spice.TlsFiles(cacert=str(tmp_path / "ca.pem"), cert=str(tmp_path / "spice.pem"),
                          key=str(tmp_path / "spice.pem"))


def test_node_check_passes_with_what_it_needs(cert_files: spice.TlsFiles,
                                              tmp_path: Any) -> None:
    password = tmp_path / "pw"
    password.write_text("secret\n", encoding="utf-8")
    core_params.check_node_spice(hvp(spice_bind="lo", spice_use_tls=True,
                                     spice_password_file=str(password),
                                     spice_streaming_video="off"), spice_caps(), cert_files)
    # No SPICE asked: nothing to check.
    core_params.check_node_spice(hvp(), spice_caps(spice_keys=frozenset()), None)


@pytest.mark.parametrize("caps_change, overrides, key, words", [
    ({"spice_keys": frozenset()}, {}, "spice_bind", "cannot run a SPICE server"),
    ({"spice_keys": SPICE_KEYS - {"streaming-video"}}, {"spice_streaming_video": "all"},
     "spice_streaming_video", "streaming-video"),
    ({"spice_keys": SPICE_KEYS - {"tls-ciphers"}}, {"spice_use_tls": True},
     "spice_tls_ciphers", "tls-ciphers"),
    ({"chardev_backends": frozenset(["socket"])}, {}, "spice_use_vdagent", "spicevmc"),
    ({"devices": frozenset(["virtio-serial-pci", "virtserialport"])}, {}, "vga", "qxl-vga"),
    ({}, {"spice_bind": "gk-nosuch0"}, "spice_bind", "network interface"),
    ({}, {"spice_use_tls": True, "spice_tls_ciphers": "NOSUCHCIPHER"}, "spice_tls_ciphers",
     "selects no cipher"),
])
def test_node_refusals_name_the_key(caps_change: dict[str, Any], overrides: dict[str, Any],
                                    key: str, words: str, cert_files: spice.TlsFiles) -> None:
    caps = spice_caps(**caps_change)
    with pytest.raises(errors.ParameterError, match=words) as info:
        core_params.check_node_spice(hvp(**{"spice_bind": "127.0.0.1", **overrides}), caps,
                                     cert_files)
    assert info.value.name == key and key in str(info.value)


def test_node_refuses_tls_without_the_certificate_files(tmp_path: Any) -> None:
    with pytest.raises(errors.ParameterError, match="no SPICE certificate files"):
        core_params.check_node_spice(hvp(spice_bind="127.0.0.1", spice_use_tls=True),
                                     spice_caps(), None)
    missing = spice.TlsFiles(cacert=str(tmp_path / "ca.pem"), cert="/etc/hosts",
                             key="/etc/hosts")
    with pytest.raises(errors.ParameterError, match="ca.pem") as info:
        core_params.check_node_spice(hvp(spice_bind="127.0.0.1", spice_use_tls=True),
                                     spice_caps(), missing)
    assert info.value.name == c.HV_KVM_SPICE_USE_TLS


@pytest.mark.parametrize("content", [None, "", "\n"])
def test_node_refuses_an_unusable_password_file(tmp_path: Any, content: str | None) -> None:
    path = tmp_path / "pw"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(errors.ParameterError, match="SPICE password file"):
        core_params.check_node_spice(hvp(spice_bind="127.0.0.1", spice_password_file=str(path)),
                                     spice_caps(), None)


# --- the probe -------------------------------------------------------------------------


def test_the_probe_reads_spice_keys_and_backends_as_qmp_data() -> None:
    text = "\n".join(json.dumps(reply) for reply in [
        {"QMP": {"version": {}, "capabilities": []}}, {"return": {}},
        {"return": [{"option": "spice", "parameters": [
            {"name": "port", "type": "number"}, {"name": "tls-ciphers", "type": "string"}]}]},
        {"return": [{"name": "socket"}, {"name": "spicevmc"}]}, {"return": {}}])
    keys, backends = qemu_caps.parse_spice_probe(text)
    assert keys == {"port", "tls-ciphers"} and backends == {"socket", "spicevmc"}
    no_spice = '{"error": {"class": "GenericError", "desc": "invalid option name: spice"}}'
    assert qemu_caps.parse_spice_probe(no_spice) == (frozenset(), frozenset())
    caps = qemu_caps.QemuCaps(path="/q", version=(7, 2, 0), version_text="", options=frozenset(),
                              spice_keys=keys, chardev_backends=backends)
    again = qemu_caps.QemuCaps.from_dict(json.loads(json.dumps(caps.to_dict())))
    assert again == caps and again.has_spice and again.has_chardev_backend("spicevmc")


def test_real_qemus_answer_the_spice_probe(qemu_bin: str) -> None:
    keys, backends = qemu_caps.probe_spice(qemu_bin)
    assert keys >= SPICE_KEYS
    assert spice.SPICEVMC_BACKEND in backends


# --- the agent's controller in the record ---------------------------------------------


def test_the_agent_controller_takes_the_highest_slot_left_and_is_kept() -> None:
    record = runtime.RuntimeRecord(name="web1", argv=["kvm"],
                                   hvparams=hvp(spice_bind="127.0.0.1"),
                                   nics=[{"mac": "52:54:00:00:00:01"}])
    hardware.assign_devices(record)
    assert devices.DeviceId.from_dict(record.balloon, "b").slot == 31
    hardware.give_spice_agent(record)
    assert record.spice_agent == spice.serial_identity(30).to_dict()
    again = runtime.parse(record.serialize(), "web1", "test")
    assert again.spice_agent == record.spice_agent
    hardware.give_spice_agent(again)
    assert again.spice_agent == record.spice_agent
    beside = runtime.RuntimeRecord(name="web3", argv=["kvm"],
                                   hvparams=hvp(spice_bind="127.0.0.1"),
                                   balloon=record.balloon,
                                   guest_agent=spice.serial_identity(30).to_dict())
    hardware.give_spice_agent(beside)  # another kept controller's slot is avoided
    assert beside.spice_agent == spice.serial_identity(29).to_dict()
    without = runtime.RuntimeRecord(name="web2", argv=["kvm"],
                                    hvparams=hvp(spice_bind="127.0.0.1",
                                                 spice_use_vdagent=False))
    hardware.give_spice_agent(without)
    assert without.spice_agent is None


# --- the console -----------------------------------------------------------------------


@pytest.mark.parametrize("bind, host", [("192.0.2.5", "192.0.2.5"), ("0.0.0.0", "node1"),
                                        ("::", "node1"), ("eth0", "node1")])
def test_console_is_spice_with_host_and_port(bind: str, host: str) -> None:
    instance = {"name": "web1", "network_port": 11000}
    console = G3Hypervisor.GetInstanceConsole(instance, {"name": "node1"}, None,
                                              g3_params(serial_console=False, spice_bind=bind),
                                              {})
    assert (console.kind, console.host, console.port) == ("spice", host, 11000)
    assert console.Validate() is True


# --- real QEMUs -------------------------------------------------------------------------


def spice_link(sock: socket.socket) -> tuple[int, bytes]:
    """A SPICE client's first message for the main channel: ``(error, public key DER)``."""
    body = struct.pack("<IBBIII", 0, 1, 0, 0, 0, 18)  # no session, main channel, no caps
    sock.sendall(struct.pack("<4sIII", b"REDQ", 2, 2, len(body)) + body)
    magic, _, _, size = struct.unpack("<4sIII", recv_exact(sock, 16))
    assert magic == b"REDQ", magic
    reply = recv_exact(sock, size)
    return struct.unpack("<I", reply[:4])[0], reply[4:4 + 162]


def spice_ticket(sock: socket.socket, public_key: bytes, password: str, directory: str) -> int:
    """Send ``password`` as SPICE's RSA-OAEP ticket; the server's link result."""
    key_file = os.path.join(directory, "spice-pub.der")
    with open(key_file, "wb") as handle:
        handle.write(public_key)
    ticket = subprocess.run(["openssl", "pkeyutl", "-encrypt", "-pubin", "-inkey", key_file,
                             "-keyform", "DER", "-pkeyopt", "rsa_padding_mode:oaep"],
                            input=password.encode() + b"\0", capture_output=True, check=True,
                            timeout=60).stdout
    sock.sendall(ticket)
    return struct.unpack("<I", recv_exact(sock, 4))[0]


def link_result(port: int, password: str | None, directory: str) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        error, public_key = spice_link(sock)
        assert error == SPICE_LINK_OK
        if password is None:
            return error
        return spice_ticket(sock, public_key, password, directory)


def qemu_pid(hypervisor: Any, name: str) -> int:
    pid = hypervisor.node.running_pid(name)
    assert pid is not None
    return pid


def cmdline_of(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as handle:
        return handle.read().decode().split("\0")


def open_files_content(pid: int) -> bytes:
    """What the regular files QEMU holds open contain."""
    content = b""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:  # closed since the listing (a QMP connection)
            continue
        if target.startswith("/") and os.path.isfile(target):
            with open(target, "rb") as handle:
                content += handle.read(1 << 20)
    return content


@pytest.fixture
def spice_g3(short_dir: str) -> Iterator[tuple[G3Hypervisor, spice.TlsFiles]]:
    """A Ganeti 3 hypervisor given certificate files made for 127.0.0.1."""
    x509 = make_x509_dir(os.path.join(short_dir, "x509"))
    combined = os.path.join(short_dir, "spice.pem")
    with open(combined, "w", encoding="ascii") as out:
        for name in ("server-cert.pem", "server-key.pem"):
            with open(os.path.join(x509, name), encoding="ascii") as part:
                out.write(part.read())
    tls = spice.TlsFiles(cacert=os.path.join(x509, "ca-cert.pem"), cert=combined, key=combined)
    with node_hypervisors(G3Hypervisor, short_dir, "run", spice_tls=tls) as (hypervisor,):
        yield hypervisor, tls


def start(hypervisor: G3Hypervisor, name: str, qemu_bin: str, **overrides: Any) -> int:
    """Start a guest-less instance paused; its network port."""
    hvparams = g3_params(kvm_flag="disabled", **overrides)
    hvparams["kvm_path"] = qemu_bin
    # what ValidateParameters checks, with this node's certificate files
    G3Hypervisor.CheckParameterSyntax(hvparams)
    hypervisor.node.check_params(g3params.to_core(hvparams))
    instance = g3_instance(name, hvparams)
    instance["network_port"] = free_vnc_port()
    hypervisor.StartInstance(instance, [], True)
    return int(instance["network_port"])


def test_spice_on_loopback_with_the_agent(spice_g3: Any, qemu_bin: str, short_dir: str) -> None:
    hypervisor, _ = spice_g3
    port = start(hypervisor, "sp1", qemu_bin, spice_bind="127.0.0.1")
    info = hypervisor.node.qmp("sp1", "query-spice")
    assert info["enabled"] is True and info["auth"] == "none"
    assert (info["host"], int(info["port"])) == ("127.0.0.1", port)
    assert "tls-port" not in info
    assert link_result(port, None, short_dir) == SPICE_LINK_OK  # a client links, no ticket
    chardevs = {ch["label"]: ch for ch in hypervisor.node.qmp("sp1", "query-chardev")}
    assert chardevs[spice.VDAGENT_CHARDEV]["filename"] == "spicevmc"
    port_name = hypervisor.node.qmp("sp1", "qom-get", {
        "path": f"/machine/peripheral/{spice.VDAGENT_CHARDEV}-port", "property": "name"})
    assert port_name == spice.VDAGENT_PORT_NAME
    record = hypervisor.node.load_record("sp1")
    slot = devices.DeviceId.from_dict(record.spice_agent, "agent").slot
    pci = hypervisor.node.qmp("sp1", "query-pci")[0]["devices"]
    by_slot = {d["slot"]: d for d in pci}
    assert by_slot[slot]["qdev_id"] == spice.VIRTIO_SERIAL_ID
    assert by_slot[slot]["id"]["device"] == 0x1003  # virtio-serial
    assert any(d["id"]["vendor"] == 0x1b36 and d["id"]["device"] == 0x0100 for d in pci)  # qxl


def test_spice_password_is_set_over_qmp_only(spice_g3: Any, qemu_bin: str,
                                             short_dir: str) -> None:
    hypervisor, _ = spice_g3
    secret = "Zq7-unlikely-spice-secret"
    password_file = os.path.join(short_dir, "spice-password")
    with open(password_file, "w", encoding="utf-8") as handle:
        handle.write(secret + "\n")
    compression = {"spice_image_compression": "auto_lz", "spice_jpeg_wan_compression": "never",
                   "spice_zlib_glz_wan_compression": "always",
                   "spice_streaming_video": "filter"}
    port = start(hypervisor, "sp2", qemu_bin, spice_bind="127.0.0.1",
                 spice_password_file=password_file, spice_playback_compression=False,
                 spice_use_vdagent=False, **compression)
    info = hypervisor.node.qmp("sp2", "query-spice")
    assert info["auth"] == "spice" and int(info["port"]) == port
    assert link_result(port, secret, short_dir) == SPICE_LINK_OK
    assert link_result(port, "not-the-password", short_dir) == SPICE_LINK_PERMISSION_DENIED
    pid = qemu_pid(hypervisor, "sp2")
    argv = cmdline_of(pid)
    assert not any(secret in a for a in argv) and not any(password_file in a for a in argv)
    assert secret.encode() not in open_files_content(pid)
    # QMP has no query for these: QEMU took them (it refuses an unknown value) ...
    options = spice_value(argv)
    for key, qemu_key in [(c.HV_KVM_SPICE_LOSSLESS_IMG_COMPR, "image-compression"),
                          (c.HV_KVM_SPICE_JPEG_IMG_COMPR, "jpeg-wan-compression"),
                          (c.HV_KVM_SPICE_ZLIB_GLZ_IMG_COMPR, "zlib-glz-wan-compression"),
                          (c.HV_KVM_SPICE_STREAMING_VIDEO_DETECTION, "streaming-video")]:
        assert f"{qemu_key}={compression[key]}" in options
    assert "playback-compression=off" in options and "agent-mouse=off" in options
    # ... and its own list of -spice keys, asked over QMP when probed, has each of them
    caps = hypervisor.node.caps(qemu_bin)
    assert {o.split("=")[0] for o in options} <= caps.spice_keys
    chardevs = [ch["label"] for ch in hypervisor.node.qmp("sp2", "query-chardev")]
    assert spice.VDAGENT_CHARDEV not in chardevs  # no agent channel


def test_spice_over_tls_on_an_interface(spice_g3: Any, qemu_bin: str, short_dir: str) -> None:
    hypervisor, tls = spice_g3
    port = start(hypervisor, "sp3", qemu_bin, spice_bind="lo", spice_ip_version=4,
                 spice_use_tls=True)
    info = hypervisor.node.qmp("sp3", "query-spice")
    assert info["host"] == "127.0.0.1" and info["tls-port"] == port and "port" not in info
    context = ssl.create_default_context(cafile=tls.cacert)
    context.check_hostname = False  # the test certificate names 127.0.0.1 as its CN only
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            context.wrap_socket(raw) as sock:
        certificate: Any = sock.getpeercert()
        subject = dict(item[0] for item in certificate["subject"])
        assert subject["commonName"] == "127.0.0.1"
        error, _ = spice_link(sock)  # SPICE speaks inside the TLS session
        assert error == SPICE_LINK_OK


def test_validate_refuses_a_qemu_without_spice_naming_the_key(short_dir: str) -> None:
    fake = os.path.join(short_dir, "qemu-nospice")
    caps = qemu_caps.QemuCaps(path=fake, version=(7, 2, 0), version_text="", options=frozenset())
    with pytest.raises(errors.ParameterError, match="spice_bind") as info:
        core_params.check_node_spice(hvp(spice_bind="127.0.0.1"), caps, None)
    assert "cannot run a SPICE server" in str(info.value)


def test_the_2011_contract_gives_spice_the_2011_hardware(hv: KVMHypervisor,
                                                         qemu_bin: str) -> None:
    """spice_bind under the 2011 contract: SPICE served, the std VGA, no agent channel."""
    hvparams = dict(hvp(spice_bind="127.0.0.1", kvm_flag="disabled"))
    hvparams["kvm_path"] = qemu_bin
    hv.ValidateParameters(hvparams)
    port = free_vnc_port()
    hv.StartInstance(make_instance("sp2011", hvparams, network_port=port), [], True)
    info = hv.node.qmp("sp2011", "query-spice")
    assert (info["enabled"], info["host"], int(info["port"])) == (True, "127.0.0.1", port)
    pci = hv.node.qmp("sp2011", "query-pci")[0]["devices"]
    ids = {(d["id"]["vendor"], d["id"]["device"]) for d in pci}
    assert (0x1234, 0x1111) in ids  # the standard VGA
    assert (0x1b36, 0x0100) not in ids  # no qxl
    assert not any(d["id"]["device"] in (0x1003, 0x1043) for d in pci)  # no virtio-serial
    assert hv.node.load_record("sp2011").spice_agent is None
