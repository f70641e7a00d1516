"""Per-step records kept as columns, so runs of skipped steps append in bulk."""

from __future__ import annotations

from dataclasses import fields

import numpy as np
import pandas as pd

from engine.records import StepRecord

COLUMNS = tuple(f.name for f in fields(StepRecord))
FLOAT_COLUMNS = ("start_s", "end_s")


class StepLog:
    def __init__(self) -> None:
        self._chunks: list[dict[str, np.ndarray] | list[StepRecord]] = []
        self._rows: list[StepRecord] = []
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def append(self, record: StepRecord) -> None:
        self._rows.append(record)
        self._len += 1

    def extend(self, columns: dict[str, np.ndarray]) -> None:
        """Append many steps at once; `columns` holds one array per StepRecord field."""
        self._flush_rows()
        n = len(columns["step"])
        assert all(len(columns[c]) == n for c in COLUMNS), "ragged step columns"
        self._chunks.append({c: np.asarray(columns[c]) for c in COLUMNS})
        self._len += n

    def _flush_rows(self) -> None:
        if self._rows:
            self._chunks.append(self._rows)  # converted once, in to_frame
            self._rows = []

    def to_frame(self) -> pd.DataFrame:
        self._flush_rows()
        if not self._chunks:
            return pd.DataFrame({c: np.array([], dtype=float if c in FLOAT_COLUMNS else np.int64)
                                 for c in COLUMNS})
        chunks = [_columns(ch) if isinstance(ch, list) else ch for ch in self._chunks]
        frame = pd.DataFrame({c: np.concatenate([ch[c] for ch in chunks]) for c in COLUMNS})
        return frame.astype({c: float if c in FLOAT_COLUMNS else np.int64 for c in COLUMNS})


def _columns(rows: list[StepRecord]) -> dict[str, np.ndarray]:
    return {c: np.array([getattr(r, c) for r in rows]) for c in COLUMNS}
