"""Step composition features (DESIGN.md "Step time"), as numpy columns.

Single steps and runs of skipped decode steps go through the same vectorised code, so both
give bit-identical durations.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import numpy as np

from engine.core.scheduler_output import SchedulerOutput
from engine.core.sequence import Sequence

FEATURES = ("prefill_tokens", "prefill_attn", "decode_seqs", "decode_ctx", "num_seqs")
# Measured since kvtwin-profile/3 (decode_shared since this version's later profiles); None
# where unknown (older profiles' samples).
EXTRA_FEATURES = ("decode_max_ctx", "prefill_gather", "decode_shared")


@dataclass
class StepFeatures:
    prefill_tokens: np.ndarray  # new tokens of prefilling sequences
    prefill_attn: np.ndarray    # causal query x key pairs of those tokens
    decode_seqs: np.ndarray     # decoding sequences (one token each)
    decode_ctx: np.ndarray      # keys the decodes attend to, summed
    num_seqs: np.ndarray        # sequences in the batch
    # The paged decode kernel walks each sequence's keys in one program: the longest decode
    # bounds the kernel however short the others are.
    decode_max_ctx: np.ndarray | None = None
    # Keys gathered from the cache for the prefill chunks: all their keys once any chunk has
    # a computed prefix (prefix hit, later chunk), else 0 (what the torch backend does).
    prefill_gather: np.ndarray | None = None
    # Keys the decodes re-read from a cached prefix that another decode of the step also
    # reads (prefix-cache hits): the kernel finds those blocks in the GPU's L2, not in HBM.
    decode_shared: np.ndarray | None = None

    # Set where every step has the same decode batch (a run of decode steps): terms of the
    # batch alone compute once.
    uniform_batch: ClassVar[int | None] = None

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

    def subset(self, mask: np.ndarray) -> StepFeatures:
        return StepFeatures(*(None if c is None else c[mask] for c in self._columns()))

    def _columns(self) -> list[np.ndarray | None]:
        return [getattr(self, f) for f in (*FEATURES, *EXTRA_FEATURES)]

    @classmethod
    def from_columns(cls, columns: dict[str, np.ndarray]) -> StepFeatures:
        """The required FEATURES, and the EXTRA_FEATURES where `columns` has them."""
        extra = [np.asarray(columns[f], dtype=np.int64) if f in columns else None
                 for f in EXTRA_FEATURES]
        return cls(*(np.asarray(columns[f], dtype=np.int64) for f in FEATURES), *extra)


@dataclass(slots=True)
class StepRow:
    """One step's features as plain ints (the simulator's single steps); the EXTRA_FEATURES
    are None where unknown, as in StepFeatures."""

    prefill_tokens: int
    prefill_attn: int
    decode_seqs: int
    decode_ctx: int
    num_seqs: int
    decode_max_ctx: int | None = None
    prefill_gather: int | None = None
    decode_shared: int | None = None


def features_of(out: SchedulerOutput, shared: bool = True) -> StepRow:
    """The features of one planned step; `shared=False` leaves the re-read prefix keys out
    (None: the caller's step-time model does not read them)."""
    prefill_tokens = prefill_attn = decode_ctx = max_ctx = keys = 0
    cached = False
    decodes = []
    for item in out.scheduled:
        q, start = item.num_new_tokens, item.num_computed_tokens
        if item.is_decode:
            decode_ctx += start + 1
            if start >= max_ctx:
                max_ctx = start + 1
            if shared:
                decodes.append((item.seq, start + 1))
        else:
            prefill_tokens += q
            prefill_attn += q * start + q * (q + 1) // 2
            keys += start + q
            cached = cached or start > 0
    group = out.grouped
    if group is not None:
        decode_ctx += group.ctx
        max_ctx = max(max_ctx, group.max_ctx)
        if shared:  # a decode re-reads at most its prefix hit
            decodes.extend((s, s.num_cached_tokens) for s in group.cached)
    return StepRow(prefill_tokens, prefill_attn, out.num_decode_seqs, decode_ctx,
                   out.num_scheduled, max_ctx, keys if cached else 0,
                   shared_prefix_keys(decodes) if shared else None)


def shared_prefix_keys(decodes: Iterable[tuple[Sequence, int]]) -> int:
    """Keys that decodes (sequence, keys read) re-read from a cached prefix another of them
    reads too: each sequence's prefix-cache hit, grouped by its first block's chained hash
    (the prefixes of one group are one chain), counts once per group, at the group's
    longest. Hashes outlive the block table, so a finished step's plan still has them."""
    total = 0
    longest: dict[int, int] = {}
    for seq, keys in decodes:
        hit = min(seq.num_cached_tokens, keys)
        if hit and seq.block_hashes:
            total += hit
            first = seq.block_hashes[0]
            longest[first] = max(longest.get(first, 0), hit)
    return total - sum(longest.values())


_STEPS = np.arange(1 << 14, dtype=np.int64)  # read-only: runs take views of it
_STEPS.flags.writeable = False


def decode_run_features(num_seqs: int, ctx_start: int, num_steps: int,
                        max_ctx_start: int | None = None, shared: int = 0) -> StepFeatures:
    """`num_steps` decode steps of the same `num_seqs` sequences; context grows by one each.
    The longest context is unknown (None: a step-time term over it takes the mean) unless
    `max_ctx_start` gives it at the first step. The re-read prefix keys (`shared`) stay
    put: new tokens go to each sequence's own last block."""
    steps = np.arange(num_steps, dtype=np.int64)
    zeros = np.zeros(num_steps, dtype=np.int64)
    seqs = np.full(num_steps, num_seqs, dtype=np.int64)
    longest = None if max_ctx_start is None else max_ctx_start + steps
    return StepFeatures(zeros, zeros.copy(), seqs, ctx_start + steps * num_seqs, seqs.copy(),
                        longest, zeros.copy(), np.full(num_steps, shared, dtype=np.int64))


class DecodeRunFeatures(StepFeatures):
    """The features of `decode_run_features`, predicted in one pass; the batch and prefill
    columns (read by few terms) are made only when a term reads them."""

    def __init__(self, num_seqs: int, ctx_start: int, num_steps: int,
                 max_ctx_start: int | None = None, shared: int = 0):
        # The columns every decode-run term reads are made here (a run is predicted once,
        # and a lazy attribute costs more than these few small arrays).
        steps = _STEPS[:num_steps] if num_steps <= len(_STEPS) else np.arange(num_steps)
        self._n, self._k = num_seqs, num_steps
        self.decode_ctx = ctx_start + steps * num_seqs  # type: ignore[misc]
        self.decode_max_ctx = None if max_ctx_start is None else max_ctx_start + steps
        self.decode_shared = np.full(num_steps, shared, dtype=np.int64)
        self.uniform_batch = num_seqs  # type: ignore[misc]

    def __len__(self) -> int:
        return self._k

    @cached_property
    def decode_seqs(self) -> np.ndarray:  # type: ignore[override]
        return np.full(self._k, self._n, dtype=np.int64)

    @property
    def num_seqs(self) -> np.ndarray:  # type: ignore[override]
        return self.decode_seqs

    @cached_property
    def prefill_tokens(self) -> np.ndarray:  # type: ignore[override]
        return np.zeros(self._k, dtype=np.int64)

    @property
    def prefill_attn(self) -> np.ndarray:  # type: ignore[override]
        return self.prefill_tokens

    @property
    def prefill_gather(self) -> np.ndarray:  # type: ignore[override]
        return self.prefill_tokens
