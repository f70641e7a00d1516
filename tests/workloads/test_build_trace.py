"""Composition: arrivals x lengths x prefix / conversation structure, seeded and rebuildable."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from workloads.arrivals import Constant, Gamma, Offline, Poisson, Ramp
from workloads.build import build_trace, regenerate
from workloads.errors import SpecError
from workloads.lengths import Empirical, Fixed, LogNormal, Uniform
from workloads.specs import spec_from_dict, spec_to_dict
from workloads.structure import MultiTurn, SharedPrefix
from workloads.tokens import TokenSpec


def _plain(seed: int = 0, **changes: object) -> pd.DataFrame:
    specs = {"arrivals": Poisson(5.0), "prompt_lens": Uniform(10, 500),
             "output_lens": Uniform(5, 50), **changes}
    return build_trace(n=1000, seed=seed, **specs).df


def test_ids_follow_arrival_order_and_n_is_exact() -> None:
    df = _plain()
    assert len(df) == 1000
    assert df["request_id"].tolist() == list(range(1000))
    assert df["arrival_s"].is_monotonic_increasing


def test_components_draw_from_independent_streams() -> None:
    base, other_output = _plain(), _plain(output_lens=LogNormal(100, 400))
    assert base["arrival_s"].equals(other_output["arrival_s"])
    assert base["prompt_len"].equals(other_output["prompt_len"])
    assert not base["output_len"].equals(other_output["output_len"])
    assert not base["arrival_s"].equals(_plain(seed=1)["arrival_s"])


def test_shared_prefix_groups_follow_zipf() -> None:
    prefix = SharedPrefix(num_groups=6, prefix_len=100, zipf_s=1.2)
    trace = build_trace(n=6000, arrivals=Offline(), prompt_lens=Uniform(1, 20),
                        output_lens=Fixed(1), prefix=prefix, seed=3)
    counts = np.bincount(trace.column("prefix_group"), minlength=6)
    assert stats.chisquare(counts, prefix.popularity() * 6000).pvalue > 1e-3
    assert counts[0] > counts[5] * 5  # (6)^1.2 ~ 8.6 times as popular
    suffix = trace.df["prompt_len"] - 100
    assert suffix.min() >= 1 and suffix.max() <= 20
    assert (trace.df["prefix_len"] == 100).all()


def test_uniform_popularity_when_s_is_zero() -> None:
    assert SharedPrefix(4, 10, 0.0).popularity().tolist() == [0.25] * 4


@pytest.fixture(scope="module")
def chat_df() -> pd.DataFrame:
    chat = MultiTurn(Uniform(1, 6), think_time_s=7.0, think_time="fixed")
    return build_trace(n=500, arrivals=Poisson(0.5), prompt_lens=Uniform(5, 80),
                       output_lens=Uniform(5, 60), prefix=SharedPrefix(3, 32),
                       multi_turn=chat, seed=4).df


def test_conversations_are_well_formed(chat_df: pd.DataFrame) -> None:
    assert len(chat_df) == 500
    for _, turns in chat_df.groupby("conversation_id"):
        turns = turns.sort_values("turn")
        assert turns["turn"].tolist() == list(range(len(turns)))
        assert np.allclose(np.diff(turns["arrival_s"]), 7.0)  # fixed think time
        prompt, output = turns["prompt_len"].to_numpy(), turns["output_len"].to_numpy()
        user = prompt[1:] - prompt[:-1] - output[:-1]
        assert (user >= 5).all() and (user <= 80).all()
        assert 32 + 5 <= prompt[0] <= 32 + 80
        assert turns["prefix_group"].nunique() == 1


def test_conversation_turn_counts_follow_their_spec(chat_df: pd.DataFrame) -> None:
    counts = chat_df.groupby("conversation_id").size()
    assert counts.max() <= 6 and counts.min() >= 1
    assert abs(counts.iloc[:-1].mean() - 3.5) < 5 * np.sqrt(35 / 12 / (len(counts) - 1))


def test_max_model_len_ends_conversations_early() -> None:
    chat = MultiTurn(Fixed(20), think_time_s=1.0, max_model_len=600)
    df = build_trace(n=300, arrivals=Constant(1.0), prompt_lens=Uniform(20, 60),
                     output_lens=Uniform(20, 60), multi_turn=chat, seed=5).df
    assert ((df["prompt_len"] + df["output_len"]) <= 600).all()
    assert df.groupby("conversation_id").size().max() < 20


def test_impossible_max_model_len_is_reported() -> None:
    chat = MultiTurn(Fixed(2), max_model_len=50)
    with pytest.raises(SpecError, match=r"MultiTurn.max_model_len=50 .*\(only 0 do\)"):
        build_trace(n=10, arrivals=Offline(), prompt_lens=Fixed(100), output_lens=Fixed(10),
                    multi_turn=chat)


ALL_SPECS = [Poisson(2.0), Gamma(1.0, 0.5), Constant(3.0), Offline(), Ramp(((5, 1.0), (5, 2.0))),
             Fixed(4), Uniform(1, 9), LogNormal(50, 200, 2, 900), Empirical((1, 5, 5)),
             SharedPrefix(3, 12, 0.7), MultiTurn(Uniform(1, 3), 2.5, "fixed", 4096)]


@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: type(s).__name__)
def test_specs_survive_json(spec: object) -> None:
    import json

    assert spec_from_dict(json.loads(json.dumps(spec_to_dict(spec)))) == spec


def test_metadata_rebuilds_the_trace() -> None:
    trace = build_trace(n=200, arrivals=Ramp(((10, 5.0), (10, 15.0))),
                        prompt_lens=Empirical((30, 40, 90)), output_lens=LogNormal(20, 80),
                        prefix=SharedPrefix(4, 16), multi_turn=MultiTurn(Uniform(1, 4)),
                        seed=77, tokens=TokenSpec(5000, 10), name="mine")
    assert trace.meta["seed"] == 77 and trace.meta["generator"]["name"] == "mine"
    assert trace.meta["tokens"] == {"scheme": "philox-v1", "vocab_size": 5000, "low": 10}
    assert regenerate(trace.meta).equals(trace)


def test_bad_n_and_seed_are_named() -> None:
    with pytest.raises(SpecError, match="n=0 is invalid"):
        build_trace(n=0, arrivals=Offline(), prompt_lens=Fixed(1), output_lens=Fixed(1))
    with pytest.raises(SpecError, match="seed=-1 is invalid"):
        build_trace(n=1, arrivals=Offline(), prompt_lens=Fixed(1), output_lens=Fixed(1),
                    seed=-1)
    with pytest.raises(SpecError, match="meta.generator"):
        regenerate({"seed": 0, "source": {"kind": "azure"}})
