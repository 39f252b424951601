"""The package's layout: two contracts over one core, layers pointing down only.

Every module of ``ganeti_kvm`` is parsed (nothing is imported) and each of
its imports, also those inside functions, is resolved to the module it names.
The rules:

- The 2011 contract is the top-level modules ``constants``, ``errors``,
  ``objects``, ``hv_base`` and ``hv_kvm``; nothing else lives at the top
  level but the package's ``__init__`` and ``__main__``.
- Nothing under ``core/``, ``qemu/``, ``qmp/``, ``host/`` or ``tools/``
  imports a contract: neither the 2011 one's ``constants``, ``hv_base``,
  ``hv_kvm`` and ``objects`` nor ``ganeti3``.  ``errors`` is the library's
  exception root and is used everywhere.  Exceptions: ``tools/cli.py`` (the
  ``ganeti-kvm`` command drives a node through the 2011 contract's
  ``KVMHypervisor`` and objects, and hands ``ganeti install`` to ``ganeti3``)
  and ``tools/doc.py`` (it documents the 2011 contract's parameter table):
  both are front ends of the contracts, not parts of the core.
- ``ganeti3/`` imports none of the 2011 contract's ``constants``,
  ``hv_base``, ``hv_kvm`` and ``objects``: it maps Ganeti's hvparams onto
  the core's names (``core.names``) and checks (``core.params``) itself.
- Layers point down only: ``qmp/`` and ``host/`` import nothing of ``core/``;
  ``qemu/`` imports only the core's vocabulary, ``core.names``.
"""

from __future__ import annotations

import ast
import os
from collections.abc import Iterator

import pytest

PACKAGE = "ganeti_kvm"
ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), PACKAGE)

CONTRACT_2011 = ("constants", "errors", "objects", "hv_base", "hv_kvm")
TOP_LEVEL = {"__main__", *CONTRACT_2011}  # besides the package's own __init__
LAYERS = ("core", "qemu", "qmp", "host", "tools")
CONTRACT_FRONT_ENDS = {"ganeti_kvm.tools.cli", "ganeti_kvm.tools.doc"}
# What a layer below the contracts must not import (a module or its submodules)
CONTRACT_MODULES = tuple(f"{PACKAGE}.{name}" for name in
                         ("constants", "hv_base", "hv_kvm", "objects", "ganeti3"))
NOT_FOR_GANETI3 = tuple(f"{PACKAGE}.{name}" for name in
                        ("constants", "hv_base", "hv_kvm", "objects"))


def module_files() -> Iterator[tuple[str, str]]:
    """``(dotted module name, path)`` of every Python module of the package."""
    for directory, dirs, files in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for filename in sorted(files):
            if filename.endswith(".py"):
                path = os.path.join(directory, filename)
                relative = os.path.relpath(path, os.path.dirname(ROOT))[:-3]
                yield relative.replace(os.sep, ".").removesuffix(".__init__"), path


def is_package(module: str) -> bool:
    """Whether ``module`` (dotted) is a package of this tree."""
    return os.path.isfile(os.path.join(os.path.dirname(ROOT), *module.split("."),
                                       "__init__.py"))


def imported_modules(module: str, source: str, package: bool = False) -> set[str]:
    """The dotted names of the modules that ``source`` (the text of ``module``) imports.

    ``from P import x`` names ``P.x`` when that is a module of this tree,
    else ``P``; relative imports are resolved against ``module``
    (``package``: ``module`` is a package's ``__init__``).
    """
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")
                keep = len(parts) - node.level + (1 if package else 0)
                base = ".".join(parts[:keep] + ([base] if base else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                is_module = (is_package(candidate)
                             or os.path.isfile(os.path.join(os.path.dirname(ROOT),
                                                            *candidate.split(".")) + ".py"))
                found.add(candidate if is_module else base)
    return found


def names_any(imported: set[str], prefixes: tuple[str, ...]) -> list[str]:
    """The imports in ``imported`` that are one of ``prefixes`` or inside one."""
    return sorted(m for m in imported
                  if any(m == p or m.startswith(p + ".") for p in prefixes))


def read(path: str) -> str:
    with open(path, encoding="utf-8") as handle:
        return handle.read()


IMPORTS = {module: imported_modules(module, read(path), package=path.endswith("__init__.py"))
           for module, path in module_files()}


def in_layer(module: str, layer: str) -> bool:
    return module == f"{PACKAGE}.{layer}" or module.startswith(f"{PACKAGE}.{layer}.")


def test_the_tree_has_every_layer_and_both_contracts() -> None:
    """The walk sees the modules this test is about (else every rule below passes vacuously)."""
    for expected in ("ganeti_kvm.hv_kvm", "ganeti_kvm.ganeti3.hypervisor",
                     "ganeti_kvm.core.node", "ganeti_kvm.core.names", "ganeti_kvm.core.params",
                     "ganeti_kvm.qemu.cmdline", "ganeti_kvm.qmp.client",
                     "ganeti_kvm.host.paths", "ganeti_kvm.tools.cli"):
        assert expected in IMPORTS, expected
    assert "ganeti_kvm.core.names" in IMPORTS["ganeti_kvm.core.node"]


def test_only_the_2011_contract_lives_at_the_top_level() -> None:
    top = {m.split(".")[1] for m in IMPORTS if m.count(".") == 1 and not is_package(m)}
    assert top == TOP_LEVEL, (
        f"modules at the top of {PACKAGE}/ other than the 2011 contract: "
        f"{sorted(top - TOP_LEVEL)}; move them into one of {', '.join(LAYERS)}")


@pytest.mark.parametrize("layer", LAYERS)
def test_no_layer_below_the_contracts_imports_one(layer: str) -> None:
    offenders = {m: names_any(imported, CONTRACT_MODULES)
                 for m, imported in IMPORTS.items()
                 if in_layer(m, layer) and m not in CONTRACT_FRONT_ENDS}
    assert not {m: bad for m, bad in offenders.items() if bad}
    assert offenders, f"no module in {layer}/"


def test_the_front_ends_are_the_only_exceptions() -> None:
    """Each exempt front end does use a contract: the exemption is not dead weight."""
    for module in CONTRACT_FRONT_ENDS:
        assert names_any(IMPORTS[module], CONTRACT_MODULES), module


def test_ganeti3_imports_nothing_of_the_2011_contract() -> None:
    modules = {m: names_any(imported, NOT_FOR_GANETI3)
               for m, imported in IMPORTS.items() if in_layer(m, "ganeti3")}
    assert len(modules) > 3
    assert not {m: bad for m, bad in modules.items() if bad}
    assert any("ganeti_kvm.core.params" in IMPORTS[m] for m in modules)


@pytest.mark.parametrize("layer", ["qmp", "host"])
def test_qmp_and_host_do_not_import_the_core(layer: str) -> None:
    bad = {m: names_any(imported, ("ganeti_kvm.core",))
           for m, imported in IMPORTS.items() if in_layer(m, layer)}
    assert not {m: b for m, b in bad.items() if b}


def test_qemu_takes_only_the_core_vocabulary() -> None:
    bad = {m: [i for i in names_any(imported, ("ganeti_kvm.core",))
               if i != "ganeti_kvm.core.names"]
           for m, imported in IMPORTS.items() if in_layer(m, "qemu")}
    assert not {m: b for m, b in bad.items() if b}


@pytest.mark.parametrize("module, source, package, expected", [
    ("ganeti_kvm.core.x", "from ganeti_kvm import constants as c", False,
     {"ganeti_kvm.constants"}),
    ("ganeti_kvm.core.x", "def f():\n    from ganeti_kvm.hv_base import NO_CHECK\n", False,
     {"ganeti_kvm.hv_base"}),
    ("ganeti_kvm.core.x", "from .. import objects", False, {"ganeti_kvm.objects"}),
    ("ganeti_kvm.core", "from . import names", True, {"ganeti_kvm.core.names"}),
    ("ganeti_kvm.qmp.x", "import ganeti_kvm.ganeti3.params", False,
     {"ganeti_kvm.ganeti3.params"}),
    ("ganeti_kvm.qemu.x", "from ganeti_kvm.core.names import HV_ACPI", False,
     {"ganeti_kvm.core.names"}),
])
def test_the_checker_sees_each_form_of_import(module: str, source: str, package: bool,
                                              expected: set[str]) -> None:
    """The resolver finds a forbidden import however it is written."""
    found = imported_modules(module, source, package)
    assert found == expected
    assert names_any(found, CONTRACT_MODULES + ("ganeti_kvm.core",))
