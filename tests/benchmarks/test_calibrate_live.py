"""Live CPU timings: a small calibration of the tiny model fits the steps it measured.

    python -m pytest tests/benchmarks/test_calibrate_live.py --benchmark-enable

The assertion is on real step times, which move with the machine's load: it runs only with
--benchmark-enable (on an idle machine). tests/engine/test_calibrate.py fits synthetic
timings instead.
"""

from __future__ import annotations

import numpy as np
import pytest

from engine.tools.calibrate import calibrate
from sim.profile import heldout_predictions
from tests.engine.test_calibrate import CONFIG, GRID, WORKLOADS


def test_fit_predicts_its_own_live_samples(benchmark) -> None:
    if benchmark.disabled:
        pytest.skip("live timings: run with --benchmark-enable on an idle machine")
    profile = benchmark.pedantic(
        calibrate, args=("tiny_qwen3", CONFIG), rounds=1, iterations=1,
        kwargs=dict(hardware="cpu", samples=GRID, time_budget_s=60, workloads=WORKLOADS,
                    engine_passes=1, verbose=False))
    predicted = heldout_predictions(profile.step_time(), profile.fit_data())
    rel = np.abs(predicted - profile.seconds) / profile.seconds
    benchmark.extra_info["median_rel_err"] = float(np.median(rel))
    assert np.median(rel) < 0.25, f"median relative error {np.median(rel):.2f}"
