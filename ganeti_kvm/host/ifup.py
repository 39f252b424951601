"""The ifup hook: connects an instance's TAP devices to the node's network.

The library runs the hook (by default the shipped ``kvm-ifup``,
:data:`ganeti_kvm.host.paths.KVM_IFUP`) once per NIC, after QEMU holds the
TAP device.  The hook learns everything from its environment, built by
:func:`nic_environment`; values are passed verbatim and never through a
shell, so instance names or tags full of shell metacharacters are harmless.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
from collections.abc import Iterable
from typing import Any

from ganeti_kvm import errors
from ganeti_kvm.host.netdev import netns_path

log = logging.getLogger(__name__)

# The NIC parameters the hook is told about, and the modes it knows
# (the cluster manager's nicparams keys and values).
NIC_MODE = "mode"
NIC_LINK = "link"
NIC_MODE_BRIDGED = "bridged"
NIC_MODE_ROUTED = "routed"
NIC_VALID_MODES = frozenset([NIC_MODE_BRIDGED, NIC_MODE_ROUTED])

DEFAULT_TIMEOUT = 30.0
"""Seconds a hook may run before it is killed."""

EXTRA_PATH = ("/sbin", "/usr/sbin")
"""Appended to the hook's ``PATH`` (as the cluster manager did) so that ``ip`` is found."""

_KILL_WAIT = 5.0


def nic_environment(instance_name: str, nic: Any, index: int, tap: str,
                    tags: Iterable[str]) -> dict[str, str]:
    """The environment of the ifup hook for NIC number ``index`` of an instance.

    ``nic`` is any object with attributes ``mac``, ``ip`` (may be None or
    empty) and ``nicparams`` (a mapping with ``"mode"`` and ``"link"``).
    The result holds exactly these variables:

    ``INSTANCE``
        ``instance_name``
    ``MAC``
        ``nic.mac``
    ``MODE``
        ``nicparams["mode"]`` (``"bridged"`` or ``"routed"``)
    ``INTERFACE``
        ``tap``, the TAP device's name
    ``INTERFACE_INDEX``
        ``str(index)``
    ``TAGS``
        ``tags`` joined by single spaces, in the given order
    ``IP``
        ``nic.ip``; only if it is set
    ``LINK``
        ``nicparams["link"]``; only if it is set
    ``BRIDGE``
        ``nicparams["link"]`` (possibly empty); only in bridged mode

    Values are used verbatim.  A value containing a NUL byte, or a missing
    MAC or mode, raises :class:`errors.HypervisorError`.
    """
    nicparams = getattr(nic, "nicparams", None) or {}
    mode = nicparams.get(NIC_MODE) or ""
    link = nicparams.get(NIC_LINK) or ""
    mac = getattr(nic, "mac", None) or ""
    ip = getattr(nic, "ip", None) or ""
    if not mac:
        raise errors.HypervisorError(
            f"NIC {index} of instance {instance_name} has no MAC address; set one before "
            f"starting the instance")
    if not mode:
        raise errors.HypervisorError(
            f"NIC {index} of instance {instance_name} has no mode; set nicparams "
            f"'{NIC_MODE}' to one of {', '.join(sorted(NIC_VALID_MODES))}")
    env = {
        "INSTANCE": instance_name,
        "MAC": str(mac),
        "MODE": str(mode),
        "INTERFACE": tap,
        "INTERFACE_INDEX": str(index),
        "TAGS": " ".join(tags),
    }
    if ip:
        env["IP"] = str(ip)
    if link:
        env["LINK"] = str(link)
    if mode == NIC_MODE_BRIDGED:
        env["BRIDGE"] = str(link)
    for key, value in env.items():
        if "\0" in value:
            raise errors.HypervisorError(
                f"Cannot run the ifup hook for NIC {index} of instance {instance_name}: "
                f"{key} contains a NUL byte ({value!r}); fix the instance's configuration")
    return env


def _hook_path() -> str:
    """PATH for the hook: ours plus /sbin and /usr/sbin."""
    parts = [p for p in os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin").split(":") if p]
    parts += [p for p in EXTRA_PATH if p not in parts]
    return ":".join(parts)


def run_ifup(script: str, env: dict[str, str], timeout: float = DEFAULT_TIMEOUT,
             netns: str | None = None) -> None:
    """Run the ifup hook ``script`` with environment ``env`` (plus ``PATH``).

    The hook is run as an argv list (no shell), with no standard input, in
    its own session, and gets ``timeout`` seconds; on timeout its whole
    process group is killed.  With ``netns`` (an ``ip netns`` name) it runs as
    ``ip netns exec NETNS SCRIPT``: inside that network namespace with a
    matching ``/sys``, for NICs whose TAP devices were opened there (see
    :func:`ganeti_kvm.host.netdev.open_tap`).

    Raises :class:`errors.HypervisorError` with the hook's exit code and
    combined output if it fails, cannot be started or times out.
    """
    interface = env.get("INTERFACE", "?")
    what = f"ifup hook {script} for {interface}"
    if not isinstance(script, str) or "\0" in script or not os.path.isfile(script) \
            or not os.access(script, os.X_OK):
        raise errors.HypervisorError(
            f"Cannot run {what}: {script} is missing or not executable; reinstall "
            f"ganeti-kvm or fix the hook's path and permissions")
    full_env = dict(env)
    full_env.setdefault("PATH", _hook_path())
    argv = [script]
    if netns is not None:
        netns_path(netns)  # validates the name and checks that it exists
        ip = shutil.which("ip", path=full_env["PATH"])
        if ip is None:
            raise errors.HypervisorError(
                f"Cannot run {what} in network namespace {netns}: 'ip' (iproute2) not "
                f"found in {full_env['PATH']}; install iproute2")
        argv = [ip, "netns", "exec", netns, script]
    log.debug("Running %s: %s", what, argv)
    try:
        proc = subprocess.Popen(argv, env=full_env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True, close_fds=True)
    except OSError as err:
        raise errors.HypervisorError(
            f"Cannot run {what}: {err}; check the hook's interpreter line and "
            f"permissions") from None
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        output = _drain(proc)
        raise errors.HypervisorError(
            f"The {what} did not finish within {timeout:.0f} s and was killed. "
            f"Output: {_text(output) or '(none)'}; check the hook and the node's "
            f"network configuration") from None
    text = _text(output)
    if proc.returncode != 0:
        status = (f"was killed by signal {-proc.returncode}" if proc.returncode < 0
                  else f"exited with code {proc.returncode}")
        raise errors.HypervisorError(
            f"The {what} {status}. Output: {text or '(none)'}; fix the cause and "
            f"restart the instance (or rerun the hook)")
    if text:
        log.info("The %s said: %s", what, text)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the hook's process group (it runs in a session of its own)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _drain(proc: subprocess.Popen[bytes]) -> bytes:
    """Collect what a killed hook wrote, waiting at most a few seconds."""
    try:
        output, _ = proc.communicate(timeout=_KILL_WAIT)
    except subprocess.TimeoutExpired:
        # A grandchild escaped the group and holds the pipe; stop reading.
        proc.kill()
        if proc.stdout is not None:
            proc.stdout.close()
        try:
            proc.wait(timeout=_KILL_WAIT)
        except subprocess.TimeoutExpired:
            log.error("ifup hook process %d did not exit after SIGKILL", proc.pid)
        return b""
    return output or b""


def _text(output: bytes | None) -> str:
    return (output or b"").decode("utf-8", "replace").strip()
