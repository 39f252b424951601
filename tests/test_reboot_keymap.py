"""The 2011 driver's reboot_behavior and keymap: the command line and real QEMU."""

from __future__ import annotations

import os
import time
from typing import Any

import pytest

from ganeti_kvm import constants as c
from ganeti_kvm import errors
from ganeti_kvm.host import process
from ganeti_kvm.host.paths import RunDir
from ganeti_kvm.qemu import cmdline
from tests.helpers import make_instance

PATHS = RunDir("/run/gk").instance("web1")
SPEC = cmdline.MachineSpec(name="web1", memory=256, vcpus=1, network_port=5901)


class Caps:
    has_runas = True
    has_chroot = True
    has_run_with_user = False
    has_run_with_chroot = False

    def has_device(self, name: str) -> bool:
        return True


def hvp(**overrides: Any) -> dict[str, Any]:
    return dict(c.HVC_DEFAULTS[c.HT_KVM], kernel_path="", root_path="", **overrides)


def argv(**overrides: Any) -> list[str]:
    return cmdline.build_argv(SPEC, [], hvp(**overrides), Caps(), PATHS)


def test_reboot_behavior_exit_adds_no_reboot() -> None:
    assert "-no-reboot" not in argv()
    assert "-no-reboot" in argv(reboot_behavior=c.INSTANCE_REBOOT_EXIT)


def test_keymap_goes_with_vnc_only() -> None:
    with_vnc = argv(keymap="de", vnc_bind_address="127.0.0.1")
    assert with_vnc[with_vnc.index("-k") + 1] == "de"
    assert "-k" not in argv(keymap="de")
    assert "-k" not in argv(vnc_bind_address="127.0.0.1")


def test_a_record_written_before_these_keys_still_builds() -> None:
    old = hvp()
    del old[c.HV_KEYMAP], old[c.HV_REBOOT_BEHAVIOR]
    result = cmdline.build_argv(SPEC, [], old, Caps(), PATHS)
    assert "-no-reboot" not in result and "-k" not in result


def _hvparams(qemu_bin: str, **overrides: Any) -> dict[str, Any]:
    return hvp(kvm_path=qemu_bin, kvm_flag="disabled", serial_console=False, **overrides)


def _wait_gone(pid: int, limit: float = 30.0) -> bool:
    deadline = time.monotonic() + limit
    while process.is_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not process.is_alive(pid)


@pytest.mark.parametrize("behavior, survives", [(c.INSTANCE_REBOOT_ALLOWED, True),
                                                (c.INSTANCE_REBOOT_EXIT, False)])
def test_reboot_behavior_on_real_qemu(hv, qemu_bin, behavior: str, survives: bool) -> None:
    inst = make_instance("rb1", _hvparams(qemu_bin, reboot_behavior=behavior))
    hv.StartInstance(inst, [])
    pid = hv.GetInstanceInfo("rb1")[1]
    hv.node.qmp("rb1", "system_reset")
    if survives:
        assert hv.node.qmp("rb1", "query-status")["status"] == "running"
        assert hv.ListInstances() == ["rb1"]
    else:
        assert _wait_gone(pid), "QEMU kept running after the guest reset"
        assert hv.ListInstances() == []


def test_keymap_on_real_qemu(hv, qemu_bin, short_dir) -> None:
    vnc_dir = os.path.join(short_dir, "vnc")
    os.mkdir(vnc_dir, 0o700)
    inst = make_instance("km1", _hvparams(qemu_bin, vnc_bind_address=vnc_dir, keymap="de"))
    hv.StartInstance(inst, [], startup_paused=True)
    assert "-k" in hv.node.load_record("km1").argv
    assert hv.node.qmp("km1", "query-status")["status"] == "prelaunch"
    bad = make_instance("km2", _hvparams(qemu_bin, vnc_bind_address=vnc_dir,
                                         keymap="no-such-layout"))
    with pytest.raises(errors.HypervisorError, match="keymap"):
        hv.StartInstance(bad, [], startup_paused=True)
    assert hv.ListInstances() == ["km1"]
