"""The Debian package ganeti-kvm: its build, lintian, contents, man page, and the drop-in.

The package is built by :mod:`tests.debpkg` in a temporary copy of the tree
(cached by a hash of its inputs).  The install cycle works on this
machine's own Ganeti 3.0 with dpkg (``dpkg -i``, ``-r``, ``-P``), under
Debian's ``/usr/bin/python3`` -- not the interpreter running pytest, whose
``ganeti_kvm`` is the editable work tree -- and always purges at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator

import pytest

import ganeti_kvm
from ganeti_kvm import constants as c
from ganeti_kvm import errors
from ganeti_kvm.ganeti3 import install
from ganeti_kvm.tools import cli, manpage
from tests import debpkg, ganeti_trees, host_ganeti

IN_CI = os.environ.get("CI", "").lower() == "true"
REPO = debpkg.REPO
SITE = "/usr/lib/python3/dist-packages"
PACKAGE_DIR = os.path.dirname(os.path.abspath(ganeti_kvm.__file__))
PACKAGE_SOURCE = os.path.dirname(PACKAGE_DIR)  # the source tree, with debian/
DPKG_ENV = {"PATH": debpkg.BUILD_ENV_PATH, "LC_ALL": "C.UTF-8",
            "DEBIAN_FRONTEND": "noninteractive"}
GANETI = "/usr/share/ganeti"


def _skip(message: str) -> None:
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def run(argv: list[str], check: bool = True, user: str | None = None,
        timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` with Debian's PATH (not pyenv's python3) and its output captured."""
    if user is not None:
        argv = ["runuser", "-u", user, "--", *argv]
    result = subprocess.run(argv, capture_output=True, text=True, env=DPKG_ENV, cwd="/",
                            stdin=subprocess.DEVNULL, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited with {result.returncode}:\n"
                             f"{result.stdout}\n{result.stderr}")
    return result


DPKG_LOCK_WAIT = 300.0


def dpkg(*args: str, mount_ns_of: int | None = None) -> str:
    """dpkg ARGS (in the mount namespace of a process); its output.

    Waits (bounded) while another dpkg or apt holds dpkg's lock.
    """
    enter = [] if mount_ns_of is None else ["nsenter", "--mount", "--target",
                                            str(mount_ns_of), "--"]
    deadline = time.monotonic() + DPKG_LOCK_WAIT
    while True:
        result = run([*enter, "dpkg", *args], check=False)
        if result.returncode == 0:
            return result.stdout
        locked = "lock" in result.stderr and "locked" in result.stderr
        if not locked or time.monotonic() > deadline:
            raise AssertionError(f"dpkg {' '.join(args)} exited with {result.returncode}:\n"
                                 f"{result.stdout}\n{result.stderr}")
        time.sleep(1)


def changelog(field: str) -> str:
    return run(["dpkg-parsechangelog", "-l", os.path.join(REPO, "debian", "changelog"),
                "-S", field]).stdout.strip()


def debian_path(path: str) -> str:
    """Where the package installs a file that constants.py locates in the package."""
    return os.path.join(SITE, "ganeti_kvm", os.path.relpath(path, PACKAGE_DIR))


def sha256(path: str) -> str:
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def diversions() -> str:
    return run(["dpkg-divert", "--list"]).stdout


@pytest.fixture(scope="module")
def deb() -> str:
    """The .deb of this tree (built once, cached by the tree's hash)."""
    missing = debpkg.missing_tools() + [t for t in ("lintian", "dpkg-deb")
                                        if shutil.which(t, path=debpkg.BUILD_ENV_PATH) is None]
    if missing:
        _skip(f"{', '.join(missing)} not found: run 'make setup'")
    return debpkg.build()


def _data(deb_path: str) -> tarfile.TarFile:
    raw = subprocess.run(["dpkg-deb", "--fsys-tarfile", deb_path], capture_output=True,
                         env=DPKG_ENV, check=True).stdout
    return tarfile.open(fileobj=io.BytesIO(raw))


def members(deb_path: str) -> dict[str, tarfile.TarInfo]:
    """The files of the package, by absolute path."""
    with _data(deb_path) as tar:
        return {os.path.normpath("/" + m.name): m for m in tar.getmembers()}


def extract(deb_path: str, path: str) -> bytes:
    with _data(deb_path) as tar:
        handle = tar.extractfile("." + path)
        assert handle is not None, path
        return handle.read()


# --- without building ---------------------------------------------------------------


def test_the_version_has_one_place() -> None:
    """__version__ is the one place; setup.py reads it, debian/changelog must match."""
    assert debpkg.version() == ganeti_kvm.__version__
    out = subprocess.run([sys.executable, "setup.py", "--version"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == ganeti_kvm.__version__
    if shutil.which("dpkg-parsechangelog", path=debpkg.BUILD_ENV_PATH) is None:
        _skip("dpkg-parsechangelog not found: run 'make setup'")
    assert changelog("Version") == ganeti_kvm.__version__, (
        "debian/changelog's version is not ganeti_kvm.__version__: add a changelog entry "
        "(dch -v VERSION) when the version changes")
    assert changelog("Source") == debpkg.PACKAGE


def _all_flags(parser: argparse.ArgumentParser) -> Iterator[str]:
    for action in parser._actions:
        yield from action.option_strings
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name
                yield from _all_flags(sub)
        elif action.choices is not None:
            yield from (str(choice) for choice in action.choices)


def test_the_man_page_shows_every_command_option_and_choice() -> None:
    page = manpage.render(cli.build_parser())
    for word in set(_all_flags(cli.build_parser())):
        assert manpage.escape(word) in page, word
    for name in ("start", "migrate", "ganeti"):
        assert f'.SS "{name}"' in page
    assert manpage.escape("--packaged") in page  # the maintainer scripts' option
    groff = shutil.which("groff", path=debpkg.BUILD_ENV_PATH)
    if groff is None:
        _skip("groff not found (package groff-base)")
        return
    checked = subprocess.run([groff, "-man", "-ww", "-z", "-Tutf8"], input=page,
                             capture_output=True, text=True, check=False)
    assert checked.returncode == 0 and checked.stderr == "", checked.stderr


def test_an_option_added_to_the_parser_reaches_the_page() -> None:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub.choices["stop"].add_argument("--brand-new", metavar="WHEN",
                                     help="a brand-new option %(default)s", default="now")
    page = manpage.render(parser)
    assert "\\fB\\-\\-brand\\-new\\fR \\fIWHEN\\fR" in page
    assert "a brand\\-new option now" in page
    assert page != manpage.render(cli.build_parser())


def test_the_man_page_date_is_source_date_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1764892800")
    assert manpage.build().startswith('.TH "GANETI-KVM" "1" "2025-12-05" "ganeti-kvm ')
    monkeypatch.delenv("SOURCE_DATE_EPOCH")
    assert manpage.build().startswith('.TH "GANETI-KVM" "1" "" ')


# --- the package ------------------------------------------------------------------


def test_the_package_is_named_after_the_version_and_lintian_clean(deb: str) -> None:
    assert os.path.basename(deb) == f"ganeti-kvm_{ganeti_kvm.__version__}_all.deb"
    assert not deb.startswith(REPO + os.sep)  # never built in the work tree
    result = run(["lintian", "--allow-root", deb], check=False, timeout=600)
    findings = [line for line in result.stdout.splitlines() if re.match(r"[EW]: ", line)]
    assert result.returncode == 0 and not findings, result.stdout + result.stderr


def test_the_package_installs_the_library_command_hook_and_wrapper(deb: str) -> None:
    files = members(deb)
    for rel in debpkg.input_files():
        if rel.startswith("ganeti_kvm/") and rel.endswith(".py"):
            assert os.path.join(SITE, rel) in files, rel
    for path in (c.KVM_IFUP, c.KVM_CONSOLE_WRAPPER):
        assert debian_path(path) in files, path
        assert files[debian_path(path)].mode & 0o111 == 0o111, path
    assert extract(deb, debian_path(c.KVM_CONSOLE_WRAPPER)).startswith(b"#!/usr/bin/python3\n")
    assert extract(deb, "/usr/bin/ganeti-kvm").startswith(b"#!/usr/bin/python3\n")
    assert files["/usr/bin/ganeti-kvm"].mode & 0o111 == 0o111
    assert "/usr/share/man/man1/ganeti-kvm.1.gz" in files
    assert "/usr/share/doc/ganeti-kvm/copyright" in files
    assert not [p for p in files if p.endswith((".pth", ".pyc")) or "/tests/" in p]


def test_the_package_declares_its_dependencies_and_trigger(deb: str) -> None:
    def field(name: str) -> str:
        return run(["dpkg-deb", "-f", deb, name]).stdout.strip()

    assert field("Version") == ganeti_kvm.__version__
    assert field("Architecture") == "all"
    depends = [d.strip() for d in field("Depends").split(",")]
    for needed in ("qemu-system-x86 | qemu-kvm", "socat", "iproute2"):
        assert needed in depends
    assert any(d.startswith("python3") for d in depends)
    assert field("Enhances") == "ganeti"
    triggers = run(["dpkg-deb", "-I", deb, "triggers"]).stdout
    assert "interest-noawait /usr/share/ganeti" in triggers
    for script in ("postinst", "prerm", "postrm"):
        text = run(["dpkg-deb", "-I", deb, script]).stdout
        assert text.startswith("#!/bin/sh")
    assert "ganeti-kvm ganeti install --packaged" in run(["dpkg-deb", "-I", deb,
                                                          "postinst"]).stdout
    assert "ganeti-kvm ganeti remove --packaged" in run(["dpkg-deb", "-I", deb, "prerm"]).stdout


def test_the_man_page_in_the_package_matches_the_parser(deb: str) -> None:
    installed = gzip.decompress(extract(deb, "/usr/share/man/man1/ganeti-kvm.1.gz")).decode()
    date = manpage._date(changelog("Timestamp"))
    assert date
    assert installed == manpage.render(cli.build_parser(), date=date), (
        "the packaged man page differs from the parser: rebuild the package")


# --- installing it on this machine's Ganeti -----------------------------------------------


def _status(package: str) -> str:
    result = run(["dpkg-query", "-W", "-f=${db:Status-Status}", package], check=False)
    return result.stdout.strip() if result.returncode == 0 else "not-installed"


def _trigger_ganeti() -> None:
    """What dpkg does when a package under /usr/share/ganeti is installed or removed."""
    run(["dpkg-trigger", "--no-await", GANETI])
    dpkg("--triggers-only", "--pending")


def _drop_all_but(tree: str, keep: str) -> None:
    """Remove a Ganeti tree as dpkg would remove its package: only ``keep`` (no one's) stays."""
    for base, dirs, files in os.walk(tree, topdown=False):
        for name in files:
            if os.path.join(base, name) != keep:
                os.remove(os.path.join(base, name))
        for name in dirs:
            with contextlib.suppress(OSError):
                os.rmdir(os.path.join(base, name))


def _leftovers() -> list[str]:
    found = [p for p in (f"{SITE}/ganeti_kvm", "/usr/bin/ganeti-kvm",
                         "/usr/share/doc/ganeti-kvm", "/usr/share/man/man1/ganeti-kvm.1.gz",
                         install.marker(c.DEFAULT_RUN_DIR), install.Layout("/").pth)
             if os.path.lexists(p)]
    found += [p for p in os.listdir(SITE) if p.startswith("ganeti_kvm")]
    found += [p for p in os.listdir("/var/lib/dpkg/info") if p.startswith("ganeti-kvm.")]
    return found


@pytest.fixture
def system_ganeti() -> Iterator[None]:
    """This machine's own Ganeti, for one test at a time (tests/host_ganeti.py's lock)."""
    if not os.path.isdir(host_ganeti.DRIVER_DIR):
        _skip(f"{host_ganeti.DRIVER_DIR} not found: run 'make setup' (it installs Ganeti 3.0)")
    with host_ganeti.host_driver_lock():
        yield


def _may_touch_this_machines_ganeti() -> str:
    """Ganeti 3.0's driver path, or skip: not root, no Ganeti, or switched by someone else."""
    if os.geteuid() != 0:
        _skip("the install cycle needs root")
    driver = install.Layout("/").driver("3.0")
    if not os.path.isfile(driver):
        _skip(f"{driver} not found: run 'make setup' (it installs Ganeti 3.0)")
    if "hv_kvm" in diversions():
        pytest.skip("this machine's Ganeti KVM driver is switched already; not touching it")
    if _status("ganeti-kvm") != "not-installed":
        pytest.skip("the package ganeti-kvm is installed here already; not touching it")
    return driver


def test_install_trigger_remove_and_purge_on_this_machine(deb: str,
                                                          system_ganeti: None) -> None:
    """dpkg -i diverts Ganeti 3.0's driver; -r restores it byte for byte; -P leaves nothing.

    In between, a Ganeti version that appears later (3.1, from the unpacked
    package) is diverted by the trigger, and forgotten when it goes again.
    Where Ganeti 3.1 is installed already (scripts/setup.sh installs it for
    the cluster tests), its driver is diverted with 3.0's and restored byte
    for byte, and a trigger (as when ganeti-3.1 is upgraded) keeps it so.
    """
    driver = _may_touch_this_machines_ganeti()
    tree_31 = ganeti_trees.find_tree("3.1")
    new_version = os.path.join(GANETI, "3.1")
    add_31 = tree_31 is not None and not os.path.exists(new_version)
    driver_31 = install.Layout("/").driver("3.1")
    had_31 = os.path.isfile(driver_31)
    before_31 = sha256(driver_31) if had_31 else ""
    before = sha256(driver)
    had_run_ganeti = os.path.isdir(os.path.dirname(install.marker(c.DEFAULT_RUN_DIR)))
    try:
        dpkg("-i", deb)
        assert _status("ganeti-kvm") == "installed"
        assert run(["dpkg-divert", "--listpackage", driver]).stdout.strip() == "ganeti-kvm"
        assert install.is_shim(driver)
        assert sha256(driver + install.DIVERT_SUFFIX) == before
        assert not os.path.exists(install.Layout("/").pth)
        # Ganeti's daemons (their user, Debian's python3) get the packaged driver.
        code = ("import sys; sys.path.insert(0, '/usr/share/ganeti/3.0');"
                "from ganeti import constants, hypervisor; import ganeti_kvm.ganeti3 as g;"
                "assert hypervisor.GetHypervisorClass(constants.HT_KVM) is g.KVMHypervisor;"
                "print(g.__file__)")
        where = run(["/usr/bin/python3", "-B", "-c", code], user=install.CHECK_USER).stdout
        assert where.strip() == f"{SITE}/ganeti_kvm/ganeti3/__init__.py"
        # The hook and the wrapper are where Debian's python3 constants say.
        tools = run(["/usr/bin/python3", "-B", "-c", "from ganeti_kvm import constants as c;"
                     "print(c.KVM_IFUP); print(c.KVM_CONSOLE_WRAPPER)"]).stdout.split()
        assert tools == [debian_path(c.KVM_IFUP), debian_path(c.KVM_CONSOLE_WRAPPER)]
        assert all(os.access(tool, os.X_OK) for tool in tools)
        assert run(["ganeti-kvm", "--version"]).stdout.strip() == \
            f"ganeti-kvm {ganeti_kvm.__version__}"
        assert run(["ganeti-kvm", "ganeti", "status"]).stdout.splitlines()[0] == \
            "Ganeti 3.0: ganeti-kvm"

        if add_31:
            assert tree_31 is not None
            shutil.copytree(tree_31, new_version, symlinks=True)
            driver_31 = install.Layout("/").driver("3.1")
            before_31 = sha256(driver_31)
            _trigger_ganeti()
            assert run(["dpkg-divert", "--listpackage", driver_31]).stdout.strip() == \
                "ganeti-kvm"
            assert install.is_shim(driver_31)
            assert sha256(driver_31 + install.DIVERT_SUFFIX) == before_31
            _drop_all_but(new_version, keep=driver_31)  # as if ganeti-3.1 were removed
            _trigger_ganeti()
            assert not os.path.exists(new_version)
            assert "3.1/" not in diversions()
        elif had_31:
            _trigger_ganeti()
            assert run(["dpkg-divert", "--listpackage", driver_31]).stdout.strip() == \
                "ganeti-kvm"
            assert install.is_shim(driver_31)
            assert sha256(driver_31 + install.DIVERT_SUFFIX) == before_31

        dpkg("-r", "ganeti-kvm")
        assert sha256(driver) == before
        if had_31:
            assert sha256(driver_31) == before_31
        assert "hv_kvm" not in diversions()
        assert not os.path.exists(driver + install.DIVERT_SUFFIX)
        dpkg("-P", "ganeti-kvm")
        assert _status("ganeti-kvm") == "not-installed"
        assert _leftovers() == []
        assert os.path.isdir(os.path.dirname(install.marker(c.DEFAULT_RUN_DIR))) == \
            had_run_ganeti
    finally:
        if _status("ganeti-kvm") != "not-installed":
            dpkg("-P", "ganeti-kvm")
        if add_31:
            shutil.rmtree(new_version, ignore_errors=True)


# --- the packaged mode of `ganeti-kvm ganeti install`, under a private root ---------


@pytest.fixture
def root(short_dir: str) -> str:
    """A root with Ganeti 3.0, its own dpkg database, and the library in dist-packages."""
    missing = [t for t in ("dpkg-divert", "runuser") if shutil.which(t) is None]
    if os.geteuid() != 0:
        missing.append("root")
    if missing:
        _skip(f"the packaged-mode tests need {', '.join(missing)}")
    top = os.path.join(short_dir, "root")
    os.makedirs(os.path.join(top, "var", "lib", "dpkg"))
    open(os.path.join(top, "var", "lib", "dpkg", "status"), "w").close()
    shutil.copytree(ganeti_trees.require_tree("3.0"), os.path.join(top, GANETI[1:], "3.0"),
                    symlinks=True)
    site = os.path.join(top, SITE[1:])
    os.makedirs(site)
    # As the package installs it (a link: the checks compare real paths).
    os.symlink(PACKAGE_DIR, os.path.join(site, "ganeti_kvm"))
    for directory in (short_dir, top):
        os.chmod(directory, 0o755)  # the daemons' user must reach the copy
    return top


def _owner(root: str, version: str = "3.0") -> str:
    driver = install.Layout(root).driver(version)
    return run(["dpkg-divert", "--root", root, "--listpackage", driver]).stdout.strip()


def test_packaged_mode_owns_the_diversion_writes_no_pth_and_restores(root: str) -> None:
    layout = install.Layout(root)
    target = layout.under(layout.driver("3.0"))
    before = sha256(target)
    run_dir = os.path.join(root, "run")
    report = install.install(root, restart=False, run_dir=run_dir, package="ganeti-kvm")
    try:
        assert report.versions == ["3.0"]
        assert _owner(root) == "ganeti-kvm"
        with open(target, encoding="utf-8") as handle:
            assert handle.read() == install.PACKAGED_SHIM
        assert not os.path.exists(layout.pth) and not os.path.exists(layout.link_dir)
        assert install.status(root) == {"3.0": "ganeti-kvm"}
        again = install.install(root, restart=False, run_dir=run_dir, package="ganeti-kvm")
        assert again.changed == []
        # A --local install on top of the package's is refused, naming the package.
        with pytest.raises(errors.ConfigurationError, match="Debian package ganeti-kvm"):
            install.install(root, restart=False, run_dir=run_dir)
    finally:
        install.remove(root, restart=False, run_dir=run_dir, package="ganeti-kvm")
    assert sha256(target) == before
    assert _owner(root) == ""



def test_an_upgrade_restarts_the_daemon_though_nothing_is_diverted_anew(root: str) -> None:
    """postinst on an upgrade: the running daemon must load the new library's code."""
    run_dir = os.path.join(root, "run")
    restarts = os.path.join(root, "restarts")
    command = ["sh", "-c", f"echo restarted >> {restarts}"]

    def count() -> int:
        if not os.path.exists(restarts):
            return 0
        with open(restarts, encoding="ascii") as handle:
            return len(handle.readlines())

    install.install(root, restart=command, run_dir=run_dir, package="ganeti-kvm")
    try:
        assert count() == 1  # the first install switches the driver
        again = install.install(root, restart=command, run_dir=run_dir, package="ganeti-kvm")
        assert (again.changed, again.restart, count()) == ([], None, 1)
        upgraded = install.install(root, restart=command, run_dir=run_dir,
                                   package="ganeti-kvm", restart_always=True)
        assert (upgraded.changed, upgraded.restart, count()) == ([], command, 2)
    finally:
        install.remove(root, restart=False, run_dir=run_dir, package="ganeti-kvm")
    with open(os.path.join(PACKAGE_SOURCE, "debian", "ganeti-kvm.postinst"),
              encoding="utf-8") as handle:
        postinst = handle.read()
    # dpkg gives configure the version it upgrades from as $2.
    assert '[ -n "$2" ]' in postinst and "--packaged --restart-always" in postinst

def test_packaged_mode_takes_a_local_install_over(root: str) -> None:
    layout = install.Layout(root)
    target = layout.under(layout.driver("3.0"))
    before = sha256(target)
    run_dir = os.path.join(root, "run")
    try:
        install.install(root, restart=False, run_dir=run_dir)
        assert _owner(root) == "LOCAL" and os.path.exists(layout.pth)
        report = install.install(root, restart=False, run_dir=run_dir, package="ganeti-kvm")
        assert _owner(root) == "ganeti-kvm"
        assert any("now belongs to the package ganeti-kvm" in x for x in report.changed)
        assert sha256(target + install.DIVERT_SUFFIX) == before
        assert not os.path.exists(layout.pth) and not os.path.exists(layout.link_dir)
    finally:
        install.remove(root, restart=False, run_dir=run_dir, package="ganeti-kvm")
    assert sha256(target) == before and _owner(root) == ""


def test_packaged_mode_without_ganeti_is_the_library_alone(short_dir: str) -> None:
    if shutil.which("dpkg-divert") is None:
        _skip("dpkg-divert not found")
    report = install.install(short_dir, restart=False, package="ganeti-kvm")
    assert report.versions == [] and report.changed == []
    assert install.remove(short_dir, restart=False, package="ganeti-kvm").changed == []


def test_packaged_restart_obeys_debian_and_only_a_running_daemon(short_dir: str) -> None:
    assert install.packaged_restart_command(install.Layout(short_dir)) is None
    pid_file = os.path.join(short_dir, "noded.pid")
    with open(pid_file, "w", encoding="utf-8") as handle:
        handle.write(f"{os.getpid()}\n")  # pytest, not a node daemon
    assert not install.noded_running(pid_file)
    assert not install.noded_running(os.path.join(short_dir, "missing.pid"))
    command = install.packaged_restart_command(install.Layout("/"))
    assert command is None or command[0] in ("deb-systemd-invoke", "invoke-rc.d")


def test_dpkg_switches_running_instances_without_restarting_them(
        deb: str, system_ganeti: None, short_dir: str, qemu72: str) -> None:
    """dpkg -i adopts a running bundled instance, dpkg -r hands both back: same QEMUs.

    The node is tests/switch_probe.py in a private mount namespace (its own
    /run, so its own /var/run/ganeti/kvm-hypervisor); dpkg runs in that
    namespace, so the maintainer scripts see that node's instances, while
    /usr and dpkg's database are this machine's.
    """
    from tests.helpers import free_port
    from tests.test_switch import ProbeNode

    driver = _may_touch_this_machines_ganeti()
    if shutil.which("nsenter") is None:
        _skip("nsenter not found (util-linux)")
    before = sha256(driver)
    node = ProbeNode(ganeti_trees.require_tree("3.0"), os.path.join(short_dir, "probe.log"))
    try:
        node("start", driver="bundled", name="db1", qemu=qemu72, port=free_port())
        node("start", driver="ours", name="do1", qemu=qemu72, port=free_port())
        pids = node("pids")
        original = node("read", path="conf/db1.runtime")
        try:
            out = dpkg("-i", deb, mount_ns_of=node.proc.pid)
            assert "instance db1: switched without a restart" in out
            assert node("read", path="conf/db1.runtime") != original  # ganeti-kvm's now
            assert node("pids") == pids
        finally:
            if _status("ganeti-kvm") != "not-installed":
                out = dpkg("-P", "ganeti-kvm", mount_ns_of=node.proc.pid)
        for name in ("db1", "do1"):
            assert f"instance {name}: switched without a restart" in out
        assert node("read", path="conf/db1.runtime") == original  # byte for byte
        assert node("pids") == pids  # no QEMU was restarted
        assert sorted(node("list", driver="bundled")) == ["db1", "do1"]
        assert sha256(driver) == before and "hv_kvm" not in diversions()
        assert node("read", path="../kvm-hypervisor.ganeti-kvm") is None  # the marker
        for name in ("db1", "do1"):
            node("stop", driver="bundled", name=name, force=True)
            node("cleanup", driver="bundled", name=name)
    finally:
        node.close()
