"""Where a step-time fit is biased, and what removes it: step classes, the fit's row
weights, a serving overhead per step and a per-kind rescale from a quick calibration."""

from __future__ import annotations

import numpy as np
import pytest

from engine.core.features import StepFeatures, StepRow
from sim.profile import (
    PROFILE_DIR,
    Profile,
    format_holdout,
    rescaled,
    scaled_kinds,
    with_overhead,
)
from sim.step_classes import CLASSES, classify
from sim.step_time import DecodeRun

H200 = PROFILE_DIR / "h200_141gb__qwen3_0_6b__bfloat16__torch.json"


def features(rows: list[tuple[int, int, int, int, int]]) -> StepFeatures:
    cols = list(zip(*rows, strict=True))
    names = ("prefill_tokens", "prefill_attn", "decode_seqs", "decode_ctx", "num_seqs")
    return StepFeatures.from_columns(dict(zip(names, cols, strict=True)))


def test_every_step_falls_in_one_class() -> None:
    f = features([(5000, 10**7, 4, 4000, 5), (2048, 10**6, 0, 0, 1), (2048, 10**6, 8, 800, 9),
                  (100, 5000, 8, 800, 9), (0, 0, 4, 40000, 4), (0, 0, 4, 400, 4),
                  (0, 0, 40, 4000, 40), (0, 0, 200, 20000, 200)])
    got = classify(f, token_limit=4096)
    assert list(got) == ["eager", "prefill only", "mixed long chunk", "mixed short chunk",
                         "decode small, long ctx", "decode small", "decode mid",
                         "decode large"]
    assert classify(f, 0)[0] == "mixed long chunk"  # no graphs: nothing is eager
    host = classify(f, 4096, np.full(len(f), 0.6))
    assert list(host[1:]) == ["host-bound"] * 7 and set(got) <= set(CLASSES)


def test_the_calibration_report_prints_the_bias_per_class() -> None:
    profile = Profile.load(H200)
    profile.fit_step_time()
    text = format_holdout(profile.fit["holdout"])
    assert "signed error by step class" in text
    assert "decode small, long ctx" in text and "bias median" in text


def test_row_weights_are_a_new_fit_rule() -> None:
    """Committed profiles refit with each source weighed apart, as before; new calibrations
    (meta fit_weights "rows") weigh every row alike, which moves the fit."""
    old = Profile.load(H200)
    assert old.fit_weights == "sources"
    new = Profile(old.key, old.samples, old.buckets, old.memory,
                  {**old.meta, "fit_weights": "rows"})
    f = old.features()
    a, b = old.fit_step_time().predict(f), new.fit_step_time().predict(f)
    assert not np.allclose(a, b)
    assert new.fit["holdout"]["median_abs_pct_err"] < old.fit["holdout"]["median_abs_pct_err"]


def test_a_serving_overhead_adds_to_every_step_on_every_path() -> None:
    profile = Profile.load(H200)
    base = profile.step_time()
    profile.meta["serving_overhead"] = {"seconds": 1.15e-4, "source": "test"}
    model = profile.step_time()
    f = profile.features()
    assert np.allclose(model.predict(f) - base.predict(f), 1.15e-4, rtol=0, atol=1e-12)
    run = DecodeRun(16, 16 * 700, 30, 900, 0)
    rows = run.features()
    singles = [model.step(StepRow(0, 0, 16, int(rows.decode_ctx[i]), 16,
                                  int(rows.decode_max_ctx[i]), 0, 0), i) for i in range(30)]
    assert np.array_equal(model.decode_run(run, 0), np.array(singles))
    assert "serving overhead" in model.source
    assert with_overhead(base, 0.0) is base
    profile.meta["serving_overhead"] = {"seconds": "fast"}
    with pytest.raises(ValueError, match="serving_overhead"):
        profile.step_time()


def test_rescaling_fits_one_scale_per_kind() -> None:
    full = Profile.load(H200)
    f = full.features()
    decode = f.is_decode_only
    quick = Profile(full.key, {k: list(v) for k, v in full.samples.items()}, full.buckets,
                    full.memory, {"date": "today"})
    factor = np.where(decode, 1.1, 0.9)
    quick.samples["seconds"] = list(full.seconds * factor)
    quick.samples["exec_seconds"] = list(full.exec_seconds * factor)
    new = rescaled(full, quick)
    scales = new.meta["rescaled"]["scales"]
    assert scales["decode"] == pytest.approx(1.1 * _level(full, True), rel=0.02)
    assert scales["mixed"] == pytest.approx(0.9 * _level(full, False), rel=0.02)
    expected = scaled_kinds(full.step_time(), scales["decode"], scales["mixed"]).predict(f)
    assert np.array_equal(new.step_time().predict(f), expected)
    other = Profile(full.key.__class__("x", "y", "z", "w"), quick.samples)
    with pytest.raises(ValueError, match="keys differ"):
        rescaled(full, other)


def _level(profile: Profile, decode: bool) -> float:
    """The trimmed mean of measured / predicted of the profile's own samples of a kind
    (the scale a quick calibration identical to the full one would get)."""
    same = rescaled(profile, profile).meta["rescaled"]["scales"]
    return same["decode" if decode else "mixed"]
