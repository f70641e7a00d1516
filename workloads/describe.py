"""A trace at a glance: size, rates, lengths, prefix sharing, cache savings, KV per request."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from workloads.errors import SpecError, check_number
from workloads.prefix_cache import cacheable_by_structure, cacheable_tokens, explicit_prompts
from workloads.schema import Trace
from workloads.tokens import TokenSpec

# exact_cache generates every prompt token: refused beyond this many (4 bytes each).
MAX_EXACT_TOKENS = 1 << 28

PERCENTILES = (50, 90, 99)
MiB = 1 << 20


@dataclass
class TraceSummary:
    """See `describe`. Rates in requests/s; lengths in tokens; KV in bytes."""

    source: str
    requests: int
    duration_s: float
    mean_rate: float | None
    peak_rate_1s: float
    peak_rate_60s: float
    prompt_tokens: int
    output_tokens: int
    prompt_len: dict[str, float]
    output_len: dict[str, float]
    total_len: dict[str, float]
    prefix_groups: int
    conversations: int
    shared_prompt_tokens: int
    prefix_sharing_ratio: float
    block_size: int
    cacheable_prompt_tokens: int
    cacheable_ratio: float
    cacheable_from: str = "structure"
    kv_bytes_per_token: int | None = None
    kv_model: str | None = None
    kv_bytes_per_request: dict[str, float] | None = None
    kv_blocks_per_request: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def describe(trace: Trace, *, block_size: int = 16, kv_bytes_per_token: int | None = None,
             kv_model: str | None = None, tokens: TokenSpec | None = None,
             exact_cache: bool = False) -> TraceSummary:
    """Summarise `trace`.

    mean_rate = (requests - 1) / span of arrivals (None when all arrive at once); peak rates are
    the most arrivals in any sliding window of 1 s / 60 s, divided by the window. Sharing counts
    prompt tokens an earlier prompt already held (see shared_prompt_tokens). Cacheable tokens
    come from that structure (no token is made: memory follows the request count, never the
    lengths), from the ids a trace carries, or, with exact_cache, from every generated token
    id (prefix_cache.py; refused over MAX_EXACT_TOKENS prompt tokens). KV per request is its
    peak: prompt_len + output_len - 1 tokens (the last sampled token is never fed back).
    """
    check_number("block_size", block_size, 1, integer=True)
    prompt = trace.df["prompt_len"].to_numpy(dtype=np.int64)
    output = trace.df["output_len"].to_numpy(dtype=np.int64)
    per_request = shared_prompt_tokens(trace)
    shared = int(per_request.sum())
    cacheable, method = _cacheable(trace, prompt, per_request, block_size, tokens, exact_cache)
    summary = TraceSummary(
        source=_source(trace.meta), requests=len(trace),
        **_rates(trace.df["arrival_s"].to_numpy()),
        prompt_tokens=int(prompt.sum()), output_tokens=int(output.sum()),
        prompt_len=_stats(prompt), output_len=_stats(output), total_len=_stats(prompt + output),
        prefix_groups=_distinct(trace, "prefix_group"),
        conversations=_distinct(trace, "conversation_id"),
        shared_prompt_tokens=shared, prefix_sharing_ratio=shared / float(prompt.sum()),
        block_size=block_size, cacheable_prompt_tokens=cacheable,
        cacheable_ratio=cacheable / float(prompt.sum()), cacheable_from=method)
    if kv_bytes_per_token is not None:
        _add_kv(summary, prompt + output - 1, kv_bytes_per_token, kv_model, block_size)
    return summary


def _cacheable(trace: Trace, prompt: np.ndarray, shared: np.ndarray, block_size: int,
               tokens: TokenSpec | None, exact: bool) -> tuple[int, str]:
    if trace.has_explicit_tokens:
        return int(cacheable_tokens(explicit_prompts(trace), block_size).sum()), "token ids"
    if not exact:
        return int(cacheable_by_structure(prompt, shared, block_size).sum()), "structure"
    if int(prompt.sum()) > MAX_EXACT_TOKENS:
        raise SpecError("exact_cache", True, f"used on traces of at most {MAX_EXACT_TOKENS:,} "
                        f"prompt tokens (this one has {int(prompt.sum()):,})")
    from workloads.tokens_bulk import all_prompt_token_ids  # makes every token: opt-in only

    return int(cacheable_tokens(all_prompt_token_ids(trace, tokens), block_size).sum()), \
        "generated token ids"


def _rates(arrival: np.ndarray) -> dict[str, Any]:
    span = float(arrival[-1] - arrival[0])
    return {"duration_s": span, "mean_rate": (arrival.size - 1) / span if span > 0 else None,
            "peak_rate_1s": peak_rate(arrival, 1.0), "peak_rate_60s": peak_rate(arrival, 60.0)}


def _distinct(trace: Trace, column: str) -> int:
    values = trace.column(column)
    return int(np.unique(values[values >= 0]).size)


def _add_kv(summary: TraceSummary, kv_tokens: np.ndarray, per_token: int, model: str | None,
            block_size: int) -> None:
    check_number("kv_bytes_per_token", per_token, 1, integer=True)
    summary.kv_bytes_per_token = per_token
    summary.kv_model = model
    summary.kv_bytes_per_request = _stats(kv_tokens * per_token)
    summary.kv_blocks_per_request = _stats(-(-kv_tokens // block_size))


def peak_rate(arrival: np.ndarray, window_s: float) -> float:
    """Most arrivals in any window [t_i, t_i + window_s), divided by window_s."""
    ends = np.searchsorted(arrival, arrival + window_s, side="left")
    return float((ends - np.arange(arrival.size)).max() / window_s)


def shared_prompt_tokens(trace: Trace) -> np.ndarray:
    """Per request: leading prompt tokens that an earlier request's prompt already held, by
    structure (a group prefix seen before; turn k-1's prompt). The previous answer is not
    counted: the engine generates its own tokens there, so no cache can match them."""
    group, plen = trace.column("prefix_group"), trace.column("prefix_len", fill=0)
    conv, turn = trace.column("conversation_id"), trace.column("turn")
    seen_group = np.zeros(len(trace), dtype=bool)
    has_group = np.flatnonzero(group >= 0)
    _, first = np.unique(group[has_group], return_index=True)
    seen_group[has_group] = True
    seen_group[has_group[first]] = False
    shared = np.where(seen_group, plen, 0)
    later = np.flatnonzero((conv >= 0) & (turn > 0))
    if later.size:
        key = {(c, t): r for r, (c, t) in enumerate(zip(conv.tolist(), turn.tolist(),
                                                            strict=True)) if c >= 0}
        prev = np.array([key[(conv[r], turn[r] - 1)] for r in later.tolist()], dtype=np.int64)
        shared[later] = trace.column("prompt_len")[prev]
    return shared


def _stats(values: np.ndarray) -> dict[str, float]:
    pct = np.percentile(values, PERCENTILES)
    out = {f"p{p}": float(v) for p, v in zip(PERCENTILES, pct, strict=True)}
    return {**out, "max": float(values.max()), "mean": float(values.mean())}


def _source(meta: dict[str, Any]) -> str:
    if "preset" in meta:
        return f"preset {meta['preset']['name']} (seed {meta.get('seed', 0)})"
    if "source" in meta:
        return f"{meta['source'].get('kind', 'import')} import of {meta['source'].get('path')}"
    generator = meta.get("generator") or {}
    if generator:
        return f"{generator.get('name', generator.get('builder'))} (seed {meta.get('seed', 0)})"
    return "trace without generator metadata"
