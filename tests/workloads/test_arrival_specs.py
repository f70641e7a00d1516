"""Arrival processes match their parameters (fixed seeds; bounds from the sample size)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from workloads.arrivals import Constant, Gamma, Offline, Poisson, Ramp
from workloads.errors import SpecError


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.mark.parametrize("spec", [Poisson(3.0), Gamma(3.0, 0.3), Constant(3.0), Offline(),
                                  Ramp(((10, 1.0), (10, 5.0)))], ids=repr)
def test_times_start_at_zero_and_never_go_back(spec: object) -> None:
    times = spec.sample(500, _rng())
    assert times.shape == (500,) and times[0] == 0.0
    assert np.all(np.diff(times) >= 0)


def test_poisson_gaps_are_exponential_with_the_rate() -> None:
    gaps = np.diff(Poisson(4.0).sample(20_001, _rng(1)))
    assert stats.kstest(gaps, "expon", args=(0, 1 / 4.0)).pvalue > 0.01
    # mean gap 1/rate within 5 standard errors (sd of an exponential = its mean)
    assert abs(gaps.mean() - 0.25) < 5 * 0.25 / np.sqrt(gaps.size)


@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
def test_gamma_gaps_match_shape_and_scale(burstiness: float) -> None:
    rate = 2.0
    gaps = np.diff(Gamma(rate, burstiness).sample(20_001, _rng(2)))
    scale = 1 / (rate * burstiness)
    assert stats.kstest(gaps, "gamma", args=(burstiness, 0, scale)).pvalue > 0.01
    sd = np.sqrt(burstiness) * scale
    assert abs(gaps.mean() - 1 / rate) < 5 * sd / np.sqrt(gaps.size)


def test_burstier_gamma_has_a_larger_coefficient_of_variation() -> None:
    cv = [np.std(np.diff(Gamma(1.0, b).sample(5000, _rng(3)))) for b in (0.2, 1.0, 5.0)]
    assert cv[0] > cv[1] > cv[2]
    assert cv[1] == pytest.approx(1.0, rel=0.1)


def test_constant_and_offline_are_exact() -> None:
    assert Constant(4.0).sample(5, _rng()).tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert Offline().sample(4, _rng()).tolist() == [0.0] * 4


def test_poisson_ramp_puts_the_expected_count_in_each_stage() -> None:
    ramp = Ramp(((100, 2.0), (50, 10.0), (200, 1.0)))
    assert ramp.expected_count() == 900 and ramp.duration_s == 350
    times = ramp.sample(900, _rng(4))
    for lo, hi, expected in ((0, 100, 200), (100, 150, 500), (150, 350, 200)):
        count = int(((times >= lo) & (times < hi)).sum())
        assert abs(count - expected) < 5 * np.sqrt(expected) + 5


def test_constant_ramp_is_exact_and_keeps_the_last_rate_afterwards() -> None:
    times = Ramp(((2, 1.0), (1, 4.0)), process="constant").sample(10, _rng())
    assert times.tolist() == pytest.approx([0, 1, 2, 2.25, 2.5, 2.75, 3, 3.25, 3.5, 3.75])


def test_linear_ramp_builds_the_stages() -> None:
    ramp = Ramp.linear(2, 8, 2, 30)
    assert ramp.stages == ((30.0, 2.0), (30.0, 4.0), (30.0, 6.0), (30.0, 8.0))


@pytest.mark.parametrize("make,field", [
    (lambda: Poisson(0), "Poisson.rate"),
    (lambda: Poisson(float("nan")), "Poisson.rate"),
    (lambda: Gamma(1.0, -1), "Gamma.burstiness"),
    (lambda: Constant(-2), "Constant.rate"),
    (lambda: Ramp(()), "Ramp.stages"),
    (lambda: Ramp(((10, 1.0), (5, 0.0))), "Ramp.stages[1].rate"),
    (lambda: Ramp(((10, 1.0),), process="bursty"), "Ramp.process"),
    (lambda: Ramp.linear(5, 1, 1, 10), "Ramp.stop_rate"),
])
def test_bad_parameters_name_their_field(make: object, field: str) -> None:
    with pytest.raises(SpecError) as info:
        make()
    assert info.value.field == field
    assert "must be" in str(info.value)
