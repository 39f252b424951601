"""TAP devices for instance NICs, created through ``/dev/net/tun`` ioctls.

Every NIC of an instance is a TAP device that this library opens itself and
hands to QEMU as an open file descriptor (``-netdev tap,fd=N``): the device
lives exactly as long as some process holds that descriptor, so it disappears
by itself when QEMU exits and nothing has to clean it up.

Descriptors returned by :func:`open_tap` are close-on-exec.  The caller passes
them to QEMU with ``subprocess``'s ``pass_fds`` (which makes them inheritable in
the child only); QEMU keeps them across ``-daemonize``.  Once QEMU runs, the
caller closes its own copies.

Network namespaces
------------------
:func:`open_tap` and :func:`tap_exists` take an optional ``netns``: the name
of a namespace managed by ``ip netns`` (a file under ``/var/run/netns``).  The
device is then created *inside* that namespace without the calling process
ever leaving its own: a short-lived helper thread enters the namespace with
``setns(2)`` (which changes the network namespace of the calling thread only),
opens the device and ends.  The descriptor belongs to the whole process and
keeps working from any namespace, so QEMU started from the host namespace
uses it as usual.  This is how tests keep every device out of the host's
namespace, and how a node could place instance NICs in a dedicated namespace.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import re
import socket
import struct
import threading
from collections.abc import Callable
from typing import TypeVar

from ganeti_kvm import errors

log = logging.getLogger(__name__)

TUN_DEVICE = "/dev/net/tun"
"""The TUN/TAP clone device."""

NETNS_RUN_DIR = "/var/run/netns"
"""Where ``ip netns`` keeps its named network namespaces."""

# ioctl numbers from <linux/if_tun.h> (_IOW('T', 202, int) etc.)
TUNSETIFF = 0x400454CA
TUNGETIFF = 0x800454D2
TUNGETFEATURES = 0x800454CF

# struct ifreq flags for TUNSETIFF
IFF_TUN = 0x0001
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_ONE_QUEUE = 0x2000
"""Obsolete: ignored by kernels since 3.8, so this module never sets it."""
IFF_VNET_HDR = 0x4000
IFF_MULTI_QUEUE = 0x0100
MAX_QUEUES = 8
"""The most queues (descriptors) a TAP device gets here: Ganeti's limit for virtio_net_queues."""

IFNAMSIZ = 16
"""Size of an interface name buffer, the NUL included (names are at most 15 bytes)."""

DEFAULT_TAP_TEMPLATE = "gnt.tap%d"
"""Name template for TAP devices; the kernel replaces ``%d`` with the first free number."""

# struct ifreq: 16 bytes of name, then a 24-byte union whose first member is
# the short ifr_flags.
_IFREQ = struct.Struct("16sH22x")

_CLONE_NEWNET = 0x40000000
_NETNS_TIMEOUT = 10.0
_NETNS_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,255}$")

# NIC types (hypervisor parameter values) and QEMU models that are
# paravirtual and so understand the virtio-net header.
_VNET_HDR_NIC_TYPES = frozenset(["paravirtual"])  # core.names.HT_NIC_PARAVIRTUAL
_VNET_HDR_MODELS = frozenset(["virtio-net-pci", "virtio-net", "virtio-net-device"])

_T = TypeVar("_T")


def wants_vnet_hdr(nic_type: str) -> bool:
    """Whether a NIC of ``nic_type`` should get a TAP device with ``IFF_VNET_HDR``.

    ``nic_type`` is a ``nic_type`` hypervisor parameter value (``"paravirtual"``)
    or a QEMU device model (``"virtio-net-pci"``).  Only paravirtual NICs know
    the virtio-net header; emulated ones (e1000, rtl8139, ...) must not get it.
    """
    return nic_type in _VNET_HDR_NIC_TYPES or nic_type in _VNET_HDR_MODELS


def probe_vnet_hdr(fd: int) -> bool:
    """Whether the TUN driver behind ``fd`` supports ``IFF_VNET_HDR``.

    ``fd`` is an open ``/dev/net/tun`` descriptor, attached to a device or
    not.  True only if ``TUNGETFEATURES`` is implemented and lists
    ``IFF_VNET_HDR``, and ``TUNGETIFF`` is implemented too (QEMU needs it to
    check the header flag of a descriptor it is given).
    """
    try:
        raw = fcntl.ioctl(fd, TUNGETFEATURES, struct.pack("I", 0))
    except OSError as err:
        log.warning("TUNGETFEATURES is not supported (%s); not enabling IFF_VNET_HDR",
                    os.strerror(err.errno or 0))
        return False
    features = struct.unpack("I", raw)[0]
    if not features & IFF_VNET_HDR:
        log.warning("The kernel's TUN driver does not support IFF_VNET_HDR; not enabling it")
        return False
    try:
        fcntl.ioctl(fd, TUNGETIFF, bytes(_IFREQ.size))
    except OSError as err:
        # EBADFD: implemented, but the descriptor has no device attached yet.
        if err.errno != errno.EBADFD:
            log.warning("TUNGETIFF is not supported (%s); not enabling IFF_VNET_HDR",
                        os.strerror(err.errno or 0))
            return False
    return True


def validate_tap_name(name: str) -> None:
    """Raise :class:`errors.HypervisorError` unless ``name`` can name a TAP device.

    A name is 1 to 15 bytes of printable ASCII without ``/``, ``:``, whitespace
    or ``%``, except that a single ``%d`` (a template the kernel numbers) is
    allowed.  ``"."`` and ``".."`` are refused.
    """
    if not isinstance(name, str) or not name:
        raise errors.HypervisorError(
            f"Invalid TAP device name {name!r}: give a non-empty string of at most "
            f"{IFNAMSIZ - 1} bytes")
    try:
        raw = name.encode("ascii")
    except UnicodeEncodeError:
        raise errors.HypervisorError(
            f"Invalid TAP device name {name!r}: use ASCII letters, digits, '.', '-' or '_'"
        ) from None
    if len(raw) > IFNAMSIZ - 1:
        raise errors.HypervisorError(
            f"Invalid TAP device name {name!r}: {len(raw)} bytes, the kernel allows at most "
            f"{IFNAMSIZ - 1}; use a shorter name")
    bad = [ch for ch in name.replace("%d", "", 1)
           if ch in "/:%" or ch.isspace() or not ch.isprintable()]
    if bad or name in (".", ".."):
        raise errors.HypervisorError(
            f"Invalid TAP device name {name!r}: it may not be '.' or '..' nor contain "
            f"'/', ':', whitespace or '%' (other than one '%d' template); pick another name")


def netns_path(netns: str) -> str:
    """Path of the ``ip netns`` namespace called ``netns``; raise if it does not exist."""
    if not isinstance(netns, str) or not _NETNS_NAME_RE.fullmatch(netns) \
            or netns in (".", ".."):
        raise errors.HypervisorError(
            f"Invalid network namespace name {netns!r}: give the name of a namespace "
            f"listed by 'ip netns list'")
    path = os.path.join(NETNS_RUN_DIR, netns)
    if not os.path.exists(path):
        raise errors.HypervisorError(
            f"Network namespace {netns!r} does not exist ({path} is missing); "
            f"create it with 'ip netns add {netns}' or fix the name")
    return path


def _setns(fd: int) -> None:
    """setns(2) into the network namespace ``fd`` for the calling thread only."""
    native = getattr(os, "setns", None)  # Python >= 3.12
    if native is not None:
        native(fd, _CLONE_NEWNET)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def run_in_netns(netns: str, func: Callable[[], _T],
                 cleanup: Callable[[_T], None] | None = None,
                 timeout: float = _NETNS_TIMEOUT) -> _T:
    """Call ``func`` in a helper thread that has entered network namespace ``netns``.

    Only that thread changes namespace (``setns(2)`` on a network namespace
    is per thread), so the rest of the process, other threads included, is
    unaffected; the thread returns to its original namespace before ending.
    Sockets and TUN devices that ``func`` creates belong to ``netns``.
    If the thread does not finish within ``timeout`` seconds a
    :class:`errors.HypervisorError` is raised and, when ``func`` finally
    returns, ``cleanup`` (if given) is called on its result so that nothing
    leaks.
    """
    ns_path = netns_path(netns)
    lock = threading.Lock()
    state: dict[str, object] = {}

    def worker() -> None:
        try:
            ns_fd = os.open(ns_path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                own_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            except BaseException:
                os.close(ns_fd)
                raise
            try:
                _setns(ns_fd)
                try:
                    result = func()
                finally:
                    try:
                        _setns(own_fd)
                    except OSError as err:  # the thread ends right after anyway
                        log.warning("Could not leave network namespace %s: %s", netns, err)
            finally:
                os.close(own_fd)
                os.close(ns_fd)
        except BaseException as err:  # handed to the waiting thread
            with lock:
                state["error"] = err
            return
        with lock:
            abandoned = "abandoned" in state
            state["result"] = result
        if abandoned and cleanup is not None:
            cleanup(result)

    thread = threading.Thread(target=worker, name=f"netns-{netns}", daemon=True)
    thread.start()
    thread.join(timeout)
    with lock:
        if "error" in state:
            error = state["error"]
            assert isinstance(error, BaseException)
            if isinstance(error, errors.GenericError):
                raise error
            raise errors.HypervisorError(
                f"Operation in network namespace {netns!r} failed: {error}; check that "
                f"the namespace exists and that this process may enter it "
                f"(CAP_SYS_ADMIN)") from error
        if "result" not in state:
            state["abandoned"] = True
            raise errors.HypervisorError(
                f"Operation in network namespace {netns!r} did not finish within "
                f"{timeout:.0f} s; check the node's kernel log")
        return state["result"]  # type: ignore[return-value]


def _open_tap_here(name: str, vnet_hdr: bool, multi_queue: bool = False) -> tuple[int, str]:
    """Create the TAP device (or one more queue of it) in this thread's network namespace."""
    try:
        fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as err:
        raise errors.HypervisorError(
            f"Cannot open {TUN_DEVICE}: {os.strerror(err.errno or 0)}; load the 'tun' "
            f"kernel module and check that the device node exists and is accessible"
        ) from None
    try:
        flags = IFF_TAP | IFF_NO_PI
        if vnet_hdr and probe_vnet_hdr(fd):
            flags |= IFF_VNET_HDR
        if multi_queue:
            flags |= IFF_MULTI_QUEUE
        request = _IFREQ.pack(name.encode("ascii"), flags)
        try:
            answer = fcntl.ioctl(fd, TUNSETIFF, request)
        except OSError as err:
            hint = {
                errno.EBUSY: "a TAP device of that name is already in use; pick another name",
                errno.EINVAL: "a network interface of that name exists and is not a TAP "
                              "device, or the flags are not supported; pick another name",
                errno.EPERM: "this needs CAP_NET_ADMIN; run as root",
                errno.ENFILE: "no free device number for the template; remove unused "
                              "interfaces",
            }.get(err.errno or 0, "check the kernel log")
            raise errors.HypervisorError(
                f"Cannot create TAP device {name!r} via {TUN_DEVICE} (TUNSETIFF): "
                f"{os.strerror(err.errno or 0)}; {hint}") from None
        actual = _IFREQ.unpack(answer)[0].split(b"\0", 1)[0].decode("ascii", "replace")
    except BaseException:
        os.close(fd)
        raise
    log.debug("Opened TAP device %s (fd %d, flags %#x)", actual, fd, flags)
    return fd, actual


def open_tap(name: str = "", vnet_hdr: bool = True,
             netns: str | None = None) -> tuple[int, str]:
    """Create a TAP device and return ``(fd, interface name)``.

    ``name`` is the interface name or a template with one ``%d``; empty means
    ``"gnt.tap%d"``.  The device is created with ``IFF_TAP | IFF_NO_PI``, plus
    ``IFF_VNET_HDR`` if ``vnet_hdr`` is true and the kernel supports it (see
    :func:`probe_vnet_hdr`; :func:`tap_info` tells what was set).  With
    ``netns`` (an ``ip netns`` name) the device is created inside that
    namespace; see the module documentation.

    The descriptor is close-on-exec: pass it to QEMU with ``pass_fds`` and
    close it once QEMU holds its copy.  The device vanishes when the last
    descriptor is closed.  Failures raise :class:`errors.HypervisorError`
    naming ``/dev/net/tun`` and the kernel's error.
    """
    name = name or DEFAULT_TAP_TEMPLATE
    validate_tap_name(name)
    if netns is None:
        return _open_tap_here(name, vnet_hdr)
    return run_in_netns(netns, lambda: _open_tap_here(name, vnet_hdr),
                        cleanup=lambda result: os.close(result[0]))


def _open_queues_here(name: str, vnet_hdr: bool, queues: int) -> tuple[list[int], str]:
    fd, actual = _open_tap_here(name, vnet_hdr, multi_queue=True)
    fds = [fd]
    try:
        while len(fds) < queues:  # each TUNSETIFF on the same name attaches one more queue
            fds.append(_open_tap_here(actual, vnet_hdr, multi_queue=True)[0])
    except BaseException:
        for opened in fds:
            os.close(opened)
        raise
    return fds, actual


def open_tap_queues(name: str = "", vnet_hdr: bool = True, queues: int = 1,
                    netns: str | None = None) -> tuple[list[int], str]:
    """Create a TAP device with ``queues`` queues: ``([fd, ...], interface name)``.

    One queue is :func:`open_tap`'s device; more give a multiqueue device
    (``IFF_MULTI_QUEUE``), one descriptor per queue, for QEMU's
    ``-netdev tap,fds=A:B:...``.  ``queues`` is 1 to :data:`MAX_QUEUES`.
    """
    if not isinstance(queues, int) or isinstance(queues, bool) or not 0 < queues <= MAX_QUEUES:
        raise errors.HypervisorError(
            f"A TAP device can have 1 to {MAX_QUEUES} queues, not {queues!r}; "
            "fix virtio_net_queues")
    if queues == 1:
        fd, actual = open_tap(name, vnet_hdr, netns)
        return [fd], actual
    name = name or DEFAULT_TAP_TEMPLATE
    validate_tap_name(name)
    if netns is None:
        return _open_queues_here(name, vnet_hdr, queues)

    def close_all(result: tuple[list[int], str]) -> None:
        for opened in result[0]:
            os.close(opened)
    return run_in_netns(netns, lambda: _open_queues_here(name, vnet_hdr, queues),
                        cleanup=close_all)


def tap_info(fd: int) -> tuple[str, int]:
    """Name and ``IFF_*`` flags of the TAP device attached to ``fd`` (``TUNGETIFF``)."""
    try:
        answer = fcntl.ioctl(fd, TUNGETIFF, bytes(_IFREQ.size))
    except OSError as err:
        raise errors.HypervisorError(
            f"Cannot query the TAP device of descriptor {fd} (TUNGETIFF on {TUN_DEVICE}): "
            f"{os.strerror(err.errno or 0)}; pass a descriptor returned by open_tap") from None
    raw_name, flags = _IFREQ.unpack(answer)
    return raw_name.split(b"\0", 1)[0].decode("ascii", "replace"), flags


def _interface_exists_here(name: str) -> bool:
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


def tap_exists(name: str, netns: str | None = None) -> bool:
    """Whether a network interface called ``name`` exists.

    Without ``netns`` this looks at ``/sys/class/net`` (the namespace this
    process's ``/sys`` shows, normally its own); with ``netns`` it asks the
    kernel from inside that namespace.  Invalid names are reported as absent.
    """
    try:
        validate_tap_name(name)
    except errors.HypervisorError:
        return False
    if "%" in name:
        return False
    if netns is None:
        return os.path.exists(os.path.join("/sys/class/net", name))
    return run_in_netns(netns, lambda: _interface_exists_here(name))
