"""Throw-away X.509 certificates for VNC TLS tests, made with openssl."""

from __future__ import annotations

import os
import subprocess


def make_x509_dir(directory: str, common_name: str = "127.0.0.1") -> str:
    """Write ca-cert.pem, server-cert.pem and server-key.pem into ``directory``."""
    os.makedirs(directory, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    ca_key = os.path.join(directory, "ca-key.pem")
    ca_cert = os.path.join(directory, "ca-cert.pem")
    key = os.path.join(directory, "server-key.pem")
    csr = os.path.join(directory, "server.csr")
    cert = os.path.join(directory, "server-cert.pem")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out",
            ca_cert, "-days", "2", "-subj", "/CN=ganeti-kvm test CA")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
            "-subj", f"/CN={common_name}")
    openssl("x509", "-req", "-in", csr, "-CA", ca_cert, "-CAkey", ca_key,
            "-CAcreateserial", "-out", cert, "-days", "2")
    return directory
