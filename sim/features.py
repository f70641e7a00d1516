"""Step composition features (DESIGN.md "Step time"), as numpy columns.

Single steps and runs of skipped decode steps go through the same vectorised code, so both
give bit-identical durations.
"""

from __future__ import annotations

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
    row = (prefill_tokens, prefill_attn, decode_seqs, decode_ctx, len(out.scheduled))
    return StepFeatures(*(np.array([v], dtype=np.int64) for v in row))


def decode_run_features(num_seqs: int, ctx_start: int, num_steps: int) -> StepFeatures:
    """`num_steps` decode steps of the same `num_seqs` sequences; context grows by one each."""
    steps = np.arange(num_steps, dtype=np.int64)
    zeros = np.zeros(num_steps, dtype=np.int64)
    seqs = np.full(num_steps, num_seqs, dtype=np.int64)
    return StepFeatures(zeros, zeros.copy(), seqs, ctx_start + steps * num_seqs, seqs.copy())
