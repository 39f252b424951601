"""One "node" for the driver-switch tests: Ganeti 3's bundled KVM driver and ganeti-kvm.

Started by tests/test_switch.py as
``unshare --mount --propagation private /usr/bin/python3 tests/switch_probe.py``
with one unpacked Ganeti tree and this repository on PYTHONPATH.  It first
mounts fresh tmpfs over /run, /var/lib/ganeti and /var/log/ganeti (the
bundled driver's paths are hard-coded: ``pathutils.RUN_DIR`` ...), so both
drivers work in /var/run/ganeti/kvm-hypervisor without touching the
machine's.  Then it answers one JSON request per line on stdin, one JSON
reply per line on stdout: ``{"op": NAME, ...}`` -> ``{"ok": VALUE}`` or
``{"error": TEXT}``.  QEMUs it starts outlive it (they keep the namespace),
so the test kills them by the PIDs ``pids`` reports.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from typing import Any

RUN_DIR = "/var/run/ganeti/kvm-hypervisor"
MOUNTS = ("/run", "/var/lib/ganeti", "/var/log/ganeti")


def private_dirs() -> None:
    """tmpfs over Ganeti's hard-coded directories, in this (private) mount namespace."""
    with open("/proc/self/mountinfo", encoding="ascii") as handle:
        if any(" shared:" in line for line in handle if line.split()[4] == "/"):
            raise SystemExit("switch_probe: run me under unshare --propagation private")
    for target in MOUNTS:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", target], check=True)
    os.makedirs("/var/log/ganeti/kvm", exist_ok=True)
    os.makedirs("/var/run/ganeti", exist_ok=True)


class Node:
    """Both drivers on this node and the instances it knows."""

    def __init__(self) -> None:
        from ganeti.hypervisor.hv_kvm import KVMHypervisor as Bundled  # type: ignore[import-not-found,unused-ignore]

        from ganeti_kvm.ganeti3 import KVMHypervisor as Ours

        self.drivers = {"bundled": Bundled, "ours": Ours}
        self.instances: dict[str, Any] = {}

    def hv(self, driver: str) -> Any:
        return self.drivers[driver]()

    def instance(self, name: str, qemu: str = "", port: int = 0, acpi: bool = True,
                 nics: list[str] | None = None) -> Any:
        """The instance ``name``, made once; ``nics`` are MACs of bridged NICs on br0."""
        from ganeti import constants, objects  # type: ignore[import-not-found,unused-ignore]

        if name in self.instances:
            return self.instances[name]
        hvparams = dict(constants.HVC_DEFAULTS[constants.HT_KVM], kvm_path=qemu,
                        kernel_path="", kvm_flag="disabled", serial_console=True, acpi=acpi,
                        vhost_net=False, migration_port=port, migration_bandwidth=100,
                        migration_downtime=30)
        beparams = dict(constants.BEC_DEFAULTS, maxmem=64, minmem=64, vcpus=1)
        serial_no = len(self.instances) + 1
        inst = objects.Instance(name=name, uuid=f"3c5c7a6e-0000-4000-8000-{serial_no:012d}",
                                primary_node="node-uuid-1",
                                hypervisor=constants.HT_KVM, hvparams=hvparams,
                                beparams=beparams, disks=[], tags=set(), network_port=None,
                                nics=[objects.NIC(mac=mac, uuid=f"5e1f0000-{serial_no:04d}-4000"
                                                  f"-8000-{seq:012d}",
                                                  nicparams={constants.NIC_MODE: "bridged",
                                                             constants.NIC_LINK: "br0"})
                                      for seq, mac in enumerate(nics or [])])
        self.instances[name] = inst
        return inst

    # --- requests --------------------------------------------------------------

    def op_start(self, driver: str, name: str, qemu: str, port: int, acpi: bool = True,
                 nics: list[str] | None = None) -> None:
        self.hv(driver).StartInstance(self.instance(name, qemu, port, acpi, nics), [], False)

    def op_bundled_ifup(self, path: str) -> None:
        """Make the bundled driver run ``path`` as its ifup hook (its own is not installed)."""
        from ganeti import pathutils  # type: ignore[import-not-found,unused-ignore]

        pathutils.KVM_IFUP = path

    def op_list(self, driver: str) -> list[str]:
        return sorted(self.hv(driver).ListInstances())

    def op_info(self, driver: str, name: str) -> Any:
        info = self.hv(driver).GetInstanceInfo(name)
        return None if info is None else list(info)

    def op_all(self, driver: str) -> list[Any]:
        return sorted(list(i) for i in self.hv(driver).GetAllInstancesInfo())

    def op_console(self, driver: str, name: str) -> dict[str, Any]:
        from ganeti import constants, objects

        inst = self.instance(name)
        node = objects.Node(name="node1.example.com", uuid="node-uuid-1", ndparams={})
        group = objects.NodeGroup(name="default", uuid="group-uuid-1",
                                  ndparams={constants.ND_SSH_PORT: 22})
        console = self.drivers[driver].GetInstanceConsole(inst, node, group, inst.hvparams,
                                                          inst.beparams)
        console.Validate()
        return dict(console.ToDict())

    def op_stop(self, driver: str, name: str, force: bool) -> None:
        self.hv(driver).StopInstance(self.instance(name), force=force)

    def op_cleanup(self, driver: str, name: str) -> None:
        self.hv(driver).CleanupInstance(name)

    def op_migration_info(self, driver: str, name: str) -> str:
        return str(self.hv(driver).MigrationInfo(self.instance(name)))

    def op_accept(self, driver: str, name: str, info: str, qemu: str, port: int) -> None:
        self.hv(driver).AcceptInstance(self.instance(name, qemu, port), info, "127.0.0.1")

    def op_migrate(self, driver: str, name: str) -> None:
        self.hv(driver).MigrateInstance("cluster", self.instance(name), "127.0.0.1", True)

    def op_migration_status(self, driver: str, name: str) -> str:
        return str(self.hv(driver).GetMigrationStatus(self.instance(name)).status)

    def op_finalize_dst(self, driver: str, name: str, info: str, success: bool) -> None:
        self.hv(driver).FinalizeMigrationDst(self.instance(name), info, success)

    def op_finalize_src(self, driver: str, name: str, success: bool) -> None:
        self.hv(driver).FinalizeMigrationSource(self.instance(name), success, True)

    def op_adopt_all(self) -> list[str]:
        from ganeti_kvm.ganeti3 import bundled

        return bundled.adopt_all(RUN_DIR)

    def op_export_all(self) -> list[str]:
        from ganeti_kvm.ganeti3 import bundled

        return bundled.export_all(RUN_DIR)

    def op_reboot(self, driver: str, name: str) -> None:
        self.hv(driver).RebootInstance(self.instance(name))

    def op_install(self, root: str) -> list[str]:
        """``ganeti-kvm ganeti install --root ROOT`` for this node: the instances switched."""
        from ganeti_kvm.ganeti3 import install

        return install.install(root, restart=False, run_dir=RUN_DIR).instances

    def op_remove(self, root: str) -> list[str]:
        from ganeti_kvm.ganeti3 import install

        return install.remove(root, restart=False, run_dir=RUN_DIR).instances

    def op_islink(self, path: str) -> bool:
        return os.path.islink(os.path.join(RUN_DIR, path))

    def op_files(self) -> list[str]:
        """Every file and directory under the run directory, relative."""
        found = []
        for base, dirs, files in os.walk(RUN_DIR):
            for entry in dirs + files:
                found.append(os.path.relpath(os.path.join(base, entry), RUN_DIR))
        return sorted(found)

    def op_read(self, path: str) -> str | None:
        try:
            with open(os.path.join(RUN_DIR, path), encoding="utf-8") as handle:
                return handle.read()
        except FileNotFoundError:
            return None

    def op_qmp(self, name: str, command: str) -> Any:
        from ganeti_kvm.qmp.client import qmp_execute

        return qmp_execute(os.path.join(RUN_DIR, "ctrl", name + ".qmp"), command, timeout=10)

    def op_connect(self, path: str) -> bool:
        """Whether a unix socket (a console's serial or monitor) accepts a connection."""
        import socket

        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(path)
        return True

    def op_pids(self) -> dict[str, int]:
        pids = {}
        directory = os.path.join(RUN_DIR, "pid")
        for name in os.listdir(directory) if os.path.isdir(directory) else []:
            with open(os.path.join(directory, name), encoding="ascii") as handle:
                text = handle.read().strip()
            if text.isdigit():
                pids[name] = int(text)
        return pids


def main() -> int:
    private_dirs()
    node = Node()
    print(json.dumps({"ok": "ready"}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        op = request.pop("op")
        if op == "exit":
            break
        try:
            reply = {"ok": getattr(node, "op_" + op)(**request)}
        except Exception as err:  # noqa: BLE001 - every failure goes back to the test
            reply = {"error": f"{type(err).__module__}.{type(err).__name__}: {err}",
                     "traceback": traceback.format_exc()}
        print(json.dumps(reply, default=repr), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
