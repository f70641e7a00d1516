"""`calibrate --quick` and `--update`, on the CPU engine with synthetic step times (the
sample-collection seam): no assertion reads a live timing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.core.config import EngineConfig
from engine.tools.calibrate import CalibrationGrid, calibrate, eager_ladder, main
from engine.tools.quick_grid import QuickRule, quick_shapes
from sim.profile import Profile, heldout_predictions
from tests.engine.test_calibrate import CONFIG, GRID, WORKLOADS, synthetic_timer

CLI = ["--model", "tiny_qwen3", "--hardware", "cpu", "--dtype", "float32", "--device", "cpu",
       "--backend", "sdpa", "--max-model-len", "256", "--max-num-seqs", "32",
       "--max-num-batched-tokens", "256", "--cpu-memory-gib", "0.25", "--engine-passes", "1"]


def test_quick_rule_keeps_the_knots_and_both_ends() -> None:
    rule = QuickRule.of((16, 64, 256, 512, 1024, 2048, 4096, 8192, 32768),
                        (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192),
                        (0, 128, 512, 2048, 8192, 24576), token_limit=4096,
                        token_budget=8192)
    assert rule.decode_contexts == {16, 1024, 4096, 8192, 32768}  # 8192: nearest 16384
    assert {16, 64, 256, 1024, 4096, 8192} <= rule.prefill_chunks
    assert rule.prefill_contexts == {0, 2048, 24576}
    gpu = EngineConfig(max_model_len=32768, max_cudagraph_tokens=4096)
    grid = CalibrationGrid.for_config(gpu)
    full = grid.shapes()
    quick = quick_shapes(full, grid.quick_rule(gpu))
    assert 100 < len(quick) < len(full) / 2
    eager = [s for s in full if sum(q for _, q in s.prefills) + len(s.decodes) > 4096]
    assert all(s in quick for s in eager) and eager
    assert eager_ladder(4096, 8192) == (4160, 4608, 6144) and eager_ladder(0, 8192) == ()


def test_quick_calibration_times_the_quick_shapes_and_fits(tmp_path: Path) -> None:
    profile = calibrate("tiny_qwen3", CONFIG, hardware="cpu", samples=GRID, time_budget_s=60,
                        workloads=WORKLOADS, engine_passes=1, quick=True,
                        timer=synthetic_timer, verbose=False)
    planned = quick_shapes(GRID.runnable(CONFIG, 512), GRID.quick_rule(CONFIG))
    assert profile.meta["quick"] is True
    assert profile.meta["points_planned"] == len(planned) < len(GRID.runnable(CONFIG, 512))
    predicted = heldout_predictions(profile.step_time(), profile.fit_data())
    assert np.median(np.abs(predicted / profile.seconds - 1)) < 0.05


def slower_timer(f):
    return synthetic_timer(f, slower=1.25)


def test_update_rescales_a_full_profile_to_a_quick_one(tmp_path: Path, capsys) -> None:
    """A full calibration elsewhere (the synthetic times), a quick one here 1.25x slower:
    the rescaled profile is the full fit times ~1.25 for both kinds, with provenance."""
    full_path = main([*CLI, "--out", str(tmp_path / "full"), "--time-budget", "60"],
                     timer=synthetic_timer)
    new_path = main([*CLI, "--quick", "--update", str(full_path), "--out",
                     str(tmp_path / "new")], timer=slower_timer)
    full, new = Profile.load(full_path), Profile.load(new_path)
    quick = Profile.load(tmp_path / "new" / "quick" / full_path.name)
    scales = new.meta["rescaled"]["scales"]
    assert scales["decode"] == pytest.approx(1.25, rel=0.03)
    assert scales["mixed"] == pytest.approx(1.25, rel=0.05)
    f = full.features()
    assert np.allclose(new.step_time().predict(f),
                       np.where(f.is_decode_only, scales["decode"], scales["mixed"])
                       * full.step_time().predict(f), rtol=1e-12)
    assert new.samples == full.samples and quick.meta["quick"] is True
    assert new.meta["rescaled"]["quick_samples"] == len(quick.seconds)
    assert new.meta["rescaled"]["full"]["command"] == full.meta["command"]
    assert new.fit["holdout"]["median_abs_pct_err"] < 5
    refit = Profile.load(new_path)
    refit.fit_step_time()
    assert np.allclose(refit.step_time().predict(f), new.step_time().predict(f), rtol=1e-6)
    assert "rescaled (decode x" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"needs calibrate.quick \(--quick\)"):
        main([*CLI, "--update", str(full_path)])
