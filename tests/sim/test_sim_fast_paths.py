"""The simulator's fast paths equal their plain definitions: stand-in tokens, decode runs
predicted in one pass, the compact step log, runs planned across several finishes, the
paused GC, a finished simulator freed without it."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pandas as pd
import pytest

from engine.core.catalog import load_hardware, load_model
from engine.core.config import EngineConfig
from engine.core.features import decode_run_features
from engine.core.records import StepRecord
from engine.core.request import Request
from engine.core.shapes import graph_buckets
from sim.simulator import Simulator, gc_paused
from sim.stand_in import fake_tokens
from sim.step_log import DecodeRunSteps, StepLog
from sim.step_time import CalibratedStepTime, DecodeRun, RooflineStepTime


@pytest.mark.parametrize(("index", "position", "count"),
                         [(0, 0, 1), (7, 99_990, 25), (123_456, 5, 300), (3, 1, 250_000)])
def test_fake_tokens_follow_their_formula(index: int, position: int, count: int) -> None:
    positions = np.arange(position, position + count, dtype=np.int64)
    expected = (1000 + (index * 1_000_003 + positions * 7919) % 100_000).tolist()
    assert fake_tokens(index, position, count).tolist() == expected


def step_time_models() -> list:
    hw = load_hardware("h100_80gb")
    roofline = RooflineStepTime(load_model("qwen3_0_6b"), "bfloat16", hw.peak_bf16_flops,
                                hw.hbm_bandwidth_bytes_per_s, source="test")
    calibrated = CalibratedStepTime(np.array([3e-3, 1.7e-5, 3.1e-8]),
                                    np.array([4e-3, 2.3e-5, 1.1e-9, 1.9e-5, 2.9e-8, 1e-5]),
                                    graph_buckets(64), source="test")
    return [roofline, calibrated]


@pytest.mark.parametrize("model", step_time_models(), ids=["roofline", "calibrated"])
def test_decode_runs_equal_predicting_their_steps(model) -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        n, k = int(rng.integers(1, 70)), int(rng.integers(1, 900))
        ctx = int(rng.integers(n, 40 * n * 1024))
        direct = model.predict(decode_run_features(n, ctx, k), 0)
        assert np.array_equal(model.decode_run(DecodeRun(n, ctx, k)), direct)


def row(step: int, start: float, end: float, waiting: int = 0, used: int = 3) -> StepRecord:
    return StepRecord(step, start, end, 40, 38, 1, 2, 3, waiting, used, 10 - used, 0)


def test_the_step_log_expands_runs_into_the_rows_of_their_steps() -> None:
    log, rows = StepLog(), []
    for record in (row(0, 0.0, 0.5), row(1, 0.7, 1.0, waiting=2)):
        log.append(record)
        rows.append(record)
    ends = np.array([1.25, 1.5, 1.75, 2.0])
    log.add_decode_run(DecodeRunSteps(1.0, ends, 2, 2, [1, 1, 3], 3, [0, 2], 10))
    waiting, used, start = [2, 4, 4, 5], [4, 4, 5, 5], [1.0, 1.25, 1.5, 1.75]
    for j in range(4):
        rows.append(StepRecord(2 + j, start[j], float(ends[j]), 2, 0, 0, 2, 2, waiting[j],
                               used[j], 10 - used[j], 0))
    log.append(row(6, 2.0, 2.5))
    rows.append(row(6, 2.0, 2.5))
    expected = pd.DataFrame([r.to_dict() for r in rows])
    pd.testing.assert_frame_equal(log.to_frame(), expected, check_exact=True)
    assert len(StepLog().to_frame()) == 0


def test_one_run_is_planned_across_several_finishes() -> None:
    """Three decodes finishing at different steps, nothing arriving: one plan, three
    segments, each ended by a step through the Scheduler; records as single-stepping's."""
    config = EngineConfig(block_size=16, max_model_len=1024, max_num_seqs=4).validate()
    requests = [Request(i, 0.0, [i + 5] * 40, 100 * (i + 1)) for i in range(3)]
    model = step_time_models()[1]
    runs = {skip: Simulator(config, 200, model, skip=skip).run(requests) for skip in (0, 1)}
    stats = runs[1].stats
    assert stats["decode_runs"] == 1 and stats["skip_runs"] == 3
    pd.testing.assert_frame_equal(runs[0].steps.to_frame(), runs[1].steps.to_frame(),
                                  check_exact=True)


def test_gc_is_paused_inside_and_restored_after() -> None:
    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()


def test_a_finished_run_is_freed_without_the_cyclic_gc() -> None:
    """Nothing the simulator hands out (its scheduler keeps the stand-in tokens for its decode
    groups) points back at it: a cycle would keep a long run's tables in memory until the
    collector ran, past the peak of what follows the run (1M requests: +140 MiB)."""
    config = EngineConfig(block_size=4, max_model_len=256, max_num_seqs=6,
                          max_num_batched_tokens=256).validate()
    requests = [Request(i, 0.001 * i, [7] * 30, 40) for i in range(60)]
    sim = Simulator(config, 400, step_time_models()[1], group_min=3)
    result = sim.run(requests)
    assert result.stats["group_steps"] > 0
    with gc_paused():
        ref = weakref.ref(sim)
        del sim, result
        assert ref() is None
