"""Throw-away network namespaces for tests that touch networking.

Tests never add bridges, addresses, routes or TAP devices to the machine's
own network namespace.  Everything happens inside a namespace made by
:func:`netns`, which deletes it at exit, failed test or not; deleting a
namespace destroys every bridge, veth and route made inside it.  TAP devices
are created straight inside the namespace with
``netdev.open_tap(..., netns=name)`` and vanish when their descriptor is
closed.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import pytest

log = logging.getLogger(__name__)

IP = shutil.which("ip", path=os.pathsep.join(
    [os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin", "/bin"])) or "ip"
COMMAND_TIMEOUT = 20.0


def ip_available() -> bool:
    """Whether iproute2's ``ip`` is installed and we may create namespaces (root)."""
    return os.path.isabs(IP) and os.access(IP, os.X_OK) and os.geteuid() == 0


def skip_unless_netns() -> None:
    """Skip the calling test unless network namespaces can be made here."""
    if not ip_available():
        pytest.skip("needs root and iproute2's 'ip' to create network namespaces")


def run(argv: Sequence[str], check: bool = True,
        timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` (never through a shell); fail loudly with its output if ``check``."""
    result = subprocess.run(list(argv), stdin=subprocess.DEVNULL, capture_output=True,
                            text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} exited with {result.returncode}: "
            f"{(result.stdout + result.stderr).strip()}")
    return result


def ns_run(name: str, argv: Sequence[str], check: bool = True,
           timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` inside namespace ``name`` (``ip netns exec``, which also remounts /sys)."""
    return run([IP, "netns", "exec", name, *argv], check=check, timeout=timeout)


def ns_ip(name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ip -n NAME ARGS...``."""
    return run([IP, "-n", name, *args], check=check)


def ns_read(name: str, path: str) -> str:
    """Content of ``path`` (e.g. in /sys/class/net) as seen from inside namespace ``name``."""
    return ns_run(name, ["cat", path]).stdout


@contextmanager
def netns(prefix: str = "gk-test") -> Iterator[str]:
    """Create network namespace ``<prefix>-<random>``, yield its name, delete it at exit.

    The loopback device is brought up.  Deleting the namespace also removes
    every bridge, veth, address and route made inside it; TAP devices still
    open inside it never fall back into the host namespace, but close their
    descriptors first so they go away at once.
    """
    name = f"{prefix}-{secrets.token_hex(4)}"
    run([IP, "netns", "add", name])
    try:
        ns_ip(name, "link", "set", "dev", "lo", "up")
        yield name
    finally:
        result = run([IP, "netns", "delete", name], check=False)
        if result.returncode != 0:
            log.error("Could not delete test namespace %s: %s", name,
                      (result.stdout + result.stderr).strip())


@contextmanager
def bridged_netns(prefix: str, address: str | None = None) -> Iterator[str]:
    """:func:`netns` (skipping the test where namespaces cannot be made) with a
    bridge ``br0`` up inside, for the instances' TAP devices; ``address``
    (``IP/PREFIX``) is given to the bridge if set."""
    skip_unless_netns()
    with netns(prefix) as name:
        ns_ip(name, "link", "add", "br0", "type", "bridge")
        if address:
            ns_ip(name, "addr", "add", address, "dev", "br0")
        ns_ip(name, "link", "set", "br0", "up")
        yield name
