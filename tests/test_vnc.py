"""VNC for real: TCP and unix listeners, VeNCrypt/x509, passwords; and the console calls.

Instances start paused on both QEMUs; the console checks need no QEMU.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import stat
import struct
import threading
import time
from typing import Any

import pytest

from ganeti_kvm import constants as c
from ganeti_kvm import errors
from ganeti_kvm.host import paths
from ganeti_kvm.hv_kvm import KVMHypervisor
from tests.certs import make_x509_dir
from tests.helpers import free_vnc_port, make_instance, recv_exact

RFB_BANNER = b"RFB 003.008\n"
SEC_VENCRYPT = 19
VENCRYPT_X509NONE = 260
VENCRYPT_X509VNC = 261


def base_hvparams(qemu_bin: str, **overrides: Any) -> dict[str, Any]:
    """No kernel, no disk, TCG: enough for a paused start."""
    hvp = dict(c.HVC_DEFAULTS[c.HT_KVM], kvm_path=qemu_bin, kernel_path="", root_path="",
               kvm_flag="disabled")
    hvp.update(overrides)
    return hvp


def connect(family: int, address: Any, timeout: float = 10.0) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(address)
    return sock


def security_types(sock: socket.socket) -> list[int]:
    """Read the banner, answer RFB 3.8 and return the offered security types."""
    assert recv_exact(sock, 12) == RFB_BANNER
    sock.sendall(RFB_BANNER)
    count = recv_exact(sock, 1)[0]
    assert count > 0, "the server refused the connection"
    return list(recv_exact(sock, count))


# --- VNC on an IP address -----------------------------------------------------


def test_vnc_on_loopback_port(hv, qemu_bin) -> None:
    port = free_vnc_port()
    inst = make_instance("vnc1", base_hvparams(qemu_bin, vnc_bind_address="127.0.0.1"),
                         memory=64, network_port=port)
    hv.StartInstance(inst, [], startup_paused=True)
    vnc = hv.node.qmp("vnc1", "query-vnc")
    assert vnc["enabled"] is True
    assert vnc["host"] == "127.0.0.1"
    assert vnc["service"] == str(port)
    assert vnc["family"] == "ipv4"
    assert vnc["auth"] == "none"
    with connect(socket.AF_INET, ("127.0.0.1", port)) as sock:
        assert recv_exact(sock, 12) == RFB_BANNER
    hv.StopInstance(inst, force=True)
    assert hv.ListInstances() == []


def test_vnc_tls_x509_offers_vencrypt_and_completes_tls(hv, qemu_bin, short_dir) -> None:
    x509 = make_x509_dir(os.path.join(short_dir, "x509"))
    port = free_vnc_port()
    hvp = base_hvparams(qemu_bin, vnc_bind_address="127.0.0.1", vnc_tls=True,
                        vnc_x509_path=x509, vnc_x509_verify=False)
    inst = make_instance("tls1", hvp, memory=64, network_port=port)
    hv.StartInstance(inst, [], startup_paused=True)
    vnc = hv.node.qmp("tls1", "query-vnc")
    assert vnc["enabled"] is True and vnc["service"] == str(port)
    # query-vnc names the combination; query-vnc-servers splits it into auth and sub-auth
    assert vnc["auth"] in ("vencrypt+x509+none", "vencrypt+x509+vnc")
    servers = hv.node.qmp("tls1", "query-vnc-servers")
    assert len(servers) == 1
    assert servers[0]["auth"] == "vencrypt"
    assert servers[0]["vencrypt"] in ("x509-none", "x509-vnc")

    with connect(socket.AF_INET, ("127.0.0.1", port)) as sock:
        types = security_types(sock)
        assert SEC_VENCRYPT in types, types
        sock.sendall(bytes([SEC_VENCRYPT]))
        # VeNCrypt 0.2: version exchange, then the sub-types
        assert recv_exact(sock, 2) == b"\x00\x02"
        sock.sendall(b"\x00\x02")
        assert recv_exact(sock, 1) == b"\x00"  # version accepted
        count = recv_exact(sock, 1)[0]
        subtypes = list(struct.unpack(f">{count}I", recv_exact(sock, 4 * count)))
        chosen = next((s for s in subtypes if s in (VENCRYPT_X509NONE, VENCRYPT_X509VNC)),
                      None)
        assert chosen is not None, subtypes
        sock.sendall(struct.pack(">I", chosen))
        assert recv_exact(sock, 1) == b"\x01"  # sub-type accepted
        context = ssl.create_default_context(cafile=os.path.join(x509, "ca-cert.pem"))
        context.check_hostname = False  # the test certificate names its host in CN only
        assert context.verify_mode == ssl.CERT_REQUIRED
        with context.wrap_socket(sock, server_side=False) as tls:
            peer = tls.getpeercert()
            assert peer, "no verified server certificate"
            subject = dict(item[0] for item in peer["subject"])
            assert subject["commonName"] == "127.0.0.1"
            if chosen == VENCRYPT_X509NONE:
                # RFB 3.8: the security result follows, inside TLS
                assert recv_exact(tls, 4) == b"\x00\x00\x00\x00"
    hv.StopInstance(inst, force=True)


# --- VNC password -------------------------------------------------------------


def test_vnc_password_never_leaks(hv, qemu_bin, short_dir, caplog) -> None:
    secret = "Zq7-unlikely-vnc-secret"  # QEMU uses the first 8 characters
    password_file = os.path.join(short_dir, "vnc-password")
    with open(password_file, "w", encoding="utf-8") as handle:
        handle.write(secret + "\n")
    port = free_vnc_port()
    hvp = base_hvparams(qemu_bin, vnc_bind_address="127.0.0.1",
                        vnc_password_file=password_file)
    inst = make_instance("pw1", hvp, memory=64, network_port=port)

    leaks: list[str] = []
    scans: list[int] = []
    done = threading.Event()

    def scan_cmdlines() -> None:
        needle = secret.encode()
        while True:
            for entry in os.listdir("/proc"):
                if not entry.isdigit():
                    continue
                try:
                    with open(f"/proc/{entry}/cmdline", "rb") as handle:
                        if needle in handle.read():
                            leaks.append(f"/proc/{entry}/cmdline")
                except OSError:
                    continue
            scans.append(1)
            if done.is_set():
                return
            time.sleep(0.001)

    scanner = threading.Thread(target=scan_cmdlines, daemon=True)
    with caplog.at_level(logging.DEBUG):
        scanner.start()
        try:
            hv.StartInstance(inst, [], startup_paused=True)
            vnc = hv.node.qmp("pw1", "query-vnc")
        finally:
            done.set()
            scanner.join(30)
        assert not leaks, leaks
        assert len(scans) >= 2  # it scanned during the start, and once after
        assert vnc["enabled"] is True and vnc["auth"] == "vnc"
        with connect(socket.AF_INET, ("127.0.0.1", port)) as sock:
            assert 2 in security_types(sock)  # VNC authentication
        for root, _, files in os.walk(hv.node.layout.root):
            for name in files:
                path = os.path.join(root, name)
                if not stat.S_ISREG(os.lstat(path).st_mode):
                    continue
                with open(path, "rb") as handle:
                    assert secret.encode() not in handle.read(), path
        # A failing start (a missing disk) must not carry it in its error either.
        hv.StopInstance(inst, force=True)
        with pytest.raises(errors.HypervisorError) as info:
            hv.StartInstance(inst, [({"mode": "rw"}, "/nonexistent/disk.raw")],
                             startup_paused=True)
        assert secret not in str(info.value)
        assert secret not in repr(getattr(info.value, "argv", ""))
    messages = [record.getMessage() for record in caplog.records]
    assert any("Starting instance pw1" in m for m in messages)  # the log was captured
    for record in caplog.records:
        assert secret not in record.getMessage()
        assert secret not in (record.exc_text or "")


@pytest.mark.parametrize("content, message", [
    (None, "Cannot read the VNC password file|vnc_password_file"),
    ("", "is empty"),
    ("\n", "is empty"),
])
def test_unusable_password_file_fails_before_qemu(hv, qemu_bin, short_dir, content,
                                                  message) -> None:
    password_file = os.path.join(short_dir, "vnc-password")
    if content is not None:
        with open(password_file, "w", encoding="utf-8") as handle:
            handle.write(content)
    hvp = base_hvparams(qemu_bin, vnc_bind_address="127.0.0.1",
                        vnc_password_file=password_file)
    inst = make_instance("pw2", hvp, memory=64, network_port=free_vnc_port())

    def qemus_of_pw2() -> list[str]:
        found = []
        for entry in os.listdir("/proc"):
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    if b"\0pw2\0" in handle.read() and entry.isdigit():
                        found.append(entry)
            except OSError:
                continue
        return found

    with pytest.raises(errors.HypervisorError, match=message):
        hv.StartInstance(inst, [], startup_paused=True)
    assert qemus_of_pw2() == []
    ipaths = hv.node.paths("pw2")
    for leftover in ipaths.runtime_files() + [ipaths.runtime_file]:
        assert not os.path.exists(leftover), leftover
    assert hv.ListInstances() == []


# --- VNC on a unix socket -----------------------------------------------------


def test_vnc_on_a_unix_socket_directory(hv, qemu_bin, short_dir) -> None:
    vnc_dir = os.path.join(short_dir, "vnc")
    os.mkdir(vnc_dir)
    inst = make_instance("unix1", base_hvparams(qemu_bin, vnc_bind_address=vnc_dir),
                         memory=64)
    hv.StartInstance(inst, [], startup_paused=True)
    path = os.path.join(vnc_dir, "unix1.vnc")
    assert os.path.exists(path)
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    vnc = hv.node.qmp("unix1", "query-vnc")
    assert vnc["enabled"] is True and vnc["family"] == "unix"
    with connect(socket.AF_UNIX, path) as sock:
        assert recv_exact(sock, 12) == RFB_BANNER
    hv.StopInstance(inst, force=True)
    assert hv.ListInstances() == []


# --- GetInstanceConsole (no QEMU) ---------------------------------------------


def console_hvparams(**overrides: Any) -> dict[str, Any]:
    return base_hvparams("/usr/bin/qemu-system-x86_64", **dict({"serial_console": False},
                                                               **overrides))


@pytest.mark.parametrize("address, host", [("127.0.0.1", "127.0.0.1"),
                                           ("192.0.2.7", "192.0.2.7"),
                                           ("0.0.0.0", "node1")])
def test_console_vnc_on_an_ip(address, host) -> None:
    hvp = console_hvparams(vnc_bind_address=address)
    inst = make_instance("cons1", hvp, network_port=5907)
    console = KVMHypervisor.GetInstanceConsole(inst, hvp, inst.beparams)
    assert console.kind == c.CONS_VNC == "vnc"
    assert console.instance == "cons1"
    assert console.host == host
    assert console.port == 5907
    assert console.display == 7
    assert console.Validate() is True


def test_console_message_without_vnc_or_serial() -> None:
    hvp = console_hvparams()
    inst = make_instance("cons2", hvp, network_port=5907)
    console = KVMHypervisor.GetInstanceConsole(inst, hvp, inst.beparams)
    assert console.kind == c.CONS_MESSAGE == "msg"
    assert console.message and "cons2" in console.message
    assert console.Validate() is True


def test_console_serial_over_ssh(short_dir) -> None:
    run_dir = os.path.join(short_dir, "run")
    hvp = console_hvparams(serial_console=True, vnc_bind_address="127.0.0.1")
    inst = make_instance("cons3", hvp, network_port=5907)
    console = KVMHypervisor.GetInstanceConsole(inst, hvp, inst.beparams, run_dir=run_dir)
    ipaths = paths.RunDir(run_dir).instance("cons3")
    assert console.kind == c.CONS_SSH == "ssh"
    assert console.host == "node1"
    assert console.user == "root"
    assert console.command == [c.KVM_CONSOLE_WRAPPER, c.SOCAT_PATH, "cons3",
                               ipaths.qmp_socket, "STDIO,raw,echo=0,escape=0x1d",
                               "UNIX-CONNECT:" + ipaths.serial_socket]
    assert console.command[3].startswith(run_dir + "/")
    assert console.Validate() is True
