"""The shapes the engine runs, each rule defined once for the runtime and the twin: CUDA-graph
batch and token buckets, the rows an eager step pads to, and how the paged-decode kernel
splits a sequence's keys. Pure Python (no torch)."""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass

# Eager steps on the varlen backends run their GEMMs on row counts padded to these
# multiples. cuBLAS chooses a kernel for every row count it has not seen: measured on the
# H100 host, ~130-200 us of host time per GEMM launch against ~20 us for a count it has
# seen, and a host-bound mixed step launches 4 per layer. Padded counts repeat from step to
# step (and the start-up warm-up has run them all), so the choice is made once per count.
TOKEN_MULTIPLE = 64
SAMPLE_MULTIPLE = 8


def padded_len(n: int, multiple: int, cap: int = 0) -> int:
    """`n` rounded up to a multiple of `multiple`, but never past max(n, cap) when cap > 0."""
    padded = -(-n // multiple) * multiple
    return min(padded, max(n, cap)) if cap > 0 else padded


def graph_bucket(n: int, buckets: list[int]) -> int | None:
    """The smallest bucket that holds `n` (None: past the largest)."""
    i = bisect_left(buckets, n)
    return buckets[i] if i < len(buckets) else None


def decode_batch(num_decodes: int, buckets: list[int] | None) -> int:
    """The batch a decode-only step runs: its graph bucket, or itself past the graphs."""
    bucket = graph_bucket(num_decodes, buckets) if buckets else None
    return num_decodes if bucket is None else bucket


def step_rows(num_tokens: int, buckets: list[int] | None, cap: int = 0) -> int:
    """The rows a mixed or prefill step runs when its rows are padded: its mixed-step graph
    bucket, else the count padded to TOKEN_MULTIPLE (never past `cap`, the token budget)."""
    bucket = graph_bucket(num_tokens, buckets) if buckets else None
    return padded_len(num_tokens, TOKEN_MULTIPLE, cap) if bucket is None else bucket


@dataclass(frozen=True)
class DecodeSplit:
    """How the Triton paged-decode kernel splits each sequence's keys across programs: a
    power of two by batch size alone (so a CUDA graph of a bucket stays valid), until a
    launch has about `target_programs` programs, at most `max_splits`, each split
    `min_share` keys or more (rounded up to `block_n`). The kernel and the simulator's
    step-time model both read this one rule."""

    num_kv_heads: int
    target_programs: int = 512
    max_splits: int = 16
    min_share: int = 256
    block_n: int = 64

    def splits(self, batch: int) -> int:
        ratio = max(1, self.target_programs // max(1, batch * self.num_kv_heads))
        return min(self.max_splits, 1 << (ratio - 1).bit_length())

    def longest_share(self, longest: int, batch: int) -> int:
        """Keys the busiest program reads: the longest sequence's share of its splits."""
        splits = self.splits(batch)
        if splits == 1:
            return longest
        per_split = -(-longest // splits)
        return max(-(-per_split // self.block_n) * self.block_n, self.min_share)


# Token counts of the mixed-step graphs' buckets: every 64 up to 512, then every 128, 256, 512, ...,
# doubling the step as the count doubles, so a step past 512 tokens pads at most a quarter.
TOKEN_BUCKET_START = 64


def token_buckets(limit: int) -> list[int]:
    """Padded token counts of the mixed / prefill steps that replay CUDA graphs,
    up to `limit` (which is always the last one)."""
    buckets: list[int] = []
    step, n = TOKEN_BUCKET_START, TOKEN_BUCKET_START
    while n < limit:
        buckets.append(n)
        if n >= 8 * step:
            step *= 2
        n += step
    return [*buckets, limit] if limit > 0 else []


def graph_buckets(max_num_seqs: int) -> list[int]:
    """Decode batch sizes that get a CUDA graph: 1, 2, 4, 8, then every 16 up to
    max_num_seqs (rounded up to 16)."""
    small = [b for b in (1, 2, 4, 8) if b < max_num_seqs]
    return small + list(range(16, max_num_seqs + 16, 16))


