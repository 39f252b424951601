"""The README's parameter table is the one generated from the code."""

from __future__ import annotations

import os

from ganeti_kvm.tools import doc

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def test_readme_parameter_table_is_current() -> None:
    with open(README, encoding="utf-8") as handle:
        text = handle.read()
    start, end = text.index(doc.BEGIN), text.index(doc.END) + len(doc.END)
    assert text[start:end] == doc.parameter_table(), \
        "regenerate the table with: python3 -m ganeti_kvm.tools.doc"


def test_table_has_every_parameter() -> None:
    table = doc.parameter_table()
    for key in doc.params.PARAMETERS:
        assert f"| `{key}` |" in table
