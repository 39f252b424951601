"""``ganeti-kvm ganeti install|remove``: dpkg-divert, the shim, the .pth, the checks.

Most tests work on a copy of Ganeti's trees under a private root (``--root``,
like dpkg's), with its own dpkg database; one works on this machine's own
/usr/share/ganeti/3.0 and always undoes what it did.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator

import pytest

from ganeti_kvm import errors
from ganeti_kvm.ganeti3 import install
from ganeti_kvm.tools import cli
from tests import ganeti_trees
from tests.host_ganeti import host_driver_lock

IN_CI = os.environ.get("CI", "").lower() == "true"
SYSTEM_GANETI = "/usr/share/ganeti/3.0"


def _need_tools() -> None:
    missing = [t for t in ("dpkg-divert", "runuser") if shutil.which(t) is None]
    if os.geteuid() != 0:
        missing.append("root")
    if not os.path.isdir(SYSTEM_GANETI):
        missing.append(SYSTEM_GANETI)
    if missing:
        message = f"install tests need {', '.join(missing)}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


def sha256(path: str) -> str:
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def drivers(root: str) -> dict[str, str]:
    """sha256 of each Ganeti version's hv_kvm/__init__.py under ``root``."""
    layout = install.Layout(root)
    return {v: sha256(layout.under(layout.driver(v))) for v in layout.versions()}


def diversions(root: str) -> str:
    return subprocess.run(["dpkg-divert", "--root", root, "--list"], capture_output=True,
                          text=True, check=True).stdout


@pytest.fixture
def root(short_dir: str) -> Iterator[str]:
    """A root with Ganeti 3.0 and 3.1 (the unpacked packages) and its own dpkg database."""
    _need_tools()
    top = os.path.join(short_dir, "root")
    os.makedirs(os.path.join(top, "var", "lib", "dpkg"))
    open(os.path.join(top, "var", "lib", "dpkg", "status"), "w").close()
    share = os.path.join(top, "usr", "share", "ganeti")
    os.makedirs(share)
    # From the unpacked packages, not /usr/share/ganeti: that may be switched right now.
    shutil.copytree(ganeti_trees.require_tree("3.0"), os.path.join(share, "3.0"),
                    symlinks=True)
    tree = ganeti_trees.find_tree("3.1")
    if tree is not None:
        shutil.copytree(tree, os.path.join(share, "3.1"), symlinks=True)
    # The daemons' user must reach the copy (short_dir is 0700).
    for directory in (short_dir, top):
        os.chmod(directory, 0o755)
    yield top


def fake_python(directory: str, fail_after: bool) -> str:
    """A python that fails every check (or only the one after the switch)."""
    path = os.path.join(directory, "fake-python")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("#!/bin/sh\n")
        if fail_after:
            handle.write('case "$4" in *GetHypervisorClass*) ;; *) exec /usr/bin/python3 "$@";; '
                         "esac\n")
        handle.write('echo "ImportError: no module named ganeti_kvm" >&2\nexit 1\n')
    os.chmod(path, 0o755)
    return path


def test_install_puts_the_shim_in_and_remove_restores_byte_for_byte(root: str) -> None:
    before = drivers(root)
    assert "3.0" in before
    report = install.install(root, restart=False, run_dir=os.path.join(root, "run"))
    try:
        assert report.versions == sorted(before)
        layout = install.Layout(root)
        for version in before:
            shim = layout.under(layout.driver(version))
            with open(shim, encoding="utf-8") as handle:
                assert handle.read() == install.SHIM
            assert sha256(layout.under(layout.diverted(version))) == before[version]
            assert f"local diversion of {layout.driver(version)}" in diversions(root)
        assert install.status(root) == dict.fromkeys(before, "ganeti-kvm")
        # The .pth is readable by everybody and names a directory with only the package.
        assert stat.S_IMODE(os.stat(layout.pth).st_mode) == 0o644
        assert os.listdir(layout.link_dir) == ["ganeti_kvm"]
        # Ganeti's registry, under the daemons' user, hands out our class.
        for version in before:
            install.check_import(layout, version, after=True, user=install.check_user())
    finally:
        install.remove(root, restart=False, run_dir=os.path.join(root, "run"))
    assert drivers(root) == before
    assert "hv_kvm" not in diversions(root)
    assert not os.path.exists(install.Layout(root).pth)
    assert not os.path.exists(install.Layout(root).under(install.LINK_DIR))
    assert install.status(root) == dict.fromkeys(before, "bundled")


def test_install_twice_remove_twice_and_remove_without_install(root: str) -> None:
    before = drivers(root)
    run_dir = os.path.join(root, "run")
    first = install.remove(root, restart=False, run_dir=run_dir)  # nothing installed
    assert first.changed == [] and drivers(root) == before
    try:
        install.install(root, restart=False, run_dir=run_dir)
        again = install.install(root, restart=False, run_dir=run_dir)
        assert again.changed == []
        assert len([x for x in again.unchanged if x.startswith("shim ")]) == len(before)
    finally:
        removed = install.remove(root, restart=False, run_dir=run_dir)
    assert removed.changed
    assert install.remove(root, restart=False, run_dir=run_dir).changed == []
    assert drivers(root) == before and "hv_kvm" not in diversions(root)


def test_install_refuses_when_the_adapter_does_not_import(root: str, short_dir: str) -> None:
    before = drivers(root)
    with pytest.raises(errors.ConfigurationError,
                       match="not installed, Ganeti's own KVM driver stays.*no module named"):
        install.install(root, restart=False, python=fake_python(short_dir, fail_after=False))
    assert drivers(root) == before and "hv_kvm" not in diversions(root)
    assert not os.path.exists(install.Layout(root).pth)


def test_a_failed_check_after_the_switch_rolls_the_diversion_back(root: str,
                                                                  short_dir: str) -> None:
    before = drivers(root)
    with pytest.raises(errors.ConfigurationError, match="Ganeti's own KVM driver stays"):
        install.install(root, restart=False, python=fake_python(short_dir, fail_after=True))
    assert drivers(root) == before and "hv_kvm" not in diversions(root)
    assert not os.path.exists(install.Layout(root).pth)


def test_a_foreign_diversion_is_refused_by_name(root: str) -> None:
    layout = install.Layout(root)
    driver = layout.driver("3.0")
    subprocess.run(["dpkg-divert", "--root", root, "--local", "--rename", "--divert",
                    driver + ".other", "--add", driver], check=True, capture_output=True)
    try:
        with pytest.raises(errors.ConfigurationError, match=r"already diverted.*\.other"):
            install.install(root, restart=False)
        with pytest.raises(errors.ConfigurationError, match=r"already diverted.*\.other"):
            install.remove(root, restart=False)
        assert os.path.exists(layout.under(driver + ".other"))
    finally:
        subprocess.run(["dpkg-divert", "--root", root, "--local", "--rename", "--divert",
                        driver + ".other", "--remove", driver], check=True, capture_output=True)
    assert not os.path.exists(layout.pth)


def test_remove_refuses_a_file_that_is_not_the_shim(root: str) -> None:
    layout = install.Layout(root)
    install.install(root, restart=False, run_dir=os.path.join(root, "run"))
    target = layout.under(layout.driver("3.0"))
    try:
        with open(target, "w", encoding="utf-8") as handle:
            handle.write("# someone else's driver\n")
        with pytest.raises(errors.ConfigurationError, match="is not the ganeti-kvm shim"):
            install.remove(root, restart=False)
    finally:
        with open(target, "w", encoding="utf-8") as handle:
            handle.write(install.SHIM)
        install.remove(root, restart=False, run_dir=os.path.join(root, "run"))
    assert "hv_kvm" not in diversions(root)


def test_the_restart_command_runs_after_the_switch(root: str, short_dir: str) -> None:
    marker = os.path.join(short_dir, "restarted")
    command = ["sh", "-c", f"ls {install.Layout(root).under(install.SITE_DIR)} > {marker}"]
    try:
        report = install.install(root, restart=command, run_dir=os.path.join(root, "run"))
        assert report.restart == command
        with open(marker, encoding="utf-8") as handle:
            assert install.PTH_NAME in handle.read()  # it ran once everything was in place
    finally:
        install.remove(root, restart=False, run_dir=os.path.join(root, "run"))


def test_the_command_line(root: str, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = os.path.join(root, "run")
    before = drivers(root)
    try:
        assert cli.main(["ganeti", "install", "--root", root, "--no-restart",
                         "--run-dir", run_dir]) == 0
        assert "shim" in capsys.readouterr().out
        assert cli.main(["ganeti", "status", "--root", root]) == 0
        assert "Ganeti 3.0: ganeti-kvm" in capsys.readouterr().out
    finally:
        assert cli.main(["ganeti", "remove", "--root", root, "--no-restart",
                         "--run-dir", run_dir]) == 0
    assert "restored" in capsys.readouterr().out
    assert drivers(root) == before


def test_no_ganeti_under_the_root_is_refused(short_dir: str) -> None:
    _need_tools()
    with pytest.raises(errors.ConfigurationError, match="No Ganeti 3.0 or 3.1 under"):
        install.install(short_dir, restart=False)


def test_on_this_machines_own_ganeti(short_dir: str) -> None:
    """Install on the real /usr/share/ganeti/3.0 and remove again, byte for byte."""
    _need_tools()
    with host_driver_lock():
        _install_and_remove_on_this_machine(short_dir)


def _install_and_remove_on_this_machine(short_dir: str) -> None:
    if "hv_kvm" in diversions("/"):
        # Switched by someone else (a cluster test, an operator): not ours to undo.
        pytest.skip("this machine's Ganeti KVM driver is switched already; not touching it")
    before = drivers("/")
    run_dir = os.path.join(short_dir, "run")
    try:
        install.install("/", restart=False, run_dir=run_dir)
        assert install.status("/")["3.0"] == "ganeti-kvm"
        # As the brief of the daemons: the user gnt-masterd, Debian's python3.
        code = ("import sys; sys.path.insert(0, '/usr/share/ganeti/3.0');"
                "from ganeti import constants, hypervisor; import ganeti_kvm.ganeti3 as g;"
                "assert hypervisor.GetHypervisorClass(constants.HT_KVM) is g.KVMHypervisor")
        subprocess.run(["runuser", "-u", install.CHECK_USER, "--", "/usr/bin/python3", "-B",
                        "-c", code], check=True, cwd="/", capture_output=True, timeout=120)
    finally:
        install.remove("/", restart=False, run_dir=run_dir)
    assert drivers("/") == before
    assert "hv_kvm" not in diversions("/")
    assert not os.path.exists(install.Layout("/").pth)


def test_nodes_sharing_usr_each_restart_their_daemon_once(root: str, short_dir: str) -> None:
    """A second node's install finds the files switched; its own daemon still restarts."""
    node_a, node_b = os.path.join(short_dir, "a", "run"), os.path.join(short_dir, "b", "run")
    before = drivers(root)
    try:
        assert install.install(root, restart=["true"], run_dir=node_a).restart == ["true"]
        second = install.install(root, restart=["true"], run_dir=node_b)
        assert second.changed == [] and second.restart == ["true"]
        assert install.install(root, restart=["true"], run_dir=node_b).restart is None
        assert os.path.exists(install.marker(node_a)) and os.path.exists(install.marker(node_b))
    finally:
        first = install.remove(root, restart=["true"], run_dir=node_a)
    assert first.restart == ["true"] and drivers(root) == before
    other = install.remove(root, restart=["true"], run_dir=node_b)
    assert other.changed == [] and other.restart == ["true"]
    assert install.remove(root, restart=["true"], run_dir=node_b).restart is None
    assert not os.path.exists(install.marker(node_a))
    assert not os.path.exists(install.marker(node_b))
