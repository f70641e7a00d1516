"""Presets: nano-vllm's bench reproduced draw for draw; every preset valid and rebuildable."""

from __future__ import annotations

import random

import numpy as np
import pytest

from workloads.build import regenerate
from workloads.errors import SpecError
from workloads.presets import PRESETS, make_preset, preset_params


def test_nanovllm_bench_totals() -> None:
    trace = make_preset("nanovllm_bench")
    df = trace.df
    assert len(df) == 256
    assert int(df["prompt_len"].sum()) == 142_827
    assert int(df["output_len"].sum()) == 133_966
    assert (df["arrival_s"] == 0).all()
    assert df["prompt_len"].between(100, 1024).all() and df["output_len"].between(100, 1024).all()


def test_nanovllm_bench_token_ids_are_bench_py_draws() -> None:
    trace = make_preset("nanovllm_bench", n=3)
    rng = random.Random(0)
    first = [rng.randint(0, 10000) for _ in range(rng.randint(100, 1024))]
    assert trace.df["prompt_token_ids"].iloc[0].tolist() == first
    assert trace.has_explicit_tokens


@pytest.mark.parametrize("name", [n for n in PRESETS if n != "azure_conv"])
def test_each_preset_is_valid_and_rebuilds_from_its_metadata(name: str) -> None:
    trace = make_preset(name, seed=3)
    assert trace.meta["preset"]["name"] == name
    assert trace.meta["preset"]["params"]["seed"] == 3
    assert regenerate(trace.meta).equals(trace)


def test_azure_preset_is_a_window(azure_path: object) -> None:
    trace = make_preset("azure_conv", path=str(azure_path), duration_s=120, rate_scale=4.0)
    assert trace.df["arrival_s"].max() < 30
    assert regenerate(trace.meta).equals(trace)


def test_overrides_are_applied_and_recorded() -> None:
    trace = make_preset("poisson_chat", n=50, rate=100.0)
    assert len(trace) == 50
    assert trace.meta["preset"]["params"] == {"n": 50, "rate": 100.0, "seed": 0}
    assert trace.df["arrival_s"].iloc[-1] < 2.0


def test_ramp_covers_its_stages() -> None:
    trace = make_preset("ramp")
    assert len(trace) == 30 * (2 + 4 + 6 + 8 + 10 + 12 + 14 + 16)
    last = trace.df["arrival_s"].iloc[-1]
    assert 220 < last < 260  # 8 stages of 30 s
    late = (trace.df["arrival_s"] >= 210).sum()
    assert abs(late - 16 * 30) < 5 * np.sqrt(16 * 30) + 10


def test_shared_prefix_and_multi_turn_presets_share_prompts() -> None:
    assert make_preset("shared_prefix", n=100).has_prefix
    chat = make_preset("multi_turn", n=200)
    assert chat.has_conversations and chat.df["turn"].max() >= 1


def test_unknown_names_are_rejected() -> None:
    with pytest.raises(SpecError, match="preset='chat' .* one of nanovllm_bench"):
        make_preset("chat")
    with pytest.raises(SpecError, match="ramp.rate=3 .* one of start_rate"):
        preset_params("ramp", rate=3)
