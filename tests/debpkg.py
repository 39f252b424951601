"""Build and cache the Debian package ganeti-kvm (``make deb``).

dpkg-buildpackage (debhelper, dh-python's pybuild) runs in a temporary copy
of what goes into the package (:data:`BUILD_INPUTS`), never in the work tree.
The results (``ganeti-kvm_VERSION_all.deb``, the ``.changes``, ``.buildinfo``
and the build log) are kept in ``$GANETI_KVM_CACHE/deb/HASH/``, where HASH
covers every input file's path, executable bit and content: an unchanged
tree reuses the package, a changed one gets a fresh build.

``python3 -m tests.debpkg`` builds if needed and prints the .deb's path;
:func:`build` returns it (for the cluster tests, which install it into their
nodes).  The build runs with Debian's own tools and ``/usr/bin/python3``
whatever interpreter runs this module: PATH is reset for it.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.get("GANETI_KVM_CACHE", "/var/cache/ganeti-kvm")
PACKAGE = "ganeti-kvm"
# Everything the package is built from, relative to the repository.
BUILD_INPUTS = ("setup.py", "COPYING", "README.md", "ganeti_kvm", "debian",
                "examples/instance.json")
# Build leftovers of a work tree that must not reach the build.
_SKIP_DIRS = frozenset({"__pycache__", ".pybuild", ".mypy_cache", ".pytest_cache"})
_SKIP_SUFFIXES = (".pyc", ".egg-info")
# The Debian tools the build needs (debhelper, dh-python, dpkg-dev).
BUILD_TOOLS = ("dpkg-buildpackage", "dh", "pybuild", "dh_python3")
BUILD_ENV_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
BUILD_TIMEOUT = 600.0
KEEP_BUILDS = 3


class BuildError(Exception):
    """The package did not build; the message quotes the end of the build log."""


def version(repo: str = REPO) -> str:
    """The version, from its one place: ``__version__`` in ganeti_kvm/__init__.py."""
    with open(os.path.join(repo, "ganeti_kvm", "__init__.py"), encoding="utf-8") as handle:
        found = re.search(r'^__version__ = "([^"]+)"$', handle.read(), re.MULTILINE)
    if found is None:
        raise BuildError(f"no __version__ line in {repo}/ganeti_kvm/__init__.py")
    return found.group(1)


def deb_name(ver: str) -> str:
    return f"{PACKAGE}_{ver}_all.deb"


def missing_tools() -> list[str]:
    """The build tools not installed (scripts/setup.sh installs them)."""
    return [tool for tool in BUILD_TOOLS
            if shutil.which(tool, path=BUILD_ENV_PATH) is None]


def input_files(repo: str = REPO) -> list[str]:
    """Every file the build copies, relative to ``repo``, sorted."""
    found: list[str] = []
    for item in BUILD_INPUTS:
        path = os.path.join(repo, item)
        if os.path.isfile(path):
            found.append(item)
            continue
        for base, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs
                             if d not in _SKIP_DIRS and not d.endswith(_SKIP_SUFFIXES))
            for name in files:
                if not name.endswith(_SKIP_SUFFIXES):
                    found.append(os.path.relpath(os.path.join(base, name), repo))
    return sorted(found)


def tree_hash(repo: str = REPO) -> str:
    """A hash of every input file's path, executable bit and content."""
    digest = hashlib.sha256()
    for rel in input_files(repo):
        path = os.path.join(repo, rel)
        executable = os.stat(path).st_mode & 0o100
        with open(path, "rb") as handle:
            content = handle.read()
        digest.update(f"{rel}\0{'x' if executable else '-'}\0{len(content)}\0".encode())
        digest.update(content)
    return digest.hexdigest()[:16]


def _copy_inputs(repo: str, dest: str) -> None:
    for rel in input_files(repo):
        target = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(os.path.join(repo, rel), target)


def _build_env() -> dict[str, str]:
    """The build's environment: Debian's tools and python3 first, no other Python's."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("PYTHON", "PYENV", "VIRTUAL_ENV", "PIP_"))}
    env.update(PATH=BUILD_ENV_PATH, LC_ALL="C.UTF-8")
    return env


def _prune(top: str, keep: str) -> None:
    """Keep the newest :data:`KEEP_BUILDS` builds (and ``keep``)."""
    builds = sorted((os.path.join(top, d) for d in os.listdir(top)
                     if os.path.isdir(os.path.join(top, d)) and not d.startswith("tmp")),
                    key=os.path.getmtime, reverse=True)
    for old in builds[KEEP_BUILDS:]:
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)


def build(repo: str = REPO, cache: str = CACHE) -> str:
    """The path of the .deb of ``repo``'s tree; built unless cached.  BuildError if not."""
    missing = missing_tools()
    if missing:
        raise BuildError(f"{', '.join(missing)} not found: run 'make setup' (it installs "
                         "debhelper, dh-python and lintian)")
    ver = version(repo)
    top = os.path.join(cache, "deb")
    os.makedirs(top, mode=0o755, exist_ok=True)
    with open(os.path.join(top, "build.lock"), "w", encoding="utf-8") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time; a second one reuses it
        out = os.path.join(top, tree_hash(repo))
        deb = os.path.join(out, deb_name(ver))
        if os.path.isfile(deb):
            return deb
        work = tempfile.mkdtemp(prefix="tmp-", dir=top)
        try:
            source = os.path.join(work, f"{PACKAGE}-{ver}")
            _copy_inputs(repo, source)
            log_path = os.path.join(work, "build.log")
            with open(log_path, "wb") as log:
                try:
                    result = subprocess.run(
                        ["dpkg-buildpackage", "-b", "-us", "-uc"], cwd=source,
                        env=_build_env(), stdin=subprocess.DEVNULL, stdout=log,
                        stderr=subprocess.STDOUT, timeout=BUILD_TIMEOUT, check=False)
                except subprocess.TimeoutExpired:
                    raise BuildError(f"dpkg-buildpackage took over {BUILD_TIMEOUT:.0f} s; "
                                     f"see {log_path}") from None
            if result.returncode != 0:
                with open(log_path, encoding="utf-8", errors="replace") as log_text:
                    tail = log_text.read().splitlines()[-15:]
                raise BuildError(f"dpkg-buildpackage exited with {result.returncode}:\n"
                                 + "\n".join(tail))
            results = os.path.join(work, "out")
            os.mkdir(results)
            for name in os.listdir(work):
                if name.endswith((".deb", ".changes", ".buildinfo", ".log")):
                    os.rename(os.path.join(work, name), os.path.join(results, name))
            if not os.path.isfile(os.path.join(results, deb_name(ver))):
                raise BuildError(f"the build made no {deb_name(ver)} "
                                 f"(debian/changelog's version is not {ver}?)")
            os.chmod(results, 0o755)
            os.rename(results, out)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        _prune(top, out)
        return deb


def main() -> int:
    try:
        print(build())
    except BuildError as err:
        print(f"debpkg: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
