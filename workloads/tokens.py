"""Deterministic prompt token ids: the same (trace seed, request) gives the same ids everywhere.

Scheme ("philox-v1"). A prompt is built from *segments*, each a stream of pseudo tokens:

- prefix group g: the first prefix_len tokens of every request of group g;
- request body r: what follows the prefix for request_id r (requests outside conversations);
- conversation c, turn k: the new user tokens of turn k, and the answer tokens of turn k.

Turn k's prompt = turn k-1's prompt + turn k-1's answer (its output_len tokens) + its new user
tokens; turn 0's prompt = group prefix (if any) + its user tokens. The answer tokens are pseudo
tokens too: an engine forced to output_len generates different ones, so a prefix cache can reuse
turn k-1's prompt for turn k, but not its answer.

Segment (kind, key, sub) draws from numpy's Philox4x64-10 bit generator with the 128-bit key
(seed, kind << 56 | key) and counter sub << 64; only raw 64-bit outputs are used (the raw Philox
stream is fixed by the algorithm, unlike Generator methods), each split into two 32-bit halves
(low half first) and mapped to [low, vocab_size) by (u * (vocab_size - low)) >> 32.

To make sharing exact, the first token of a group prefix is low + g mod (vocab_size - low), and the
first token after the prefix is low + r mod (vocab_size - low) (request_id r, or conversation id for
turn 0), so distinct groups and distinct requests of one group differ at a known position whenever
their ids differ by less than vocab_size - low.

Defaults: vocab_size 32000 and low 1000. Every supported vocabulary (Llama 2 / Mistral 32000,
Llama 3 128256, Qwen3 151936) holds [1000, 32000), and it avoids both the low ids where Llama 2 /
Mistral keep special and control tokens and the high ids (>= 128000) where Llama 3 and Qwen do.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from workloads.errors import check_number
from workloads.schema import TOKENS_COLUMN, Trace

DEFAULT_VOCAB_SIZE = 32000
DEFAULT_LOW = 1000
SCHEME = "philox-v1"
KIND_PREFIX, KIND_BODY, KIND_USER, KIND_ANSWER = 1, 2, 3, 4


@dataclass(frozen=True)
class TokenSpec:
    """Token ids are drawn from [low, vocab_size)."""

    vocab_size: int = DEFAULT_VOCAB_SIZE
    low: int = DEFAULT_LOW

    def __post_init__(self) -> None:
        check_number("tokens.vocab_size", self.vocab_size, 2, 1 << 31, integer=True)
        check_number("tokens.low", self.low, 0, self.vocab_size - 1, integer=True)

    @property
    def span(self) -> int:
        return self.vocab_size - self.low

    def to_meta(self) -> dict[str, Any]:
        return {"scheme": SCHEME, "vocab_size": self.vocab_size, "low": self.low}

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> TokenSpec:
        tokens = meta.get("tokens") or {}
        return cls(int(tokens.get("vocab_size", DEFAULT_VOCAB_SIZE)),
                   int(tokens.get("low", DEFAULT_LOW)))


class PhiloxStream:
    """Raw Philox4x64-10 words of segment (kind, key, sub) under one seed.

    Setting the state of one bit generator is ~3x faster than building one per segment and gives
    the same words as Philox(key=[seed, kind << 56 | key], counter=sub << 64).
    """

    def __init__(self, seed: int):
        check_number("seed", seed, 0, (1 << 64) - 1, integer=True)
        self._bits = np.random.Philox(key=np.array([seed, 0], dtype=np.uint64))
        self._state = self._bits.state

    def words(self, kind: int, key: int, sub: int, count: int) -> np.ndarray:
        state = self._state
        state["state"]["key"][1] = (kind << 56) | key
        state["state"]["counter"][:] = (0, sub, 0, 0)
        state["buffer_pos"] = 4
        self._bits.state = state
        return self._bits.random_raw(count)

    def halves(self, kind: int, key: int, sub: int, n: int) -> np.ndarray:
        """n 32-bit values: each word's low half, then its high half (on any byte order)."""
        raw = self.words(kind, key, sub, (n + 1) // 2)
        return raw.astype("<u8", copy=False).view("<u4")[:n]


def to_tokens(halves: np.ndarray, spec: TokenSpec) -> np.ndarray:
    """Map 32-bit values to token ids in [low, vocab_size) (int32)."""
    scaled = (halves.astype(np.uint64) * np.uint64(spec.span)) >> np.uint64(32)
    return (scaled + np.uint64(spec.low)).astype(np.int32)


def segment_tokens(seed: int, kind: int, key: int, sub: int, n: int,
                   spec: TokenSpec) -> np.ndarray:
    """n pseudo tokens (int32) of segment (kind, key, sub) under `seed`."""
    return to_tokens(PhiloxStream(seed).halves(kind, key, sub, n), spec)


@dataclass(frozen=True)
class PromptTokens:
    """All prompts of a trace, ragged: prompt i is values[offsets[i]:offsets[i + 1]]."""

    values: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return self.offsets.size - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i]:self.offsets[i + 1]]

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[i] for i in range(len(self)))

    def row_list(self, i: int) -> list[int]:
        return self[i].tolist()

    def to_lists(self) -> list[list[int]]:
        return [self[i].tolist() for i in range(len(self))]


class PromptPlan:
    """Where each part of each prompt comes from; shared by the per-request and bulk paths."""

    def __init__(self, trace: Trace, spec: TokenSpec | None = None):
        self.seed = trace.seed
        self.spec = spec or TokenSpec.from_meta(trace.meta)
        self.stream = PhiloxStream(self.seed)
        self.ids = trace.df["request_id"].to_numpy(dtype=np.int64)
        self.prompt = trace.df["prompt_len"].to_numpy(dtype=np.int64)
        self.output = trace.df["output_len"].to_numpy(dtype=np.int64)
        self.group = trace.column("prefix_group")
        self.plen = trace.column("prefix_len", fill=0)
        self.conv = trace.column("conversation_id")
        self.turn = trace.column("turn")
        self.prev = self._previous_turns()
        later = self.prev >= 0
        safe_prev = np.where(later, self.prev, 0)
        # Tokens before this row's own tokens: its group prefix, or its whole history.
        self.head = np.where(later, self.prompt[safe_prev] + self.output[safe_prev], self.plen)

    def _previous_turns(self) -> np.ndarray:
        """Row of turn k-1 of the same conversation, or -1."""
        prev = np.full(self.ids.size, -1, dtype=np.int64)
        rows = np.flatnonzero(self.conv >= 0)
        index = {(c, t): r for r, c, t in zip(rows.tolist(), self.conv[rows].tolist(),
                                               self.turn[rows].tolist(), strict=True)}
        for r in rows[self.turn[rows] > 0].tolist():
            prev[r] = index[(int(self.conv[r]), int(self.turn[r]) - 1)]
        return prev

    def own_segment(self, row: int) -> tuple[int, int, int, int | None]:
        """(kind, key, sub, mark) of the tokens this row adds; mark sets its first token."""
        c = int(self.conv[row])
        if c < 0:
            rid = int(self.ids[row])
            return KIND_BODY, rid, 0, rid
        t = int(self.turn[row])
        return KIND_USER, c, t, (c if t == 0 else None)

    def tokens(self, kind: int, key: int, sub: int, n: int, mark: int | None) -> np.ndarray:
        out = to_tokens(self.stream.halves(kind, key, sub, n), self.spec)
        if mark is not None and n:
            out[0] = self.spec.low + mark % self.spec.span
        return out

    def prefix(self, group: int, n: int) -> np.ndarray:
        return self.tokens(KIND_PREFIX, group, 0, n, group)

    def prompt_of(self, row: int) -> np.ndarray:
        chain = [row]  # this turn back to turn 0 (iterative: conversations may be long)
        while self.prev[chain[-1]] >= 0:
            chain.append(int(self.prev[chain[-1]]))
        first = chain[-1]
        if self.group[first] >= 0:
            prompt = self.prefix(int(self.group[first]), int(self.plen[first]))
        else:
            prompt = np.zeros(0, dtype=np.int32)
        for r in reversed(chain):
            prev = int(self.prev[r])
            if prev >= 0:
                prompt = np.concatenate([prompt, self.tokens(
                    KIND_ANSWER, int(self.conv[prev]), int(self.turn[prev]),
                    int(self.output[prev]), None)])
            kind, key, sub, mark = self.own_segment(r)
            own = self.tokens(kind, key, sub, int(self.prompt[r]) - prompt.size, mark)
            prompt = np.concatenate([prompt, own])
        return prompt


def prompt_token_ids(trace: Trace, row: int, spec: TokenSpec | None = None) -> list[int]:
    """Prompt token ids of the request at position `row` of `trace` (0-based, arrival order).

    Explicit ids (a prompt_token_ids column) win; otherwise the philox-v1 scheme above. For many
    requests use `all_prompt_token_ids`, which is vectorised.
    """
    check_number("row", row, 0, len(trace) - 1, integer=True)
    if trace.has_explicit_tokens:
        return np.asarray(trace.df[TOKENS_COLUMN].iloc[row]).tolist()
    return PromptPlan(trace, spec).prompt_of(row).tolist()
