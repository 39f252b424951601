"""The SPICE display: ``-spice``, its adapter and the guest agent's channel.

Built as Ganeti's KVM driver does, in this library's own way: QEMU
listens on ``spice_bind`` (an IP address, or an interface whose address
the node looked up, see :mod:`ganeti_kvm.host.ifaddr`) at the instance's
``network_port``; with ``spice_use_tls`` that port speaks TLS only
(``tls-port``, no plain port), with the certificate files the cluster
manager keeps (:class:`TlsFiles`, handed in by its adapter).  The password
is never on the command line: without ``spice_password_file`` ticketing is
off, with it QEMU refuses every client until the library sets the
password over QMP (``set_password``), before the guest runs.  The image,
WAN and video options are QEMU's own names and values, each checked
against its set; the cipher list is escaped for QEMU's option parser.
``spice_use_vdagent`` adds the guest agent's channel: a ``spicevmc``
chardev on port ``com.redhat.spice.0`` of a virtio-serial controller with
a fixed identity kept in the runtime record; without it the mouse is
the server's (``agent-mouse=off``).

Nothing here touches the node; :func:`spice_keys` says which ``-spice``
keys a parameter set needs, for the node check against QEMU's own list.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ganeti_kvm import errors
from ganeti_kvm.core import names as c
from ganeti_kvm.host import ifaddr
from ganeti_kvm.qemu.devices import PCI_BUS, DeviceId

VDAGENT_CHARDEV = "vdagent0"
VDAGENT_PORT_NAME = "com.redhat.spice.0"
VDAGENT_PORT_NR = 1  # port 0 of a virtio-serial bus is the console's
VIRTIO_SERIAL_DEVICE = "virtio-serial-pci"
VIRTIO_SERIAL_ID = "vdagent-serial0"
SPICEVMC_BACKEND = "spicevmc"
PORT_DEVICE = "virtserialport"

# OpenSSL cipher list syntax: names, ':' or ',' or ' ' separators, '!', '+',
# '-', '@STRENGTH', '@SECLEVEL=n'
_CIPHERS_RE = re.compile(r"[A-Za-z0-9:+!@=_., -]{1,1024}")

# The -spice value keys of each enumerated parameter
_ENUM_KEYS = {
    c.HV_KVM_SPICE_LOSSLESS_IMG_COMPR: "image-compression",
    c.HV_KVM_SPICE_JPEG_IMG_COMPR: "jpeg-wan-compression",
    c.HV_KVM_SPICE_ZLIB_GLZ_IMG_COMPR: "zlib-glz-wan-compression",
    c.HV_KVM_SPICE_STREAMING_VIDEO_DETECTION: "streaming-video",
}
ENUM_VALUES = {
    c.HV_KVM_SPICE_LOSSLESS_IMG_COMPR: c.HT_KVM_SPICE_VALID_LOSSLESS_IMG_COMPR_OPTIONS,
    c.HV_KVM_SPICE_JPEG_IMG_COMPR: c.HT_KVM_SPICE_VALID_LOSSY_IMG_COMPR_OPTIONS,
    c.HV_KVM_SPICE_ZLIB_GLZ_IMG_COMPR: c.HT_KVM_SPICE_VALID_LOSSY_IMG_COMPR_OPTIONS,
    c.HV_KVM_SPICE_STREAMING_VIDEO_DETECTION:
        c.HT_KVM_SPICE_VALID_VIDEO_STREAM_DETECTION_OPTIONS,
}
# The keys that mean nothing without spice_bind (Ganeti refuses them set without it)
NEEDS_BIND = (c.HV_KVM_SPICE_PASSWORD_FILE, *_ENUM_KEYS, c.HV_KVM_SPICE_USE_TLS)


@dataclass(frozen=True)
class TlsFiles:
    """The node's SPICE certificate files: the CA, the server certificate, its key.

    Ganeti keeps the certificate and the key in one PEM file (its
    ``SPICE_CERT_FILE``), which is then both ``cert`` and ``key``.
    """

    cacert: str
    cert: str
    key: str


def _value(hvp: Mapping[str, Any], key: str) -> Any:
    """``hvp[key]``, or the core's default for a record or 2011 set written without it."""
    return hvp.get(key, c.DEFAULTS[key])


def enabled(hvp: Mapping[str, Any]) -> bool:
    """Whether ``hvp`` asks for a SPICE display."""
    return bool(hvp.get(c.HV_KVM_SPICE_BIND))


def wants_agent(hvp: Mapping[str, Any]) -> bool:
    """Whether the SPICE guest agent's channel is given (SPICE on, spice_use_vdagent)."""
    return enabled(hvp) and bool(_value(hvp, c.HV_KVM_SPICE_USE_VDAGENT))


def ip_literal(value: object) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``value`` as an IP address, or None if it is not one."""
    if not isinstance(value, str):
        return None
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        return None


def is_bind(value: object) -> bool:
    """A ``spice_bind`` value: an IP address or a network interface name."""
    return ip_literal(value) is not None or ifaddr.is_interface_name(value)


def is_tls_ciphers(value: object) -> bool:
    """An OpenSSL cipher list as text QEMU's option can carry."""
    return isinstance(value, str) and _CIPHERS_RE.fullmatch(value) is not None


def check_syntax(hvp: Mapping[str, Any]) -> None:
    """The checks between the SPICE keys and the others (pure); ParameterError naming one."""
    bind = hvp.get(c.HV_KVM_SPICE_BIND) or ""
    if not bind:
        for key in NEEDS_BIND:
            if hvp.get(key):
                raise errors.ParameterError(
                    f"{key} is {hvp[key]!r} but {c.HV_KVM_SPICE_BIND} is empty, so there is "
                    f"no SPICE server: set {c.HV_KVM_SPICE_BIND} to the address or interface "
                    f"QEMU should listen on, or reset {key}", key, hvp[key])
        return
    if hvp.get(c.HV_VNC_BIND_ADDRESS):
        raise errors.ParameterError(
            f"Both SPICE and VNC are configured ({c.HV_KVM_SPICE_BIND} {bind!r}, "
            f"{c.HV_VNC_BIND_ADDRESS} {hvp[c.HV_VNC_BIND_ADDRESS]!r}), but an instance has "
            f"one graphical console: set one of them to \"\"", c.HV_KVM_SPICE_BIND, bind)
    version = hvp.get(c.HV_KVM_SPICE_IP_VERSION) or c.IFACE_NO_IP_VERSION_SPECIFIED
    address = ip_literal(bind)
    if address is not None and version and address.version != version:
        raise errors.ParameterError(
            f"{c.HV_KVM_SPICE_BIND} is the IPv{address.version} address {bind!r} but "
            f"{c.HV_KVM_SPICE_IP_VERSION} is {version}; set {c.HV_KVM_SPICE_IP_VERSION} to "
            f"{address.version} or 0, or {c.HV_KVM_SPICE_BIND} to an IPv{version} address",
            c.HV_KVM_SPICE_IP_VERSION, version)


def spice_keys(hvp: Mapping[str, Any]) -> dict[str, str]:
    """The ``-spice`` keys ``hvp`` needs, each with the parameter that asks for it."""
    if not enabled(hvp):
        return {}
    keys = {"addr": c.HV_KVM_SPICE_BIND}
    if _value(hvp, c.HV_KVM_SPICE_USE_TLS):
        keys.update(dict.fromkeys(
            ("tls-port", "x509-cacert-file", "x509-cert-file", "x509-key-file"),
            c.HV_KVM_SPICE_USE_TLS))
        if _value(hvp, c.HV_KVM_SPICE_TLS_CIPHERS):
            keys["tls-ciphers"] = c.HV_KVM_SPICE_TLS_CIPHERS
    else:
        keys["port"] = c.HV_KVM_SPICE_BIND
    if not _value(hvp, c.HV_KVM_SPICE_PASSWORD_FILE):
        keys["disable-ticketing"] = c.HV_KVM_SPICE_PASSWORD_FILE
    keys.update({qemu_key: key for key, qemu_key in _ENUM_KEYS.items() if _value(hvp, key)})
    if not _value(hvp, c.HV_KVM_SPICE_AUDIO_COMPR):
        keys["playback-compression"] = c.HV_KVM_SPICE_AUDIO_COMPR
    if not _value(hvp, c.HV_KVM_SPICE_USE_VDAGENT):
        keys["agent-mouse"] = c.HV_KVM_SPICE_USE_VDAGENT
    return keys


def _escape(key: str, value: object) -> str:
    # imported here: cmdline imports this module
    from ganeti_kvm.qemu.cmdline import qemu_escape
    if not isinstance(value, str):
        raise errors.ParameterError(f"Parameter {key} must be a string, not {value!r:.100}",
                                    key, value)
    return qemu_escape(value, key)


def spice_argv(hvp: Mapping[str, Any], name: str, port: int | None, address: str | None,
               tls: TlsFiles | None, serial: DeviceId | None) -> list[str]:
    """``-spice`` with its adapter and agent channel for instance ``name``; [] without SPICE.

    ``address`` is the IP address the node resolved ``spice_bind`` to (None:
    ``spice_bind`` must itself be an address); ``port`` the instance's
    network port; ``tls`` the node's certificate files (needed with
    ``spice_use_tls``); ``serial`` the virtio-serial controller's identity
    from the runtime record (None: QEMU places it).
    """
    if not enabled(hvp):
        return []
    bind = hvp[c.HV_KVM_SPICE_BIND]
    literal = ip_literal(address if address is not None else bind)
    if literal is None:
        raise errors.ParameterError(
            f"Instance {name}: {c.HV_KVM_SPICE_BIND} {bind!r:.100} must be an IP address "
            "here (an interface is looked up by the node before the command line is built)",
            c.HV_KVM_SPICE_BIND, bind)
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise errors.HypervisorError(
            f"Instance {name} needs a network_port (1-65535) for its SPICE server, not "
            f"{port!r}; the cluster manager allocates one for each instance")
    options = [f"addr={literal}", f"ipv{literal.version}=on"]
    if _value(hvp, c.HV_KVM_SPICE_USE_TLS):
        if tls is None:
            raise errors.HypervisorError(
                f"Instance {name}: {c.HV_KVM_SPICE_USE_TLS} is true but this node was given "
                "no SPICE certificate files; set it to false, or run the library under a "
                "cluster manager that keeps them")
        options += [f"tls-port={port}",
                    f"x509-cacert-file={_escape(c.HV_KVM_SPICE_USE_TLS, tls.cacert)}",
                    f"x509-cert-file={_escape(c.HV_KVM_SPICE_USE_TLS, tls.cert)}",
                    f"x509-key-file={_escape(c.HV_KVM_SPICE_USE_TLS, tls.key)}"]
        ciphers = _value(hvp, c.HV_KVM_SPICE_TLS_CIPHERS)
        if ciphers:
            if not is_tls_ciphers(ciphers):
                raise errors.ParameterError(
                    f"Parameter {c.HV_KVM_SPICE_TLS_CIPHERS} must be an OpenSSL cipher list, "
                    f"not {ciphers!r:.100}", c.HV_KVM_SPICE_TLS_CIPHERS, ciphers)
            options.append(f"tls-ciphers={_escape(c.HV_KVM_SPICE_TLS_CIPHERS, ciphers)}")
    else:
        options.append(f"port={port}")
    if not _value(hvp, c.HV_KVM_SPICE_PASSWORD_FILE):
        options.append("disable-ticketing=on")
    for key, qemu_key in _ENUM_KEYS.items():
        value = _value(hvp, key)
        if value:
            if value not in ENUM_VALUES[key]:
                raise errors.ParameterError(
                    f"Parameter {key} must be one of {', '.join(sorted(ENUM_VALUES[key]))}, "
                    f"not {value!r:.100}", key, value)
            options.append(f"{qemu_key}={value}")
    if not _value(hvp, c.HV_KVM_SPICE_AUDIO_COMPR):
        options.append("playback-compression=off")
    argv: list[str] = []
    if wants_agent(hvp):
        argv += agent_argv(name, serial)
    else:
        options.append("agent-mouse=off")
    return argv + ["-spice", ",".join(options)]


def agent_argv(name: str, serial: DeviceId | None) -> list[str]:
    """The virtio-serial controller, the ``spicevmc`` chardev and the agent's port."""
    controller = serial or DeviceId(backend=VIRTIO_SERIAL_ID, id=VIRTIO_SERIAL_ID)
    problem = controller.problem()
    if problem or controller.id is None:
        raise errors.HypervisorError(
            f"Instance {name}'s virtio-serial controller has an identity QEMU cannot take: "
            f"{problem or 'no id'}; stop the instance and start it again")
    return ["-device", ",".join([VIRTIO_SERIAL_DEVICE, *controller.options()]),
            "-chardev", f"{SPICEVMC_BACKEND},id={VDAGENT_CHARDEV},name=vdagent",
            "-device", f"{PORT_DEVICE},bus={controller.id}.0,nr={VDAGENT_PORT_NR},"
                       f"chardev={VDAGENT_CHARDEV},id={VDAGENT_CHARDEV}-port,"
                       f"name={VDAGENT_PORT_NAME}"]


def serial_identity(slot: int) -> DeviceId:
    """The virtio-serial controller's identity on PCI slot ``slot`` of ``pci.0``."""
    return DeviceId(backend=VIRTIO_SERIAL_ID, id=VIRTIO_SERIAL_ID, bus=PCI_BUS, addr=hex(slot))
