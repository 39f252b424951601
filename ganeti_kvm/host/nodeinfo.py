"""What the node's kernel tells about the node, and the node's hard power cycle.

Contract-neutral: both contracts' ``GetLinuxNodeInfo`` (memory, CPUs, NUMA
nodes, sockets) and ``LinuxPowercycle`` (sysrq) are these functions.
"""

from __future__ import annotations

import glob
import os

from ganeti_kvm import errors


def linux_node_info(meminfo: str = "/proc/meminfo", cpuinfo: str = "/proc/cpuinfo",
                    numa_nodes: str = "/sys/devices/system/node") -> dict[str, int]:
    """Return memory_total, memory_free, memory_dom0 (MiB), cpu_total,
    cpu_nodes (NUMA nodes) and cpu_sockets, the keys of the 2011 driver."""
    for path in (meminfo, cpuinfo, numa_nodes):
        if not isinstance(path, str):  # open(5) would read, then close, fd 5
            raise errors.HypervisorError(f"Node information paths must be text, not {path!r}")
    try:
        with open(meminfo, encoding="ascii") as handle:
            lines = handle.read().splitlines()
    except (OSError, ValueError, TypeError) as err:  # also a NUL, not text, not a path
        raise errors.HypervisorError(f"Cannot read {meminfo}: {err}") from err
    fields: dict[str, int] = {}
    for line in lines:
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            fields[key.strip()] = int(parts[0])  # kB
    try:
        total = fields["MemTotal"]
        free = fields["MemFree"] + fields.get("Buffers", 0) + fields.get("Cached", 0)
    except KeyError as err:
        raise errors.HypervisorError(f"{meminfo} has no {err.args[0]} line") from err
    result = {
        "memory_total": total // 1024,
        "memory_free": free // 1024,
        "memory_dom0": (total - free) // 1024,
    }
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as handle:
            cpu_lines = handle.read().splitlines()
    except (OSError, ValueError, TypeError) as err:
        raise errors.HypervisorError(f"Cannot read {cpuinfo}: {err}") from err
    cpus = sum(1 for line in cpu_lines if line.startswith("processor"))
    sockets = {line.partition(":")[2].strip() for line in cpu_lines
               if line.startswith("physical id")}
    result["cpu_total"] = cpus or (os.cpu_count() or 1)
    try:
        result["cpu_nodes"] = len(glob.glob(os.path.join(numa_nodes, "node[0-9]*"))) or 1
    except (ValueError, TypeError) as err:
        raise errors.HypervisorError(f"Cannot list NUMA nodes in {numa_nodes!r}: {err}") \
            from err
    result["cpu_sockets"] = len(sockets) or 1
    return result


def powercycle(sysrq_trigger: str = "/proc/sysrq-trigger") -> None:
    """Reboot the node at once through sysrq (sync, then reboot); does not return on success."""
    if not isinstance(sysrq_trigger, str):  # open(1) would write to fd 1
        raise errors.HypervisorError(f"The sysrq trigger must be a path, not {sysrq_trigger!r}")
    try:
        with open(sysrq_trigger, "w", encoding="ascii") as handle:
            handle.write("s")
        with open(sysrq_trigger, "w", encoding="ascii") as handle:
            handle.write("b")
    except (OSError, ValueError, TypeError) as err:
        raise errors.HypervisorError(
            f"Failed to power-cycle the node through {sysrq_trigger}: {err}") from err
