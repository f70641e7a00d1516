"""Prediction bands as the pages show them: "point [p5–p95]", and whether a measured value
falls in its band (`reports.bands` makes them)."""

from __future__ import annotations

import math
from collections.abc import Callable


def format_band(point: float | None, b: dict[str, float] | None,
                fmt: Callable[[float | None], str]) -> str:
    """"point [p5–p95]" (the point alone without a band)."""
    if b is None:
        return fmt(point)
    return f"{fmt(point)} [{fmt(b['p5'])}–{fmt(b['p95'])}]"


def contains(b: dict[str, float] | None, value: float | None, count: bool = False) -> bool:
    """Whether `value` lies in the band (counts: rounded outward to whole numbers)."""
    if b is None or value is None:
        return False
    lo, hi = (math.floor(b["p5"]), math.ceil(b["p95"])) if count else (b["p5"], b["p95"])
    return lo <= value <= hi
