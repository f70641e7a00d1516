"""The compiled step-time models give the same floats on every path: many steps at once
(`predict`), one step in plain Python (`step`) and a run of decode steps (`decode_run`)."""

from __future__ import annotations

from dataclasses import fields

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.core.config import EngineConfig
from engine.core.features import StepFeatures, StepRow
from engine.core.shapes import DecodeSplit
from sim.profile import PROFILE_DIR, ProfileKey, find_profile
from sim.step_terms import compile_term, share_staircase
from sim.step_time import DecodeRun, RooflineStepTime, StepTimeModel
from sim.twin import profile_step_time, setup_twin

PROFILES = [("h100_80gb", "qwen3_0_6b", "bfloat16", "torch"),
            ("h200_141gb", "qwen3_0_6b", "bfloat16", "torch"),
            ("cpu", "tiny_qwen3", "float32", "sdpa")]


def models() -> list[StepTimeModel]:
    out: list[StepTimeModel] = []
    for key in PROFILES:
        profile = find_profile(ProfileKey(*key), PROFILE_DIR)
        assert profile is not None, key
        out += [profile.step_time(), profile_step_time(profile, EngineConfig())]
    out.append(setup_twin("qwen3_0_6b", "h100_80gb", EngineConfig(), "roofline").step_time)
    return out


MODELS = models()
IDS = ["h100", "h100@512", "h200", "h200@512", "cpu", "cpu@512", "roofline"]


def as_features(rows: list[StepRow]) -> StepFeatures:
    names = [f.name for f in fields(StepFeatures)]
    return StepFeatures(*(np.array([getattr(r, n) for r in rows], dtype=np.int64)
                          for n in names))


@st.composite
def step_rows(draw: st.DrawFn) -> StepRow:
    decodes = draw(st.integers(0, 300))
    prefill = draw(st.sampled_from([0, 0, 1, 7, 64, 500, 513, 4096, 9000]))
    prefills = min(prefill, draw(st.integers(1, 4))) if prefill else 0
    decodes = max(decodes, 1) if not prefill else decodes
    ctx = decodes * draw(st.integers(1, 40_000)) if decodes else 0
    longest = -(-ctx // decodes) + draw(st.integers(0, 5000)) if decodes else 0
    start = draw(st.integers(0, 20_000))
    attn = prefill * start + prefill * (prefill + 1) // 2
    gather = draw(st.sampled_from([0, prefill + start]))
    shared = draw(st.integers(0, ctx // 2)) if decodes > 1 else 0
    return StepRow(prefill, attn, decodes, ctx, decodes + prefills, longest, gather, shared)


@pytest.mark.parametrize("model", MODELS, ids=IDS)
@settings(max_examples=300, deadline=None)
@given(rows=st.lists(step_rows(), min_size=1, max_size=8))
def test_one_step_equals_predicting_it_among_others(model, rows) -> None:
    vectorised = model.predict(as_features(rows))
    assert [model.step(r, 0) for r in rows] == vectorised.tolist()


@pytest.mark.parametrize("model", MODELS, ids=IDS)
@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 300), per_seq=st.integers(1, 30_000), k=st.integers(1, 600),
       longer=st.one_of(st.none(), st.integers(0, 9000)), shared=st.integers(0, 50_000))
def test_a_decode_run_equals_predicting_its_steps(model, n, per_seq, k, longer,
                                                  shared) -> None:
    longest = None if longer is None else per_seq + longer
    run = DecodeRun(n, n * per_seq, k, longest, min(shared, n * per_seq))
    assert np.array_equal(model.decode_run(run), model.predict(run.features()))


def test_a_term_name_compiles_once_to_its_type_and_an_unknown_one_is_named() -> None:
    assert type(compile_term("decode_ctx>4096", None)).__name__ == "Hinge"
    assert compile_term("batch_knot(16,32,48)", [1, 16, 32, 48]).batch_only
    with pytest.raises(ValueError, match="'decode_ctz' is invalid"):
        compile_term("decode_ctz", None)


def test_the_roofline_reads_neither_the_longest_nor_the_shared_keys() -> None:
    roofline = [m for m in MODELS if isinstance(m, RooflineStepTime)][0]
    assert not roofline.reads_longest and not roofline.reads_shared
    assert MODELS[0].reads_longest and MODELS[0].reads_shared  # the H100 profile's terms


@settings(max_examples=300, deadline=None)
@given(heads=st.integers(1, 16), target=st.sampled_from([64, 512, 1024]),
       max_splits=st.sampled_from([1, 4, 16]), min_share=st.integers(1, 512),
       block_n=st.sampled_from([8, 16, 64]), batch=st.integers(1, 300),
       longest=st.lists(st.integers(1, 200_000), min_size=1, max_size=20))
def test_the_share_staircase_is_the_kernel_rule(heads: int, target: int, max_splits: int,
                                                min_share: int, block_n: int, batch: int,
                                                longest: list[int]) -> None:
    split = DecodeSplit(heads, target, max_splits, min_share, block_n)
    got = share_staircase(split, np.array(longest, dtype=np.int64), split.splits(batch))
    assert got.tolist() == [split.longest_share(m, batch) for m in longest]
