"""The committed validation steps with their compositions (the twin replays each point's
measured durations), against the profile: bias per class, point speeds, serving overhead."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from reports.validation.accuracy import VALIDATION_DIR, load_set
from reports.validation.steps import (
    WARMUP,
    class_bias,
    serving_overhead,
    set_steps,
    speed_spread,
    write_overhead_profiles,
)
from sim.profile import Profile

CPU = VALIDATION_DIR / "cpu_tiny_qwen3"


@pytest.fixture(scope="module")
def points():
    return set_steps(str(CPU))


def test_replays_recover_the_compositions_of_the_measured_steps(points) -> None:
    vset = load_set(CPU)
    started = [p for p in vset.points if p["real"]["starts"]]
    assert len(points) == len(started)
    for p in points:
        point = vset.point(p.point)
        assert len(p.measured) == point["real"]["metrics"]["num_steps"]
        assert p.features.num_seqs.min() >= 1 and (p.measured > 0).all()
        assert (p.states[:WARMUP] == f"first {WARMUP} steps").all()


def test_bias_per_class_and_state_add_up(points) -> None:
    bias = class_bias(points)
    total = sum(len(p.measured) for p in points)
    assert bias["all"]["n"] == total
    states = [f"first {WARMUP} steps", "requests waiting", "steady"]
    assert sum(bias[s]["n"] for s in states if s in bias) == total
    classes = [k for k in bias if k != "all" and k not in states]
    assert sum(bias[c]["n"] for c in classes) == total - bias[states[0]]["n"]
    spread = speed_spread(points)
    assert spread["points"] == len(points) and spread["min"] <= spread["median"]
    assert spread["log_rms"] >= spread["log_sd"] * 0.5 > 0


def test_a_serving_overhead_fit_on_the_steps_removes_their_offset(points, tmp_path: Path
                                                                  ) -> None:
    fit = serving_overhead(points, "cpu")
    after = np.concatenate([(p.measured - p.predicted())[WARMUP:] for p in points])
    assert fit["seconds"] == pytest.approx(float(np.median(after)))
    [path] = write_overhead_profiles(load_set(CPU), points, tmp_path)
    profile = Profile.load(path)
    assert profile.serving_overhead == pytest.approx(fit["seconds"])
    f = points[0].features
    moved = profile.step_time().predict(f) - points[0].model.predict(f)
    assert np.allclose(moved, fit["seconds"], rtol=0, atol=1e-12)
