"""Per-step attention metadata, set by the model runner and read by every Attention layer."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property

import torch


@dataclass
class DecodeBatch:
    """The sequences whose step is one new token, attended together in one batched call."""

    seqs: list[int]             # their indices in the step
    rows: torch.Tensor          # their token rows [num_decodes] (int64)
    block_tables: torch.Tensor  # [num_decodes, max blocks] (padded)
    seq_lens: torch.Tensor      # KV length of each [num_decodes]
    max_seq_len: int


@dataclass
class PagedMetadata:
    """The varlen backends' view of a step: decodes first, then prefill chunks.

    Rows ``[0, num_decodes)`` are one-token steps (paged decode kernel, reading KV lengths and
    blocks from device tensors, so a CUDA graph can replay it); the remaining rows are prefill
    chunks for varlen flash attention. ``prefill_kv_slots`` lists, sequence after sequence, the
    cache slots of every key a chunk attends to; None when no chunk has computed tokens
    before it, so the chunks attend to their own new K/V directly.
    """

    num_decodes: int
    decode_seq_lens: torch.Tensor | None = None     # [num_decodes] int32
    decode_block_tables: torch.Tensor | None = None  # [num_decodes, width] int32
    decode_order: torch.Tensor | None = None        # [num_decodes] int32, longest first
    prefill_cu_q: torch.Tensor | None = None        # [P + 1] int32, rows from num_decodes
    prefill_cu_k: torch.Tensor | None = None        # [P + 1] int32
    prefill_max_q: int = 0
    prefill_max_k: int = 0
    prefill_kv_slots: torch.Tensor | None = None    # [sum of key lengths] int64
    # The whole step (every row of every sequence) through the mixed attention kernel,
    # from the context's query_start_loc, seq_lens and block_tables (engine/mixed_graphs.py).
    whole_step: bool = False


@dataclass
class ForwardContext:
    """How a flattened batch of T tokens splits into sequences, and where their KV lives.

    Sequence i owns query rows ``query_start_loc[i]:query_start_loc[i + 1]`` and, after this
    step, ``seq_lens[i]`` tokens of KV (the computed-before ones plus the new ones).
    ``slot_mapping[t]`` is the cache slot (block_id * block_size + offset) where token t's KV
    goes, -1 for "do not store" (set ``all_slots_valid`` when there is none: storing then
    never syncs the device); ``block_tables[i]`` lists sequence i's blocks (padded).
    The ``*_cpu`` lists mirror the tensors so the per-sequence loop never syncs the device.
    With no ``slot_mapping`` (profiling, dense evaluation) attention is causal over each
    sequence's new tokens only. An empty context means one causal sequence of all T tokens.
    """

    query_start_loc: torch.Tensor | None = None
    seq_lens: torch.Tensor | None = None
    slot_mapping: torch.Tensor | None = None
    block_tables: torch.Tensor | None = None
    query_start_loc_cpu: list[int] = field(default_factory=list)
    seq_lens_cpu: list[int] = field(default_factory=list)
    all_slots_valid: bool = False
    paged: PagedMetadata | None = None

    @property
    def num_seqs(self) -> int:
        return max(len(self.query_start_loc_cpu) - 1, 0)

    def spans(self, num_tokens: int) -> list[tuple[int, int, int]]:
        """(query start, query end, KV length) of each sequence."""
        if not self.query_start_loc_cpu:
            return [(0, num_tokens, num_tokens)]
        starts = self.query_start_loc_cpu
        ends = starts[1:]
        kv_lens = self.seq_lens_cpu or [e - s for s, e in zip(starts, ends, strict=False)]
        return list(zip(starts, ends, kv_lens, strict=False))

    @cached_property
    def decode_batch(self) -> DecodeBatch | None:
        """Built once per step (by the first layer that asks), on the block tables' device."""
        if self.block_tables is None or not self.query_start_loc_cpu:
            return None
        spans = self.spans(self.query_start_loc_cpu[-1])
        seqs = [i for i, (start, end, _) in enumerate(spans) if end - start == 1]
        if not seqs:
            return None
        device = self.block_tables.device
        index = torch.tensor(seqs, device=device)
        rows = torch.tensor([spans[i][0] for i in seqs], device=device)
        lens = [spans[i][2] for i in seqs]
        return DecodeBatch(seqs, rows, self.block_tables[index],
                           torch.tensor(lens, device=device), max(lens))


def dense_context(seq_lens: list[int]) -> ForwardContext:
    """Independent causal sequences laid end to end, no KV cache (profiling, tests)."""
    starts = [0]
    for n in seq_lens:
        starts.append(starts[-1] + n)
    return ForwardContext(query_start_loc_cpu=starts, seq_lens_cpu=list(seq_lens))


_CONTEXT = ForwardContext()


def get_forward_context() -> ForwardContext:
    return _CONTEXT


def set_forward_context(context: ForwardContext) -> None:
    global _CONTEXT
    _CONTEXT = context


def reset_forward_context() -> None:
    set_forward_context(ForwardContext())


@contextmanager
def forward_context(context: ForwardContext) -> Iterator[ForwardContext]:
    """Set `context` for the duration of a forward pass, then restore the empty one."""
    set_forward_context(context)
    try:
        yield context
    finally:
        reset_forward_context()
