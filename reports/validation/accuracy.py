"""How accurate is kvtwin: re-predict committed validation points, compare, tabulate.

A validation set (`tests/data/validation/<set>/`, written by `reports.validation.collect`)
holds, per point, the configuration, the trace and what the real engine measured. Here the
twin re-predicts every point from those files (the profile in `sim/profiles/` that matches
it), and each quantity is compared with the measurement:

- start / no-start and `num_blocks`: exact;
- peak KV blocks in use, preemptions: relative error;
- TTFT, TPOT, E2E at p50 / p90 / p99: relative error of the percentile values.

`GATES` is the one table of thresholds, per validation set; the accuracy-gate tests and the
README table both read it. A set without an entry uses `TARGETS` (issue 7's targets). Where a
target is missed, set the gate at the measured level with a margin, and say why in its note.

    python -m reports.validation.accuracy tests/data/validation/cpu_tiny_qwen3 [--markdown]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any

import pandas as pd

from engine.core.config import EngineConfig
from reports.band_format import contains
from reports.bands import predict_bands
from reports.metrics import twin_metrics
from sim.profile import PROFILE_DIR
from sim.twin import setup_twin, simulate
from workloads import read_trace
from workloads.trace_requests import model_requests

ROOT = Path(__file__).resolve().parents[2]
VALIDATION_DIR = ROOT / "tests" / "data" / "validation"
INDEX = "index.json"
LATENCIES = ("ttft", "tpot", "e2e")
PERCENTILES = ("p50", "p90", "p99")


@dataclass(frozen=True)
class Gate:
    """|error| <= limit (percent; 0 means exact), or with `floor`, value >= limit. `target`
    is issue 7's (the set scores': issue "Fidelity v2"'s); `note` says why a limit differs
    from it."""

    limit: float
    target: float
    note: str = ""
    floor: bool = False

    def holds(self, value: float) -> bool:
        return value >= self.limit - 1e-9 if self.floor else abs(value) <= self.limit + 1e-9


# Scores of a whole set (`set_scores`), gated beside the per-point quantities: the share of
# (point, metric) pairs whose measurement falls in the predicted 90 % band, the median
# |error| over the points' latency percentiles, and per latency metric the median signed
# error (its bias).
SET_SCORES = ("coverage", "median_abs_error", *(f"bias_{m}" for m in LATENCIES))


def _targets() -> dict[str, Gate]:
    gates = {"starts": Gate(0, 0), "num_blocks": Gate(0, 0),
             "kv_blocks_used_peak": Gate(2, 2), "total_preemptions": Gate(5, 5)}
    for name in LATENCIES:
        gates.update({f"{name}_{p}": Gate(3 if p == "p50" else 5, 3 if p == "p50" else 5)
                      for p in PERCENTILES})
    gates.update({"coverage": Gate(90, 90, floor=True), "median_abs_error": Gate(3, 3),
                  **{f"bias_{m}": Gate(2, 2) for m in LATENCIES}})
    return gates


TARGETS: dict[str, Gate] = _targets()
TARGETS_SCORES = {name: TARGETS[name].limit for name in SET_SCORES}

CPU_NOTE = ("CPU engine on the shared 2-core dev machine, where other jobs' load moves "
            "step times: the same point replayed twice two minutes apart differed by up to "
            "100 % (E2E p90, chat at 70 %); gate = the committed run's error (2026-11-21) + "
            "a margin")


H100_NOTE = ("piecewise-graph engine (mixed steps still host-bound, ~9 ms; superseded by "
             "whole-step graphs) on a noisy H100 "
             "host: its calibration's held-out mixed-step error is 10 % median, and the load "
             "points replayed twice back to back differ by a median 20 / 11 / 11 % (TTFT / "
             "TPOT / E2E p50; shared prefix at 0.1: 0 vs 34 preemptions, TTFT p99 +807 %); "
             "the twin is a median 9.7 / 5.6 / 7.7 % off; the largest errors are the same "
             "preemption-bound points (shared prefix at 0.1: 22 preemptions predicted vs 0) "
             "and a slower host during the sweeps than during the calibration (most errors "
             "negative); gate = the committed run's error (2026-11-21 13:45-14:01 UTC) + a "
             "margin; the tight gates are the eager set's")

H200_NOTE = (
    "whole-step CUDA graphs (mixed steps GPU-bound) on an H200 whose speed moves in phases: "
    "the same points measured twice back to back differ by a median 5.9 / 5.1 / 5.9 % "
    "(TTFT / TPOT / E2E p50) and up to 71 / 15 / 32 %; the twin is a median 6.8 / 5.4 / "
    "8.2 % off (6.1 / 4.1 / 5.7 % against the second run), mostly short (the replays ran "
    "1-17 % slower than the calibration predicted, median 2 %); the largest errors are "
    "utilization 0.03 grid points whose preemption counts decide the tail; gate = the "
    "committed run's error (2026-12-04 06:16-06:29 UTC) + a margin")

H100_EAGER_NOTE = (
    "targets missed at some points: the median point is within 3.0 / 1.5 / 2.3 % (TTFT / "
    "TPOT / E2E p50) and 4.3-5.1 % at p90 / p99; the largest errors are grid points at "
    "utilization 0.1, where preemption counts decide the tail (block 16 / 2048: 2 "
    "preemptions predicted vs 8, TTFT p50 -27 %; block 128 / 2048: 4 vs 2, TTFT p90 +37 %), "
    "and TPOT over-predicted up to 9.4 % at block 128 / 2048; two back-to-back runs on "
    "another H100 differ from each other by a median 22 % in TTFT p50 (README, 'Run to "
    "run'); gate = the committed run's error (2026-11-21, engine 8fafeb3, profile refit with "
    "decode batch knots) + a margin")


SCORES_NOTE = (
    "set scores with BAND_REPLICATES = 4 seeded replicates per point (machine log-sd "
    "sim.noise.MACHINE_SPREAD, the profile's held-out step residuals), measured {date}: "
    "coverage {coverage:.1f} %, median |error| {median:.2f} %, median signed error TTFT "
    "{ttft:+.2f} / TPOT {tpot:+.2f} / E2E {e2e:+.2f} %; gate = that level with a margin "
    "(5 points of coverage, 1 of median |error|, 1.5 of bias){why}")


def _scores(coverage: float, median: float, ttft: float, tpot: float, e2e: float,
            why: str = "") -> tuple[dict[str, float], str]:
    """Score gates at a measured level (targets kept where met) and their note."""
    measured = {"coverage": coverage, "median_abs_error": median, "bias_ttft": ttft,
                "bias_tpot": tpot, "bias_e2e": e2e}
    gates = {}
    for name, value in measured.items():
        target = TARGETS_SCORES[name]
        if name == "coverage":
            gates[name] = target if value >= target else round(value - 5, 1)
        else:
            margin = 1.0 if name == "median_abs_error" else 1.5
            gates[name] = target if abs(value) <= target else round(abs(value) + margin, 1)
    note = SCORES_NOTE.format(date="2026-12-05", coverage=coverage, median=median, ttft=ttft,
                              tpot=tpot, e2e=e2e, why=f"; {why}" if why else "")
    return gates, note


def _measured(limits: dict[str, float], note: str,
              scores: dict[str, float] | None = None, score_note: str = "") -> dict[str, Gate]:
    """TARGETS with some limits set to a measured level (each carries `note`; the set
    scores' `score_note`)."""
    def gate(q: str, g: Gate) -> Gate:
        if q in limits:
            return Gate(limits[q], g.target, note)
        if scores and q in scores:
            return Gate(scores[q], g.target, score_note, g.floor)
        return g
    return {q: gate(q, g) for q, g in TARGETS.items()}


# The thresholds, per validation set (the folder name under tests/data/validation). Where a
# set misses a target, its limit is the measured error plus a margin, and the note says why.
GATES: dict[str, dict[str, Gate]] = {
    # H100 run (2026-11-21 10:47-10:56 UTC, 46 points, engine at commit 8fafeb3: every mixed
    # step eager; re-predicted with the profile committed beside it, in its profiles/):
    # start / no-start and num_blocks exact everywhere; largest |error| TTFT 27 / 37 / 38,
    # TPOT 9.4 / 9.8 / 12, E2E 11 / 8.6 / 10 % at p50 / p90 / p99, peak KV blocks 6.3 %,
    # preemptions 100 % (4 predicted vs 2, block 128, max_model_len 2048, utilization 0.1);
    # median |error| 3.0 / 1.5 / 2.3 % at p50.
    "h100_qwen3_0_6b_eager": _measured(
        {"ttft_p50": 32, "ttft_p90": 44, "ttft_p99": 45, "tpot_p50": 12, "tpot_p90": 12,
         "tpot_p99": 14, "e2e_p50": 13, "e2e_p90": 11, "e2e_p99": 12,
         "kv_blocks_used_peak": 8, "total_preemptions": 120}, H100_EAGER_NOTE,
        *_scores(94.4, 2.53, -1.05, 1.03, 1.35)),
    # The piecewise-graph engine (commit 06ad2a8; CUDA graphs between eager attention calls,
    # up to 4096 tokens) and its profile (in the set's profiles/), measured on another H100
    # (2026-11-21 13:42-14:01 UTC, 44 points: block 128 / 32768 at 0.5 and 0.9 were cut by
    # the command's time limit): start / no-start and num_blocks exact
    # everywhere; largest |error| TTFT 41 / 30 / 468, TPOT 36 / 17 / 18, E2E 24 / 20 / 19 %,
    # peak KV blocks 14 %, preemptions 2100 % (22 vs 0); median 9.7 / 5.6 / 7.7 % at p50.
    "h100_qwen3_0_6b": _measured(
        {"ttft_p50": 50, "ttft_p90": 40, "ttft_p99": 520, "tpot_p50": 45, "tpot_p90": 22,
         "tpot_p99": 22, "e2e_p50": 30, "e2e_p90": 25, "e2e_p99": 24,
         "kv_blocks_used_peak": 18, "total_preemptions": 2500}, H100_NOTE,
        *_scores(87.8, 7.37, -7.37, -3.13, -2.74, "the host ran slower during the sweeps "
                 "than during the calibration (median point 1.02x its profile's busy time)")),
    # The shipped engine (one CUDA graph per mixed step up to 4096 tokens) and profile, on an
    # H200 (2026-12-04, 46 points: the whole grid at 0.03 / 0.06 / 0.5 / 0.9 and the load
    # levels): start / no-start and num_blocks exact everywhere; largest |error| TTFT 62 /
    # 44 / 41, TPOT 18 / 16 / 27, E2E 30 / 22 / 22 %, peak KV blocks 9.2 %, preemptions 42 %;
    # median 6.8 / 5.4 / 8.2 % at p50.
    "h200_qwen3_0_6b": _measured(
        {"ttft_p50": 70, "ttft_p90": 50, "ttft_p99": 48, "tpot_p50": 22, "tpot_p90": 20,
         "tpot_p99": 30, "e2e_p50": 35, "e2e_p90": 25, "e2e_p99": 25,
         "kv_blocks_used_peak": 12, "total_preemptions": 50}, H200_NOTE,
        *_scores(78.6, 7.03, -7.13, -5.11, -6.65, "the replays' steps took a median 115 us "
                 "more than the profile predicts for them (reports.validation.steps: median "
                 "point 1.05x its busy time): that serving overhead, fit on this run and "
                 "added to the profile (meta serving_overhead), gives run 2 a bias of -1.3 / "
                 "+0.6 / -0.7 % and a coverage of 94 %; the committed profile keeps the "
                 "golden records, so it is not added here")),
    # Committed run's largest |error| (README, "How accurate is kvtwin"): TTFT 22 / 68 / 76,
    # TPOT 47 / 49 / 57, E2E 37 / 48 / 47 % at p50 / p90 / p99; peak KV blocks 33 %,
    # preemptions 12.5 % (8 vs 9 and 7 vs 8).
    "cpu_tiny_qwen3": _measured(
        {"ttft_p50": 30, "ttft_p90": 85, "ttft_p99": 95, "tpot_p50": 60, "tpot_p90": 60,
         "tpot_p99": 70, "e2e_p50": 50, "e2e_p90": 60, "e2e_p99": 60,
         "kv_blocks_used_peak": 40, "total_preemptions": 20}, CPU_NOTE,
        *_scores(70.0, 9.36, 5.58, 0.31, 3.00, "the shared CPU box's load moves step times "
                 "more than any profile's spread")),
}


def gates_for(set_name: str) -> dict[str, Gate]:
    return GATES.get(set_name, TARGETS)


# -- reading a set ------------------------------------------------------------------------------

@dataclass
class ValidationSet:
    path: Path
    index: dict[str, Any]

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def points(self) -> list[dict[str, Any]]:
        return list(self.index["points"])

    @property
    def profile_dir(self) -> Path | None:
        """The set's own profiles (`profiles/` beside its index), for a set measured on an
        older engine than the shipped profile describes; None: sim/profiles."""
        own = self.path / "profiles"
        return own if own.is_dir() else None

    def point(self, point_id: str) -> dict[str, Any]:
        for p in self.points:
            if p["id"] == point_id:
                return p
        raise KeyError(f"{self.name}: no point {point_id!r}")

    def trace(self, point: dict[str, Any]):
        return read_trace(self.path / point["trace"])


def find_sets(root: Path = VALIDATION_DIR) -> list[ValidationSet]:
    return [load_set(p.parent) for p in sorted(Path(root).glob(f"*/{INDEX}"))]


def load_set(path: Path) -> ValidationSet:
    index = json.loads((Path(path) / INDEX).read_text())
    if index.get("format") != "kvtwin-validation/1":
        raise ValueError(f"{path / INDEX}: format={index.get('format')!r} is invalid: must be "
                         "'kvtwin-validation/1'")
    return ValidationSet(Path(path), index)


# -- re-predicting ------------------------------------------------------------------------------

def repredict(vset: ValidationSet, point: dict[str, Any], profiles: Path | None = None,
              scale: float = 1.0) -> dict[str, Any]:
    """The twin's prediction for a committed point, from its config and trace alone, with
    the profiles in `profiles` (default: the set's own, else sim/profiles); `scale`
    multiplies every predicted step time (a calibrated predictor's)."""
    profiles = profiles or vset.profile_dir
    return _repredict(str(vset.path), point["id"], str(profiles) if profiles else None, scale)


# Points recorded before the engine had piecewise CUDA graphs ran every mixed step eagerly.
PRE_PIECEWISE = {"max_cudagraph_tokens": 0}


def _setup(path: str, point_id: str, profiles: str | None) -> tuple[Any, Any]:
    """The twin's setup of a committed point and its requests."""
    vset = load_set(Path(path))
    point = vset.point(point_id)
    config = EngineConfig.from_kwargs(**(PRE_PIECEWISE | point["engine"]))
    setup = setup_twin(point["model"], point["hardware"], config, point["predictor"],
                       profile_dir=Path(profiles) if profiles else PROFILE_DIR)
    return setup, model_requests(vset.trace(point), setup.model.vocab_size)


@cache
def _repredict(path: str, point_id: str, profiles: str | None,
               scale: float = 1.0) -> dict[str, Any]:
    vset = load_set(Path(path))
    setup, requests = _setup(path, point_id, profiles)
    if scale != 1.0:
        if not hasattr(setup.step_time, "scaled"):
            raise ValueError(f"{vset.name} {point_id}: scaling step times needs a calibrated "
                             f"predictor, not {setup.step_time.kind!r}")
        setup = replace(setup, step_time=setup.step_time.scaled(scale))
    run = simulate(setup, requests)
    return {"starts": setup.memory.starts, "num_blocks": setup.memory.num_blocks,
            "error_type": setup.memory.error_type, "predictor": setup.predictor,
            "profile": setup.profile.name if setup.profile else None,
            "metrics": twin_metrics(run) if setup.memory.starts else None}


# -- errors -------------------------------------------------------------------------------------

def pct_err(predicted: float | None, measured: float | None, count: bool = False) -> float:
    """Signed percent error; counts divide by max(measured, 1). NaN when either is missing."""
    if predicted is None or measured is None:
        return math.nan
    if count:
        return 100.0 * (predicted - measured) / max(abs(measured), 1.0)
    if measured == 0:
        return 0.0 if predicted == 0 else math.inf
    return 100.0 * (predicted - measured) / measured


def metric_key(quantity: str) -> str:
    """ttft_p50 -> ttft_p50_s (summarize's key); other quantities are keys already."""
    name, _, pct = quantity.rpartition("_")
    return f"{quantity}_s" if name in LATENCIES and pct in PERCENTILES else quantity


def point_errors(point: dict[str, Any], predicted: dict[str, Any]) -> dict[str, float]:
    """Every gated quantity's error (percent; starts and num_blocks as absolute mismatch)."""
    real = point["real"]
    errors = {"starts": 0.0 if predicted["starts"] == real["starts"] else math.inf,
              "num_blocks": _blocks_error(predicted["num_blocks"], real.get("num_blocks"))}
    measured, sim = real.get("metrics"), predicted.get("metrics")
    if not (measured and sim and real["starts"] and predicted["starts"]):
        return errors
    for quantity in TARGETS:
        if quantity in errors or quantity in SET_SCORES:
            continue
        key = metric_key(quantity)
        counted = quantity in ("kv_blocks_used_peak", "total_preemptions")
        errors[quantity] = pct_err(sim.get(key), measured.get(key), count=counted)
    return errors


def _blocks_error(predicted: int, measured: int | None) -> float:
    if measured is None:
        return math.nan  # the engine's error message gave no count
    return float(abs(predicted - measured))


def violations(errors: dict[str, float], gates: dict[str, Gate]) -> list[str]:
    """One line per quantity whose |error| exceeds its gate (NaN: not applicable)."""
    out = []
    for quantity, err in errors.items():
        gate = gates.get(quantity)
        if gate is None or math.isnan(err):
            continue
        if not gate.holds(err):
            if gate.floor:
                out.append(f"{quantity}: {err:.1f} % is below the gate {gate.limit:g} %"
                           + (f" ({gate.note})" if gate.note else ""))
                continue
            unit = "" if quantity in ("starts", "num_blocks") else " %"
            out.append(f"{quantity}: error {err:+.2f}{unit} exceeds the gate {gate.limit:g}"
                       f"{unit}" + (f" ({gate.note})" if gate.note else ""))
    return out


# -- tables -------------------------------------------------------------------------------------

def errors_frame(vset: ValidationSet, profiles: Path | None = None) -> pd.DataFrame:
    """One row per point: its label, configuration and every quantity's error."""
    return pd.DataFrame([_error_row(point, point_errors(point, repredict(vset, point, profiles)))
                         for point in vset.points])


def repeat_frame(first: ValidationSet, repeat: ValidationSet) -> pd.DataFrame:
    """Measured against measured: for each point of `first` that `repeat` measured again
    (same workload, engine configuration and trace), the error of the repeat's measurement
    taken as a prediction of the first one; the floor no predictor can go under."""
    again = {point_key(p): p for p in repeat.points}
    rows = [_error_row(point, point_errors(point, again[point_key(point)]["real"]))
            for point in first.points if point_key(point) in again]
    if not rows:
        raise ValueError(f"{repeat.path}: no point of {first.path} was measured again")
    return pd.DataFrame(rows)


def sensitivity_frame(vset: ValidationSet, pct: float,
                      profiles: Path | None = None) -> pd.DataFrame:
    """How far the twin's own prediction of each point moves when every step time is
    `pct` percent longer or shorter: the larger |change| of each quantity (percent). Where
    a 1 % step-time error moves a metric by more than its target, the point is not
    predictable to that target by any step-time model short of exact."""
    rows = []
    for point in vset.points:
        base = {"real": repredict(vset, point, profiles)}
        moves = [point_errors(base, repredict(vset, point, profiles, 1 + sign * pct / 100))
                 for sign in (1, -1)]
        rows.append(_error_row(point, {q: max(abs(m[q]) for m in moves) for q in moves[0]}))
    return pd.DataFrame(rows)


# -- bands: coverage and bias ---------------------------------------------------------------

BAND_REPLICATES = 4  # per point in the gates: seeded, the machine scale drawn stratified
BAND_QUANTITIES = (*(f"{m}_{p}" for m in LATENCIES for p in PERCENTILES), "total_preemptions")


def repredict_bands(vset: ValidationSet, point: dict[str, Any],
                    replicates: int = BAND_REPLICATES, seed: int = 0,
                    profiles: Path | None = None) -> dict[str, Any] | None:
    """The twin's 5-95 % bands for a committed point (`reports.bands`); None where the
    point does not start."""
    profiles = profiles or vset.profile_dir
    return _repredict_bands(str(vset.path), point["id"], str(profiles) if profiles else None,
                            replicates, seed)


@cache
def _repredict_bands(path: str, point_id: str, profiles: str | None, replicates: int,
                     seed: int) -> dict[str, Any] | None:
    setup, requests = _setup(path, point_id, profiles)
    if not setup.memory.starts:
        return None
    return predict_bands(setup, requests, replicates, seed)


def coverage_frame(vset: ValidationSet, replicates: int = BAND_REPLICATES, seed: int = 0,
                   profiles: Path | None = None) -> pd.DataFrame:
    """One row per (started point, banded quantity) with a measurement: measured,
    predicted, the band and whether the measurement falls in it."""
    rows = []
    for point in vset.points:
        measured = point["real"].get("metrics")
        bands = repredict_bands(vset, point, replicates, seed, profiles)
        if not (measured and bands and point["real"]["starts"]):
            continue
        predicted = repredict(vset, point, profiles)["metrics"]
        for quantity in BAND_QUANTITIES:
            key, value = metric_key(quantity), measured.get(metric_key(quantity))
            band = bands["metrics"].get(key)
            if value is None or band is None:
                continue
            count = quantity == "total_preemptions"
            rows.append({"point": point["id"], "workload": point["workload_label"],
                         "quantity": quantity, "measured": value,
                         "predicted": predicted.get(key), "p5": band["p5"],
                         "p95": band["p95"], "inside": contains(band, value, count)})
    return pd.DataFrame(rows)


def set_scores(errors: pd.DataFrame, coverage: pd.DataFrame | None = None) -> dict[str, float]:
    """The set's coverage (percent of its (point, quantity) pairs in their band), median
    |error| over its started points' latency percentiles, and per latency metric the
    median signed error."""
    started = errors[errors["starts"]]
    columns = {m: [f"err_{m}_{p}" for p in PERCENTILES] for m in LATENCIES}
    every = pd.concat([started[c] for cs in columns.values() for c in cs]).dropna()
    scores = {"median_abs_error": float(every.abs().median())}
    for m, cs in columns.items():
        scores[f"bias_{m}"] = float(pd.concat([started[c] for c in cs]).dropna().median())
    if coverage is not None and len(coverage):
        scores["coverage"] = float(100 * coverage["inside"].mean())
    return scores


def coverage_table(coverage: pd.DataFrame) -> pd.DataFrame:
    """Coverage per quantity and over all, percent."""
    rows = [{"quantity": q, "pairs": len(g), "coverage": 100 * g["inside"].mean()}
            for q, g in coverage.groupby("quantity", sort=False)]
    rows.append({"quantity": "all", "pairs": len(coverage),
                 "coverage": 100 * coverage["inside"].mean()})
    return pd.DataFrame(rows)


def point_key(point: dict[str, Any]) -> str:
    return json.dumps([point["workload_label"], point["engine"], point["trace"]],
                      sort_keys=True)


def _error_row(point: dict[str, Any], errors: dict[str, float]) -> dict[str, Any]:
    return {"point": point["id"], "workload": point["workload_label"],
            "block_size": point["engine"]["block_size"],
            "max_model_len": point["engine"]["max_model_len"],
            "gpu_memory_utilization": point["engine"]["gpu_memory_utilization"],
            "starts": point["real"]["starts"], **{f"err_{k}": v for k, v in errors.items()}}


def error_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per workload (load level): points, then the largest |error| over its points of each
    latency metric x percentile, peak KV blocks and preemptions; a last row over all."""
    columns = _error_columns()
    started = frame[frame["starts"]]
    groups = [(label, g) for label, g in started.groupby("workload", sort=False)]
    rows = [_group_row(label, g, columns) for label, g in groups + [("all", started)]]
    return pd.DataFrame(rows)


def median_table(frame: pd.DataFrame) -> pd.DataFrame:
    """One row: the median |error| over all started points, per quantity (the typical
    point, beside error_table's worst)."""
    started = frame[frame["starts"]]
    return pd.DataFrame([_group_row("all, median", started, _error_columns(), "median")])


def _error_columns() -> list[str]:
    return [f"err_{m}_{p}" for m in LATENCIES for p in PERCENTILES] + \
        ["err_kv_blocks_used_peak", "err_total_preemptions"]


def _group_row(label: str, group: pd.DataFrame, columns: list[str],
               how: str = "max") -> dict[str, Any]:
    row: dict[str, Any] = {"workload": label, "points": len(group)}
    for c in columns:
        values = group[c].abs() if c in group else pd.Series(dtype=float)
        row[c.removeprefix("err_")] = float(values.agg(how)) if values.notna().any() \
            else math.nan
    return row


def markdown(table: pd.DataFrame) -> str:
    """The error table as README markdown: max |error| in percent."""
    head = ["workload", "points"] + [c for c in table.columns if c not in ("workload", "points")]
    lines = ["| " + " | ".join(h.replace("_", " ") for h in head) + " |",
             "| " + " | ".join("---" for _ in head) + " |"]
    for _, row in table.iterrows():
        cells = [str(row["workload"]), str(int(row["points"]))]
        cells += ["–" if pd.isna(row[c]) else f"{row[c]:.1f}" for c in head[2:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def exact_summary(frame: pd.DataFrame) -> str:
    """The exact quantities over all points: start verdicts and num_blocks."""
    starts = int((frame["err_starts"] == 0).sum())
    blocks = frame["err_num_blocks"].dropna()
    return (f"start / no-start correct at {starts}/{len(frame)} points; num_blocks exact at "
            f"{int((blocks == 0).sum())}/{len(blocks)} points with a measured count")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m reports.validation.accuracy",
                                description="Re-predict a validation set; print its errors.")
    p.add_argument("set", type=Path, help="tests/data/validation/<set>")
    p.add_argument("--markdown", action="store_true", help="the README table")
    p.add_argument("--points", action="store_true", help="every point's errors too")
    p.add_argument("--repeat", type=Path, metavar="SET",
                   help="a second measurement of the set's points: print the first run's "
                        "errors against it (measured against measured) instead")
    p.add_argument("--profiles", type=Path, metavar="DIR",
                   help="re-predict with the profiles in DIR (the calibration of the machine "
                        "that measured the set) instead of sim/profiles")
    p.add_argument("--bands", type=int, metavar="N", nargs="?", const=BAND_REPLICATES,
                   help="also predict each point's 5-95 %% band with N replicates (default "
                        f"{BAND_REPLICATES}, as the gates) and print the coverage and the set "
                        "scores against the gates")
    p.add_argument("--sensitivity", type=float, metavar="PCT",
                   help="print how far the twin's own metrics move when every step time is "
                        "PCT percent longer or shorter, instead")
    args = p.parse_args(argv)
    vset = load_set(args.set)
    if args.repeat:
        frame = repeat_frame(vset, load_set(args.repeat))
    elif args.sensitivity is not None:
        frame = sensitivity_frame(vset, args.sensitivity, args.profiles)
    else:
        frame = errors_frame(vset, args.profiles)
    if args.points:
        print(frame.to_string(index=False, float_format=lambda v: f"{v:+.2f}"))
    for table in (error_table(frame), median_table(frame)):
        print(markdown(table) if args.markdown else table.to_string(
            index=False, float_format="{:.2f}".format))
    print(exact_summary(frame))
    if args.bands and not args.repeat and args.sensitivity is None:
        print_scores(vset, frame, coverage_frame(vset, args.bands, 0, args.profiles))
    return 0


def print_scores(vset: ValidationSet, frame: pd.DataFrame, coverage: pd.DataFrame) -> None:
    print(coverage_table(coverage).to_string(index=False, float_format="{:.1f}".format))
    scores = set_scores(frame, coverage)
    gates = gates_for(vset.name)
    for name, value in scores.items():
        gate = gates[name]
        verdict = "ok" if gate.holds(value) else "FAILS"
        sign = ">=" if gate.floor else "|x| <="
        print(f"{name}: {value:+.2f} %  (gate {sign} {gate.limit:g}: {verdict})")


if __name__ == "__main__":
    sys.exit(main())
