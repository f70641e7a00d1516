"""Step-time noise for prediction bands (DESIGN.md "Step time").

Two sources of spread around a calibrated prediction:
- `Residuals`: how far single steps land from the fit, as ratios measured / predicted on the
  calibration's held-out steps, per step kind (decode-only / mixed), kept as quantiles;
  `NoisyStepTime` multiplies every step by its own draw from them;
- `MachineSpread`: how far a whole run's speed lands from its profile's (another machine of
  the same kind, another day, the phases one machine's speed moves in): one factor per
  replicate, log-normal.

Draws are keyed by (seed, kind, step index), never by call order, so the scalar path, a run
of decode steps and `predict` give bit-identical durations, with or without event skipping.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.core.features import StepFeatures, StepRow
from sim.step_time import DecodeRun, StepTimeModel

KINDS = ("decode", "mixed")
LEVELS = np.linspace(0.0, 1.0, 101)  # the quantiles a profile keeps
MIN_ENGINE_ROWS = 30  # held-out engine steps per kind to use them alone

# Run-to-run spread of a run's step-time scale (log-sd) when a profile records none (meta
# "machine_spread"): `python -m reports.validation.steps <set>` replays each committed point's
# steps and divides its measured busy time by the profile's prediction of the same steps;
# the RMS of the log ratio (offset from 1 included) over a set's points is 0.066 on the H200
# (whole-step graphs, calibrated right before: ratios 0.94-1.17, median 1.05), 0.041 and
# 0.016 on the H100 piecewise / eager sets. The H200's, the shipped engine's, rounded up.
# A profile used on another machine of its kind moved more: the eager engine's machines A
# and B against the committed machine's profile, 0.16-0.26 (ratios 1.02-1.77, README "Run to
# run and machine to machine"): rescale it there first (`calibrate --update`) or pass that.
MACHINE_SPREAD = 0.07
CROSS_MACHINE_SPREAD = 0.26
MACHINE_SPREAD_SOURCE = ("default: RMS log ratio of measured to predicted busy time over the "
                         "committed validation points (H200 0.066, H100 0.041 / 0.016)")


@dataclass(frozen=True)
class Residuals:
    """Per kind, the quantiles (at LEVELS) of measured / predicted on held-out steps."""

    decode: np.ndarray
    mixed: np.ndarray
    source: str = ""

    @classmethod
    def of(cls, ratios: dict[str, np.ndarray], source: str = "") -> Residuals:
        """From the ratios of each kind; a kind with none gets no noise (a ratio of 1)."""
        def quantiles(r: np.ndarray) -> np.ndarray:
            r = np.asarray(r, dtype=np.float64)
            r = r[np.isfinite(r) & (r > 0)]
            return np.quantile(r, LEVELS) if r.size else np.ones(len(LEVELS))
        return cls(quantiles(ratios.get("decode", ())), quantiles(ratios.get("mixed", ())),
                   source)

    def table(self, kind: int) -> np.ndarray:
        return self.decode if kind == 0 else self.mixed

    def draw(self, kind: int, u: np.ndarray) -> np.ndarray:
        """Inverse-CDF draws for uniform `u` (linear between the kept quantiles)."""
        return np.interp(u, LEVELS, self.table(kind))

    def spread(self) -> dict[str, list[float]]:
        """Per kind, the 5 / 50 / 95 % ratios (what the calibration report prints)."""
        return {k: [float(np.interp(q, LEVELS, self.table(i))) for q in (0.05, 0.5, 0.95)]
                for i, k in enumerate(KINDS)}

    def to_dict(self) -> dict[str, Any]:
        return {"levels": len(LEVELS), "decode": [round(float(x), 6) for x in self.decode],
                "mixed": [round(float(x), 6) for x in self.mixed], "source": self.source}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Residuals:
        if data.get("levels") != len(LEVELS):
            raise ValueError(f"residuals: levels={data.get('levels')!r} is invalid: must be "
                             f"{len(LEVELS)}")
        return cls(np.asarray(data["decode"], float), np.asarray(data["mixed"], float),
                   str(data.get("source", "")))


@dataclass(frozen=True)
class MachineSpread:
    """log(run speed / profile speed) ~ Normal(0, log_sd)."""

    log_sd: float = MACHINE_SPREAD
    source: str = MACHINE_SPREAD_SOURCE

    @classmethod
    def of_meta(cls, meta: dict[str, Any]) -> MachineSpread:
        """A profile's own measured spread (meta "machine_spread": {"log_sd", "source"})."""
        got = meta.get("machine_spread")
        if not got:
            return cls()
        return cls(float(got["log_sd"]), str(got.get("source", "profile meta")))

    def scales(self, n: int, seed: int) -> np.ndarray:
        """`n` seeded factors, stratified (one per 1/n of the distribution, in shuffled
        order), so a few replicates already span it."""
        # scipy.stats takes ~0.3 s to import: only the bands' machine spread needs it
        from scipy.stats import norm

        rng = np.random.default_rng([seed, 0x5CA1E])
        u = (rng.permutation(n) + rng.random(n)) / n
        return np.exp(self.log_sd * norm.ppf(u))


class NoisyStepTime:
    """`base`'s durations, each step times its own residual draw (seeded; the draw of step
    i of kind k is the same whichever path asks for it)."""

    BLOCK = 4096  # draws made at a time, per kind
    KEEP = 16  # blocks cached

    def __init__(self, base: StepTimeModel, residuals: Residuals, seed: int):
        self.base, self.residuals, self.seed = base, residuals, int(seed)
        self.kind = base.kind
        self.source = f"{base.source}, step-time noise (seed {seed})"
        self.reads_longest = base.reads_longest
        self.reads_shared = base.reads_shared
        self._blocks: dict[tuple[int, int], np.ndarray] = {}

    def _block(self, kind: int, block: int) -> np.ndarray:
        got = self._blocks.get((kind, block))
        if got is None:
            if len(self._blocks) >= self.KEEP:
                del self._blocks[next(iter(self._blocks))]
            u = np.random.default_rng([self.seed, kind, block]).random(self.BLOCK)
            got = self._blocks[kind, block] = self.residuals.draw(kind, u)
        return got

    def factor(self, kind: int, index: int) -> float:
        return float(self._block(kind, index // self.BLOCK)[index % self.BLOCK])

    def factors(self, kind: int, first: int, n: int) -> np.ndarray:
        """The draws of steps first .. first + n - 1."""
        out = np.empty(n)
        i = 0
        while i < n:
            index = first + i
            block, at = divmod(index, self.BLOCK)
            take = min(self.BLOCK - at, n - i)
            out[i:i + take] = self._block(kind, block)[at:at + take]
            i += take
        return out

    def predict(self, features: StepFeatures, first_step: int = 0) -> np.ndarray:
        base = self.base.predict(features, first_step)
        n = len(features)
        return base * np.where(features.is_decode_only, self.factors(0, first_step, n),
                               self.factors(1, first_step, n))

    def step(self, row: StepRow, index: int) -> float:
        return self.base.step(row, index) * self.factor(int(row.prefill_tokens > 0), index)

    def decode_run(self, run: DecodeRun, first_step: int) -> np.ndarray:
        return self.base.decode_run(run, first_step) * self.factors(0, first_step,
                                                                     run.num_steps)
