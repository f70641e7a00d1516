"""Turn a raw table (any dtypes, as read from a file) into a validated Trace.

Every check reports the first offending row by its 0-based position in the input, the field, the
value and the allowed range. Rows are checked chunk by chunk as a reader streams them
(`TraceBuilder`), lengths against their bounds (workloads.bounds) before a token column is
parsed; the table-wide checks (unique ids, prefix groups, conversations) run once at the end.
Unsorted arrivals are sorted (stable) with a TraceWarning, or refused with unsorted="error".
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd

from workloads.bounds import DEFAULT_BOUNDS, LengthBounds
from workloads.errors import SpecError, TraceError, TraceWarning
from workloads.schema import (
    ALL_COLUMNS,
    CONVERSATION_COLUMNS,
    MAX_ID,
    MAX_STORED_LEN,
    PREFIX_COLUMNS,
    REQUIRED_COLUMNS,
    TOKENS_COLUMN,
    Trace,
)

INT_RANGES = {
    "request_id": (0, MAX_ID),
    "prompt_len": (1, MAX_STORED_LEN),
    "output_len": (1, MAX_STORED_LEN),
    "prefix_group": (0, MAX_ID),
    "prefix_len": (1, MAX_STORED_LEN),
    "conversation_id": (0, MAX_ID),
    "turn": (0, MAX_STORED_LEN),
}
MAX_TOKEN_ID = (1 << 31) - 1
UNSORTED = ("sort", "error")


def make_trace(raw: pd.DataFrame, meta: dict[str, Any] | None = None, *,
               bounds: LengthBounds | None = None, unsorted: str = "sort",
               source: str | None = None) -> Trace:
    """Validate `raw` and return a Trace sorted by arrival time (row numbers refer to `raw`;
    `source` names the file in warnings)."""
    builder = TraceBuilder(raw.columns, bounds, unsorted, source)
    builder.add(raw)
    return builder.trace(meta)


class TraceBuilder:
    """Rows validated as they come, chunk after chunk (row numbers continue across chunks);
    `trace` runs the table-wide checks. Holds only the typed columns of the known fields."""

    def __init__(self, columns: Iterable[Any], bounds: LengthBounds | None = None,
                 unsorted: str = "sort", source: str | None = None):
        if unsorted not in UNSORTED:
            raise SpecError("unsorted", unsorted, "'sort' or 'error'")
        self.source = source  # the file, named in warnings
        self.columns = known_columns(columns, source)
        self.bounds = bounds or DEFAULT_BOUNDS
        self.unsorted = unsorted
        self.rows = 0
        self.too_long = 0
        self._parts: list[pd.DataFrame] = []

    def add(self, raw: pd.DataFrame) -> None:
        raw = raw.set_axis(pd.RangeIndex(self.rows, self.rows + len(raw)), axis=0)
        df = pd.DataFrame(index=raw.index)
        for name in (c for c in self.columns if c != TOKENS_COLUMN):
            df[name] = _typed_column(raw[name], name)
        self.too_long += self.bounds.check(df)  # before any token list is parsed
        if TOKENS_COLUMN in self.columns:
            df[TOKENS_COLUMN] = _token_column(raw[TOKENS_COLUMN])
            _check_token_lengths(df)
        self._parts.append(df)
        self.rows += len(raw)

    def trace(self, meta: dict[str, Any] | None = None) -> Trace:
        if not self.rows:
            raise TraceError("request_id", None, "<no rows>", "at least one request")
        parts = [p for p in self._parts if len(p)]
        df = parts[0] if len(parts) == 1 else pd.concat(parts)
        self._parts = []
        _check_unique_ids(df)
        _check_prefix(df)
        df = _sorted_by_arrival(df, self.unsorted, self.source)
        _check_conversations(df)
        if self.too_long:
            warn(self.bounds.kept_warning(self.too_long), self.source)
        return Trace(df.reset_index(drop=True), dict(meta or {}))


def warn(warning: Warning, source: str | None) -> None:
    """A warning, naming the file it is about."""
    if source:
        warning = type(warning)(f"{source}: {warning}")
    warnings.warn(warning, stacklevel=4)


def known_columns(columns: Iterable[Any], source: str | None = None) -> list[str]:
    """The schema's columns among `columns`, in schema order; a TraceError names a missing
    required one, a TraceWarning the unknown ones."""
    names = [str(c) for c in columns]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise TraceError("columns", None, dup, "unique column names (this one repeats)")
    required = list(REQUIRED_COLUMNS)
    for pair in (PREFIX_COLUMNS, CONVERSATION_COLUMNS):
        if any(c in names for c in pair):
            required += pair
    for name in required:
        if name not in names:
            raise TraceError(name, 0, "<missing column>",
                             f"present: the columns {', '.join(required)} are required")
    unknown = [n for n in names if n not in ALL_COLUMNS]
    if unknown:
        shown = ", ".join(unknown[:10]) + (f" (+{len(unknown) - 10} more)" if len(unknown) > 10
                                           else "")
        warn(TraceWarning(f"ignoring unknown columns: {shown}"), source)
    return [c for c in ALL_COLUMNS if c in names]


def _typed_column(raw: pd.Series, name: str) -> pd.Series:
    if name == "arrival_s":
        return _float_column(raw, name)
    lo, hi = INT_RANGES[name]
    return _int_column(raw, name, lo, hi, nullable=name not in REQUIRED_COLUMNS)


def _fail_first(mask: np.ndarray, raw: pd.Series, name: str, allowed: str) -> None:
    bad = np.flatnonzero(mask)
    if bad.size:
        pos = int(bad[0])
        raise TraceError(name, int(raw.index[pos]), _plain(raw.iloc[pos]), allowed)


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _int_column(raw: pd.Series, name: str, lo: int, hi: int, nullable: bool) -> pd.Series:
    allowed = f"an integer in [{lo}, {hi}]" + (" or empty" if nullable else "")
    missing = raw.isna().to_numpy()
    nums = _exact_numbers(raw[~missing])
    ok = np.ones(len(raw), dtype=bool)
    ok[missing] = nullable
    ok[~missing] = _integral_in_range(nums, lo, hi)
    _fail_first(~ok, raw, name, allowed)
    out = pd.Series(pd.NA, index=raw.index, dtype="Int64")
    out[~missing] = nums.astype(np.int64)
    return out if nullable else out.astype(np.int64)


def _exact_numbers(values: pd.Series) -> pd.Series:
    """Numbers from numeric or text values: int64 when all are integers, else float64 (NaN if
    not a number). Text integers stay exact beyond 2**53."""
    if pd.api.types.is_unsigned_integer_dtype(values.dtype) and len(values) and \
            int(values.max()) > np.iinfo(np.int64).max:
        return values.astype(float)  # out of every range: fails its check, named as given
    if pd.api.types.is_integer_dtype(values.dtype) or pd.api.types.is_float_dtype(values.dtype):
        return values.astype(np.int64 if pd.api.types.is_integer_dtype(values.dtype) else float)
    try:
        return pd.to_numeric(values.astype(str).str.strip(), errors="coerce")
    except (TypeError, ValueError):
        return pd.Series(np.nan, index=values.index)


def _integral_in_range(nums: pd.Series, lo: int, hi: int) -> np.ndarray:
    if pd.api.types.is_integer_dtype(nums.dtype):
        arr = nums.to_numpy(dtype=np.int64)
        return (arr >= lo) & (arr <= hi)
    arr = nums.to_numpy(dtype=float, na_value=np.nan)
    with np.errstate(invalid="ignore"):
        return np.isfinite(arr) & (arr % 1 == 0) & (arr >= lo) & (arr <= hi)


def _float_column(raw: pd.Series, name: str) -> pd.Series:
    missing = raw.isna().to_numpy()
    nums = np.full(len(raw), np.nan)
    nums[~missing] = _exact_numbers(raw[~missing]).to_numpy(dtype=float, na_value=np.nan)
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(nums) & (nums >= 0)
    _fail_first(~ok, raw, name, "a finite number >= 0 (seconds)")
    return pd.Series(nums, index=raw.index, dtype=np.float64)


def _token_column(raw: pd.Series) -> pd.Series:
    arrays = []
    for row, value in zip(raw.index, raw, strict=True):
        arr = _token_array(value)
        if arr is None:
            raise TraceError(TOKENS_COLUMN, int(row), value,
                             f"a list of integers in [0, {MAX_TOKEN_ID}]")
        arrays.append(arr)
    return pd.Series(arrays, index=raw.index, dtype=object)


def _token_array(value: Any) -> np.ndarray | None:
    if isinstance(value, str):
        value = value.split()
    if not isinstance(value, list | tuple | np.ndarray):
        return None
    try:
        arr = np.asarray(value, dtype=np.int64) if len(value) else np.zeros(0, np.int64)
    except (TypeError, ValueError, OverflowError):
        return None
    if arr.ndim != 1 or np.any(arr != np.asarray(value, dtype=float)):
        return None
    if arr.size and (arr.min() < 0 or arr.max() > MAX_TOKEN_ID):
        return None
    return arr.astype(np.int32)


def _check_unique_ids(df: pd.DataFrame) -> None:
    ids = df["request_id"]
    dup = ids.duplicated().to_numpy()
    if dup.any():
        row = int(np.flatnonzero(dup)[0])
        first = int(np.flatnonzero(ids.to_numpy() == ids.iloc[row])[0])
        raise TraceError("request_id", row, int(ids.iloc[row]),
                         f"unique (row {first} has the same request_id)")


def _check_prefix(df: pd.DataFrame) -> None:
    if "prefix_group" not in df:
        return
    group, plen = df["prefix_group"], df["prefix_len"]
    _fail_first((group.isna() != plen.isna()).to_numpy(), plen, "prefix_len",
                "set exactly when prefix_group is set")
    has = group.notna().to_numpy()
    prompt = df["prompt_len"].to_numpy()
    plen_arr = plen.to_numpy(dtype=np.int64, na_value=0)
    too_long = has & (plen_arr >= prompt)
    if too_long.any():
        row = int(np.flatnonzero(too_long)[0])
        raise TraceError("prefix_len", row, int(plen_arr[row]),
                         f"an integer in [1, prompt_len - 1 = {prompt[row] - 1}]")
    _check_constant_per_key(df[has], "prefix_group", "prefix_len")


def _check_constant_per_key(df: pd.DataFrame, key: str, field: str) -> None:
    first = df.groupby(key, sort=False)[field].transform("first")
    differs = (df[field] != first).to_numpy()
    if differs.any():
        pos = int(np.flatnonzero(differs)[0])
        row = int(df.index[pos])
        raise TraceError(field, row, _plain(df[field].iloc[pos]),
                         f"the same for every request of {key} {df[key].iloc[pos]} "
                         f"({first.iloc[pos]})")


def _check_token_lengths(df: pd.DataFrame) -> None:
    lens = df[TOKENS_COLUMN].map(len).to_numpy()
    prompt = df["prompt_len"].to_numpy()
    bad = np.flatnonzero(lens != prompt)
    if bad.size:
        pos = int(bad[0])
        raise TraceError(TOKENS_COLUMN, int(df.index[pos]), f"<{lens[pos]} tokens>",
                         f"exactly prompt_len = {prompt[pos]} tokens long")


def _sorted_by_arrival(df: pd.DataFrame, unsorted: str, source: str | None) -> pd.DataFrame:
    arrival = df["arrival_s"].to_numpy()
    back = np.flatnonzero(np.diff(arrival) < 0)
    if not back.size:
        return df
    row = int(back[0]) + 1
    if unsorted == "error":
        raise TraceError("arrival_s", row, float(arrival[row]),
                         f">= {float(arrival[row - 1])!r} of row {row - 1} (arrivals in "
                         "non-decreasing order; unsorted='sort' sorts them)")
    warn(TraceWarning(
        f"arrivals are not sorted (row {row}: arrival_s={float(arrival[row])!r} < "
        f"{float(arrival[row - 1])!r} of row {row - 1}); sorted by arrival_s (stable)"), source)
    return df.sort_values("arrival_s", kind="stable")


def _check_conversations(df: pd.DataFrame) -> None:
    if "conversation_id" not in df:
        return
    conv = df[df["conversation_id"].notna()].sort_values(["conversation_id", "turn"],
                                                         kind="stable")
    if conv.empty:
        return
    grouped = conv.groupby("conversation_id", sort=False)
    _fail_where(conv, conv["turn"] != grouped.cumcount(), "turn",
                "0, 1, 2, ... within its conversation, without gaps or repeats")
    prev_arrival = grouped["arrival_s"].shift(1)
    _fail_where(conv, conv["arrival_s"] < prev_arrival, "arrival_s",
                "at or after the previous turn's arrival_s")
    history = grouped["prompt_len"].shift(1) + grouped["output_len"].shift(1)
    _fail_where(conv, conv["prompt_len"] <= history, "prompt_len",
                "> the previous turn's prompt_len + output_len (its history)")
    if "prefix_group" in conv:
        keyed = conv.assign(prefix_group=conv["prefix_group"].fillna(-1),
                            prefix_len=conv["prefix_len"].fillna(0))
        _check_constant_per_key(keyed, "conversation_id", "prefix_group")
        _check_constant_per_key(keyed, "conversation_id", "prefix_len")


def _fail_where(df: pd.DataFrame, mask: pd.Series, field: str, allowed: str) -> None:
    mask = mask.fillna(False).to_numpy(dtype=bool)
    if mask.any():
        rows = df.index.to_numpy()[mask]
        row = int(rows.min())
        raise TraceError(field, row, _plain(df.loc[row, field]), allowed)
