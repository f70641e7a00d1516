"""Errors and warnings of the workloads package; each names the field, the row and the range."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.core.config import ConfigError


class TraceError(ValueError):
    """A trace value outside its allowed range.

    `row` is the 0-based position of the request in the file as read (before any sorting),
    or None when the problem is not tied to one row; `path` names the file when one was read.
    The message is one line: "<path>: row <row>: <field>=<value> is invalid: must be <allowed>".
    """

    def __init__(self, field: str, row: int | None, value: Any, allowed: str,
                 path: str | None = None):
        self.field = field
        self.row = row
        self.value = value
        self.allowed = allowed
        self.path = path
        where = f"{path}: " if path else ""
        where += f"row {row}: " if row is not None else ""
        text = f"{where}{field}={short_repr(value)} is invalid: must be {allowed}"
        super().__init__(text.replace("\r", " ").replace("\n", " "))

    def at(self, path: str | Path) -> TraceError:
        """The same error naming `path` (kept when it names a file already)."""
        if self.path:
            return self
        return TraceError(self.field, self.row, self.value, self.allowed, str(path))

    def shifted(self, rows: int) -> TraceError:
        """The same error with its row counted `rows` further (a chunk's first row)."""
        if self.row is None or not rows:
            return self
        return TraceError(self.field, self.row + rows, self.value, self.allowed, self.path)


def short_repr(value: Any, limit: int = 60) -> str:
    """repr(value) on one line, cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


class SpecError(ConfigError):
    """A generator or importer parameter outside its allowed range (field, value, allowed)."""


class TraceWarning(UserWarning):
    """Something in a trace was repaired on load (e.g. unsorted arrivals were sorted)."""


class TraceImportWarning(UserWarning):
    """An importer capped, clamped or dropped requests; the ImportReport has the counts."""


def check_number(field: str, value: Any, lo: float | None = None, hi: float | None = None,
                 *, lo_open: bool = False, integer: bool = False) -> None:
    """Raise SpecError unless `value` is a finite number (an int if `integer`) within bounds."""
    kind = "an integer" if integer else "a number"
    numeric = isinstance(value, int) if integer else isinstance(value, int | float)
    ok = numeric and not isinstance(value, bool) and value == value and abs(value) != float("inf")
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value <= hi
    if not ok:
        raise SpecError(field, value, f"{kind} {_range_text(lo, hi, lo_open)}".strip())


def _range_text(lo: float | None, hi: float | None, lo_open: bool) -> str:
    left = "(" if lo_open else "["
    if lo is not None and hi is not None:
        return f"in {left}{lo}, {hi}]"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f"<= {hi}"
    return "(finite)"
