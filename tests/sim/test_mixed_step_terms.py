"""The sim's side of the engine's CUDA graphs for mixed steps: the rows a mixed step runs, the
step-time terms over them, and the graph memory at another token limit than the profile's."""

from __future__ import annotations

import numpy as np
import pytest

from engine.core.catalog import load_hardware, load_model
from engine.core.config import ConfigError, EngineConfig
from engine.core.features import StepFeatures
from engine.core.shapes import token_buckets
from sim.memory_model import mixed_graph_bytes, predict_memory
from sim.profile import Profile, ProfileKey
from sim.step_terms import design_matrix, mixed_terms, padded_tokens, term_column
from sim.step_time import CalibratedStepTime, fit_nonnegative


def test_token_buckets_step_up_as_the_count_grows() -> None:
    buckets = token_buckets(4096)
    assert buckets[:9] == [64, 128, 192, 256, 320, 384, 448, 512, 640]
    assert buckets[-3:] == [3072, 3584, 4096]
    steps, edges = np.diff(buckets), np.asarray(buckets[:-1])
    assert (steps[edges >= 512] / edges[edges >= 512] <= 1 / 4).all()  # padding <= 1/4
    assert token_buckets(100) == [64, 100] and token_buckets(0) == []


def test_engine_config_checks_the_token_limit() -> None:
    with pytest.raises(ConfigError, match=r"max_cudagraph_tokens=-1 is invalid.*\[0, 16384\]"):
        EngineConfig(max_cudagraph_tokens=-1).validate()
    assert EngineConfig(max_cudagraph_tokens=4096, max_num_batched_tokens=1024) \
        .cudagraph_token_limit == 1024
    assert EngineConfig(enforce_eager=True).cudagraph_token_limit == 0


def test_padded_tokens_are_the_bucket_then_multiples_of_64() -> None:
    n = np.arange(1, 6001)
    rows = padded_tokens(n, 2048)
    edges = np.asarray(token_buckets(2048))
    inside = n <= 2048
    expected = edges[np.searchsorted(edges, n[inside])]
    assert np.array_equal(rows[inside], expected)
    assert np.array_equal(rows[~inside], -(-n[~inside] // 64) * 64)
    assert np.array_equal(padded_tokens(n, 0), -(-n // 64) * 64)


def mixed(tokens: np.ndarray) -> StepFeatures:
    t = np.asarray(tokens, dtype=np.int64)
    zeros = np.zeros(len(t), dtype=np.int64)
    return StepFeatures(t, t * (t + 1) // 2, zeros, zeros.copy(), np.ones(len(t), np.int64))


def test_bucket_and_eager_terms_fit_what_token_hinges_cannot() -> None:
    """A step costs its bucket's rows (graphs) and a fixed host cost once it runs eagerly:
    steps in the padded terms fit it; the unpadded hinges miss by far more."""
    rng = np.random.default_rng(0)
    f = mixed(rng.integers(1, 8193, 3000))
    seconds = 2e-3 + 2e-6 * padded_tokens(f.num_tokens, 4096) + 8e-3 * (f.num_tokens > 4096)

    def worst(limit: int) -> float:
        terms = mixed_terms(8192, token_limit=limit)
        x = design_matrix(f, terms, None)
        return float(np.abs(x @ fit_nonnegative(x, seconds) / seconds - 1).max())

    assert "eager(4096)" in mixed_terms(8192, token_limit=4096)
    assert not any(t.startswith("eager") for t in mixed_terms(4096, token_limit=4096))
    assert worst(4096) < 1e-6
    assert worst(0) > 0.05


def test_a_fit_reads_another_configurations_token_limit() -> None:
    terms = mixed_terms(8192, token_limit=4096)
    model = CalibratedStepTime(np.ones(3), np.ones(len(terms)), None, "test",
                               mixed_terms=terms)
    assert model.token_limit == 4096
    moved = model.with_token_limit(512)
    assert moved.token_limit == 512
    assert "padded_tokens(512)>256" in moved.mixed_terms and "eager(512)" in moved.mixed_terms
    f = mixed(np.array([1000]))
    assert term_column(f, "eager(512)", None)[0] == 1.0
    assert term_column(f, "eager(4096)", None)[0] == 0.0
    assert moved.predict(f)[0] != model.predict(f)[0]
    old = CalibratedStepTime(np.ones(3), np.ones(2), None, "test",
                             mixed_terms=("const", "num_tokens"))
    assert old.token_limit is None


def test_profiles_name_their_token_limit() -> None:
    key = ProfileKey("h", "m", "bfloat16", "torch")
    assert Profile(key, {}).cudagraph_token_limit == 0
    assert Profile(key, {}, meta={"cudagraph_token_limit": 4096}).cudagraph_token_limit == 4096
    with pytest.raises(ValueError, match="cudagraph_token_limit='big' is invalid"):
        _ = Profile(key, {}, meta={"cudagraph_token_limit": "big"}).cudagraph_token_limit


def test_graph_memory_at_another_token_limit_moves_by_the_formula() -> None:
    model, hardware = load_model("qwen3_0_6b"), load_hardware("h100_80gb")
    memory = {"total_bytes": 80 << 30, "non_torch_bytes": 1 << 28, "activation": [[8192, 1 << 30]],
              "cuda_graph_bytes": 200 << 20, "cuda_graph_tokens": 4096}
    profile = Profile(ProfileKey("h100_80gb", "qwen3_0_6b", "bfloat16", "torch"), {},
                      memory=memory)

    def graph(config: EngineConfig) -> tuple[int, str]:
        prediction = predict_memory(model, hardware, config, profile)
        return prediction.terms.cuda_graph_bytes, prediction.sources["cuda_graph"]

    assert graph(EngineConfig(max_cudagraph_tokens=4096)) == (200 << 20, "profile h100_80gb__"
                                                              "qwen3_0_6b__bfloat16__torch")
    config = EngineConfig(max_cudagraph_tokens=512)
    smaller, source = graph(config)
    delta = mixed_graph_bytes(model, config, 4096) - mixed_graph_bytes(model, config, 512)
    assert smaller == (200 << 20) - delta and "512 tokens by formula" in source
    assert graph(EngineConfig(enforce_eager=True)) == (0, "enforce_eager")
    del memory["cuda_graph_tokens"]  # a profile from before mixed-step graphs: as measured
    assert graph(EngineConfig(max_cudagraph_tokens=512))[0] == 200 << 20
