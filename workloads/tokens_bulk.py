"""All prompts of a trace at once: the philox-v1 scheme of tokens.py, vectorised.

Generated segments (request bodies, user turns, answers) are written as raw 32-bit values straight
to their final positions, mapped to token ids in one pass, then group prefixes are scattered and
conversation histories copied turn level by turn level. Equal, token for token, to
`prompt_token_ids` (the tests check it).
"""

from __future__ import annotations

import numpy as np

from workloads.schema import TOKENS_COLUMN, Trace
from workloads.tokens import (
    KIND_ANSWER,
    KIND_BODY,
    KIND_USER,
    PromptPlan,
    PromptTokens,
    TokenSpec,
    to_tokens,
)

_MAP_CHUNK = 1 << 23


def all_prompt_token_ids(trace: Trace, spec: TokenSpec | None = None) -> PromptTokens:
    """Prompt token ids of every request, in trace order, as one ragged int32 array."""
    offsets = np.zeros(len(trace) + 1, dtype=np.int64)
    np.cumsum(trace.df["prompt_len"].to_numpy(dtype=np.int64), out=offsets[1:])
    if trace.has_explicit_tokens:
        values = np.concatenate([np.zeros(0, np.int32), *trace.df[TOKENS_COLUMN]])
        return PromptTokens(values.astype(np.int32), offsets)
    plan = PromptPlan(trace, spec)
    raw = _generated_halves(plan, offsets)
    values = np.empty(raw.size, dtype=np.int32)
    for start in range(0, raw.size, _MAP_CHUNK):
        values[start:start + _MAP_CHUNK] = to_tokens(raw[start:start + _MAP_CHUNK], plan.spec)
    del raw
    _mark_first_own_tokens(plan, values, offsets)
    _scatter_prefixes(plan, values, offsets)
    _copy_histories(plan, values, offsets)
    return PromptTokens(values, offsets)


def _segment_table(plan: PromptPlan, offsets: np.ndarray) -> list[tuple[int, ...]]:
    """(kind, key, sub, length, destination) of every generated segment."""
    in_conv = plan.conv >= 0
    kind = np.where(in_conv, KIND_USER, KIND_BODY)
    key = np.where(in_conv, plan.conv, plan.ids)
    sub = np.where(in_conv, plan.turn, 0)
    own = [kind, key, sub, plan.prompt - plan.head, offsets[:-1] + plan.head]
    later = np.flatnonzero(plan.prev >= 0)
    prev = plan.prev[later]
    answers = [np.full(later.size, KIND_ANSWER), plan.conv[prev], plan.turn[prev],
               plan.output[prev], offsets[later] + plan.prompt[prev]]
    columns = [np.concatenate([a, b]).tolist() for a, b in zip(own, answers, strict=True)]
    return list(zip(*columns, strict=True))


def _generated_halves(plan: PromptPlan, offsets: np.ndarray) -> np.ndarray:
    raw = np.zeros(int(offsets[-1]), dtype=np.uint32)
    halves = plan.stream.halves
    for kind, key, sub, n, dest in _segment_table(plan, offsets):
        raw[dest:dest + n] = halves(kind, key, sub, n)
    return raw


def _mark_first_own_tokens(plan: PromptPlan, values: np.ndarray, offsets: np.ndarray) -> None:
    first = np.flatnonzero(plan.prev < 0)
    mark = np.where(plan.conv[first] >= 0, plan.conv[first], plan.ids[first])
    values[offsets[first] + plan.head[first]] = plan.spec.low + mark % plan.spec.span


def _scatter_prefixes(plan: PromptPlan, values: np.ndarray, offsets: np.ndarray) -> None:
    rows = np.flatnonzero((plan.group >= 0) & (plan.prev < 0))
    if not rows.size:
        return
    rows = rows[np.argsort(plan.group[rows], kind="stable")]
    groups, starts = np.unique(plan.group[rows], return_index=True)
    for group, members in zip(groups.tolist(), np.split(rows, starts[1:]), strict=True):
        n = int(plan.plen[members[0]])
        values[offsets[members][:, None] + np.arange(n)] = plan.prefix(group, n)


def _copy_histories(plan: PromptPlan, values: np.ndarray, offsets: np.ndarray) -> None:
    """Turn k's prompt starts with turn k-1's whole prompt; copy level by level."""
    later = plan.prev >= 0
    for level in np.unique(plan.turn[later]).tolist():
        rows = np.flatnonzero(later & (plan.turn == level))
        prev = plan.prev[rows]
        lengths = plan.prompt[prev]
        values[ragged_arange(offsets[rows], lengths)] = values[
            ragged_arange(offsets[prev], lengths)]


def ragged_arange(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + n) for each (s, n)."""
    total = int(lengths.sum())
    begin = np.cumsum(lengths) - lengths
    return np.repeat(starts - begin, lengths) + np.arange(total, dtype=np.int64)
