"""Build and cache the tiny Linux guest that the real-QEMU tests boot.

The guest is Debian's cloud kernel plus an initramfs made here: a static
busybox, the few virtio/ACPI modules the tests need, and an ``/init`` script.
Nothing is installed on the host: the Debian packages are fetched with
``apt-get download`` and unpacked with ``dpkg-deb -x`` into a temporary
directory; only ``vmlinuz`` and ``initramfs.cpio.gz`` are kept in the cache
(``$GANETI_KVM_CACHE``, default ``/var/cache/ganeti-kvm``), in a directory
named after a hash of everything that goes into the image, so a changed
``/init`` gets a fresh build and an unchanged one is reused.

Kernel command line
    ``console=ttyS0,38400 panic=-1 quiet`` (:data:`KERNEL_ARGS`), plus
    optionally:

    ``gk.ip=ADDR/PREFIX``  configure eth0 (the first virtio NIC) with ADDR
    ``gk.gw=ADDR``         and add a default route through ADDR

    ``panic=-1`` reboots at once on a panic; start QEMU with ``-no-reboot`` so
    that this ends QEMU instead of booting the guest again.

What the guest prints on the first serial port, in this order
    (an empty line, which ends SeaBIOS's terminal reset codes ``ESC c ESC [?7l
    ESC [2J`` that have no newline of their own)
    ``GANETI-KVM TEST GUEST UP``   (:data:`FIRST_LINE`, before any module loads)
    ``BOOT 1 kernel <release>``
    ``MODULE <name> MISSING|FAILED``  (only if a module could not be loaded)
    ``BOOT 2 modules loaded``
    ``DISK MARKER=<marker>``       the first line of /dev/vda (see :func:`make_disk`);
    ``DISK BLANK`` if /dev/vda has no marker, ``DISK NONE`` without /dev/vda
    ``NET eth0 ADDR/PREFIX``       or ``NET NONE`` (no ``gk.ip``) or ``NET FAILED ...``
    ``BOOT 3 acpid running``       (or ``BOOT 3 acpid FAILED``)
    ``READY``
    ``COUNTER 1``, ``COUNTER 2``, ... every 200 ms, forever
    ``POWER BUTTON``               when the ACPI power button is pressed (QMP
                                   ``system_powerdown``, heard from READY on);
                                   the guest then powers off at once and QEMU
                                   exits (status 0)
    ``SHELL EXITED``               when the serial shell exits; a new one starts
    Lines end in ``\\r\\n`` (the tty adds the ``\\r``).  An interactive busybox
    shell runs on the same port from READY on: it prints a banner ending in
    "built-in shell (ash)", then the prompt ``/ # `` followed by ``ESC [6n``
    (a cursor position query that a test can ignore).  Typed input is echoed.

Run ``python3 -m tests.guestimage`` to build (if needed) and print the paths.
"""

from __future__ import annotations

import fcntl
import glob
import gzip
import hashlib
import lzma
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass

FIRST_LINE = "GANETI-KVM TEST GUEST UP"
KERNEL_ARGS = "console=ttyS0,38400 panic=-1 quiet"

KERNEL_METAPACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"

# Loaded in this order by /init; each one only depends on modules before it.
MODULES = (
    "virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev",
    "virtio_pci", "virtio_blk", "failover", "net_failover", "virtio_net",
    "button", "evdev",
)

# Bump when the image layout changes in a way the hash below does not see.
FORMAT = "1"

INIT_SCRIPT = r"""#!/bin/sh
# /init of the ganeti-kvm test guest; tests/guestimage.py documents its output.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

# Each line opens the serial port afresh: when the interactive shell (the
# session leader owning ttyS0) exits, the kernel hangs the tty up and every
# descriptor opened on it before then only returns EIO.
say() { echo "$*" >/dev/ttyS0; }

# The empty line ends the firmware's terminal reset codes, which have no
# newline, so that the first line is a line of its own.
printf '\n%s\n' "@FIRST_LINE@" >/dev/ttyS0
say "BOOT 1 kernel $(uname -r)"

for m in @MODULES@; do
    if [ ! -f "/lib/modules/$m.ko" ]; then
        say "MODULE $m MISSING"
    elif ! insmod "/lib/modules/$m.ko"; then
        say "MODULE $m FAILED"
    fi
done
say "BOOT 2 modules loaded"

# wait_for PATH: wait up to 2 s for PATH to appear.
wait_for() {
    i=0
    while [ ! -e "$1" ] && [ "$i" -lt 20 ]; do
        usleep 100000
        i=$((i + 1))
    done
    [ -e "$1" ]
}

# has_virtio ID: is there a virtio device of that type (1 net, 2 block)?
# Checked first so that a guest without a disk or NIC does not wait for one.
has_virtio() {
    grep -qx "$1" /sys/bus/virtio/devices/*/device 2>/dev/null
}

if has_virtio 0x0002 && wait_for /dev/vda; then
    # The first line of the disk, without the zeros that follow it.
    line=$(dd if=/dev/vda bs=512 count=1 2>/dev/null | tr -d '\000' | head -n 1)
    case "$line" in
        MARKER=*) say "DISK $line" ;;
        *) say "DISK BLANK" ;;
    esac
else
    say "DISK NONE"
fi

gk_ip=
gk_gw=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        gk.ip=*) gk_ip=${arg#gk.ip=} ;;
        gk.gw=*) gk_gw=${arg#gk.gw=} ;;
    esac
done
ip link set lo up
if [ -z "$gk_ip" ]; then
    say "NET NONE"
elif ! has_virtio 0x0001 || ! wait_for /sys/class/net/eth0; then
    say "NET FAILED no eth0"
elif ! ip addr add "$gk_ip" dev eth0 || ! ip link set eth0 up; then
    say "NET FAILED address $gk_ip"
elif [ -n "$gk_gw" ] && ! ip route add default via "$gk_gw"; then
    say "NET FAILED gateway $gk_gw"
else
    say "NET eth0 $gk_ip"
fi

# busybox acpid opens /dev/input/event0, event1, ... (the keyboard, then the
# power button) and dies without event0.  On KEY_POWER it runs
# /etc/acpi/PWRF/00000080 (see /etc/acpid.conf).  It daemonizes before it
# opens them and writes its pid file after, so READY waits for the pid file:
# a power button pressed in between would go unnoticed.
if wait_for /dev/input/event0 && acpid -l /var/log/acpid.log -p /run/acpid.pid &&
        wait_for /run/acpid.pid; then
    say "BOOT 3 acpid running"
else
    say "BOOT 3 acpid FAILED"
fi

say "READY"
(
    n=0
    while :; do
        n=$((n + 1))
        say "COUNTER $n"
        usleep 200000
    done
) &

# An operator's shell on the serial port.  setsid makes it a session leader
# and cttyhack gives it ttyS0 as controlling tty (so ^C works).  /init must
# never exit: that would panic the kernel.
while :; do
    setsid cttyhack sh
    say "SHELL EXITED"
    usleep 200000
done
"""

# busybox acpid's action file: event key, then the handler's path relative to
# the config directory /etc/acpi.  It is a path, not a command line: acpid
# stat()s and executes it (or run-parts it if it is a directory).
ACPID_CONF = "PWRF PWRF/00000080\n"

POWER_HANDLER = """#!/bin/sh
echo "POWER BUTTON" >/dev/ttyS0
poweroff -f
"""


@dataclass(frozen=True)
class Guest:
    kernel: str      # path to vmlinuz
    initrd: str      # path to initramfs (cpio.gz)
    first_line: str  # the first line /init prints on the serial port


def default_cache_dir() -> str:
    return os.environ.get("GANETI_KVM_CACHE", "/var/cache/ganeti-kvm")


def _init_script() -> str:
    return (INIT_SCRIPT.replace("@FIRST_LINE@", FIRST_LINE)
            .replace("@MODULES@", " ".join(MODULES)))


def _image_key() -> str:
    """A short hash of everything that defines the image except package versions."""
    digest = hashlib.sha256()
    for part in (FORMAT, KERNEL_METAPACKAGE, BUSYBOX_PACKAGE, " ".join(MODULES),
                 _init_script(), ACPID_CONF, POWER_HANDLER):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:12]


class BuildError(RuntimeError):
    pass


def _run(argv: list[str], cwd: str | None = None) -> str:
    result = subprocess.run(argv, cwd=cwd, text=True, capture_output=True, check=False)
    if result.returncode != 0:
        raise BuildError(f"{' '.join(argv)} failed with status {result.returncode}: "
                         f"{result.stderr.strip()}")
    return result.stdout


def _kernel_package() -> str:
    """The versioned kernel package the cloud metapackage depends on now."""
    try:
        out = _run(["apt-cache", "depends", KERNEL_METAPACKAGE])
    except BuildError:
        out = ""
    for line in out.splitlines():
        key, _, value = line.strip().partition(":")
        if key == "Depends" and value.strip().startswith("linux-image-"):
            return value.strip()
    raise BuildError(f"cannot resolve the dependency of {KERNEL_METAPACKAGE}")


def _download_and_unpack(package: str, workdir: str) -> str:
    """apt-get download PACKAGE into WORKDIR and unpack it; return the tree."""
    # Downloading as root into a directory the _apt user cannot enter makes
    # apt warn; ask it not to drop privileges for this download.
    _run(["apt-get", "-q", "-o", "APT::Sandbox::User=root", "download", package],
         cwd=workdir)
    debs = glob.glob(os.path.join(workdir, f"{package}_*.deb"))
    if len(debs) != 1:
        raise BuildError(f"expected one .deb of {package}, found {debs}")
    tree = os.path.join(workdir, package)
    _run(["dpkg-deb", "-x", debs[0], tree])
    os.unlink(debs[0])
    return tree


class _CpioWriter:
    """Writes a cpio archive in the "newc" format the kernel unpacks."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._ino = 0

    def _entry(self, name: str, mode: int, data: bytes = b"",
               rdev: tuple[int, int] = (0, 0)) -> None:
        self._ino += 1
        encoded = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, 1, 0, len(data), 0, 0,
                  rdev[0], rdev[1], len(encoded), 0)
        header = b"070701" + b"".join(b"%08X" % value for value in fields)
        # The name and the data are each padded to a multiple of 4 bytes,
        # counting from the start of the header.
        self._chunks += [header, encoded, b"\0" * (-(len(header) + len(encoded)) % 4),
                         data, b"\0" * (-len(data) % 4)]

    def directory(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, 0o100000 | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, 0o120777, target.encode())

    def char_device(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(name, 0o020000 | mode, rdev=(major, minor))

    def getvalue(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return b"".join(self._chunks)


def _read_module(kernel_tree: str, name: str) -> bytes:
    """The uncompressed bytes of module NAME from an unpacked kernel package."""
    pattern = os.path.join(kernel_tree, "lib", "modules", "*", "kernel", "**", f"{name}.ko*")
    for path in glob.glob(pattern, recursive=True):
        if path.endswith(".ko"):
            with open(path, "rb") as handle:
                return handle.read()
        if path.endswith(".ko.xz"):
            with lzma.open(path) as handle:
                return handle.read()
    raise BuildError(f"module {name} not found in {kernel_tree}")


def _initramfs(kernel_tree: str, busybox_tree: str) -> bytes:
    busybox = os.path.join(busybox_tree, "bin", "busybox")
    with open(busybox, "rb") as handle:
        busybox_data = handle.read()
    applets = _run([busybox, "--list-full"]).split()

    cpio = _CpioWriter()
    for directory in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc",
                      "sys", "etc", "etc/acpi", "etc/acpi/PWRF", "lib",
                      "lib/modules", "root", "run", "tmp", "var", "var/log"):
        cpio.directory(directory)
    # The kernel opens /dev/console for init's stdio before /init mounts devtmpfs.
    cpio.char_device("dev/console", 5, 1)
    cpio.file("bin/busybox", busybox_data, 0o755)
    for applet in applets:
        if applet != "bin/busybox":
            cpio.symlink(applet, "/bin/busybox")
    for name in MODULES:
        cpio.file(f"lib/modules/{name}.ko", _read_module(kernel_tree, name))
    cpio.file("etc/acpid.conf", ACPID_CONF.encode())
    cpio.file("etc/acpi/PWRF/00000080", POWER_HANDLER.encode(), 0o755)
    cpio.file("init", _init_script().encode(), 0o755)
    return gzip.compress(cpio.getvalue(), compresslevel=6, mtime=0)


def _build(final_dir: str, cache_dir: str) -> None:
    """Build the image into a temporary directory, then rename it to FINAL_DIR."""
    build_dir = tempfile.mkdtemp(prefix="guest-build-", dir=cache_dir)
    try:
        work = os.path.join(build_dir, "work")
        try:
            os.mkdir(work)
            kernel_tree = _download_and_unpack(_kernel_package(), work)
            busybox_tree = _download_and_unpack(BUSYBOX_PACKAGE, work)
        except BuildError:
            # The package lists may be missing (a fresh machine) or out of
            # date (the mirror has newer packages): refresh them, try again.
            shutil.rmtree(work)
            _run(["apt-get", "-q", "update"])
            os.mkdir(work)
            kernel_tree = _download_and_unpack(_kernel_package(), work)
            busybox_tree = _download_and_unpack(BUSYBOX_PACKAGE, work)
        kernels = glob.glob(os.path.join(kernel_tree, "boot", "vmlinuz-*"))
        if len(kernels) != 1:
            raise BuildError(f"expected one vmlinuz, found {kernels}")
        out = os.path.join(build_dir, "out")
        os.mkdir(out)
        shutil.copyfile(kernels[0], os.path.join(out, "vmlinuz"))
        with open(os.path.join(out, "initramfs.cpio.gz"), "wb") as handle:
            handle.write(_initramfs(kernel_tree, busybox_tree))
        with open(os.path.join(out, "kernel-version"), "w", encoding="ascii") as handle:
            handle.write(os.path.basename(kernels[0])[len("vmlinuz-"):] + "\n")
        os.chmod(out, 0o755)
        os.rename(out, final_dir)
    finally:
        shutil.rmtree(build_dir, ignore_errors=True)


def build_guest(cache_dir: str | None = None) -> Guest:
    """Return the cached guest, building it first if it is missing."""
    cache_dir = cache_dir or default_cache_dir()
    final_dir = os.path.join(cache_dir, f"guest-{_image_key()}")
    guest = Guest(kernel=os.path.join(final_dir, "vmlinuz"),
                  initrd=os.path.join(final_dir, "initramfs.cpio.gz"),
                  first_line=FIRST_LINE)
    if os.path.isdir(final_dir):
        return guest  # complete: it only ever appears by rename
    os.makedirs(cache_dir, exist_ok=True)
    # One builder at a time; a second one waits, then finds the image built.
    with open(os.path.join(cache_dir, "guest.lock"), "w", encoding="ascii") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.isdir(final_dir):
            _build(final_dir, cache_dir)
            # Images of an older /init are of no use any more.
            # (Holding the lock, so no other build is in progress either.)
            for old in glob.glob(os.path.join(cache_dir, "guest-*")):
                if old != final_dir:
                    shutil.rmtree(old, ignore_errors=True)
    return guest


def make_disk(path: str, marker: str, size_mib: int = 4) -> str:
    """Write a raw disk image that starts with ``MARKER=<marker>\\n``, then zeros."""
    line = f"MARKER={marker}\n".encode()
    # The guest reads one line of the first sector.
    if "\n" in marker or "\0" in marker or len(line) > 512:
        raise ValueError(f"unusable disk marker {marker!r}")
    with open(path, "wb") as handle:
        handle.write(line)
        handle.truncate(size_mib * 1024 * 1024)
    return path


def main() -> int:
    guest = build_guest(sys.argv[1] if len(sys.argv) > 1 else None)
    print(f"kernel: {guest.kernel}")
    print(f"initrd: {guest.initrd}")
    print(f"append: {KERNEL_ARGS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


def dirtying_command(mib: int) -> str:
    """A line for the guest's shell that rewrites ``mib`` MiB of its RAM in a loop.

    A tmpfs file is rewritten with a 4 MiB block of text, block by block,
    printing ``PASS N`` after each pass (``DIRTY FAILED`` if a write fails).
    Zeros would not do: QEMU sends a page of zeros as a flag, not as 4 KiB.
    """
    blocks = mib // 4
    return (f"mkdir -p /mnt/dirty && mount -t tmpfs -o size={mib + 16}m tmpfs /mnt/dirty && "
            "yes 0123456789abcdef | head -c 4194304 >/mnt/dirty/block && n=0 && "
            f"while :; do i=0; while [ $i -lt {blocks} ]; do dd if=/mnt/dirty/block "
            "of=/mnt/dirty/f bs=4194304 seek=$i count=1 conv=notrunc 2>/dev/null || "
            "{ echo DIRTY' 'FAILED; exit 1; }; i=$((i + 1)); done; n=$((n + 1)); "
            "echo PASS $n; done &\n")
