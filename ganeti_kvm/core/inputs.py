"""Shape checks for what a cluster manager hands in: mappings, lists, text.

An adapter (the 2011 contract in :mod:`ganeti_kvm.hv_kvm`, or a later one)
gets the daemon's objects as they are; a wrong shape (a number where a
dict belongs) must become a :class:`errors.ParameterError` that names the
field, never a TypeError from deep inside.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ganeti_kvm import errors


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 100 else text[:100] + "..."


def mapping(what: str, value: Any) -> Mapping[str, Any]:
    """``value`` if it is a mapping (None is an empty one), else ParameterError naming ``what``."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise errors.ParameterError(
            f"{what} must be a mapping, not {type(value).__name__} ({_shown(value)})",
            what, value)
    return value


def items(what: str, value: Any) -> list[Any]:
    """``value`` as a list if it is a list, tuple or set (None is empty), else ParameterError."""
    if value is None:
        return []
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise errors.ParameterError(
            f"{what} must be a list, not {type(value).__name__} ({_shown(value)})",
            what, value)
    return list(value)


def optional_text(what: str, value: Any) -> str | None:
    """``value`` if it is text or None, else ParameterError naming ``what``."""
    if value is None or isinstance(value, str):
        return value
    raise errors.ParameterError(
        f"{what} must be text, not {type(value).__name__} ({_shown(value)})", what, value)
