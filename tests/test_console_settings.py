"""GetInstanceConsole keeps the 2011 classmethod and honours an object's own settings."""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Iterator

import pytest

from ganeti_kvm import constants as c
from ganeti_kvm import hv_base
from ganeti_kvm.host import paths
from ganeti_kvm.hv_kvm import KVMHypervisor
from tests.helpers import kill_instances, make_instance
from tests.test_console import Terminal


def _hvparams(kvm_path: str = "/usr/bin/qemu-system-x86_64") -> dict:
    return dict(c.HVC_DEFAULTS[c.HT_KVM], kvm_path=kvm_path, kernel_path="", root_path="",
                kvm_flag="disabled", serial_console=True)


def test_console_is_a_classmethod_for_introspection() -> None:
    raw = vars(KVMHypervisor)["GetInstanceConsole"]
    assert isinstance(raw, classmethod)
    assert isinstance(raw, hv_base.ClassOrInstanceMethod)
    assert KVMHypervisor.GetInstanceConsole.__self__ is KVMHypervisor


def test_console_on_the_class_uses_the_defaults(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv(c.RUN_DIR_ENV, str(tmp_path / "default-run"))
    inst = make_instance("cons-cls", _hvparams())
    console = KVMHypervisor.GetInstanceConsole(inst, inst.hvparams, inst.beparams)
    ipaths = paths.RunDir(str(tmp_path / "default-run")).instance("cons-cls")
    assert console.command[1] == c.SOCAT_PATH
    assert console.command[3] == ipaths.qmp_socket
    assert console.command[-1] == "UNIX-CONNECT:" + ipaths.serial_socket


def test_console_on_an_object_uses_its_run_dir_and_socat(tmp_path) -> None:
    run_dir = str(tmp_path / "run")
    hv = KVMHypervisor(run_dir=run_dir, socat_path="/opt/socat/bin/socat")
    inst = make_instance("cons-obj", _hvparams())
    console = hv.GetInstanceConsole(inst, inst.hvparams, inst.beparams)
    ipaths = paths.RunDir(run_dir).instance("cons-obj")
    assert console.command == [c.KVM_CONSOLE_WRAPPER, "/opt/socat/bin/socat", "cons-obj",
                               ipaths.qmp_socket, "STDIO,raw,echo=0,escape=0x1d",
                               "UNIX-CONNECT:" + ipaths.serial_socket]
    assert console.Validate() is True
    # An explicit run_dir still wins, on the object as on the class.
    other = str(tmp_path / "other")
    console = hv.GetInstanceConsole(inst, inst.hvparams, inst.beparams, run_dir=other)
    assert console.command[3] == paths.RunDir(other).instance("cons-obj").qmp_socket


@pytest.fixture
def logging_socat(short_dir: str, socat_bin: str) -> Iterator[tuple[str, str]]:
    """A socat that notes its use in a file, then runs the real socat."""
    marker = os.path.join(short_dir, "socat-used")
    script = os.path.join(short_dir, "my-socat")
    with open(script, "w", encoding="ascii") as handle:
        handle.write(f"#!/bin/sh\necho \"$@\" > {marker}\nexec {socat_bin} \"$@\"\n")
    os.chmod(script, stat.S_IRWXU)
    yield script, marker


def test_console_of_an_object_reaches_its_real_instance(qemu_bin, short_dir,
                                                          logging_socat) -> None:
    script, marker = logging_socat
    hv = KVMHypervisor(run_dir=os.path.join(short_dir, "run"), socat_path=script)
    try:
        inst = make_instance("cons-real", _hvparams(qemu_bin))
        hv.StartInstance(inst, [], startup_paused=True)
        console = hv.GetInstanceConsole(inst, inst.hvparams, inst.beparams)
        with Terminal(console.command) as term:
            term.read_until(r"Ctrl\+]")
            deadline = time.monotonic() + 30  # the wrapper starts socat after its banner
            while not os.path.exists(marker) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert os.path.exists(marker), term.text
            term.write(b"\x1d")
            assert term.proc.wait(10) == 0
        with open(marker, encoding="ascii") as handle:
            assert hv.node.paths("cons-real").serial_socket in handle.read()
        # The wrapper found the instance through this object's QMP socket and let it run.
        assert hv.node.qmp("cons-real", "query-status")["status"] == "running"
    finally:
        kill_instances(hv.node.layout.root)
