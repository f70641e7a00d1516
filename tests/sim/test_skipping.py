"""Event skipping gives exactly the records of single-stepping."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.core.config import EngineConfig
from engine.core.request import Request
from engine.core.shapes import graph_buckets
from sim.simulator import Simulator
from sim.step_time import CalibratedStepTime

STEP_TIME = CalibratedStepTime(
    decode_coef=np.array([3e-3, 1.7e-5, 3.1e-8]),
    mixed_coef=np.array([4e-3, 2.3e-5, 1.1e-9, 1.9e-5, 2.9e-8, 1e-5]),
    buckets=graph_buckets(8), source="test")
# A v3-style model whose decode time also follows the longest sequence's context.
LONGEST = CalibratedStepTime(
    decode_coef=np.array([3e-3, 1.7e-5, 3.1e-8, 4.3e-6]),
    mixed_coef=np.array([4e-3, 2.3e-5, 1.1e-9, 1.9e-5, 2.9e-8, 1e-5, 2.1e-6]),
    buckets=graph_buckets(8), source="test",
    decode_terms=("const", "padded_batch", "decode_ctx", "decode_max_ctx"),
    mixed_terms=("const", "prefill_tokens", "prefill_attn", "decode_seqs", "decode_ctx",
                 "num_seqs", "decode_max_ctx"))

# A model of a kernel that splits sequences (engine.core.config.DecodeSplit): the longest one's
# share of its splits, a rule small enough to split the batches drawn here.
SHARE = CalibratedStepTime(
    decode_coef=np.array([3e-3, 1.7e-5, 3.1e-8, 4.3e-6]),
    mixed_coef=STEP_TIME.mixed_coef, buckets=graph_buckets(8), source="test",
    decode_terms=("const", "padded_batch", "decode_ctx", "decode_share(2,64,8,4,4)"))
# ... and one whose decodes read a shared cached prefix once (re-reads cost less).
UNIQUE = CalibratedStepTime(
    decode_coef=np.array([3e-3, 1.7e-5, 1.1e-8, 2.9e-8]),
    mixed_coef=STEP_TIME.mixed_coef, buckets=graph_buckets(8), source="test",
    decode_terms=("const", "padded_batch", "decode_ctx", "decode_unique_ctx"))


def simulate(config: EngineConfig, num_blocks: int, requests: list[Request],
             skip: bool, step_time: CalibratedStepTime = STEP_TIME, group_min: int = 32
             ) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, int]]:
    sim = Simulator(config, num_blocks, step_time, skip=skip, group_min=group_min)
    result = sim.run(requests)
    reqs = result.requests
    return reqs, result.steps.to_frame(), result.stats


@st.composite
def scenarios(draw: st.DrawFn):
    block_size = draw(st.sampled_from([1, 2, 4, 16]))
    max_model_len = draw(st.integers(16, 96))
    config = EngineConfig(
        block_size=block_size, max_model_len=max_model_len,
        max_num_seqs=draw(st.integers(1, 8)),
        max_num_batched_tokens=draw(st.integers(max_model_len, 2 * max_model_len)),
        enable_prefix_caching=draw(st.booleans()),
        enable_chunked_prefill=draw(st.booleans()),
        policy=draw(st.sampled_from(["v1", "prefill_first"])),
    ).validate()
    min_blocks = -(-max_model_len // block_size)
    num_blocks = draw(st.integers(min_blocks, 4 * min_blocks))
    n = draw(st.integers(1, 14))
    shared = [9] * 24
    requests = []
    for i in range(n):
        plen = draw(st.integers(0, max_model_len))
        prompt = (shared[: draw(st.integers(0, 24))] + [100 + i] * max_model_len)[:plen]
        arrival = draw(st.sampled_from([0.0, 0.01, 0.05])) * draw(st.integers(0, 40))
        requests.append(Request(i, arrival, prompt, draw(st.integers(1, max_model_len))))
    return config, num_blocks, requests


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(), st.sampled_from([STEP_TIME, LONGEST, SHARE, UNIQUE]))
def test_skipping_matches_single_stepping(scenario, step_time) -> None:
    config, num_blocks, requests = scenario
    reqs_a, steps_a, stats_a = simulate(config, num_blocks, requests, False, step_time)
    reqs_b, steps_b, stats_b = simulate(config, num_blocks, requests, True, step_time)
    assert stats_a["skipped_steps"] == 0
    pd.testing.assert_frame_equal(reqs_a, reqs_b, check_exact=True)
    pd.testing.assert_frame_equal(steps_a, steps_b, check_exact=True)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(), st.sampled_from([STEP_TIME, LONGEST, SHARE, UNIQUE]), st.integers(1, 3))
def test_decode_groups_match_single_stepping(scenario, step_time, group_min) -> None:
    """Groups of as few as `group_min` decodes (the twin's are 32 and more), so that the
    small batches drawn here form them, join to them, finish, preempt and dissolve."""
    config, num_blocks, requests = scenario
    reqs_a, steps_a, stats_a = simulate(config, num_blocks, requests, False, step_time)
    reqs_b, steps_b, _ = simulate(config, num_blocks, requests, True, step_time, group_min)
    assert stats_a["group_steps"] == 0
    pd.testing.assert_frame_equal(reqs_a, reqs_b, check_exact=True)
    pd.testing.assert_frame_equal(steps_a, steps_b, check_exact=True)


def test_decode_groups_run_a_saturated_load() -> None:
    """Requests queue behind a full batch: nearly every step is a group's, with a prefill."""
    config = EngineConfig(block_size=4, max_model_len=256, max_num_seqs=6,
                          max_num_batched_tokens=256).validate()
    requests = [Request(i, 0.001 * i, [7 + i % 3] * (20 + i % 37), 30 + (i * 13) % 50)
                for i in range(300)]  # enough for the group to drop finished members
    reqs_a, steps_a, _ = simulate(config, 400, requests, False)
    reqs_b, steps_b, stats = simulate(config, 400, requests, True, group_min=3)
    assert stats["group_steps"] > 0.5 * len(steps_b)
    assert (steps_b["num_prefill_seqs"] > 0).sum() > 250  # mixed steps among them
    pd.testing.assert_frame_equal(steps_a, steps_b, check_exact=True)
    pd.testing.assert_frame_equal(reqs_a, reqs_b, check_exact=True)


@pytest.mark.parametrize("step_time", [STEP_TIME, LONGEST, SHARE, UNIQUE],
                         ids=["sum", "longest", "share", "unique"])
def test_skipping_really_skips_on_a_long_decode(step_time) -> None:
    config = EngineConfig(block_size=16, max_model_len=2048, max_num_seqs=4).validate()
    requests = [Request(i, 0.1 * i, [i + 5] * 100 * (i + 1), 500) for i in range(4)]
    reqs_a, steps_a, _ = simulate(config, 1000, requests, False, step_time)
    reqs_b, steps_b, stats = simulate(config, 1000, requests, True, step_time)
    assert stats["skipped_steps"] > 0.9 * len(steps_b)
    pd.testing.assert_frame_equal(steps_a, steps_b, check_exact=True)
    pd.testing.assert_frame_equal(reqs_a, reqs_b, check_exact=True)
    assert (reqs_b["output_len"] == 500).all()
