"""Numbers as the pages print them, and the signed prediction error."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

GiB = 1024**3
MISSING = "–"


def sig3(v: float) -> str:
    """Three significant digits, no exponent for everyday magnitudes: 0.927, 48.1, 5,104."""
    a = abs(v)
    if a >= 100 or a == 0:
        return f"{v:,.0f}"
    if a >= 1e-3:
        return f"{v:,.{2 - math.floor(math.log10(a))}f}"
    return f"{v:.2e}"


# unit -> (scale applied to the raw value, formatter)
UNITS: dict[str, tuple[float, Callable[[float], str]]] = {
    "time": (1.0, lambda v: f"{sig3(v * 1e3)} ms" if abs(v) < 10 else f"{sig3(v)} s"),
    "ms": (1e3, sig3), "s": (1.0, sig3), "float": (1.0, sig3),
    "int": (1.0, lambda v: f"{v:,.0f}"), "pct": (100.0, lambda v: f"{v:.2f}%"),
    "gib": (1 / GiB, lambda v: f"{v:,.2f}"), "x": (1.0, lambda v: f"{v:,.2f}x"),
}


def number(value: Any) -> float | None:
    """A finite float, or None (None, NaN, infinities, non-numbers)."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def scaled(value: Any, unit: str) -> float | None:
    v = number(value)
    return None if v is None else v * UNITS[unit][0]


def fmt(value: Any, unit: str) -> str:
    """`value` (in base units: seconds, bytes, fractions) printed in `unit`."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    v = scaled(value, unit)
    if v is None:
        return value if isinstance(value, str) else MISSING
    return UNITS[unit][1](v)


def pct_error(predicted: Any, measured: Any) -> float | None:
    """(predicted - measured) / |measured| x 100; None without both or with measured = 0."""
    p, m = number(predicted), number(measured)
    if p is None or m is None or m == 0:
        return None
    return (p - m) / abs(m) * 100.0


def fmt_error(err: float | None) -> str:
    return MISSING if err is None else f"{err:+.1f}%"


def error_class(err: float | None) -> str:
    """good within 10%, fair within 25%, poor beyond."""
    if err is None:
        return ""
    return "good" if abs(err) <= 10 else "fair" if abs(err) <= 25 else "poor"
