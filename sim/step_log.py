"""Per-step records kept compactly: single steps as rows, a run of skipped decode steps as a
few numbers and arrays, expanded into columns once, in `to_frame`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from operator import attrgetter

import numpy as np
import pandas as pd

from engine.core.records import StepRecord

COLUMNS = tuple(f.name for f in fields(StepRecord))
FLOAT_COLUMNS = ("start_s", "end_s")
_ROW = attrgetter(*COLUMNS)


@dataclass
class DecodeRunSteps:
    """Steps in which the same `num_seqs` sequences decode one token each.

    Step j of the run starts when step j-1 ends. The waiting queue and the blocks in use grow
    by one at each entry of `waiting_added` and `blocks_taken` (run-relative steps, sorted).
    """

    start_s: float
    end_s: np.ndarray
    num_seqs: int
    num_waiting: int
    waiting_added: list[int]
    num_blocks_used: int
    blocks_taken: list[int]
    num_blocks: int

    def __len__(self) -> int:
        return len(self.end_s)


CHUNK_STEPS = 1 << 18  # steps a streaming log holds before it hands them on as a frame

ChunkFn = Callable[[pd.DataFrame], None]


class StepLog:
    """Segments in order: a single step (one row) or a decode run (many steps). Each keeps
    its column values at its first step; `to_frame` repeats them over the segment's steps and
    adds what grows within a run.

    With `on_chunk`, the log streams: once it holds `chunk_steps` steps it hands them to
    `on_chunk` as a frame (steps in order) and forgets them, so a run of any length holds
    at most one chunk; `finish` hands on the rest."""

    def __init__(self, on_chunk: ChunkFn | None = None, chunk_steps: int = CHUNK_STEPS):
        self.on_chunk, self.chunk_steps = on_chunk, chunk_steps
        self._flushed = 0  # steps handed on
        self._reset()

    def _reset(self) -> None:
        self._lengths: list[int] = []
        self._values: list[tuple] = []  # per segment, one value per column
        self._is_run: list[bool] = []
        self._run_ends: list[np.ndarray] = []
        self._waiting_added: list[int] = []  # held steps at which a run's queue grew
        self._blocks_taken: list[int] = []   # held steps at which a run took a block
        self._held = 0

    def __len__(self) -> int:
        return self._flushed + self._held

    def append(self, record: StepRecord) -> None:
        self._add(1, _ROW(record), False)

    def add_decode_run(self, run: DecodeRunSteps) -> None:
        first, held = len(self), self._held
        self._waiting_added.extend([held + j for j in run.waiting_added])
        self._blocks_taken.extend([held + j for j in run.blocks_taken])
        self._run_ends.append(run.end_s)
        n, used = run.num_seqs, run.num_blocks_used
        at_start = StepRecord(
            step=first, start_s=run.start_s, end_s=0.0, num_batched_tokens=n,
            num_prefill_tokens=0, num_prefill_seqs=0, num_decode_seqs=n, num_running=n,
            num_waiting=run.num_waiting, num_blocks_used=used,
            num_blocks_free=run.num_blocks - used, num_preempted=0)
        self._add(len(run), _ROW(at_start), True)

    def _add(self, length: int, values: tuple, is_run: bool) -> None:
        self._lengths.append(length)
        self._values.append(values)
        self._is_run.append(is_run)
        self._held += length
        if self.on_chunk is not None and self._held >= self.chunk_steps:
            self.flush()

    def flush(self) -> None:
        """Hand the held steps to `on_chunk`."""
        if self._held and self.on_chunk is not None:
            frame = self._frame()
            self._flushed += self._held
            self._reset()
            self.on_chunk(frame)

    def to_frame(self) -> pd.DataFrame:
        """The held steps (all of them, unless the log streams), one column per StepRecord
        field, in bulk."""
        return self._frame()

    def _frame(self) -> pd.DataFrame:
        lengths = np.array(self._lengths, dtype=np.int64)
        first = np.cumsum(lengths) - lengths
        values = {c: np.array(v, dtype=float if c in FLOAT_COLUMNS else np.int64)
                  for c, v in zip(COLUMNS, zip(*self._values, strict=True), strict=True)} \
            if self._values else {c: np.zeros(0, dtype=np.int64) for c in COLUMNS}
        cols = {c: np.repeat(values[c], lengths) for c in COLUMNS if c not in FLOAT_COLUMNS}
        cols["step"] += np.arange(self._held) - np.repeat(first, lengths)
        cols["num_waiting"] += self._grown(self._waiting_added, first, lengths)
        taken = self._grown(self._blocks_taken, first, lengths)
        cols["num_blocks_used"] += taken
        cols["num_blocks_free"] -= taken
        cols["end_s"] = np.repeat(values["end_s"], lengths).astype(float)
        if self._run_ends:
            in_run = np.repeat(np.array(self._is_run), lengths)
            cols["end_s"][in_run] = np.concatenate(self._run_ends)
        cols["start_s"] = np.empty(self._held)
        cols["start_s"][1:] = cols["end_s"][:-1]  # within a run, a step starts as one ends
        cols["start_s"][first] = values["start_s"]
        return pd.DataFrame({c: cols[c] for c in COLUMNS}, copy=False)

    def _grown(self, added: list[int], first: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Per held step: how many entries of `added` its segment has at or before it."""
        if not added:
            return np.zeros(self._held, dtype=np.int64)
        counts = np.cumsum(np.bincount(np.array(added, dtype=np.int64), minlength=self._held))
        before = np.concatenate(([0], counts))[first]  # counted in earlier segments
        return counts - np.repeat(before, lengths)
