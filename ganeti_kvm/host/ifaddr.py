"""The IP addresses of this node's network interfaces, for services bound to an interface.

``spice_bind`` may name an interface instead of an address: QEMU then
listens on that interface's address, looked up on the node that starts the
instance (each node's interface has its own).  IPv4 comes from the kernel's
``SIOCGIFADDR`` ioctl (the interface's primary address), IPv6 from
``/proc/net/if_inet6`` (global and site addresses; a link-local one would
need a scope QEMU's ``addr=`` cannot carry).  Nothing here runs a program.
"""

from __future__ import annotations

import fcntl
import ipaddress
import re
import socket
import struct

from ganeti_kvm import errors

SIOCGIFADDR = 0x8915
IF_INET6 = "/proc/net/if_inet6"
IFNAMSIZ = 16
# A name the kernel accepts for a network interface (at most 15 bytes, no
# slash, colon or white space); stricter than the kernel, as no comma or '='
# may reach a QEMU option either.
_IFACE_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@-]{0,14}")
_LINK_SCOPE = 0x20


def is_interface_name(value: object) -> bool:
    """Whether ``value`` can name a network interface (``eth0``, ``br-public``)."""
    return (isinstance(value, str) and _IFACE_RE.fullmatch(value) is not None
            and value not in (".", ".."))


def exists(name: str) -> bool:
    """Whether interface ``name`` exists in this process's network namespace."""
    return is_interface_name(name) and any(n == name for _, n in socket.if_nameindex())


def ipv4_address(name: str) -> str | None:
    """The primary IPv4 address of interface ``name``, or None if it has none."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("256s", name.encode("ascii")[:IFNAMSIZ - 1])
        try:
            answer = fcntl.ioctl(sock.fileno(), SIOCGIFADDR, request)
        except OSError:
            return None  # EADDRNOTAVAIL: no IPv4 address; ENODEV: gone meanwhile
    return socket.inet_ntoa(answer[20:24])


def ipv6_addresses(name: str, table: str = IF_INET6) -> list[str]:
    """The IPv6 addresses of interface ``name`` that are not link-local, in the kernel's order."""
    try:
        with open(table, encoding="ascii") as handle:
            lines = handle.read().splitlines()
    except (OSError, UnicodeDecodeError):
        return []  # IPv6 disabled on this node
    found = []
    for line in lines:
        fields = line.split()
        if len(fields) != 6 or fields[5] != name:
            continue
        try:
            scope = int(fields[3], 16)
            address = ipaddress.IPv6Address(bytes.fromhex(fields[0]))
        except ValueError:
            continue
        if scope != _LINK_SCOPE:
            found.append(str(address))
    return found


def interface_address(name: str, version: int, key: str) -> tuple[str, int]:
    """``(address, version)`` QEMU should listen on for interface ``name``.

    ``version`` 4 or 6 asks for that family; 0 takes IPv4 if the interface
    has one, else IPv6 (there is no cluster-wide primary family to ask
    here).  ``key`` names the parameter in the :class:`errors.ParameterError`
    raised when the interface does not exist or lacks such an address.
    """
    if not exists(name):
        raise errors.ParameterError(
            f"Parameter {key} is {name!r}, which is neither an IP address nor a network "
            "interface of this node; set it to an address QEMU should listen on or to an "
            "existing interface", key, name)
    v4 = ipv4_address(name) if version in (0, 4) else None
    v6 = ipv6_addresses(name) if version in (0, 6) and v4 is None else []
    if v4 is not None:
        return v4, 4
    if v6:
        return v6[0], 6
    wanted = f"an IPv{version}" if version else "an IP"
    raise errors.ParameterError(
        f"Parameter {key} names interface {name!r}, which has no {wanted} address on this "
        f"node (link-local IPv6 addresses do not count); give the interface an address, "
        "or set the parameter to an IP address", key, name)
