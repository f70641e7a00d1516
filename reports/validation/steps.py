"""The measured steps of a validation set with their compositions, against a profile.

A set keeps each point's step records (durations, counts) but not what the steps computed:
their prefill attention, decode contexts and so on. The twin recovers them: fed the point's
measured durations (`sim.step_time.ReplayedStepTime`), it schedules exactly the engine's
batches (the seam), and a recording wrapper keeps each step's features. A point whose
replay parts from the engine's (a decode count differs at more than 1 % of its steps) is
left out.

Then, per class of step composition (`sim.step_classes`) and per run state (the engine's
first WARMUP steps; steps while requests wait), the signed error of a profile's prediction
of those very steps; and per point, its speed: measured busy time over the profile's
prediction of it (`speed_spread`: the machine-to-machine spread `sim.noise` defaults to).

    python -m reports.validation.steps tests/data/validation/h200_qwen3_0_6b
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from engine.core.config import EngineConfig
from engine.core.features import EXTRA_FEATURES, FEATURES, StepFeatures, StepRow
from reports.validation.accuracy import PRE_PIECEWISE, ValidationSet, load_set
from sim.profile import PROFILE_DIR, Profile, error_stats, fit_model
from sim.simulator import Simulator
from sim.step_classes import class_errors, classify
from sim.step_time import DecodeRun, ReplayedStepTime, StepTimeModel
from sim.twin import setup_twin
from workloads.trace_requests import model_requests

WARMUP = 10  # a fresh engine's first steps run slow (lazy initialisation, first launches)
MIN_MATCH = 0.99


class RecordingStepTime:
    """`inner`'s durations; keeps the features of every step it is asked for."""

    kind, source = "replayed", "replayed engine step times (recorded)"
    reads_longest = reads_shared = True

    def __init__(self, inner: StepTimeModel):
        self.inner = inner
        self.rows: dict[int, StepRow] = {}

    def predict(self, features: StepFeatures, first_step: int = 0) -> np.ndarray:
        return self.inner.predict(features, first_step)

    def step(self, row: StepRow, index: int) -> float:
        self.rows[index] = row
        return self.inner.step(row, index)

    def decode_run(self, run: DecodeRun, first_step: int) -> np.ndarray:
        raise RuntimeError("recording runs single steps only (skip=False)")


@dataclass
class PointSteps:
    point: str
    label: str
    features: StepFeatures
    measured: np.ndarray
    waiting: np.ndarray
    model: StepTimeModel  # the point's calibrated step-time model
    token_limit: int | None

    def predicted(self, model: StepTimeModel | None = None) -> np.ndarray:
        return (model or self.model).predict(self.features)

    @property
    def states(self) -> np.ndarray:
        index = np.arange(len(self.measured))
        return np.select([index < WARMUP, self.waiting > 0],
                         [f"first {WARMUP} steps", "requests waiting"], "steady")


def replayed_steps(vset: ValidationSet, point: dict[str, Any],
                   profiles: Path | None = None) -> PointSteps | None:
    """The point's steps with their features (None: it did not start, or its replay
    parted from the engine's)."""
    if not point["real"]["starts"]:
        return None
    config = EngineConfig.from_kwargs(**(PRE_PIECEWISE | point["engine"]))
    setup = setup_twin(point["model"], point["hardware"], config, point["predictor"],
                       profile_dir=profiles or vset.profile_dir or PROFILE_DIR)
    compact = _compact_steps(str(vset.path), point["id"])
    measured = compact["duration_us"].to_numpy(float) / 1e6
    tail = np.full(len(measured) + 1, np.median(measured))  # a parted replay runs longer
    recorder = RecordingStepTime(ReplayedStepTime(np.concatenate([measured, tail])))
    sim = Simulator(config, setup.memory.num_blocks, recorder, setup.model.eos_token_ids(),
                    skip=False)
    sim.run(model_requests(vset.trace(point), setup.model.vocab_size))
    if any(i not in recorder.rows for i in range(len(measured))):
        return None
    features = _features([recorder.rows[i] for i in range(len(measured))])
    if (features.decode_seqs != compact["num_decode_seqs"].to_numpy()).mean() > 1 - MIN_MATCH:
        return None
    model = setup.step_time
    return PointSteps(point["id"], point["workload_label"], features, measured,
                      compact["num_waiting"].to_numpy(), model,
                      getattr(model, "token_limit", None))


@cache
def _compact_steps(path: str, point_id: str) -> pd.DataFrame:
    steps = pd.read_parquet(Path(path) / "steps.parquet")
    return steps[steps["point"] == point_id].reset_index(drop=True)


def _features(rows: list[StepRow]) -> StepFeatures:
    return StepFeatures.from_columns({f: np.array([getattr(r, f) or 0 for r in rows])
                                      for f in (*FEATURES, *EXTRA_FEATURES)})


@cache
def set_steps(path: str, profiles: str | None = None) -> tuple[PointSteps, ...]:
    vset = load_set(Path(path))
    got = (replayed_steps(vset, p, Path(profiles) if profiles else None) for p in vset.points)
    return tuple(s for s in got if s is not None)


# -- errors ---------------------------------------------------------------------------------

def class_bias(points: tuple[PointSteps, ...], refit: dict[str, StepTimeModel] | None = None
               ) -> dict[str, dict[str, Any]]:
    """Signed error per class of composition over the points' steps after warm-up, and
    per run state over all of them (`refit`: a model per point id instead of its own)."""
    pred, meas, classes, states = [], [], [], []
    for p in points:
        model = (refit or {}).get(p.point, p.model)
        pred.append(p.predicted(model))
        meas.append(p.measured)
        classes.append(classify(p.features, p.token_limit))
        states.append(p.states)
    pred_a, meas_a = np.concatenate(pred), np.concatenate(meas)
    cls, state = np.concatenate(classes), np.concatenate(states)
    steady = state != f"first {WARMUP} steps"
    out = {"all": error_stats(pred_a, meas_a)}
    out.update(class_errors(pred_a[steady], meas_a[steady], cls[steady], error_stats))
    for name in (f"first {WARMUP} steps", "requests waiting", "steady"):
        rows = state == name
        if rows.any():
            out[name] = error_stats(pred_a[rows], meas_a[rows])
    return out


def speed_spread(points: tuple[PointSteps, ...]) -> dict[str, float]:
    """Per point, measured busy time / predicted: their count, median, range and the RMS
    of their logarithm (the offset from 1 included)."""
    ratios = np.array([p.measured.sum() / p.predicted().sum() for p in points])
    if not ratios.size:
        return {"points": 0}
    logs = np.log(ratios)
    return {"points": int(ratios.size), "median": float(np.median(ratios)),
            "min": float(ratios.min()), "max": float(ratios.max()),
            "log_rms": float(math.sqrt(float(np.mean(logs**2)))),
            "log_sd": float(logs.std(ddof=1)) if ratios.size > 1 else 0.0}


def point_profile(vset: ValidationSet, point_id: str,
                  profiles: Path | None = None) -> tuple[EngineConfig, Profile | None]:
    """A committed point's engine configuration and the profile its twin uses (None: the
    roofline)."""
    point = vset.point(point_id)
    config = EngineConfig.from_kwargs(**(PRE_PIECEWISE | point["engine"]))
    profile = setup_twin(point["model"], point["hardware"], config, point["predictor"],
                         profile_dir=profiles or vset.profile_dir or PROFILE_DIR).profile
    return config, profile


def refit_models(points: tuple[PointSteps, ...], weights: str, vset: ValidationSet,
                 profiles: Path | None = None) -> dict[str, StepTimeModel]:
    """Each point's model refit from its profile's samples with row `weights`."""
    fits: dict[str, Any] = {}
    out = {}
    for p in points:
        config, profile = point_profile(vset, p.point, profiles)
        assert profile is not None, f"{vset.name} {p.point}: no profile"
        if profile.name not in fits:
            rules = (*profile.rules[:3], weights)
            fits[profile.name] = fit_model(profile.fit_data(), profile.buckets, profile.name,
                                           4, *rules)
        model = fits[profile.name]
        if model.token_limit is not None:
            model = model.with_token_limit(config.cudagraph_token_limit,
                                           config.max_num_batched_tokens)
        out[p.point] = model
    return out


def serving_overhead(points: tuple[PointSteps, ...], name: str) -> dict[str, Any]:
    """The per-step time the points' steps took beyond their profile's prediction: the
    median of measured - predicted over every step after the engine's first WARMUP (an
    additive host cost: the calibration's engine loop does not pay it, a served step
    does), as a profile's meta "serving_overhead" records it."""
    diffs = [(p.measured - p.predicted())[WARMUP:] for p in points]
    d = np.concatenate(diffs) if diffs else np.zeros(0)
    if not d.size:
        raise ValueError(f"{name}: no replayed steps to fit a serving overhead on")
    return {"seconds": float(np.median(d)),
            "source": f"median measured - predicted over {d.size} steps (all but each "
                      f"point's first {WARMUP}) of {len(points)} points of validation set "
                      f"{name}"}


def write_overhead_profiles(vset: ValidationSet, points: tuple[PointSteps, ...], out: Path,
                            profiles: Path | None = None) -> list[Path]:
    """The set's profiles with their serving overhead fit on its steps (added to any they
    had), saved into `out`."""
    by_profile: dict[str, list[PointSteps]] = {}
    found = {}
    for p in points:
        _, profile = point_profile(vset, p.point, profiles)
        if profile is not None:
            found[profile.name] = profile
            by_profile.setdefault(profile.name, []).append(p)
    written = []
    for name, profile in found.items():
        fit = serving_overhead(tuple(by_profile[name]), vset.name)
        fit["seconds"] += profile.serving_overhead
        profile.meta["serving_overhead"] = fit
        written.append(profile.save(out))
    return written


def format_bias(bias: dict[str, dict[str, Any]]) -> str:
    lines = [f"  {name:<23} n={e['n']:<6} bias median {e['median_signed_pct_err']:+5.1f} %  "
             f"total time {e['total_time_pct_err']:+5.1f} %  |error| median "
             f"{e['median_abs_pct_err']:.1f} %" for name, e in bias.items() if e.get("n")]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m reports.validation.steps",
                                description=__doc__.splitlines()[0])
    p.add_argument("set", type=Path)
    p.add_argument("--profiles", type=Path, metavar="DIR")
    p.add_argument("--fit-weights", choices=("sources", "rows"),
                   help="also refit each profile from its samples with these row weights")
    p.add_argument("--fit-overhead", type=Path, metavar="DIR",
                   help="fit the serving overhead on these steps and write the profiles "
                        "with it into DIR (check them on a second run: accuracy --profiles)")
    args = p.parse_args(argv)
    vset = load_set(args.set)
    points = set_steps(str(vset.path), str(args.profiles) if args.profiles else None)
    print(f"{vset.name}: {len(points)} points replayed with their compositions")
    print("signed error of the profile's prediction of the measured steps "
          "(+ = over-predicted):")
    print(format_bias(class_bias(points)))
    if args.fit_weights:
        print(f"refit with fit_weights={args.fit_weights}:")
        refit = refit_models(points, args.fit_weights, vset, args.profiles)
        print(format_bias(class_bias(points, refit)))
    if args.fit_overhead:
        for path in write_overhead_profiles(vset, points, args.fit_overhead, args.profiles):
            print(f"wrote {path} (serving overhead "
                  f"{serving_overhead(points, vset.name)['seconds'] * 1e6:+.0f} us a step)")
    spread = speed_spread(points)
    print("point speed (measured busy time / predicted): " + ", ".join(
        f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in spread.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
