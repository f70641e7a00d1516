"""Request records kept as columns, one row per request in arrival order, filled as each
request ends (finishes or is rejected): no object per request, a fixed size per row."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from engine.core.records import REQUEST_FIELDS
from engine.core.sequence import Sequence

_FLOATS = ("first_scheduled_s", "first_token_s", "finish_s")
_INTS = ("output_len", "num_cached_tokens", "num_preemptions")


class RequestLog:
    def __init__(self, request_id: Any, arrival_s: np.ndarray, prompt_len: np.ndarray):
        n = len(arrival_s)
        self.columns: dict[str, Any] = {
            "request_id": request_id, "arrival_s": arrival_s, "prompt_len": prompt_len,
            **{c: np.full(n, np.nan) for c in _FLOATS},
            **{c: np.zeros(n, dtype=np.int64) for c in _INTS},
            "finish_reason": [None] * n, "rejected": np.zeros(n, dtype=bool)}
        self.ended = np.zeros(n, dtype=bool)

    def end(self, row: int, seq: Sequence) -> None:
        """Row `row` is `seq`, finished (or rejected, its finish time set)."""
        c, t = self.columns, seq.times
        for name, value in zip(_FLOATS, (t.first_scheduled, t.first_token, t.finish),
                               strict=True):
            if value is not None:
                c[name][row] = value
        c["output_len"][row] = seq.num_output_tokens
        c["num_cached_tokens"][row] = seq.num_cached_tokens
        c["num_preemptions"][row] = seq.num_preemptions
        c["finish_reason"][row] = seq.finish_reason
        self.ended[row] = True

    def reject(self, row: int, reason: str) -> None:
        """Row `row` was rejected on arrival (its prompt never built): it ends as it came."""
        c = self.columns
        c["finish_s"][row] = c["arrival_s"][row]
        c["finish_reason"][row] = reason
        c["rejected"][row] = True
        self.ended[row] = True

    def to_frame(self, rows: int | None = None) -> pd.DataFrame:
        """The RequestRecord columns (engine.core.records), in order; the first `rows` only
        when given (a stopped run's arrived requests)."""
        c = self.columns
        return pd.DataFrame({name: c[name][:rows] for name in REQUEST_FIELDS})
