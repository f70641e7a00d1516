"""Step-time noise for prediction bands: off by default, seeded by step index, the three
prediction paths bit-identical, and every committed profile loads unchanged and gives its
held-out residuals."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from engine.core.config import EngineConfig
from engine.core.features import StepFeatures, StepRow
from sim.noise import LEVELS, MachineSpread, NoisyStepTime, Residuals
from sim.profile import PROFILE_DIR, Profile
from sim.step_time import CalibratedStepTime, DecodeRun
from sim.twin import setup_twin, simulate
from workloads import make_preset
from workloads.trace_requests import model_requests

H200 = PROFILE_DIR / "h200_141gb__qwen3_0_6b__bfloat16__torch.json"
COMMITTED = sorted(PROFILE_DIR.glob("*.json"))


@pytest.fixture(scope="module")
def h200() -> Profile:
    return Profile.load(H200)


def noisy(profile: Profile, seed: int = 7) -> NoisyStepTime:
    return NoisyStepTime(profile.step_time(), profile.residuals(), seed)


def test_noise_is_off_by_default() -> None:
    setup = setup_twin("qwen3_0_6b", "h200_141gb", EngineConfig())
    assert isinstance(setup.step_time, CalibratedStepTime)
    assert "noise" not in setup.step_time.source


def test_a_decode_run_single_steps_and_predict_agree_bit_for_bit(h200: Profile) -> None:
    model = noisy(h200)
    first = NoisyStepTime.BLOCK - 5  # the run crosses a block of draws
    run = DecodeRun(24, 24 * 900, 40, 1500, 0)
    durations = model.decode_run(run, first)
    f = run.features()
    singles = [model.step(StepRow(0, 0, 24, int(f.decode_ctx[i]), 24,
                                  int(f.decode_max_ctx[i]), 0, 0), first + i)
               for i in range(run.num_steps)]
    assert np.array_equal(durations, np.array(singles))
    assert np.array_equal(durations, model.predict(f, first))
    mixed = StepRow(512, 512 * 513 // 2, 8, 8000, 9, 1200, 0, None)
    got = model.predict(StepFeatures.from_columns(
        {k: [getattr(mixed, k) or 0] for k in ("prefill_tokens", "prefill_attn", "decode_seqs",
                                              "decode_ctx", "num_seqs", "decode_max_ctx",
                                              "prefill_gather")}), 99)
    assert got[0] == model.step(mixed, 99)


def test_draws_follow_the_seed_and_the_step_index(h200: Profile) -> None:
    a, b, c = noisy(h200, 1), noisy(h200, 1), noisy(h200, 2)
    assert np.array_equal(a.factors(0, 10, 5000), b.factors(0, 10, 5000))
    assert not np.array_equal(a.factors(0, 10, 50), c.factors(0, 10, 50))
    assert not np.array_equal(a.factors(0, 10, 50), a.factors(1, 10, 50))  # per kind
    assert [a.factor(1, i) for i in (3, 4097, 9000)] == list(a.factors(1, 3, 8998)[[0, 4094,
                                                                                   8997]])
    table = h200.residuals().decode
    draws = a.factors(0, 0, 20000)
    assert table[0] <= draws.min() and draws.max() <= table[-1]
    assert np.median(draws) == pytest.approx(np.interp(0.5, LEVELS, table), rel=0.01)


def test_skipping_gives_the_single_steps_records_with_noise() -> None:
    setup = setup_twin("qwen3_0_6b", "h200_141gb", EngineConfig(max_num_seqs=32))
    setup = replace(setup, step_time=NoisyStepTime(setup.step_time,
                                                   setup.profile.residuals(), 3))
    requests = model_requests(make_preset("poisson_chat", n=80, rate=30.0),
                              setup.model.vocab_size)
    skipped, single = simulate(setup, requests), simulate(setup, requests, skip=False)
    assert skipped.stats["skipped_steps"] > 0
    assert skipped.requests.equals(single.requests)
    assert skipped.steps.equals(single.steps)
    plain = simulate(replace(setup, step_time=setup.step_time.base), requests)
    assert not plain.requests["finish_s"].equals(skipped.requests["finish_s"])


@pytest.mark.parametrize("path", COMMITTED, ids=[p.stem for p in COMMITTED])
def test_committed_profiles_load_unchanged_and_give_residuals(path) -> None:
    raw = json.loads(path.read_text())
    profile = Profile.load(path)
    residuals = profile.residuals()
    assert profile.to_dict()["fit"] == raw["fit"] and "residuals" not in profile.fit
    for table in (residuals.decode, residuals.mixed):
        assert len(table) == len(LEVELS) and (np.diff(table) >= 0).all()
        assert 0.5 < np.interp(0.5, LEVELS, table) < 1.5
    assert Residuals.from_dict(residuals.to_dict()).to_dict() == residuals.to_dict()
    assert profile.residuals() is residuals  # made once


def test_a_new_fit_stores_its_residuals_and_class_errors(h200: Profile) -> None:
    refit = Profile(h200.key, h200.samples, h200.buckets, h200.memory,
                    {**h200.meta, "fit_weights": "rows"})
    refit.fit_step_time()
    stored = Residuals.from_dict(refit.fit["residuals"])
    assert refit.residuals().to_dict() == stored.to_dict()
    classes = refit.fit["holdout"]["by_class"]
    assert {"eager", "decode small", "mixed long chunk"} <= set(classes)
    assert sum(c["n"] for c in classes.values()) == refit.fit["holdout"]["n"]
    with pytest.raises(ValueError, match="fit_weights"):
        Profile(h200.key, h200.samples, meta={"fit_weights": "equal"}).fit_step_time()


def test_machine_scales_are_seeded_and_stratified() -> None:
    spread = MachineSpread(0.1)
    scales = spread.scales(8, 0)
    assert np.array_equal(scales, spread.scales(8, 0))
    from scipy.stats import norm

    strata = np.floor(norm.cdf(np.log(scales) / 0.1) * 8)
    assert sorted(strata) == list(range(8))  # one draw per eighth of the distribution
    assert MachineSpread.of_meta({"machine_spread": {"log_sd": 0.2, "source": "x"}}).log_sd \
        == 0.2
    assert MachineSpread.of_meta({}) == MachineSpread()
