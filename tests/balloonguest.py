"""The test guest plus the virtio_balloon module, for the ballooning tests.

The shared test guest (:mod:`tests.guestimage`) loads no balloon driver.
Rather than rebuild that image under every other test, this adds a second
initramfs archive holding ``/lib/modules/virtio_balloon.ko`` of the guest's
own kernel release; the kernel unpacks concatenated archives one after the
other, so the guest's /init stays the same and a test loads the module from
the guest's shell (``insmod /lib/modules/virtio_balloon.ko``).  Built once
and cached next to the guest image.
"""

from __future__ import annotations

import fcntl
import gzip
import os
import shutil
import tempfile

from tests import guestimage

MODULE = "virtio_balloon"
MODULE_PATH = f"/lib/modules/{MODULE}.ko"


def build(guest: guestimage.Guest, cache_dir: str | None = None) -> str:
    """The path of the guest's initramfs with the balloon module added (built if missing)."""
    cache_dir = cache_dir or guestimage.default_cache_dir()
    guest_dir = os.path.dirname(guest.initrd)
    with open(os.path.join(guest_dir, "kernel-version"), encoding="ascii") as handle:
        release = handle.read().strip()
    final = os.path.join(cache_dir, f"balloon-{os.path.basename(guest_dir)}.cpio.gz")
    if os.path.exists(final):
        return final
    with open(os.path.join(cache_dir, "balloon.lock"), "w", encoding="ascii") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(final):
            return final
        work = tempfile.mkdtemp(prefix="balloon-build-", dir=cache_dir)
        try:
            package = f"linux-image-{release}"
            try:
                tree = guestimage._download_and_unpack(package, work)
            except guestimage.BuildError:  # package lists missing or stale: refresh, retry
                guestimage._run(["apt-get", "-q", "update"])
                tree = guestimage._download_and_unpack(package, work)
            cpio = guestimage._CpioWriter()
            cpio.file(MODULE_PATH.lstrip("/"), guestimage._read_module(tree, MODULE))
            extra = gzip.compress(cpio.getvalue(), compresslevel=6, mtime=0)
            with open(guest.initrd, "rb") as handle:
                base = handle.read()
            partial = final + ".tmp"
            with open(partial, "wb") as handle:
                handle.write(base + extra)
            os.rename(partial, final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return final


if __name__ == "__main__":
    print(build(guestimage.build_guest()))
