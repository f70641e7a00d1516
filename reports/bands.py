"""Prediction bands: seeded Monte-Carlo replicates of the twin (DESIGN.md "Step time").

Each replicate is a whole `sim.twin.simulate` of the same requests with the setup's
calibrated step times (1) scaled by one draw of the machine-to-machine spread and (2) each
step multiplied by its own draw of the profile's held-out residuals (`sim.noise`).
Replicates run in parallel worker processes, started before the point prediction so that
they run beside it (`start_bands`). Per metric the band is the 5-95 % range of the
replicates' values, from a normal fit to their logarithms (latencies) or to the values
themselves (counts): a few replicates pin a mean and a spread far better than their
extremes (the machine factor is drawn stratified, so they span its distribution). The
point prediction stays the noise-free run.

    bands = predict_bands(setup, requests, replicates=8, seed=0)
    bands["metrics"]["ttft_p50_s"]  # {"p5": ..., "p50": ..., "p95": ...}
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from engine.core.request import Request, RequestTable, as_table
from reports.metrics import StepStats, request_latencies, twin_metrics
from sim.noise import MachineSpread, NoisyStepTime, Residuals
from sim.twin import TwinSetup, simulate

Z95 = 1.6448536269514722  # the standard normal's 95th percentile
LATENCIES = ("ttft", "tpot", "itl", "e2e")
BAND_METRICS = (*(f"{m}_p{q}_s" for m in LATENCIES for q in (50, 90, 99)),
                "total_preemptions")
COUNTS = ("total_preemptions",)
CDF_COLUMNS = ("ttft_s", "tpot_s", "e2e_s")
CDF_LEVELS = tuple(round(q, 2) for q in np.linspace(0.01, 0.99, 50))
POLL_S = 0.2
MAX_REQUESTS = 200_000  # bands.max_requests: replicates multiply a run's time
StopFn = Callable[[], bool]


@dataclass(frozen=True)
class Plan:
    """What each replicate draws: its machine scale and its step-noise seed."""

    scales: tuple[float, ...]
    seeds: tuple[int, ...]
    residuals: Residuals
    spread: MachineSpread

    @classmethod
    def of(cls, setup: TwinSetup, replicates: int, seed: int,
           spread: MachineSpread | None = None) -> Plan:
        if setup.profile is None or not hasattr(setup.step_time, "scaled"):
            raise ValueError(f"prediction bands need a calibration profile: the "
                             f"{setup.step_time.kind} predictor has no measured residuals")
        spread = spread or setup.profile.machine_spread()
        seeds = np.random.SeedSequence([seed, 0xBA2D]).generate_state(replicates)
        return cls(tuple(float(s) for s in spread.scales(replicates, seed)),
                   tuple(int(s) for s in seeds), setup.profile.residuals(), spread)


def replicate_setup(setup: TwinSetup, plan: Plan, i: int) -> TwinSetup:
    """The setup of replicate `i`: scaled step times, each step with its own noise."""
    base = setup.step_time.scaled(plan.scales[i])  # type: ignore[attr-defined]
    return replace(setup, step_time=NoisyStepTime(base, plan.residuals, plan.seeds[i]))


def replicate_values(setup: TwinSetup, requests: RequestTable,
                     should_stop: StopFn | None = None) -> dict[str, Any]:
    """One run's band metrics and latency quantiles (its steps never held: streamed)."""
    stats = StepStats()
    run = simulate(setup, requests, on_steps=stats.add, should_stop=should_stop)
    if should_stop is not None and should_stop():
        raise BandsStopped
    metrics = twin_metrics(run, stats)
    latencies = request_latencies(run.requests)
    cdf = {}
    for column in CDF_COLUMNS:
        v = latencies[column].dropna().to_numpy(dtype=float)
        cdf[column] = np.quantile(v, CDF_LEVELS).tolist() if v.size else None
    return {"metrics": {k: metrics.get(k) for k in BAND_METRICS}, "cdf": cdf}


class BandsStopped(Exception):
    """The replicates were stopped (a signal): no band."""


# -- workers --------------------------------------------------------------------------------

_SHARED: dict[str, Any] = {}


def _init(setup: TwinSetup, requests: RequestTable, plan: Plan) -> None:
    """A worker's copy of the shared inputs (inherited, not pickled, where forked)."""
    _SHARED.update(setup=setup, requests=requests, plan=plan)


def _init_worker(setup: TwinSetup, requests: RequestTable, plan: Plan) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a forked parent's handler would outlive
    _init(setup, requests, plan)


def _run(i: int, should_stop: StopFn | None = None) -> dict[str, Any]:
    setup, requests, plan = _SHARED["setup"], _SHARED["requests"], _SHARED["plan"]
    t0 = time.perf_counter()
    out = replicate_values(replicate_setup(setup, plan, i), requests, should_stop)
    return {**out, "wall_s": time.perf_counter() - t0}


class PendingReplicates:
    """Replicates running in `workers` processes (forked, so they share the inputs); they
    can start before the point prediction and run beside it."""

    def __init__(self, setup: TwinSetup, requests: RequestTable, plan: Plan, workers: int):
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        n = len(plan.scales)
        self.pool = multiprocessing.get_context(method).Pool(
            min(workers, n), _init_worker, (setup, requests, plan))
        self.result = self.pool.map_async(_run, range(n))

    def wait(self, should_stop: StopFn | None = None) -> list[dict[str, Any]]:
        """Every replicate, in order; `should_stop` is asked every POLL_S (then the workers
        are terminated: BandsStopped)."""
        while not self.result.ready():
            if should_stop is not None and should_stop():
                self.close()
                raise BandsStopped
            self.result.wait(POLL_S)
        out = self.result.get()
        self.close()
        return out

    def close(self) -> None:
        self.pool.terminate()
        self.pool.join()


def run_here(setup: TwinSetup, requests: RequestTable, plan: Plan,
             should_stop: StopFn | None = None) -> list[dict[str, Any]]:
    """Every replicate, in order, in this process (`should_stop` asked between steps)."""
    _init(setup, requests, plan)
    try:
        return [_run(i, should_stop) for i in range(len(plan.scales))]
    finally:
        _SHARED.clear()


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
               else os.cpu_count() or 1)


# -- bands ------------------------------------------------------------------------------------

def band(values: Iterable[float | None], count: bool = False) -> dict[str, float] | None:
    """{p5, p50, p95} of a normal fit to the values (counts) or their logs (positive
    values); None without two values. Zero spread gives a band of one value."""
    v = np.asarray([x for x in values if x is not None], dtype=float)
    if v.size < 2:
        return None
    logs = not count and bool((v > 0).all())
    x = np.log(v) if logs else v
    mu, sd = float(x.mean()), float(x.std(ddof=1))
    lo, mid, hi = mu - Z95 * sd, mu, mu + Z95 * sd
    if logs:
        return {"p5": float(np.exp(lo)), "p50": float(np.exp(mid)), "p95": float(np.exp(hi))}
    return {"p5": max(lo, 0.0) if count else lo, "p50": mid, "p95": hi}


def cdf_bands(replicates: list[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """Per latency column, the 5-95 % band of each quantile level of its CDF."""
    out = {}
    for column in CDF_COLUMNS:
        curves = [r["cdf"][column] for r in replicates if r["cdf"].get(column)]
        if len(curves) < 2:
            continue
        levels = [band(values) for values in zip(*curves, strict=True)]
        if any(b is None for b in levels):
            continue
        out[column] = {"q": list(CDF_LEVELS), "lo": [_sig(b["p5"]) for b in levels],
                       "hi": [_sig(b["p95"]) for b in levels]}
    return out


def _sig(x: float) -> float:
    return float(f"{x:.6g}")


def predict_bands(setup: TwinSetup, requests: RequestTable | Iterable[Request],
                  replicates: int = 8, seed: int = 0, workers: int | None = None,
                  spread: MachineSpread | None = None,
                  should_stop: StopFn | None = None) -> dict[str, Any]:
    """Per band metric {p5, p50, p95} over `replicates` seeded runs (in `workers`
    processes, default: this machine's cores), with the CDF bands and how they were made."""
    return BandsRun(setup, as_table(requests), replicates, seed, workers, spread).finish(
        should_stop)


class BandsRun:
    """Prediction bands in the making. With more than one worker the replicates start at
    once, in worker processes, and run beside whatever this process does next (the point
    prediction); `finish` collects them (or runs them here, with one worker)."""

    def __init__(self, setup: TwinSetup, table: RequestTable, replicates: int, seed: int,
                 workers: int | None, spread: MachineSpread | None = None):
        if replicates < 2:
            raise ValueError(f"replicates={replicates!r} is invalid: a band needs 2 or more")
        self.t0 = time.perf_counter()
        self.setup, self.table, self.seed = setup, table, seed
        self.plan = Plan.of(setup, replicates, seed, spread)
        self.workers = default_workers() if workers is None else workers
        self.pending = PendingReplicates(setup, table, self.plan, self.workers) \
            if self.workers > 1 else None

    def finish(self, should_stop: StopFn | None = None) -> dict[str, Any]:
        plan = self.plan
        if self.pending is not None:
            runs = self.pending.wait(should_stop)
        else:
            runs = run_here(self.setup, self.table, plan, should_stop)
        metrics = {k: band((r["metrics"][k] for r in runs), k in COUNTS)
                   for k in BAND_METRICS}
        return {
            "level": [5, 95], "replicates": len(plan.scales), "seed": self.seed,
            "workers": min(self.workers, len(plan.scales)),
            "metrics": {k: v for k, v in metrics.items() if v is not None},
            "cdf": cdf_bands(runs),
            "sources": {"step_noise": plan.residuals.source,
                        "step_noise_spread": plan.residuals.spread(),
                        "machine_log_sd": plan.spread.log_sd,
                        "machine_spread": plan.spread.source,
                        "method": "normal fit to log values (counts: values), stratified "
                                  "machine scales"},
            "scales": [round(s, 5) for s in plan.scales],
            "replicate_wall_s": [round(r["wall_s"], 3) for r in runs],
            "wall_s": round(time.perf_counter() - self.t0, 3),
        }

    def cancel(self) -> None:
        if self.pending is not None:
            self.pending.close()


@dataclass
class SimBands:
    """What run.py records as summary["sim"]["bands"], started before the point prediction:
    `outcome` when known at once (None: off or the configuration cannot start; {"skipped":
    why}), else `run`, finished after the prediction."""

    outcome: dict[str, Any] | None = None
    run: BandsRun | None = None
    replicates: int = 0

    def finish(self, should_stop: StopFn | None = None,
               log: Callable[[str], None] | None = None) -> dict[str, Any] | None:
        if self.run is None:
            return self.outcome
        try:
            bands = self.run.finish(should_stop)
        except BandsStopped:
            return {"skipped": "stopped by a signal"}
        finally:
            self.run.cancel()
        if log is not None:
            log(f"bands: {self.replicates} replicates in {bands['wall_s']:.1f} s "
                f"({bands['workers']} workers)")
        return bands

    def cancel(self) -> None:
        if self.run is not None:
            self.run.cancel()


def start_bands(setup: TwinSetup, requests: RequestTable | Iterable[Request],
                replicates: int, seed: int = 0, workers: int | None = None,
                machine_log_sd: float | None = None,
                max_requests: int = MAX_REQUESTS) -> SimBands:
    """None when off (replicates 0) or the configuration cannot start; {"skipped": why}
    where the predictor has no profile or the trace has more than `max_requests` requests;
    otherwise the replicates, started (see BandsRun). `machine_log_sd`: the machine spread to
    draw from instead of the profile's."""
    if replicates <= 0 or not setup.memory.starts:
        return SimBands()
    table = as_table(requests)
    if len(table) > max_requests:
        return SimBands({"skipped": f"{len(table):,} requests is more than bands.max_requests "
                                    f"({max_requests:,}): each replicate is a whole "
                                    f"simulation"})
    spread = None if machine_log_sd is None else MachineSpread(
        machine_log_sd, "bands.machine_log_sd (the run's configuration)")
    try:
        return SimBands(run=BandsRun(setup, table, replicates, seed, workers, spread),
                        replicates=replicates)
    except ValueError as err:
        return SimBands({"skipped": str(err)})


def sim_bands(setup: TwinSetup, requests: RequestTable | Iterable[Request],
              replicates: int, seed: int = 0, workers: int | None = None,
              machine_log_sd: float | None = None, max_requests: int = MAX_REQUESTS,
              should_stop: StopFn | None = None,
              log: Callable[[str], None] | None = None) -> dict[str, Any] | None:
    """`start_bands` and its finish, one after the other."""
    return start_bands(setup, requests, replicates, seed, workers, machine_log_sd,
                       max_requests).finish(should_stop, log)
