"""Small frozen spec dataclasses <-> JSON dicts, so a trace's metadata can rebuild it."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from workloads.errors import SpecError

SPEC_TYPES: dict[str, type] = {}
T = TypeVar("T", bound=type)


def register(cls: T) -> T:
    """Class decorator: make a spec dataclass (de)serialisable under its class name."""
    SPEC_TYPES[cls.__name__] = cls
    return cls


def spec_to_dict(spec: Any) -> dict[str, Any]:
    """{"type": <class name>, <field>: <value>, ...}, nested specs included."""
    out: dict[str, Any] = {"type": type(spec).__name__}
    for f in dataclasses.fields(spec):
        out[f.name] = _encode(getattr(spec, f.name))
    return out


def _encode(value: Any) -> Any:
    if type(value).__name__ in SPEC_TYPES and dataclasses.is_dataclass(value):
        return spec_to_dict(value)
    if isinstance(value, tuple | list):
        return [_encode(v) for v in value]
    return value


def spec_from_dict(data: dict[str, Any]) -> Any:
    """Inverse of spec_to_dict."""
    name = data.get("type")
    if name not in SPEC_TYPES:
        raise SpecError("type", name, f"one of {', '.join(sorted(SPEC_TYPES))}")
    kwargs = {k: _decode(v) for k, v in data.items() if k != "type"}
    return SPEC_TYPES[name](**kwargs)


def _decode(value: Any) -> Any:
    if isinstance(value, dict) and "type" in value:
        return spec_from_dict(value)
    if isinstance(value, list):
        return tuple(_decode(v) for v in value)
    return value
