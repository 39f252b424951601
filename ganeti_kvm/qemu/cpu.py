"""The CPU part of QEMU's command line: ``-smp`` topology and ``-cpu`` model.

Pure functions of the instance's vCPU count and its hypervisor parameters
(``cpu_type``, ``cpu_sockets``, ``cpu_cores``, ``cpu_threads``), with the
cluster manager's meaning: 0 leaves a topology value to QEMU, an empty
``cpu_type`` leaves the model to QEMU.  QEMU (7.2 and 10.0 alike) computes
the values left out so that sockets x cores x threads equals the vCPUs and
refuses the start otherwise; the same rule is applied here first, so the
error names the parameters and their numbers before anything is started.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from ganeti_kvm import errors
from ganeti_kvm.core import names as c

# A -cpu value: a model name, then optional features (",+avx", ",-x2apic",
# ",pmu=off", ",hv-relaxed"): nothing that could end the option or start
# another.
_CPU_TYPE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
                          r"(?:,[+-]?[A-Za-z0-9][A-Za-z0-9_.-]{0,63}(?:=[A-Za-z0-9_.+-]{1,64})?)*")
MAX_CPU_TYPE_BYTES = 1024
#: Ganeti's order of the topology keys on -smp.
TOPOLOGY = ((c.HV_CPU_CORES, "cores"), (c.HV_CPU_THREADS, "threads"),
            (c.HV_CPU_SOCKETS, "sockets"))
#: The largest topology value accepted (QEMU's own limit is far lower).
MAX_TOPOLOGY = 8192


def is_cpu_type(value: Any) -> bool:
    """Whether ``value`` can be ``-cpu``'s argument: a model name with optional features."""
    return (isinstance(value, str) and len(value) <= MAX_CPU_TYPE_BYTES
            and _CPU_TYPE_RE.fullmatch(value) is not None)


def cpu_model(cpu_type: str) -> str:
    """The model of a ``cpu_type`` value (``"qemu64,+ssse3"`` -> ``"qemu64"``)."""
    return cpu_type.split(",", 1)[0]


def is_topology_value(value: Any) -> bool:
    """Whether ``value`` is a topology count: 0 (QEMU's choice) to :data:`MAX_TOPOLOGY`."""
    return (isinstance(value, int) and not isinstance(value, bool)
            and 0 <= value <= MAX_TOPOLOGY)


def cpu_args(hvp: Mapping[str, Any]) -> list[str]:
    """``-cpu MODEL[,features]`` for a ``cpu_type``, nothing for an empty one."""
    cpu_type = hvp.get(c.HV_CPU_TYPE) or ""
    if not cpu_type:
        return []
    if not is_cpu_type(cpu_type):
        raise errors.ParameterError(
            f"Parameter {c.HV_CPU_TYPE} must be a CPU model with optional features such as "
            f"qemu64 or host,+x2apic (see qemu-system-x86_64 -cpu help), not {cpu_type!r}",
            c.HV_CPU_TYPE, cpu_type)
    return ["-cpu", cpu_type]


def smp_value(vcpus: int, hvp: Mapping[str, Any]) -> str:
    """``-smp``'s value: the vCPUs, then the topology values that are set.

    Refused as QEMU would refuse it: all three set with a product other than
    ``vcpus``, or some set with a product that does not divide ``vcpus``.
    """
    if not isinstance(vcpus, int) or isinstance(vcpus, bool) or vcpus <= 0:
        raise errors.ParameterError(
            f"Parameter vcpus must be a whole number greater than zero, not {vcpus!r}",
            "vcpus", vcpus)
    given: dict[str, int] = {}
    for key, _ in TOPOLOGY:
        value = hvp.get(key) or 0
        if not is_topology_value(value):
            raise errors.ParameterError(
                f"Parameter {key} must be a whole number from 0 (QEMU's choice) to "
                f"{MAX_TOPOLOGY}, not {value!r}", key, value)
        if value:
            given[key] = value
    product = math.prod(given.values())
    shown = " x ".join(f"{key} {value}" for key, value in given.items())
    if len(given) == len(TOPOLOGY) and product != vcpus:
        key = c.HV_CPU_SOCKETS
        raise errors.ParameterError(
            f"{shown} make {product} vCPUs but the instance has {vcpus} (beparam vcpus); "
            f"QEMU needs them equal: set vcpus to {product}, or change the topology (or set "
            f"one of its keys to 0 to let QEMU compute it)", key, given[key])
    if given and vcpus % product:
        key = next(iter(given))
        raise errors.ParameterError(
            f"{shown} make {product}, which does not divide the instance's {vcpus} vCPUs "
            f"(beparam vcpus); QEMU computes the topology keys left at 0 so that the "
            f"product equals the vCPUs: set vcpus to a multiple of {product}, or change "
            "the topology", key, given[key])
    return ",".join([str(vcpus)] + [f"{name}={given[key]}" for key, name in TOPOLOGY
                                    if key in given])
