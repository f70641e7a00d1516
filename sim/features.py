"""Step composition features (DESIGN.md "Step time"), as numpy columns.

Single steps and runs of skipped decode steps go through the same vectorised code, so both
give bit-identical durations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from engine.scheduler import SchedulerOutput

FEATURES = ("prefill_tokens", "prefill_attn", "decode_seqs", "decode_ctx", "num_seqs")


@dataclass
class StepFeatures:
    prefill_tokens: np.ndarray  # new tokens of prefilling sequences
    prefill_attn: np.ndarray    # causal query x key pairs of those tokens
    decode_seqs: np.ndarray     # decoding sequences (one token each)
    decode_ctx: np.ndarray      # keys the decodes attend to, summed
    num_seqs: np.ndarray        # sequences in the batch

    def __len__(self) -> int:
        return len(self.num_seqs)

    @property
    def is_decode_only(self) -> np.ndarray:
        return self.prefill_tokens == 0

    @property
    def num_tokens(self) -> np.ndarray:
        return self.prefill_tokens + self.decode_seqs

    def as_matrix(self) -> np.ndarray:
        return np.stack([getattr(self, f).astype(np.float64) for f in FEATURES], axis=1)

    @classmethod
    def from_columns(cls, columns: dict[str, np.ndarray]) -> StepFeatures:
        return cls(*(np.asarray(columns[f], dtype=np.int64) for f in FEATURES))


def features_of(out: SchedulerOutput) -> StepFeatures:
    """The features of one planned step (arrays of length 1)."""
    prefill_tokens = prefill_attn = decode_seqs = decode_ctx = 0
    for item in out.scheduled:
        q, start = item.num_new_tokens, item.num_computed_tokens
        if item.is_decode:
            decode_seqs += 1
            decode_ctx += start + 1
        else:
            prefill_tokens += q
            prefill_attn += q * start + q * (q + 1) // 2
    row = np.array((prefill_tokens, prefill_attn, decode_seqs, decode_ctx, len(out.scheduled)),
                   dtype=np.int64)
    return StepFeatures(row[0:1], row[1:2], row[2:3], row[3:4], row[4:5])


def decode_run_features(num_seqs: int, ctx_start: int, num_steps: int) -> StepFeatures:
    """`num_steps` decode steps of the same `num_seqs` sequences; context grows by one each."""
    steps = np.arange(num_steps, dtype=np.int64)
    zeros = np.zeros(num_steps, dtype=np.int64)
    seqs = np.full(num_steps, num_seqs, dtype=np.int64)
    return StepFeatures(zeros, zeros.copy(), seqs, ctx_start + steps * num_seqs, seqs.copy())


class DecodeDurations:
    """Memoised durations of decode-only steps, for a step-time model whose prediction is a
    function of the features alone (not of the step index).

    Such a step's features are fixed by its sequence count n and summed context ctx, and the
    steps of a run have ctx = r + q * n for consecutive q. Durations are kept per (n, r) for
    q in [0, len), predicted in bulk by the model's own (elementwise) predict, so they are
    bit-identical to predicting the run's steps directly.
    """

    def __init__(self, predict: Callable[[StepFeatures, int], np.ndarray]):
        self._predict = predict
        self._tables: dict[tuple[int, int], np.ndarray] = {}

    def run(self, num_seqs: int, ctx_start: int, num_steps: int) -> np.ndarray:
        """Durations of `decode_run_features(num_seqs, ctx_start, num_steps)`'s steps."""
        r, q = ctx_start % num_seqs, ctx_start // num_seqs
        table = self._tables.get((num_seqs, r))
        if table is None or len(table) < q + num_steps:
            table = self._grow(num_seqs, r, table, q + num_steps)
        return table[q:q + num_steps]

    def _grow(self, n: int, r: int, table: np.ndarray | None, size: int) -> np.ndarray:
        have = 0 if table is None else len(table)
        size = max(size, 2 * have, 256)
        more = self._predict(decode_run_features(n, r + have * n, size - have), 0)
        table = more if table is None else np.concatenate((table, more))
        table.flags.writeable = False
        self._tables[(n, r)] = table
        return table
