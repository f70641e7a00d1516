"""Prompt structure specs: shared system prompts and multi-turn conversations."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from workloads.errors import SpecError, check_number
from workloads.lengths import LengthSpec, Uniform
from workloads.schema import MAX_LEN
from workloads.specs import register


@register
@dataclass(frozen=True)
class SharedPrefix:
    """num_groups system prompts of prefix_len tokens; group g (0 = most popular) is picked with
    probability proportional to 1 / (g + 1) ** zipf_s (zipf_s 0 = uniform).

    The prompt-length spec then gives the tokens *after* the prefix.
    """

    num_groups: int
    prefix_len: int
    zipf_s: float = 1.0

    def __post_init__(self) -> None:
        check_number("SharedPrefix.num_groups", self.num_groups, 1, integer=True)
        check_number("SharedPrefix.prefix_len", self.prefix_len, 1, MAX_LEN - 1, integer=True)
        check_number("SharedPrefix.zipf_s", self.zipf_s, 0)

    def popularity(self) -> np.ndarray:
        weights = np.arange(1, self.num_groups + 1, dtype=np.float64) ** -self.zipf_s
        return weights / weights.sum()

    def sample_groups(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return rng.choice(self.num_groups, size=n, p=self.popularity()).astype(np.int64)


@register
@dataclass(frozen=True)
class MultiTurn:
    """Conversations: turn k's prompt = turn k-1's prompt + its answer + new user tokens.

    With this spec, `arrivals` times conversation starts; turn k arrives think time after turn
    k-1 *arrived* (open loop: a trace cannot know when the answer finished). The prompt-length
    spec gives each turn's new user tokens, the output-length spec each answer. A conversation
    stops before the turn whose prompt + answer would exceed max_model_len (if set).
    """

    turns: LengthSpec = field(default_factory=lambda: Uniform(2, 6))
    think_time_s: float = 10.0
    think_time: Literal["exponential", "fixed"] = "exponential"
    max_model_len: int | None = None

    def __post_init__(self) -> None:
        check_number("MultiTurn.think_time_s", self.think_time_s, 0)
        if self.think_time not in ("exponential", "fixed"):
            raise SpecError("MultiTurn.think_time", self.think_time, "'exponential' or 'fixed'")
        if self.max_model_len is not None:
            check_number("MultiTurn.max_model_len", self.max_model_len, 2, MAX_LEN, integer=True)

    def sample_think(self, n: int, rng: np.random.Generator) -> np.ndarray:
        if self.think_time == "fixed" or self.think_time_s == 0:
            return np.full(n, float(self.think_time_s))
        return rng.exponential(self.think_time_s, n)
