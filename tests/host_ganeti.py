"""One test at a time may switch this machine's own Ganeti KVM driver.

``ganeti-kvm ganeti install`` on ``/`` changes the machine's
/usr/share/ganeti (the test cluster's nodes share /usr with the machine),
so tests that do it, run by concurrent pytest sessions, would switch the
driver under each other.  :func:`host_driver_lock` serialises them with an
advisory lock on the directory they change (``flock`` on the directory
itself: no lock file to create or leave behind)::

    with host_driver_lock():
        install.install("/")
        ...
        install.remove("/")
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

DRIVER_DIR = "/usr/share/ganeti/3.0/ganeti/hypervisor/hv_kvm"
GANETI_SHARE = "/usr/share/ganeti"
DRIVER = "ganeti/hypervisor/hv_kvm/__init__.py"
VERSIONS = ("3.0", "3.1")
LOCK_TIMEOUT = 900.0  # the end-to-end module holds it for about two minutes


class HostLockTimeout(Exception):
    """Another test kept the machine's Ganeti driver for longer than the bound."""


@contextmanager
def host_driver_lock(path: str = DRIVER_DIR, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
    """Hold the lock on ``path`` (Ganeti's hv_kvm directory) for the ``with`` block."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as err:
                if err.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() > deadline:
                    raise HostLockTimeout(
                        f"another test held the lock on {path} for more than {timeout:.0f} s; "
                        "is a test session that switches Ganeti's driver hung?") from None
                time.sleep(0.2)
        yield
    finally:
        os.close(fd)  # releases the lock


def driver_digests(share: str = GANETI_SHARE) -> dict[str, str]:
    """SHA-256 of the KVM driver file of every installed Ganeti 3.x (by version).

    Taken before a test switches the driver and after it switches back, it
    shows Ganeti's own drivers are back byte for byte.
    """
    found = {}
    for version in VERSIONS:
        path = os.path.join(share, version, DRIVER)
        if os.path.exists(path):
            with open(path, "rb") as handle:
                found[version] = hashlib.sha256(handle.read()).hexdigest()
    return found
