"""describe(): rates, percentiles, structural sharing, cacheable tokens, KV per request."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from workloads.arrivals import Offline, Poisson
from workloads.build import build_trace
from workloads.describe import describe, peak_rate, shared_prompt_tokens
from workloads.errors import SpecError
from workloads.lengths import Fixed, Uniform
from workloads.models import model_kv_bytes_per_token
from workloads.prefix_cache import cacheable_tokens
from workloads.schema import Trace
from workloads.structure import MultiTurn, SharedPrefix
from workloads.summary_text import format_summary
from workloads.tokens import PromptTokens
from workloads.tokens_bulk import all_prompt_token_ids
from workloads.validate import make_trace


def test_azure_summary(azure_trace: Trace) -> None:
    s = describe(azure_trace, block_size=16, kv_bytes_per_token=1000)
    assert s.requests == 19_366 and s.prompt_len["p50"] == 1020
    assert s.duration_s == pytest.approx(3501.72, abs=0.01)
    assert s.mean_rate == pytest.approx(19_365 / s.duration_s)
    assert s.peak_rate_1s >= s.peak_rate_60s >= s.mean_rate * 0.9
    total = azure_trace.df["prompt_len"] + azure_trace.df["output_len"]
    assert s.total_len["max"] == total.max()
    assert s.kv_bytes_per_request["p50"] == np.percentile(total - 1, 50) * 1000
    assert s.kv_blocks_per_request["max"] == -(-(total.max() - 1) // 16)
    # No prompt contents in the Azure trace: every request's tokens are its own.
    assert s.shared_prompt_tokens == 0 and s.cacheable_prompt_tokens == 0


def test_peak_rate_uses_the_busiest_sliding_window() -> None:
    arrivals = np.array([0.0, 5.2, 5.4, 5.9, 6.1, 6.15, 20.0])
    assert peak_rate(arrivals, 1.0) == 5.0  # [5.2, 6.2)
    assert peak_rate(arrivals, 60.0) == pytest.approx(7 / 60)


def test_offline_trace_has_no_mean_rate() -> None:
    trace = build_trace(n=8, arrivals=Offline(), prompt_lens=Fixed(4), output_lens=Fixed(2))
    s = describe(trace)
    assert s.mean_rate is None and s.peak_rate_1s == 8.0 and s.duration_s == 0.0
    assert "all at t=0" in format_summary(s)


def test_prefix_groups_cache_exactly_their_full_blocks() -> None:
    # prefix 70 = 4 full blocks of 16 + 6 tokens: the 5th block mixes prefix and own tokens.
    trace = build_trace(n=500, arrivals=Poisson(50.0), prompt_lens=Uniform(1, 100),
                        output_lens=Fixed(3), prefix=SharedPrefix(7, 70, 1.0), seed=9)
    used_groups = trace.df["prefix_group"].nunique()
    s = describe(trace, block_size=16)
    assert s.cacheable_prompt_tokens == (500 - used_groups) * 64
    assert s.shared_prompt_tokens == (500 - used_groups) * 70
    assert s.prefix_groups == used_groups


def test_never_the_whole_prompt() -> None:
    same = np.arange(1000, 1032, dtype=np.int32)
    prompts = PromptTokens(np.concatenate([same, same, same[:20]]),
                           np.array([0, 32, 64, 84]))
    assert cacheable_tokens(prompts, 16).tolist() == [0, 16, 16]
    assert cacheable_tokens(prompts, 1).tolist() == [0, 31, 19]


def test_blocks_match_only_with_their_whole_prefix() -> None:
    a = np.arange(1000, 1048, dtype=np.int32)
    b = a.copy()
    b[3] = 7  # first block differs, second and third are equal but their parent is not
    prompts = PromptTokens(np.concatenate([a, b, a]), np.array([0, 48, 96, 144]))
    assert cacheable_tokens(prompts, 16).tolist() == [0, 0, 32]


def test_multi_turn_caches_the_previous_prompt_not_its_answer() -> None:
    chat = MultiTurn(Uniform(2, 5), think_time_s=4.0)
    trace = build_trace(n=300, arrivals=Poisson(0.5), prompt_lens=Uniform(5, 90),
                        output_lens=Uniform(5, 90), multi_turn=chat, seed=12)
    per_request = cacheable_tokens(all_prompt_token_ids(trace), 16)
    shared = shared_prompt_tokens(trace)
    prompt = trace.df["prompt_len"].to_numpy()
    assert np.array_equal(per_request, np.minimum(shared // 16, (prompt - 1) // 16) * 16)
    assert (shared[trace.df["turn"].to_numpy() > 0] > 0).all()


def test_kv_from_a_model_name() -> None:
    assert model_kv_bytes_per_token("qwen3-0.6b") == 2 * 28 * 8 * 128 * 2
    assert model_kv_bytes_per_token("Qwen3-0.6B", "float32") == 2 * 28 * 8 * 128 * 4
    with pytest.raises(SpecError, match="model='gpt-9'"):
        model_kv_bytes_per_token("gpt-9")
    with pytest.raises(SpecError, match="dtype='int3'"):
        model_kv_bytes_per_token("qwen3-0.6b", "int3")


def test_kv_from_an_hf_config_path(tmp_path: Path) -> None:
    import json

    config = {"architectures": ["LlamaForCausalLM"], "vocab_size": 32000, "hidden_size": 256,
              "intermediate_size": 512, "num_hidden_layers": 3, "num_attention_heads": 4,
              "num_key_value_heads": 2}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert model_kv_bytes_per_token(str(tmp_path)) == 2 * 3 * 2 * 64 * 2


def test_summary_text_and_dict() -> None:
    trace = make_trace(pd.DataFrame({"request_id": [0, 1], "arrival_s": [0.0, 2.0],
                                     "prompt_len": [10, 30], "output_len": [5, 7]}))
    s = describe(trace, kv_bytes_per_token=2048, kv_model="toy")
    text = format_summary(s)
    assert "requests        2 over 2.0 s" in text and "toy, 2,048 B/token" in text
    assert s.to_dict()["prompt_len"]["max"] == 30.0
    with pytest.raises(SpecError, match="block_size=0"):
        describe(trace, block_size=0)


@pytest.mark.parametrize("name", ["shared_prefix", "multi_turn"])
def test_cacheable_from_structure_equals_the_token_ids(name: str) -> None:
    from workloads.presets import make_preset

    trace = make_preset(name, n=120, seed=5)
    by_structure = describe(trace, block_size=16)
    exact = describe(trace, block_size=16, exact_cache=True)
    assert by_structure.cacheable_from == "structure"
    assert exact.cacheable_from == "generated token ids"
    assert by_structure.cacheable_prompt_tokens == exact.cacheable_prompt_tokens > 0


def test_exact_cache_is_refused_on_huge_traces(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    module = importlib.import_module("workloads.describe")  # the package's `describe` shadows it
    monkeypatch.setattr(module, "MAX_EXACT_TOKENS", 100)
    trace = build_trace(n=8, arrivals=Offline(), prompt_lens=Fixed(40), output_lens=Fixed(2))
    with pytest.raises(SpecError, match="exact_cache=True .* at most 100 prompt tokens"):
        describe(trace, exact_cache=True)
    assert describe(trace).cacheable_prompt_tokens == 0
