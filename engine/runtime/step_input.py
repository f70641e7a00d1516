"""Turn a scheduler step into the model's flattened batch, decodes first.

Rows are laid out sequence after sequence: every one-token item (a decode, or a one-token
prefill chunk) first, then the prefill chunks. Attention results do not depend on the order,
and the varlen backends can then split a step at ``num_decodes``. Host arrays are built with
numpy; `BlockTables` keeps each running sequence's table as a numpy row that only grows,
because a block table only grows between admissions.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate
from typing import Protocol

import numpy as np

from engine.core.sequence import Sequence


def pad_tail(array: np.ndarray, length: int, fill: int) -> np.ndarray:
    """`array` extended to `length` entries with `fill`."""
    if len(array) >= length:
        return array
    return np.concatenate([array, np.full(length - len(array), fill, dtype=array.dtype)])


class ScheduledLike(Protocol):
    seq: Sequence
    num_new_tokens: int


@dataclass
class HostBatch:
    """One step on the host. Entry j of the per-sequence lists is scheduled item order[j]."""

    order: list[int]
    num_decodes: int
    input_ids: np.ndarray      # [T] int64
    positions: np.ndarray      # [T] int64
    slot_mapping: np.ndarray   # [T] int64, < 0: do not store
    query_start_loc: list[int]
    seq_lens: list[int]        # KV length of each sequence after this step
    block_tables: np.ndarray   # [num_seqs, width] int32, padded with 0
    sample_seqs: list[int]     # scheduled indices that sample, ascending
    sample_rows: list[int]     # the row each of them samples from
    prefill_kv_slots: np.ndarray | None  # see PagedMetadata

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def is_decode_only(self) -> bool:
        return self.num_decodes == len(self.order)

    def decode_order(self, rows: int | None = None) -> np.ndarray:
        """The decodes longest KV first (the attention kernel's start order), then any
        padding rows up to `rows` (int32)."""
        lens = np.asarray(self.seq_lens[:self.num_decodes])
        longest_first = np.argsort(-lens, kind="stable")
        padding = np.arange(self.num_decodes, rows or self.num_decodes)
        return np.concatenate([longest_first, padding]).astype(np.int32)


class BlockTables:
    """Numpy mirrors of the sequences' block tables, updated by what was appended."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self._rows: dict[int, tuple[int, np.ndarray, int, int]] = {}

    def row(self, seq: Sequence) -> np.ndarray:
        table, n_now = seq.block_table, len(seq.block_table)
        version, arr, n, last = self._rows.get(seq.seq_id, _NO_ROW)
        if version != seq.num_preemptions or n > n_now or (n and table[n - 1] != last):
            arr, n = np.empty(max(16, 2 * n_now), dtype=np.int32), 0
        if n_now > len(arr):
            arr = np.concatenate([arr[:n], np.empty(n_now, dtype=np.int32)])
        if n_now > n:
            arr[n:n_now] = table[n:]
        self._rows[seq.seq_id] = (seq.num_preemptions, arr, n_now, table[-1] if n_now else -1)
        return arr[:n_now]

    def retain(self, seqs: list[Sequence]) -> None:
        """Drop the rows of sequences not in `seqs` once finished ones pile up."""
        if len(self._rows) > 2 * len(seqs) + 64:
            keep = {seq.seq_id for seq in seqs}
            self._rows = {k: v for k, v in self._rows.items() if k in keep}


_NO_ROW = (-1, np.empty(0, dtype=np.int32), 0, -1)


def build_host_batch(scheduled: list[ScheduledLike], tables: BlockTables,
                     gather_prefix: bool) -> HostBatch:
    decodes = [i for i, item in enumerate(scheduled) if item.num_new_tokens == 1]
    order = decodes + [i for i, item in enumerate(scheduled) if item.num_new_tokens != 1]
    seqs = [scheduled[i].seq for i in order]
    num_new = [scheduled[i].num_new_tokens for i in order]
    starts = [seq.num_computed_tokens for seq in seqs]
    ends = [s + n for s, n in zip(starts, num_new, strict=True)]
    rows = [_checked_row(tables, seq, end) for seq, end in zip(seqs, ends, strict=True)]
    query_start_loc = [0, *accumulate(num_new)]
    positions = token_positions(starts, num_new)
    input_ids = _input_ids(seqs, starts, ends, len(decodes))
    slot_mapping = _slots(rows, starts, num_new, positions, tables.block_size)
    sample = sorted((j for j, (seq, e) in enumerate(zip(seqs, ends, strict=True))
                     if e == seq.num_tokens), key=order.__getitem__)
    kv_slots = None
    if gather_prefix and any(starts[len(decodes):]):
        kv_slots = _prefix_slots(rows[len(decodes):], ends[len(decodes):], tables.block_size)
    return HostBatch(order, len(decodes), input_ids, positions, slot_mapping, query_start_loc,
                     ends, pad_rows(rows), [order[j] for j in sample],
                     [query_start_loc[j + 1] - 1 for j in sample], kv_slots)


def _checked_row(tables: BlockTables, seq: Sequence, end: int) -> np.ndarray:
    needed = -(-end // tables.block_size)
    if len(seq.block_table) < needed:
        raise ValueError(f"sequence {seq.request_id} needs {needed} blocks for {end} tokens "
                         f"but its block_table has {len(seq.block_table)}")
    if end > seq.num_tokens:
        raise ValueError(f"sequence {seq.request_id} schedules tokens up to {end} but has "
                         f"{seq.num_tokens}")
    return tables.row(seq)[:needed]


def _input_ids(seqs: list[Sequence], starts: list[int], ends: list[int],
               num_decodes: int) -> np.ndarray:
    ids = [seq.token_ids[s] for seq, s in zip(seqs[:num_decodes], starts, strict=False)]
    for seq, s, e in zip(seqs[num_decodes:], starts[num_decodes:], ends[num_decodes:],
                         strict=True):
        ids.extend(seq.token_ids[s:e])
    return np.asarray(ids, dtype=np.int64)


def token_positions(starts: list[int], num_new: list[int]) -> np.ndarray:
    """Position of every new token, sequence after sequence (int64)."""
    counts = np.asarray(num_new, dtype=np.int64)
    first_row = np.cumsum(counts) - counts
    offsets = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(first_row, counts)
    return np.repeat(np.asarray(starts, dtype=np.int64), counts) + offsets


def _slots(rows: list[np.ndarray], starts: list[int], num_new: list[int],
           positions: np.ndarray, block_size: int) -> np.ndarray:
    """Cache slot of every new token: its block (from its sequence's row) and offset."""
    blocks = np.empty(len(positions), dtype=np.int64)
    row = 0
    for table, start, n in zip(rows, starts, num_new, strict=True):
        if n == 1:
            blocks[row] = table[start // block_size]
        else:
            blocks[row:row + n] = table[positions[row:row + n] // block_size]
        row += n
    return blocks * block_size + positions % block_size


def _prefix_slots(rows: list[np.ndarray], ends: list[int], block_size: int) -> np.ndarray:
    """Slots of all keys [0, end) of each prefill sequence, laid end to end."""
    parts = []
    for table, end in zip(rows, ends, strict=True):
        pos = np.arange(end, dtype=np.int64)
        parts.append(table[pos // block_size].astype(np.int64) * block_size + pos % block_size)
    return np.concatenate(parts)


def pad_rows(rows: list[np.ndarray]) -> np.ndarray:
    """[num_seqs, widest] int32 block tables, zero-padded."""
    width = max((len(r) for r in rows), default=0)
    table = np.zeros((len(rows), max(width, 1)), dtype=np.int32)
    for i, row in enumerate(rows):
        table[i, :len(row)] = row
    return table
