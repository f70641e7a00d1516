"""Length distributions match their parameters (fixed seeds; bounds from the sample size)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from workloads.errors import SpecError
from workloads.lengths import Empirical, Fixed, LogNormal, Uniform


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_uniform_is_inclusive_and_flat() -> None:
    draws = Uniform(100, 1024).sample(50_000, _rng(1))
    assert draws.dtype == np.int64
    assert draws.min() == 100 and draws.max() == 1024
    counts = np.bincount(draws - 100, minlength=925)
    assert stats.chisquare(counts).pvalue > 1e-3


def test_lognormal_hits_its_median_and_p99() -> None:
    n = 100_000
    draws = LogNormal(median=1020, p99=4142).sample(n, _rng(2))
    # The share of draws at or below each target is binomial: allow 5 standard errors.
    for target, q in ((1020, 0.5), (4142, 0.99)):
        share = (draws <= target).mean()
        assert abs(share - q) < 5 * math.sqrt(q * (1 - q) / n)


def test_lognormal_is_clipped_to_its_bounds() -> None:
    draws = LogNormal(100, 5000, min_len=20, max_len=300).sample(10_000, _rng(3))
    assert draws.min() == 20 and draws.max() == 300


def test_fixed_and_empirical() -> None:
    assert Fixed(7).sample(3, _rng()).tolist() == [7, 7, 7]
    source = np.array([5] * 700 + [9] * 300)
    draws = Empirical.of(source).sample(20_000, _rng(4))
    assert set(np.unique(draws)) == {5, 9}
    share = (draws == 9).mean()
    assert abs(share - 0.3) < 5 * math.sqrt(0.3 * 0.7 / draws.size)


@pytest.mark.parametrize("make,field", [
    (lambda: Fixed(0), "Fixed.value"),
    (lambda: Uniform(0, 5), "Uniform.low"),
    (lambda: Uniform(10, 9), "Uniform.high"),
    (lambda: LogNormal(100, 50), "LogNormal.p99"),
    (lambda: LogNormal(-1, 50), "LogNormal.median"),
    (lambda: LogNormal(100, 500, min_len=10, max_len=5), "LogNormal.max_len"),
    (lambda: Empirical(()), "Empirical.values"),
    (lambda: Empirical((3, 0, 4)), "Empirical.values[1]"),
])
def test_bad_parameters_name_their_field_and_range(make: object, field: str) -> None:
    with pytest.raises(SpecError) as info:
        make()
    assert info.value.field == field
    assert "must be" in str(info.value)


def test_uniform_error_gives_the_allowed_range() -> None:
    with pytest.raises(SpecError, match=r"Uniform.high=9 is invalid: must be an integer in \[10,"):
        Uniform(10, 9)
