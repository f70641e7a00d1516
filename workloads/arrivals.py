"""Arrival-time processes. Each spec's `sample(n, rng)` returns n sorted times, the first at 0."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

from workloads.errors import SpecError, check_number
from workloads.specs import register


class ArrivalSpec(Protocol):
    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray: ...


def times_from_gaps(gaps: np.ndarray) -> np.ndarray:
    """Arrival times whose first is 0 and whose successive differences are gaps[:-1]."""
    times = np.zeros(gaps.size, dtype=np.float64)
    np.cumsum(gaps[:-1], out=times[1:])
    return times


@register
@dataclass(frozen=True)
class Poisson:
    """Exponential gaps with mean 1/rate (requests per second)."""

    rate: float

    def __post_init__(self) -> None:
        check_number("Poisson.rate", self.rate, 0, lo_open=True)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return times_from_gaps(rng.exponential(1.0 / self.rate, n))


@register
@dataclass(frozen=True)
class Gamma:
    """Gamma gaps, as vLLM's --burstiness: shape=burstiness, scale=1/(rate*burstiness).

    burstiness 1 is Poisson; below 1 is burstier, above 1 more regular; the mean rate is `rate`.
    """

    rate: float
    burstiness: float = 1.0

    def __post_init__(self) -> None:
        check_number("Gamma.rate", self.rate, 0, lo_open=True)
        check_number("Gamma.burstiness", self.burstiness, 0, lo_open=True)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        scale = 1.0 / (self.rate * self.burstiness)
        return times_from_gaps(rng.gamma(self.burstiness, scale, n))


@register
@dataclass(frozen=True)
class Constant:
    """Exactly 1/rate seconds between arrivals."""

    rate: float

    def __post_init__(self) -> None:
        check_number("Constant.rate", self.rate, 0, lo_open=True)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return np.arange(n, dtype=np.float64) / self.rate


@register
@dataclass(frozen=True)
class Offline:
    """Every request at t = 0 (an offline batch, like nano-vllm's bench.py)."""

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return np.zeros(n, dtype=np.float64)


@register
@dataclass(frozen=True)
class Ramp:
    """Piecewise-constant rate: stages of (duration_s, rate); the last rate holds afterwards.

    `process` "poisson" draws a non-homogeneous Poisson process; "constant" spaces arrivals evenly
    in expected-count space. Both map unit-rate points through the inverse cumulative rate.
    """

    stages: tuple[tuple[float, float], ...]
    process: Literal["poisson", "constant"] = "poisson"

    def __post_init__(self) -> None:
        if not self.stages:
            raise SpecError("Ramp.stages", self.stages, "a non-empty list of (duration_s, rate)")
        stages = tuple((float(d), float(r)) for d, r in self.stages)
        for i, (duration, rate) in enumerate(stages):
            check_number(f"Ramp.stages[{i}].duration_s", duration, 0, lo_open=True)
            check_number(f"Ramp.stages[{i}].rate", rate, 0, lo_open=True)
        if self.process not in ("poisson", "constant"):
            raise SpecError("Ramp.process", self.process, "'poisson' or 'constant'")
        object.__setattr__(self, "stages", stages)

    @classmethod
    def linear(cls, start_rate: float, stop_rate: float, step: float, stage_s: float,
               process: Literal["poisson", "constant"] = "poisson") -> Ramp:
        """Rates start_rate, start_rate + step, ... up to stop_rate (inclusive), stage_s each."""
        check_number("Ramp.step", step, 0, lo_open=True)
        count = int(np.floor((stop_rate - start_rate) / step + 1e-9)) + 1
        if count < 1:
            raise SpecError("Ramp.stop_rate", stop_rate, f">= start_rate ({start_rate})")
        rates = [start_rate + i * step for i in range(count)]
        return cls(tuple((stage_s, r) for r in rates), process)

    @property
    def duration_s(self) -> float:
        return sum(d for d, _ in self.stages)

    def expected_count(self) -> float:
        """Expected requests over all stages (pick n near this to cover the whole ramp)."""
        return sum(d * r for d, r in self.stages)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        if self.process == "poisson":
            unit = times_from_gaps(rng.exponential(1.0, n))
        else:
            unit = np.arange(n, dtype=np.float64)
        durations, rates = np.array(self.stages).T
        t_edges = np.concatenate([[0.0], np.cumsum(durations)])
        count_edges = np.concatenate([[0.0], np.cumsum(durations * rates)])
        inside = np.interp(unit, count_edges, t_edges)
        beyond = t_edges[-1] + (unit - count_edges[-1]) / rates[-1]
        return np.where(unit <= count_edges[-1], inside, beyond)
