"""Token-length distributions. Each spec's `sample(n, rng)` returns n int64 lengths >= 1."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from workloads.errors import SpecError, check_number
from workloads.schema import MAX_LEN
from workloads.specs import register

Z_99 = 2.3263478740408408  # standard normal quantile at 0.99


class LengthSpec(Protocol):
    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray: ...


@register
@dataclass(frozen=True)
class Fixed:
    value: int

    def __post_init__(self) -> None:
        check_number("Fixed.value", self.value, 1, MAX_LEN, integer=True)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return np.full(n, self.value, dtype=np.int64)


@register
@dataclass(frozen=True)
class Uniform:
    """Uniform over the integers low..high, both inclusive."""

    low: int
    high: int

    def __post_init__(self) -> None:
        check_number("Uniform.low", self.low, 1, MAX_LEN, integer=True)
        check_number("Uniform.high", self.high, self.low, MAX_LEN, integer=True)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return rng.integers(self.low, self.high, size=n, endpoint=True, dtype=np.int64)


@register
@dataclass(frozen=True)
class LogNormal:
    """Lognormal with the given median and 99th percentile, rounded, clipped to [min, max]."""

    median: float
    p99: float
    min_len: int = 1
    max_len: int | None = None

    def __post_init__(self) -> None:
        check_number("LogNormal.median", self.median, 0, lo_open=True)
        check_number("LogNormal.p99", self.p99, self.median, lo_open=True)
        check_number("LogNormal.min_len", self.min_len, 1, MAX_LEN, integer=True)
        if self.max_len is not None:
            check_number("LogNormal.max_len", self.max_len, self.min_len, MAX_LEN, integer=True)

    @property
    def sigma(self) -> float:
        return math.log(self.p99 / self.median) / Z_99

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        draws = rng.lognormal(math.log(self.median), self.sigma, n)
        hi = self.max_len if self.max_len is not None else MAX_LEN
        return np.clip(np.rint(draws), self.min_len, hi).astype(np.int64)


@register
@dataclass(frozen=True)
class Empirical:
    """Resampled (with replacement) from observed lengths, e.g. a trace column."""

    values: tuple[int, ...]

    def __post_init__(self) -> None:
        values = tuple(int(v) for v in self.values)
        if not values:
            raise SpecError("Empirical.values", self.values, "a non-empty list of lengths")
        bad = [i for i, v in enumerate(values) if not 1 <= v <= MAX_LEN]
        if bad:
            raise SpecError(f"Empirical.values[{bad[0]}]", values[bad[0]],
                            f"an integer in [1, {MAX_LEN}]")
        object.__setattr__(self, "values", values)

    @classmethod
    def of(cls, lengths: np.ndarray | list[int]) -> Empirical:
        return cls(tuple(np.asarray(lengths, dtype=np.int64).tolist()))

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return rng.choice(np.asarray(self.values, dtype=np.int64), size=n, replace=True)
