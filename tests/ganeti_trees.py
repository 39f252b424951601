"""Unpacked Ganeti trees (Python code only) for the Ganeti 3.x contract tests.

Each supported Ganeti version is unpacked from its Debian package into
``$GANETI_KVM_CACHE/ganeti-VERSION/root`` (never installed); its Python
package then lives in ``root/usr/share/ganeti/VERSION``.  ``scripts/setup.sh``
fetches them with ``python3 -m tests.ganeti_trees --mirror URI`` (the Debian
archive serving this system's release); tests find them with
:func:`require_tree`, which skips a missing tree, or fails with CI=true.

Ganeti's modules are run under Debian's own ``/usr/bin/python3``: that is
the interpreter (and the python3-* libraries) Ganeti's daemons use, and two
versions of the package ``ganeti`` cannot live in one process anyway.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

CACHE_DIR = os.environ.get("GANETI_KVM_CACHE", "/var/cache/ganeti-kvm")
CODENAME = "bookworm"
# version -> (Debian package with the Python code, suite that ships it)
VERSIONS: dict[str, tuple[str, str]] = {
    "3.0": ("ganeti-3.0", CODENAME),
    "3.1": ("ganeti-3.1", CODENAME + "-backports"),
}
GANETI_PYTHON = os.environ.get("GANETI_KVM_GANETI_PYTHON", "/usr/bin/python3")
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"


def tree_dir(version: str) -> str:
    """Where Ganeti ``version`` is unpacked."""
    return os.path.join(CACHE_DIR, f"ganeti-{version}")


def python_path(version: str) -> str:
    """The directory to put on sys.path to import Ganeti ``version``'s package."""
    return os.path.join(tree_dir(version), "root", "usr", "share", "ganeti", version)


def find_tree(version: str) -> str | None:
    """The Python path of an unpacked Ganeti ``version``, or None."""
    path = python_path(version)
    if os.path.isfile(os.path.join(path, "ganeti", "hypervisor", "hv_base.py")):
        return path
    return None


def require_tree(version: str) -> str:
    """The Python path of Ganeti ``version``; skip the test (fail with CI=true) if missing."""
    import pytest

    path = find_tree(version)
    if path is not None and os.access(GANETI_PYTHON, os.X_OK):
        return path
    message = (f"Ganeti {version} is not unpacked under {tree_dir(version)} (or "
               f"{GANETI_PYTHON} is missing); run 'make setup'")
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)
    raise AssertionError("unreachable")


def fetch(version: str, mirror: str) -> str:
    """Download and unpack Ganeti ``version`` from ``mirror``; returns its Python path.

    apt runs with a private sources list and private package lists, so the
    system's apt state is left alone.
    """
    package, suite = VERSIONS[version]
    os.makedirs(CACHE_DIR, exist_ok=True)
    work = tempfile.mkdtemp(prefix=f"ganeti-{version}.tmp.", dir=CACHE_DIR)
    try:
        lists = os.path.join(work, "lists")
        download = os.path.join(work, "dl")
        os.makedirs(os.path.join(lists, "partial"))
        os.makedirs(download)
        sources = os.path.join(work, "sources.list")
        options = f"[signed-by={KEYRING}] " if os.path.isfile(KEYRING) else ""
        with open(sources, "w", encoding="utf-8") as handle:
            handle.write(f"deb {options}{mirror} {suite} main\n")
        apt = ["-q", "-o", f"Dir::Etc::sourcelist={sources}", "-o", "Dir::Etc::sourceparts=-",
               "-o", f"Dir::State::Lists={lists}", "-o", "Dir::Cache::pkgcache=",
               "-o", "Dir::Cache::srcpkgcache=", "-o", "APT::Sandbox::User=root"]
        subprocess.run(["apt-get", *apt, "update"], check=True)
        subprocess.run(["apt-get", *apt, "download", f"{package}/{suite}"], check=True,
                       cwd=download)
        root = os.path.join(work, "root")
        for name in sorted(os.listdir(download)):
            if name.endswith(".deb"):
                subprocess.run(["dpkg-deb", "-x", os.path.join(download, name), root],
                               check=True)
        shutil.rmtree(download)
        shutil.rmtree(lists)
        os.remove(sources)
        if not os.path.isdir(os.path.join(root, "usr", "share", "ganeti", version)):
            raise SystemExit(f"ganeti_trees: {package} from {suite} has no "
                             f"/usr/share/ganeti/{version}")
        target = tree_dir(version)
        shutil.rmtree(target, ignore_errors=True)
        os.rename(work, target)
        os.chmod(target, 0o755)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return python_path(version)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mirror", required=True,
                        help="the Debian archive URI (e.g. http://deb.debian.org/debian)")
    parser.add_argument("versions", nargs="*", default=sorted(VERSIONS))
    args = parser.parse_args(argv)
    for version in args.versions:
        path = find_tree(version)
        if path is None:
            print(f"ganeti_trees: unpacking Ganeti {version}", file=sys.stderr)
            path = fetch(version, args.mirror)
        print(f"Ganeti {version}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
