"""Runs under Debian's python3 with one Ganeti tree on sys.path; prints JSON.

Called by tests/test_ganeti3_ganeti.py (one process per Ganeti version:
two versions of the package ``ganeti`` cannot share a process).

    python3 tests/ganeti3_probe.py members
    python3 tests/ganeti3_probe.py params
    python3 tests/ganeti3_probe.py lifecycle QEMU RUN_DIR
"""

from __future__ import annotations

import inspect
import json
import sys
from typing import Any


def _kind(cls: type, name: str) -> str:
    for klass in cls.__mro__:
        if name in vars(klass):
            raw = vars(klass)[name]
            if isinstance(raw, classmethod):
                return "classmethod"
            if isinstance(raw, staticmethod):
                return "staticmethod"
            if callable(raw):
                return "method"
            return "attribute"
    raise AssertionError(f"{cls.__name__} has no {name}")


def _undecorated(function: Any) -> Any:
    """The function a decorator without functools.wraps hides (Ganeti's ``_with_qmp``)."""
    params = list(inspect.signature(function).parameters.values())
    if [p.kind for p in params][-2:] != [inspect.Parameter.VAR_POSITIONAL,
                                         inspect.Parameter.VAR_KEYWORD]:
        return function
    for cell in getattr(function, "__closure__", None) or ():
        if inspect.isfunction(cell.cell_contents):
            return cell.cell_contents
    return function


def _signature(cls: type, name: str) -> list[list[Any]] | None:
    member = getattr(cls, name)
    if not callable(member) or isinstance(member, type):
        return None
    if inspect.ismethod(member):  # a class method: look at the function, then drop cls
        parameters = list(inspect.signature(_undecorated(member.__func__)).parameters.values())[1:]
    else:
        parameters = inspect.signature(_undecorated(member)).parameters.values()
    return [[p.name, p.kind.name,
             None if p.default is inspect.Parameter.empty else repr(p.default)]
            for p in parameters]


def describe(cls: type) -> dict[str, Any]:
    """Every public member of ``cls`` (and its bases): kind and signature."""
    names = sorted({n for klass in cls.__mro__ if klass is not object
                    for n in vars(klass) if not n.startswith("_")})
    return {name: {"kind": _kind(cls, name), "signature": _signature(cls, name)}
            for name in names}


def members() -> dict[str, Any]:
    from ganeti.hypervisor import hv_base
    from ganeti.hypervisor.hv_kvm import KVMHypervisor as GanetiKVM

    from ganeti_kvm.ganeti3 import KVMHypervisor

    return {"ganeti": describe(GanetiKVM), "ours": describe(KVMHypervisor),
            "subclass": issubclass(KVMHypervisor, hv_base.BaseHypervisor),
            "ancillary": [list(x) for x in KVMHypervisor.GetAncillaryFiles()]}


def _other_value(default: Any, check_fn: Any) -> Any:
    """A value other than ``default``, one that Ganeti's own check accepts if possible."""
    if isinstance(default, bool):
        return not default
    if isinstance(default, int):
        candidates: list[Any] = [default + 1, 4, default + 2]
    else:
        # ParamInSet's check keeps its set in its closure.
        allowed = [cell.cell_contents for cell in getattr(check_fn, "__closure__", None) or ()
                   if isinstance(cell.cell_contents, (set, frozenset, list, tuple))]
        candidates = sorted((v for s in allowed for v in s if isinstance(v, str)), key=str)
        candidates += ["0", "x1", "/etc/hostname"]
    candidates = [v for v in candidates if v != default and v != ""]
    for value in candidates:
        if check_fn is None or check_fn(value):
            return value
    return candidates[0]


def params() -> dict[str, Any]:
    from ganeti import constants
    from ganeti import errors as ganeti_errors
    from ganeti.hypervisor.hv_kvm import KVMHypervisor as GanetiKVM

    from ganeti_kvm.ganeti3 import KVMHypervisor
    from ganeti_kvm.ganeti3 import params as g3params

    defaults = constants.HVC_DEFAULTS[constants.HT_KVM]
    refusals = {}
    for key in sorted(g3params.UNIMPLEMENTED):
        check_fn = GanetiKVM.PARAMETERS[key][1]
        value = _other_value(defaults[key], check_fn)
        hvparams = dict(defaults, **{key: value})
        outcome: dict[str, Any] = {"ganeti_accepts": check_fn is None or bool(check_fn(value))}
        for method in ("CheckParameterSyntax", "ValidateParameters"):
            try:
                getattr(KVMHypervisor, method)(hvparams)
                outcome[method] = None
            except ganeti_errors.HypervisorError as err:
                outcome[method] = [type(err).__module__ + "." + type(err).__name__, str(err)]
        refusals[key] = {"value": repr(value), **outcome}
    syntax_error = None
    try:
        KVMHypervisor.CheckParameterSyntax(dict(defaults))
    except ganeti_errors.HypervisorError as err:
        syntax_error = str(err)
    return {"ours": sorted(KVMHypervisor.PARAMETERS), "ganeti": sorted(GanetiKVM.PARAMETERS),
            "ganeti_defaults": sorted(defaults),
            "defaults_equal": defaults == g3params.DEFAULTS,
            "fallback_equal": defaults == g3params.FALLBACK_DEFAULTS,
            "checks_are_tuples": all(len(v) == 5 for v in KVMHypervisor.PARAMETERS.values()),
            "core_keys": sorted(g3params.CORE_KEYS),
            "defaults_syntax_error": syntax_error, "refusals": refusals}


def lifecycle(qemu: str, run_dir: str) -> dict[str, Any]:
    """Start, list, inspect and stop a guest-less VM through Ganeti 3's calls and objects."""
    from ganeti import constants, objects
    from ganeti.hypervisor import hv_base

    from ganeti_kvm.ganeti3 import KVMHypervisor

    hvparams = dict(constants.HVC_DEFAULTS[constants.HT_KVM], kvm_path=qemu, kernel_path="",
                    kvm_flag="disabled", serial_console=True,
                    vhost_net=False)
    beparams = dict(constants.BEC_DEFAULTS, maxmem=64, minmem=64, vcpus=1)
    inst = objects.Instance(name="g3probe", uuid="3c5c7a6e-0000-4000-8000-000000000001",
                            primary_node="node-uuid-1", hypervisor=constants.HT_KVM,
                            hvparams=hvparams, beparams=beparams, nics=[], disks=[],
                            tags=set(), network_port=None)
    node = objects.Node(name="node1.example.com", uuid="node-uuid-1", ndparams={})
    group = objects.NodeGroup(name="default", uuid="group-uuid-1",
                              ndparams={constants.ND_SSH_PORT: 2222})
    hv = KVMHypervisor(run_dir=run_dir)
    result: dict[str, Any] = {}
    try:
        hv.StartInstance(inst, [], True)
        result["list"] = hv.ListInstances(hvparams=hvparams)
        info = hv.GetInstanceInfo("g3probe", hvparams=hvparams)
        result["info"] = list(info)
        result["info_running"] = hv_base.HvInstanceState.IsRunning(info[4])
        result["all"] = [list(i) for i in hv.GetAllInstancesInfo(hvparams=hvparams)]
        console = KVMHypervisor.GetInstanceConsole(inst, node, group, hvparams, beparams)
        result["console_class"] = type(console).__module__ + "." + type(console).__name__
        console.Validate()  # raises if a field the kind needs is missing
        result["console"] = console.ToDict()
        status = hv.GetMigrationStatus(inst)
        result["migration_status"] = [type(status).__module__ + "." + type(status).__name__,
                                      status.status]
        result["node_info"] = sorted(hv.GetNodeInfo(hvparams=hvparams))
        result["verify"] = hv.Verify(hvparams=hvparams)
        hv.StopInstance(inst, force=True)
        result["list_after"] = hv.ListInstances(hvparams=hvparams)
        result["info_after"] = hv.GetInstanceInfo("g3probe", hvparams=hvparams)
        hv.CleanupInstance("g3probe")
    finally:
        if hv.node.running_pid("g3probe") is not None:
            hv.StopInstance(None, force=True, name="g3probe")
    return result


def main(argv: list[str]) -> int:
    command = argv[0]
    if command == "members":
        result = members()
    elif command == "params":
        result = params()
    elif command == "lifecycle":
        result = lifecycle(argv[1], argv[2])
    else:
        raise SystemExit(f"unknown command {command}")
    json.dump(result, sys.stdout, sort_keys=True, default=repr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
