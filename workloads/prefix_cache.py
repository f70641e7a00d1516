"""How many prompt tokens a prefix cache that never evicts could serve: the engine's own
BlockManager (engine.core.kv) answers, request after request in trace order, so the rules
are the engine's (full blocks, chained hashes verified by content, never the whole prompt).
An upper bound on what a finite cache under load will hit."""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Sequence

import numpy as np

from engine.core.kv.block_manager import BlockManager
from engine.core.sequence import Sequence as EngineSequence
from workloads.errors import check_number
from workloads.schema import TOKENS_COLUMN, Trace
from workloads.tokens import PromptTokens

UNBOUNDED = 1 << 62  # blocks: the cache never evicts


def cacheable_tokens(prompts: Iterable[Sequence[int]], block_size: int) -> np.ndarray:
    """Per prompt (int64): the tokens a cache holding every earlier prompt would serve."""
    check_number("block_size", block_size, 1, integer=True)
    cache = BlockManager(UNBOUNDED, block_size)
    hits = []
    for prompt in prompts:
        seq = EngineSequence(array("q", np.asarray(prompt, dtype=np.int64).tobytes()))
        computed = cache.get_computed_blocks(seq)
        cache.allocate_slots(seq, seq.num_tokens - len(computed) * block_size, computed)
        cache.free(seq)  # its blocks stay cached: nothing is ever evicted
        hits.append(len(computed) * block_size)
    return np.asarray(hits, dtype=np.int64)


def cacheable_by_structure(prompt_len: np.ndarray, shared: np.ndarray,
                           block_size: int) -> np.ndarray:
    """Per request: the full blocks of its `shared` leading tokens (a group prefix or the
    previous turn seen before), never the whole prompt: what the engine's cache serves the
    generated ids, by their construction (own tokens are distinct), with no token made.
    Tested equal to `cacheable_tokens`, the engine's own answer."""
    check_number("block_size", block_size, 1, integer=True)
    return np.minimum(shared // block_size, (prompt_len - 1) // block_size) * block_size


def explicit_prompts(trace: Trace) -> PromptTokens:
    """The token ids a trace carries (its prompt_token_ids column), as one ragged array."""
    column = trace.df[TOKENS_COLUMN]
    offsets = np.zeros(len(column) + 1, dtype=np.int64)
    np.cumsum(column.map(len).to_numpy(dtype=np.int64), out=offsets[1:])
    values = np.concatenate([np.zeros(0, np.int32), *column]).astype(np.int32, copy=False)
    return PromptTokens(values, offsets)
