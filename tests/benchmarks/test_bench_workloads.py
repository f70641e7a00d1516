"""Generating traces with token ids (run with --benchmark-enable to time them)."""

from __future__ import annotations

from typing import Any

import pytest

from workloads.arrivals import Poisson
from workloads.build import build_trace
from workloads.lengths import Uniform
from workloads.structure import MultiTurn, SharedPrefix
from workloads.tokens import PromptTokens
from workloads.tokens_bulk import all_prompt_token_ids


def _generate(n: int, structure: str) -> PromptTokens:
    extra: dict[str, Any] = {}
    if structure == "prefix":
        extra["prefix"] = SharedPrefix(64, 512, 1.0)
    elif structure == "chat":
        extra["multi_turn"] = MultiTurn(Uniform(2, 8), think_time_s=10.0)
    trace = build_trace(n=n, arrivals=Poisson(20.0), prompt_lens=Uniform(100, 1024),
                        output_lens=Uniform(100, 1024), seed=0, **extra)
    return all_prompt_token_ids(trace)


@pytest.mark.parametrize("n", [20_000, 100_000])
def test_generate_requests_with_token_ids(benchmark: Any, n: int) -> None:
    prompts = benchmark.pedantic(_generate, args=(n, "plain"), rounds=3, iterations=1)
    assert len(prompts) == n
    assert 100 * n <= prompts.values.size <= 1024 * n


@pytest.mark.parametrize("structure", ["prefix", "chat"])
def test_generate_structured_20k_with_token_ids(benchmark: Any, structure: str) -> None:
    prompts = benchmark.pedantic(_generate, args=(20_000, structure), rounds=3, iterations=1)
    assert len(prompts) == 20_000
