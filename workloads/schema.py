"""The trace table: one row per request, plus the metadata that makes it reproducible."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

REQUIRED_COLUMNS = ("request_id", "arrival_s", "prompt_len", "output_len")
PREFIX_COLUMNS = ("prefix_group", "prefix_len")
CONVERSATION_COLUMNS = ("conversation_id", "turn")
TOKENS_COLUMN = "prompt_token_ids"
OPTIONAL_COLUMNS = PREFIX_COLUMNS + CONVERSATION_COLUMNS + (TOKENS_COLUMN,)
ALL_COLUMNS = REQUIRED_COLUMNS + OPTIONAL_COLUMNS

FORMAT_NAME = "kvtwin-trace"
FORMAT_VERSION = 1
# Ids and group keys go into 56 bits of a Philox key (see tokens.py).
MAX_ID = (1 << 56) - 1
# The longest prompt or output a trace holds by default: beyond any model's context today
# (10M tokens at most), small enough that nothing sized by a length can exhaust memory.
MAX_LEN = 1 << 24
# What the format stores at all (int32 token positions); a request between the two is kept
# only when the reader is asked to keep over-long requests (see workloads.bounds).
MAX_STORED_LEN = (1 << 31) - 1


@dataclass(frozen=True, eq=False)  # compare with .equals (DataFrames have no truth value)
class Trace:
    """A validated, arrival-sorted request table and its metadata.

    `df` columns: request_id (int64), arrival_s (float64, seconds from the trace start),
    prompt_len and output_len (int64, >= 1), and optionally prefix_group / prefix_len,
    conversation_id / turn (nullable Int64) and prompt_token_ids (explicit token arrays).
    `meta` is JSON-serialisable: seed, generator parameters, token vocabulary, source.
    Treat both as read-only; build a new Trace instead of mutating.
    """

    df: pd.DataFrame
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.df)

    @property
    def seed(self) -> int:
        return int(self.meta.get("seed", 0))

    @property
    def has_prefix(self) -> bool:
        return "prefix_group" in self.df and bool(self.df["prefix_group"].notna().any())

    @property
    def has_conversations(self) -> bool:
        return "conversation_id" in self.df and bool(self.df["conversation_id"].notna().any())

    @property
    def has_explicit_tokens(self) -> bool:
        return TOKENS_COLUMN in self.df

    def column(self, name: str, fill: int = -1) -> np.ndarray:
        """An int64 numpy view of an optional column, nulls (or absence) as `fill`."""
        if name not in self.df:
            return np.full(len(self.df), fill, dtype=np.int64)
        return self.df[name].to_numpy(dtype=np.int64, na_value=fill)

    def equals(self, other: Trace) -> bool:
        """Same rows, same columns, same metadata (token arrays compared element-wise)."""
        if self.meta != other.meta or list(self.df.columns) != list(other.df.columns):
            return False
        plain = [c for c in self.df.columns if c != TOKENS_COLUMN]
        if not self.df[plain].equals(other.df[plain]):
            return False
        if not self.has_explicit_tokens:
            return True
        mine, theirs = self.df[TOKENS_COLUMN], other.df[TOKENS_COLUMN]
        return all(np.array_equal(a, b) for a, b in zip(mine, theirs, strict=True))


def base_meta(seed: int, **extra: Any) -> dict[str, Any]:
    """The metadata every trace carries: format, version, seed, then source-specific keys."""
    return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "seed": int(seed), **extra}
