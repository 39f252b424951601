"""Every public call of KVMHypervisor fails only with errors.GenericError.

Each call gets hostile inputs (NUL bytes, huge strings, wrong types, names
with slashes, injected MACs); whatever happens, only the library's own
errors may come out, and a failed start leaves nothing behind: no files in
the run directory, no uid, no TAP device, no QEMU.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from ganeti_kvm import constants as c
from ganeti_kvm import errors, objects
from ganeti_kvm.hv_kvm import KVMHypervisor
from tests.helpers import kill_instances
from tests.netns import netns, ns_ip, skip_unless_netns

HOSTILE: list[Any] = ["a/b", "../x", "x\0y", "x" * 200_000, "a\nb", "\udc80", None, 5, 1.5,
                      True, b"x", ["x"], {"a": 1}, "52:54:00:15:33:47,romfile=/etc/shadow"]
IDS = ["slash", "dotdot", "nul", "huge", "newline", "surrogate", "none", "int", "float",
       "bool", "bytes", "list", "dict", "injection"]


@pytest.fixture
def node(short_dir: str, qemu72: str) -> Iterator[tuple[KVMHypervisor, str, dict[str, Any]]]:
    """A hypervisor with a uid pool whose TAP devices go into the test's own namespace."""
    skip_unless_netns()
    with netns("gk-hostile") as name:
        hv = KVMHypervisor(run_dir=os.path.join(short_dir, "run"), netns=name,
                           uid_pool="61000-61003")
        base = dict(c.HVC_DEFAULTS[c.HT_KVM], kvm_path=qemu72, kernel_path="",
                    serial_console=False, kvm_flag="disabled")
        try:
            yield hv, name, base
        finally:
            kill_instances(hv.node.layout.root)


def calls(hv: KVMHypervisor, base: dict[str, Any], bad: Any) -> dict[str, Callable[[], Any]]:
    """Every public method, with ``bad`` in each argument it takes."""
    nic = {"mac": "52:54:00:00:00:01", "nicparams": {"mode": "bridged", "link": "br0"}}

    def start(block_devices: Any = (), **instance: Any) -> None:
        data = {"name": "hostile1", "hvparams": base, "beparams": {"memory": 64, "vcpus": 1}}
        data.update(instance)
        hv.StartInstance(data, block_devices)

    return {
        "StartInstance name": lambda: start(name=bad),
        "StartInstance hvparams": lambda: start(hvparams=bad),
        "StartInstance kernel_args": lambda: start(hvparams=dict(
            base, kernel_path=base["kvm_path"], kernel_args=bad)),
        "StartInstance kvm_path": lambda: start(hvparams=dict(base, kvm_path=bad)),
        "StartInstance pool kernel_args": lambda: start(hvparams=dict(
            base, security_model="pool", kernel_path=base["kvm_path"], root_path=bad)),
        "StartInstance beparams": lambda: start(beparams=bad),
        "StartInstance memory": lambda: start(beparams={"memory": bad, "vcpus": 1}),
        "StartInstance nics": lambda: start(nics=bad),
        "StartInstance nic": lambda: start(nics=[bad]),
        "StartInstance mac": lambda: start(nics=[dict(nic, mac=bad)]),
        "StartInstance pool mac": lambda: start(
            hvparams=dict(base, security_model="pool"), nics=[dict(nic, mac=bad)]),
        "StartInstance nicparams": lambda: start(nics=[dict(nic, nicparams=bad)]),
        "StartInstance link": lambda: start(nics=[dict(nic, nicparams={"mode": "bridged",
                                                                       "link": bad})]),
        "StartInstance tags": lambda: start(tags=bad),
        "StartInstance uuid": lambda: start(uuid=bad, hvparams=dict(base, kvm_path="/bin/false")),
        "StartInstance network_port": lambda: start(
            hvparams=dict(base, vnc_bind_address="127.0.0.1"), network_port=bad),
        "StartInstance block_devices": lambda: start(block_devices=bad),
        "StartInstance block device": lambda: start(block_devices=[bad]),
        "StartInstance block path": lambda: start(block_devices=[(objects.Disk(), bad)]),
        "StopInstance": lambda: hv.StopInstance(bad),
        "StopInstance name": lambda: hv.StopInstance(None, force=True, name=bad),
        "StopInstance timeout": lambda: hv.StopInstance({"name": "hostile1"}, timeout=bad),
        "CleanupInstance": lambda: hv.CleanupInstance(bad),
        "RebootInstance": lambda: hv.RebootInstance({"name": bad}),
        "GetInstanceInfo": lambda: hv.GetInstanceInfo(bad),
        "GetInstanceConsole hvparams": lambda: hv.GetInstanceConsole(
            {"name": "hostile1"}, bad, {}),
        "GetInstanceConsole name": lambda: hv.GetInstanceConsole({"name": bad}, {}, {}),
        "CheckParameterSyntax": lambda: hv.CheckParameterSyntax(bad),
        "CheckParameterSyntax kernel_args": lambda: hv.CheckParameterSyntax(
            dict(c.HVC_DEFAULTS[c.HT_KVM], kernel_args=bad)),
        "ValidateParameters": lambda: hv.ValidateParameters(bad),
        "ValidateParameters kvm_path": lambda: hv.ValidateParameters(
            dict(c.HVC_DEFAULTS[c.HT_KVM], kvm_path=bad)),
        "FillHvParams": lambda: hv.FillHvParams(bad),
        "MigrationInfo": lambda: hv.MigrationInfo({"name": bad}),
        "AcceptInstance info": lambda: hv.AcceptInstance({"name": "hostile1"}, bad,
                                                         "127.0.0.1"),
        "AcceptInstance target": lambda: hv.AcceptInstance({"name": "hostile1"}, "{}", bad),
        "MigrateInstance": lambda: hv.MigrateInstance({"name": "hostile1"}, bad, True),
        "FinalizeMigration": lambda: hv.FinalizeMigration({"name": "hostile1"}, bad, True),
        "GetMigrationStatus": lambda: hv.GetMigrationStatus({"name": bad}),
        "Verify": lambda: hv.Verify(bad),
        "GetLinuxNodeInfo meminfo": lambda: hv.GetLinuxNodeInfo(meminfo=bad),
        "GetLinuxNodeInfo cpuinfo": lambda: hv.GetLinuxNodeInfo(cpuinfo=bad),
        "GetLinuxNodeInfo numa_nodes": lambda: hv.GetLinuxNodeInfo(numa_nodes=bad),
        "ListInstances": hv.ListInstances,
        "GetAllInstancesInfo": hv.GetAllInstancesInfo,
        "GetNodeInfo": hv.GetNodeInfo,
        "GetAncillaryFiles": hv.GetAncillaryFiles,
        "constructor run_dir": lambda: KVMHypervisor(run_dir=bad).ListInstances(),
        "constructor uid_pool": lambda: KVMHypervisor(
            run_dir=hv.node.layout.root, uid_pool=bad).StartInstance(
                {"name": "hostile2", "hvparams": dict(base, security_model="pool")}, []),
        "constructor ifup_script": lambda: KVMHypervisor(
            run_dir=hv.node.layout.root, netns=hv.node.netns, ifup_script=bad).StartInstance(
                {"name": "hostile3", "hvparams": base, "nics": [nic]}, []),
        "constructor netns": lambda: KVMHypervisor(
            run_dir=hv.node.layout.root, netns=bad).StartInstance(
                {"name": "hostile3", "hvparams": base, "nics": [nic]}, []),
    }


def leftovers(hv: KVMHypervisor) -> list[str]:
    """Files under the run directory besides the layout, locks and the QEMU probe cache."""
    layout = hv.node.layout
    found = []
    for top in layout.all_dirs():
        if top in (layout.root, layout.lock_dir, layout.cache_dir) or not os.path.isdir(top):
            continue
        found += [os.path.join(top, entry) for entry in os.listdir(top)
                  if not (top == layout.uid_dir and entry == ".lock")]  # the pool's own lock
    return found


# These reboot the node when they succeed; no hostile value can make them succeed,
# but a test has no business near them.
NOT_CALLED = {"PowercycleNode", "LinuxPowercycle"}


def test_every_public_method_is_called(node) -> None:
    hv, _, base = node
    public = {name for name in dir(KVMHypervisor)
              if name[:1].isupper() and callable(getattr(KVMHypervisor, name))}
    called = {what.split()[0] for what in calls(hv, base, None)}
    assert public - NOT_CALLED <= called


@pytest.mark.parametrize("bad", HOSTILE, ids=IDS)
def test_public_calls_raise_only_library_errors(node, bad) -> None:
    hv, ns, base = node
    escaped = []
    for what, call in calls(hv, base, bad).items():
        try:
            call()
        except errors.GenericError:
            pass
        except Exception as err:  # noqa: BLE001 - this is what the test looks for
            escaped.append(f"{what}: {type(err).__name__}: {str(err)[:200]}")
        finally:
            kill_instances(hv.node.layout.root)
            for name in hv.ListInstances():
                hv.StopInstance(None, force=True, name=name)
            for name in ("hostile1", "hostile2", "hostile3"):
                hv.CleanupInstance(name)
    assert escaped == []


@pytest.mark.parametrize("bad", ["x\0y", "x" * 200_000,
                                 "52:54:00:15:33:47,id=evil,bootindex=9"],
                         ids=["nul", "huge", "injection"])
def test_failed_starts_leave_nothing_behind(node, bad) -> None:
    hv, ns, base = node
    nic = {"mac": "52:54:00:00:00:01", "nicparams": {"mode": "bridged", "link": "br0"}}
    pool = dict(base, security_model="pool")
    attempts = [
        ({"hvparams": dict(pool, kernel_path=base["kvm_path"], kernel_args=bad)}, []),
        ({"hvparams": pool}, [(objects.Disk(), "/dev/" + bad)]),
        ({"hvparams": pool, "nics": [dict(nic, mac=bad)]}, []),
        ({"hvparams": pool, "nics": [nic, dict(nic, mac=bad)]}, []),
    ]
    for instance, block_devices in attempts:
        data = {"name": "hostile1", "beparams": {"memory": 64, "vcpus": 1}, **instance}
        with pytest.raises(errors.HypervisorError) as info:
            hv.StartInstance(data, block_devices)
        assert "hostile1" in str(info.value) or "Parameter" in str(info.value)
        assert leftovers(hv) == []
        assert hv.ListInstances() == []
    assert "gnt.tap" not in ns_ip(ns, "-o", "link").stdout
