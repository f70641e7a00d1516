"""How many prompt tokens an (infinite) prefix cache could serve, from the actual token ids.

Mirrors the engine's rules: only full blocks count, a block matches only if its whole prefix
(every earlier block) matches, and at least one prompt token is always computed. Requests are
taken in trace (arrival) order with nothing ever evicted, so this is an upper bound on what a
finite cache under load will hit. Blocks are compared exactly (by content, not by hash).
"""

from __future__ import annotations

import numpy as np

from workloads.errors import check_number
from workloads.schema import TOKENS_COLUMN, Trace
from workloads.tokens import PromptTokens


def cacheable_tokens(prompts: PromptTokens, block_size: int) -> np.ndarray:
    """Per request (int64): prompt tokens a cache holding every earlier request would serve."""
    check_number("block_size", block_size, 1, integer=True)
    lengths = np.diff(prompts.offsets)
    full = lengths // block_size
    hits = np.zeros(lengths.size, dtype=np.int64)
    parent = np.full(lengths.size, -1, dtype=np.int64)  # chain id of blocks 0..j-1
    for level in range(int(full.max(initial=0))):
        rows = np.flatnonzero(full > level)
        starts = prompts.offsets[rows] + level * block_size
        blocks = prompts.values[starts[:, None] + np.arange(block_size)]
        keys = np.concatenate([parent[rows, None].view(np.int32).reshape(rows.size, 2),
                               blocks], axis=1)
        _, first, chain = np.unique(_rows_as_void(keys), return_index=True, return_inverse=True)
        hits[rows] += first[chain] != np.arange(rows.size)
        parent[rows] = chain
    never_all = (lengths - 1) // block_size
    return np.minimum(hits, never_all) * block_size


def _rows_as_void(matrix: np.ndarray) -> np.ndarray:
    matrix = np.ascontiguousarray(matrix, dtype=np.int32)
    return matrix.view(np.dtype((np.void, matrix.shape[1] * 4))).ravel()


def cacheable_by_structure(prompt_len: np.ndarray, shared: np.ndarray,
                           block_size: int) -> np.ndarray:
    """Per request: the full blocks of its `shared` leading tokens (a group prefix or the
    previous turn seen before), never the whole prompt. Equal to `cacheable_tokens` of the
    generated ids (own tokens are distinct by construction) and costs nothing per token."""
    check_number("block_size", block_size, 1, integer=True)
    return np.minimum(shared // block_size, (prompt_len - 1) // block_size) * block_size


def explicit_prompts(trace: Trace) -> PromptTokens:
    """The token ids a trace carries (its prompt_token_ids column), as one ragged array."""
    column = trace.df[TOKENS_COLUMN]
    offsets = np.zeros(len(column) + 1, dtype=np.int64)
    np.cumsum(column.map(len).to_numpy(dtype=np.int64), out=offsets[1:])
    values = np.concatenate([np.zeros(0, np.int32), *column]).astype(np.int32, copy=False)
    return PromptTokens(values, offsets)
