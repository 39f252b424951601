"""NIC MAC addresses: the only form that reaches QEMU and the ifup hook.

A MAC goes into QEMU's ``-device MODEL,...,mac=MAC`` option list, so
anything beyond six hex pairs (``52:54:00:15:33:47,romfile=/etc/shadow``)
would add options of its own.  The cluster manager writes MACs as six
lower-case, colon-separated hex pairs; like it, this module accepts upper
case and normalises it to lower case, and refuses every other spelling.
The address must be a unicast station address (the group bit of the first
octet clear, not all zeros), which is what QEMU's NIC models need.

Contract-neutral: the core calls :func:`check_nics` on every start (a new
start, a reboot, a migration target), and :mod:`ganeti_kvm.qemu.cmdline` checks
each MAC again before it writes the option.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

from ganeti_kvm import errors

_MAC_RE = re.compile(r"[0-9a-f]{2}(?::[0-9a-f]{2}){5}")


def normalize(value: object) -> str | None:
    """``value`` as six lower-case hex pairs if it is a usable unicast MAC, else None."""
    if not isinstance(value, str) or not value.isascii():
        return None
    mac = value.lower()
    if not _MAC_RE.fullmatch(mac):
        return None
    if int(mac[:2], 16) & 1 or mac == "00:00:00:00:00:00":
        return None  # a group (multicast/broadcast) address or no address at all
    return mac


def check_mac(instance: str, index: int, value: object) -> str:
    """The normalised MAC of NIC ``index`` of ``instance``; ParameterError if it is not one."""
    mac = normalize(value)
    if mac is None:
        raise errors.ParameterError(
            f"Instance {instance}: NIC {index} has an invalid MAC address {_shown(value)}; use six "
            "hex pairs separated by colons (e.g. 52:54:00:12:34:56) of a unicast address",
            "mac", value)
    return mac


def check_nics(instance: str, nics: Sequence[MutableMapping[str, Any]]) -> None:
    """Check every NIC dict of ``instance``; normalises its ``"mac"`` in place.

    Besides the MAC, the ``ip`` and the ``nicparams`` values (which reach
    the ifup hook's environment and the runtime record) must be text
    without NUL bytes.
    """
    for index, nic in enumerate(nics):
        if not isinstance(nic, MutableMapping):
            raise errors.ParameterError(
                f"Instance {instance}: NIC {index} must be a mapping with a 'mac', "
                f"not {type(nic).__name__}", "nics", nic)
        nic["mac"] = check_mac(instance, index, nic.get("mac"))
        nicparams = nic.get("nicparams") or {}
        if not isinstance(nicparams, Mapping):
            raise errors.ParameterError(
                f"Instance {instance}: NIC {index} nicparams must be a mapping, not "
                f"{type(nicparams).__name__}", "nicparams", nicparams)
        for key, value in [("ip", nic.get("ip")), *nicparams.items()]:
            if value is not None and (not isinstance(value, str) or "\0" in value):
                raise errors.ParameterError(
                    f"Instance {instance}: NIC {index} {key} must be text without NUL "
                    f"bytes, not {_shown(value)}", str(key), value)


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:80] + "..."
