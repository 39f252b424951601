"""The Ganeti 3.x adapter against Ganeti 3.0 and 3.1's own code.

Each check runs tests/ganeti3_probe.py under Debian's python3 with one
unpacked Ganeti tree on its path (see tests/ganeti_trees.py for why), and
compares what Ganeti's classes declare, introspected from the real source,
with :class:`ganeti_kvm.ganeti3.KVMHypervisor`.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import tempfile
from typing import Any

import pytest

from tests import ganeti_trees
from tests.helpers import kill_instances

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = os.path.join(REPO, "tests", "ganeti3_probe.py")
VERSIONS = sorted(ganeti_trees.VERSIONS)


def probe(version: str, *args: str, run_dir: str | None = None) -> Any:
    """Run the probe under Ganeti ``version``; its JSON answer."""
    tree = ganeti_trees.require_tree(version)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([tree, REPO]))
    if run_dir is not None:
        env["GANETI_KVM_RUN_DIR"] = run_dir
    result = subprocess.run([ganeti_trees.GANETI_PYTHON, PROBE, *args], env=env,
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, f"probe {args} under Ganeti {version}:\n{result.stderr}"
    return json.loads(result.stdout)


@functools.cache
def _cached(version: str, command: str) -> str:
    run_dir = tempfile.mkdtemp(prefix="gk-g3-", dir="/tmp")  # the node checks may create it
    try:
        return json.dumps(probe(version, command, run_dir=run_dir))
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def cached_probe(version: str, command: str) -> Any:
    """A side-effect-free probe, run once per version and command."""
    return json.loads(_cached(version, command))


def _comparable(signature: list[list[Any]] | None) -> list[tuple[Any, ...]] | None:
    """Kinds and defaults of every parameter, names of those a caller can pass by keyword.

    Ganeti passes required arguments by position (Ganeti's own KVM driver
    names some of them ``_``), and optional ones by keyword (``hvparams=``).
    """
    if signature is None:
        return None
    return [(name if default is not None else None, kind, default)
            for name, kind, default in signature]


@pytest.mark.parametrize("version", VERSIONS)
def test_every_public_member_of_ganetis_class_is_there(version: str) -> None:
    answer = cached_probe(version, "members")
    ganeti, ours = answer["ganeti"], answer["ours"]
    missing = sorted(set(ganeti) - set(ours))
    assert not missing, f"missing under Ganeti {version}: {missing}"
    assert answer["subclass"], "not a subclass of Ganeti's BaseHypervisor"
    # The members the one-line shim lacked (backend.py's _BuildUploadFileList).
    assert {"GetAncillaryFiles", "ANCILLARY_FILES", "ANCILLARY_FILES_OPT"} <= set(ours)


@pytest.mark.parametrize("version", VERSIONS)
def test_kinds_and_signatures_match_ganetis(version: str) -> None:
    answer = cached_probe(version, "members")
    ganeti, ours = answer["ganeti"], answer["ours"]
    differences = {
        name: (ganeti[name], ours[name]) for name in sorted(ganeti)
        if ganeti[name]["kind"] != ours[name]["kind"]
        or _comparable(ganeti[name]["signature"]) != _comparable(ours[name]["signature"])}
    assert not differences, f"under Ganeti {version}: {json.dumps(differences, indent=1)}"


@pytest.mark.parametrize("version", VERSIONS)
def test_parameters_are_ganetis_keys_and_defaults(version: str) -> None:
    answer = cached_probe(version, "params")
    assert answer["ours"] == answer["ganeti"] == answer["ganeti_defaults"]
    assert len(answer["ours"]) == 65
    assert answer["defaults_equal"], "defaults differ from constants.HVC_DEFAULTS['kvm']"
    assert answer["checks_are_tuples"]
    assert answer["defaults_syntax_error"] is None
    if version == "3.0":
        assert answer["fallback_equal"], "FALLBACK_DEFAULTS differ from Ganeti 3.0's"


@pytest.mark.parametrize("version", VERSIONS)
def test_unimplemented_keys_are_refused_by_name(version: str) -> None:
    answer = cached_probe(version, "params")
    refusals = answer["refusals"]
    assert set(refusals) == set(answer["ours"]) - set(answer["core_keys"])
    for key, outcome in refusals.items():
        for method in ("CheckParameterSyntax", "ValidateParameters"):
            refused = outcome[method]
            assert refused is not None, f"{method} accepted {key}={outcome['value']}"
            cls, message = refused
            assert cls == "ganeti.errors.HypervisorError" and f"'{key}'" in message, refused
        if outcome["ganeti_accepts"]:  # then the refusal is ours, not Ganeti's syntax check
            assert "does not implement" in outcome["CheckParameterSyntax"][1]


@pytest.mark.parametrize("version", VERSIONS)
def test_start_list_info_stop_with_ganetis_objects(version: str, qemu_bin: str,
                                                   short_dir: str) -> None:
    run_dir = os.path.join(short_dir, "run")
    try:
        answer = probe(version, "lifecycle", qemu_bin, run_dir, run_dir=run_dir)
    finally:
        kill_instances(run_dir)
    name, pid, memory, vcpus, state, times = answer["info"]
    assert (name, memory, vcpus, state) == ("g3probe", 64, 1, 0)  # HvInstanceState.RUNNING
    assert pid > 0 and isinstance(times, int) and answer["info_running"]
    assert answer["list"] == ["g3probe"] and answer["all"] == [answer["info"]]
    assert answer["console_class"] == "ganeti.objects.InstanceConsole"
    console = answer["console"]
    assert (console["kind"], console["host"], console["port"]) == \
        ("ssh", "node1.example.com", 2222)
    assert console["command"][3] == os.path.join(run_dir, "ctrl", "g3probe.qmp")
    assert answer["migration_status"] == ["ganeti.objects.MigrationStatus", "failed"]
    assert {"memory_total", "memory_free", "cpu_total", "cpu_dom0", "cpu_nodes",
            "cpu_sockets", "hv_version"} <= set(answer["node_info"])
    assert answer["verify"] is None
    assert answer["list_after"] == [] and answer["info_after"] is None
