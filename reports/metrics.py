"""Serving metrics from request and step records, defined as vLLM's `bench serve` defines them.

Inputs are DataFrames whose columns are the fields of `engine.core.records.RequestRecord` and
`StepRecord` (the same schema from the simulator and the engine); `requests_frame` and
`steps_frame` build them from record objects or dicts. Pure pandas/numpy (no torch).

Definitions (times in seconds, per completed request: not rejected, and finished):
  TTFT  = first_token - arrival          E2E = finish - arrival
  TPOT  = (E2E - TTFT) / (output_len - 1), undefined (NaN, left out of TPOT statistics) when
          output_len <= 1
  queue = first_scheduled - arrival (the first admission; re-admissions after a preemption
          are not counted again)
  ITL   = see `itl_samples`: the records hold no per-token timestamps, so the samples come from
          the steps.
  duration = last finish of a completed request - first arrival of any request.
  goodput  = completed requests meeting every SLO given, per second of duration; a request
          without a TPOT (one output token) meets any TPOT SLO, as in vLLM's --goodput.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import fields
from typing import Any

import numpy as np
import pandas as pd

from engine.core.records import RequestRecord, StepRecord

REQUEST_SCHEMA = tuple(f.name for f in fields(RequestRecord))
STEP_SCHEMA = tuple(f.name for f in fields(StepRecord))
# The columns the metrics read; the others of the schema may be absent.
REQUEST_COLUMNS = ("arrival_s", "first_scheduled_s", "first_token_s", "finish_s", "prompt_len",
                   "output_len", "num_cached_tokens", "num_preemptions", "rejected")
STEP_COLUMNS = ("step", "start_s", "end_s", "num_decode_seqs", "num_running", "num_waiting",
                "num_blocks_used")
DEFAULT_PERCENTILES = (50, 90, 99)
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2e", "queue")


# -- frames -------------------------------------------------------------------------------------

def requests_frame(records: Iterable[RequestRecord | dict[str, Any]]) -> pd.DataFrame:
    """A request DataFrame with every schema column, also when there are no records."""
    return _frame(records, REQUEST_SCHEMA)


def steps_frame(records: Iterable[StepRecord | dict[str, Any]]) -> pd.DataFrame:
    """A step DataFrame with every schema column, also when there are no records."""
    return _frame(records, STEP_SCHEMA)


def _frame(records: Iterable[Any], schema: tuple[str, ...]) -> pd.DataFrame:
    rows = [r.to_dict() if hasattr(r, "to_dict") else dict(r) for r in records]
    return pd.DataFrame(rows, columns=list(schema))


def _checked(df: pd.DataFrame | None, required: tuple[str, ...], what: str) -> pd.DataFrame:
    """`df` if it has the required columns; an empty frame of them for empty input."""
    if df is None or (len(df) == 0 and any(c not in df.columns for c in required)):
        return pd.DataFrame(columns=list(required))
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(f"{what} DataFrame is missing column {missing[0]!r}; "
                         f"required columns: {', '.join(required)}")
    return df


def _in_step_order(df: pd.DataFrame) -> pd.DataFrame:
    """The steps by step index (stably); as they are when already in order, as streamed
    steps are (sorting would copy every column of a 262k-row chunk for nothing)."""
    if df["step"].is_monotonic_increasing:
        return df
    return df.sort_values("step", kind="stable")


def _num(df: pd.DataFrame, column: str) -> pd.Series:
    """A numeric column; None becomes NaN."""
    return pd.to_numeric(df[column], errors="coerce").astype(float)


def _rejected(df: pd.DataFrame) -> pd.Series:
    return df["rejected"].astype("boolean").fillna(False).astype(bool)


def _completed(df: pd.DataFrame) -> pd.Series:
    return ~_rejected(df) & _num(df, "finish_s").notna()


# -- per request and per token ------------------------------------------------------------------

def request_latencies(requests_df: pd.DataFrame) -> pd.DataFrame:
    """One row per completed request: queue_s, ttft_s, tpot_s, e2e_s and its token counts."""
    df = _checked(requests_df, REQUEST_COLUMNS, "requests")
    done = df[_completed(df)]
    arrival = _num(done, "arrival_s")
    ttft = _num(done, "first_token_s") - arrival
    e2e = _num(done, "finish_s") - arrival
    output_len = _num(done, "output_len")
    tpot = ((e2e - ttft) / (output_len - 1)).where(output_len > 1)
    ids = done["request_id"] if "request_id" in done.columns else pd.Series(done.index)
    out = pd.DataFrame({
        "request_id": ids.to_numpy(),
        "queue_s": (_num(done, "first_scheduled_s") - arrival).to_numpy(),
        "ttft_s": ttft.to_numpy(), "tpot_s": tpot.to_numpy(), "e2e_s": e2e.to_numpy(),
    })
    for column in ("prompt_len", "output_len", "num_cached_tokens", "num_preemptions"):
        out[column] = pd.to_numeric(done[column]).to_numpy()  # counts keep their int dtype
    return out


def itl_samples(steps_df: pd.DataFrame) -> np.ndarray:
    """Inter-token latencies: each decode step gives `num_decode_seqs` samples of its end
    minus the previous step's end.

    A decode sequence in step k produced its previous token at the end of the step that last
    ran it; when running requests decode in every step, that is step k-1, and the sample is
    the true gap between its two tokens. The V1 scheduler serves every running request in
    every step, so the samples are exact except across a preemption (the gap spans the
    re-prefill) and in a step whose token budget could not fit all running requests.
    """
    df = _in_step_order(_checked(steps_df, STEP_COLUMNS, "steps"))
    end = _num(df, "end_s").to_numpy()
    decode = _num(df, "num_decode_seqs").fillna(0).to_numpy().astype(np.int64)
    if end.size < 2:
        return np.empty(0)
    return np.repeat(np.diff(end), decode[1:])


# -- summary ------------------------------------------------------------------------------------

class StepStats:
    """The metrics of step records, taken over chunks of steps in step order, so a long
    run's steps never have to be held at once: ITL samples as (gap, count) pairs (12 bytes
    per decode step, never one sample per token), counts, peaks and the duration-weighted
    sum of blocks used."""

    def __init__(self) -> None:
        self.num_steps = self.max_running = self.max_waiting = self.peak_used = 0
        self.weighted_used = self.total_duration = self.used_sum = 0.0
        self._last_end: float | None = None
        self._gaps: list[np.ndarray] = []
        self._counts: list[np.ndarray] = []

    def add(self, steps: pd.DataFrame) -> StepStats:
        df = _checked(steps, STEP_COLUMNS, "steps")
        if not df["step"].is_monotonic_increasing:
            df = df.sort_values("step", kind="stable")
        if len(df) == 0:
            return self
        end = _num(df, "end_s").to_numpy()
        decode = _num(df, "num_decode_seqs").fillna(0).to_numpy().astype(np.int64)
        self._add_itl(end, decode)
        used = _num(df, "num_blocks_used").to_numpy()
        durations = (end - _num(df, "start_s").to_numpy())
        self.num_steps += len(df)
        self.max_running = max(self.max_running, int(_num(df, "num_running").max()))
        self.max_waiting = max(self.max_waiting, int(_num(df, "num_waiting").max()))
        self.peak_used = max(self.peak_used, int(used.max()))
        weights = np.clip(np.nan_to_num(durations, nan=0.0), 0.0, None)
        self.weighted_used += float(used @ weights)
        self.total_duration += float(weights.sum())
        self.used_sum += float(used.sum())
        return self

    def _add_itl(self, end: np.ndarray, decode: np.ndarray) -> None:
        """Step k's decodes each wait end[k] - end[k-1] for their token (see itl_samples)."""
        if self._last_end is not None:
            end, decode = np.concatenate(([self._last_end], end)), np.concatenate(([0], decode))
        self._last_end = float(end[-1])
        keep = decode[1:] > 0
        self._gaps.append(np.diff(end)[keep])
        self._counts.append(decode[1:][keep].astype(np.uint32))

    def itl(self) -> tuple[np.ndarray, np.ndarray]:
        """ITL sample values and how many samples each stands for (kept as one array each
        from here on: no second copy)."""
        if not self._gaps:
            return np.empty(0), np.empty(0, dtype=np.uint32)
        if len(self._gaps) > 1:
            self._gaps, self._counts = [np.concatenate(self._gaps)], \
                [np.concatenate(self._counts)]
        return self._gaps[0], self._counts[0]

    def summary(self, num_blocks: int) -> dict[str, Any]:
        if self.total_duration > 0:
            mean = self.weighted_used / self.total_duration
        else:
            mean = self.used_sum / self.num_steps if self.num_steps else None
        peak = float(self.peak_used)
        return {
            "num_steps": self.num_steps, "max_concurrency": self.max_running,
            "max_waiting": self.max_waiting, "num_blocks": num_blocks,
            "kv_blocks_used_peak": int(peak), "kv_blocks_used_mean": mean,
            "kv_usage_peak": peak / num_blocks if num_blocks > 0 else None,
            "kv_usage_mean": mean / num_blocks if num_blocks > 0 and mean is not None else None,
        }


class WeightedSamples:
    """Samples given as values[i] repeated counts[i] times, never made. The k-th smallest
    is found without sorting them all: a count histogram over value bins finds its bin, and
    only that bin's values are sorted (memory: a bin index per value)."""

    BINS = 1 << 16

    def __init__(self, values: np.ndarray, counts: np.ndarray):
        keep = (counts > 0) & ~np.isnan(values)
        self.values, self.counts = values[keep], counts[keep]
        self.total = int(self.counts.sum(dtype=np.int64))
        if self.total:
            lo, hi = float(self.values.min()), float(self.values.max())
            span = hi - lo if hi > lo else 1.0
            # monotone in value: divide, then scale (no overflow however narrow the span)
            self.bins = ((self.values - lo) / span * (self.BINS - 1)).astype(np.int32)
            hist = np.bincount(self.bins, weights=self.counts, minlength=self.BINS)
            self.cum = np.cumsum(hist.astype(np.int64))

    def at(self, rank: int) -> float:
        """The rank-th smallest sample (0-based)."""
        b = int(np.searchsorted(self.cum, rank, side="right"))
        before = int(self.cum[b - 1]) if b else 0
        inside = self.bins == b
        order = np.argsort(self.values[inside], kind="stable")
        ends = np.cumsum(self.counts[inside][order].astype(np.int64))
        return float(self.values[inside][order][np.searchsorted(ends, rank - before,
                                                                side="right")])

    def mean(self) -> float:
        return float(np.dot(self.values, self.counts.astype(np.float64)) / self.total)

    def percentile(self, pct: float) -> float:
        """numpy's "linear" method, float for float."""
        n = self.total
        h = (n - 1) * (pct / 100)
        lo = min(int(np.floor(h)), n - 1)
        t = h - np.floor(h) if h < n - 1 else 0.0
        a, b = self.at(lo), self.at(min(lo + 1, n - 1))
        return a + (b - a) * t if t < 0.5 else b - (b - a) * (1 - t)

    def median(self) -> float:
        """numpy's: the middle sample, or the mean of the middle two."""
        mid = self.total // 2
        return self.at(mid) if self.total % 2 else (self.at(mid - 1) + self.at(mid)) / 2


def weighted_stats(values: np.ndarray, counts: np.ndarray, name: str,
                   percentiles: Sequence[float]) -> dict[str, Any]:
    """`_stats` of the samples in which values[i] appears counts[i] times."""
    samples = WeightedSamples(values, counts)
    if samples.total == 0:
        return _stats(np.empty(0), name, percentiles)
    out: dict[str, Any] = {f"{name}_mean_s": samples.mean(),
                           f"{name}_median_s": samples.median()}
    for q in percentiles:
        out[f"{name}_p{q:g}_s"] = samples.percentile(q)
    return out


def summarize(requests_df: pd.DataFrame, steps_df: pd.DataFrame | StepStats | None, *,
              num_blocks: int,
              slo_ttft_s: float | None = None, slo_tpot_s: float | None = None,
              slo_e2e_s: float | None = None,
              percentiles: Sequence[float] = DEFAULT_PERCENTILES,
              itl_samples_s: Sequence[float] | np.ndarray | None = None) -> dict[str, Any]:
    """Every headline metric of a run, JSON-serialisable (plain ints/floats; NaN -> None).
    The steps come as a frame, or as the StepStats of a run whose steps were streamed.
    `itl_samples_s`: inter-token latencies measured per token (an HTTP client's), used
    instead of those the steps give."""
    _check_percentiles(percentiles)
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int | np.integer) \
            or num_blocks < 0:
        raise ValueError(f"num_blocks={num_blocks!r} is invalid: must be an integer >= 0")
    requests = _checked(requests_df, REQUEST_COLUMNS, "requests")
    steps = steps_df if isinstance(steps_df, StepStats) else StepStats().add(steps_df)
    latencies = request_latencies(requests)
    duration = _duration(requests)
    summary: dict[str, Any] = {**_counts(requests), "duration_s": duration}
    summary.update(_throughputs(latencies, duration))
    for name in LATENCY_METRICS:
        if name == "itl" and itl_samples_s is not None:
            summary.update(_stats(np.asarray(itl_samples_s, dtype=float), name, percentiles))
        elif name == "itl":
            summary.update(weighted_stats(*steps.itl(), name, percentiles))
        else:
            summary.update(_stats(latencies[f"{name}_s"].to_numpy(), name, percentiles))
    slos = {"ttft_s": slo_ttft_s, "tpot_s": slo_tpot_s, "e2e_s": slo_e2e_s}
    summary.update(_goodput(latencies, duration, slos))
    summary["prefix_cache_hit_rate"] = _hit_rate(requests)
    summary.update(steps.summary(int(num_blocks)))
    return {key: _plain(value) for key, value in summary.items()}


def twin_metrics(run: Any, steps: StepStats | None = None, **slos: float | None
                 ) -> dict[str, Any]:
    """`summarize` of a simulated run (sim.twin.TwinRun); `steps`: the StepStats of a run
    whose step records streamed elsewhere."""
    return summarize(run.requests, steps if steps is not None else run.steps,
                     num_blocks=run.num_blocks, **slos)


def _check_percentiles(percentiles: Sequence[float]) -> None:
    for q in percentiles:
        if isinstance(q, bool) or not isinstance(q, int | float) or not 0 <= q <= 100:
            raise ValueError(f"percentiles contains {q!r}: each must be a number in [0, 100]")


def _counts(requests: pd.DataFrame) -> dict[str, int]:
    rejected, completed = _rejected(requests), _completed(requests)
    preemptions = _num(requests, "num_preemptions").fillna(0)
    return {
        "num_requests": len(requests), "completed": int(completed.sum()),
        "rejected": int(rejected.sum()), "unfinished": int((~rejected & ~completed).sum()),
        "preempted_requests": int((preemptions > 0).sum()),
        "total_preemptions": int(preemptions.sum()),
    }


def _duration(requests: pd.DataFrame) -> float:
    """First arrival (of any request) to the last finish of a completed one; 0 if none."""
    finish = _num(requests[_completed(requests)], "finish_s")
    if finish.empty:
        return 0.0
    return max(0.0, float(finish.max() - _num(requests, "arrival_s").min()))


def _rate(count: float, duration: float) -> float | None:
    return count / duration if duration > 0 else None


def _throughputs(latencies: pd.DataFrame, duration: float) -> dict[str, Any]:
    prompt = float(latencies["prompt_len"].sum())
    output = float(latencies["output_len"].sum())
    return {
        "total_input_tokens": int(prompt), "total_output_tokens": int(output),
        "request_throughput_req_s": _rate(len(latencies), duration),
        "output_throughput_tok_s": _rate(output, duration),
        "total_token_throughput_tok_s": _rate(prompt + output, duration),
    }


def _stats(values: np.ndarray, name: str, percentiles: Sequence[float]) -> dict[str, Any]:
    """mean, median and each percentile (numpy's linear interpolation, as vLLM), NaN left out."""
    v = np.asarray(values, dtype=float)
    v = v[~np.isnan(v)]
    empty = v.size == 0
    out: dict[str, Any] = {
        f"{name}_mean_s": None if empty else float(v.mean()),
        f"{name}_median_s": None if empty else float(np.median(v)),
    }
    for q in percentiles:
        out[f"{name}_p{q:g}_s"] = None if empty else float(np.percentile(v, q))
    return out


def _goodput(latencies: pd.DataFrame, duration: float,
             slos: dict[str, float | None]) -> dict[str, Any]:
    given = {col: limit for col, limit in slos.items() if limit is not None}
    if not given:
        return {"good_requests": None, "goodput_req_s": None}
    good = np.ones(len(latencies), dtype=bool)
    for col, limit in given.items():
        values = latencies[col]
        if col == "tpot_s":
            values = values.fillna(0.0)  # one output token: no TPOT, meets any TPOT SLO
        good &= (values <= limit).to_numpy()
    return {"good_requests": int(good.sum()), "goodput_req_s": _rate(int(good.sum()), duration)}


def _hit_rate(requests: pd.DataFrame) -> float | None:
    """Prefix-cache hit tokens / prompt tokens over admitted (scheduled, not rejected) requests."""
    admitted = requests[~_rejected(requests) & _num(requests, "first_scheduled_s").notna()]
    prompt = _num(admitted, "prompt_len").sum()
    return float(_num(admitted, "num_cached_tokens").sum() / prompt) if prompt > 0 else None


def _plain(value: Any) -> Any:
    """numpy scalars -> Python; NaN and infinities -> None."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# -- timeline -----------------------------------------------------------------------------------

def kv_usage_timeline(steps_df: pd.DataFrame, num_blocks: int) -> pd.DataFrame:
    """Per step, at its start (the snapshot is taken right after scheduling): blocks used,
    usage fraction (NaN when num_blocks is 0), running and waiting requests."""
    df = _in_step_order(_checked(steps_df, STEP_COLUMNS, "steps"))
    used = pd.to_numeric(df["num_blocks_used"])
    return pd.DataFrame({
        "step": pd.to_numeric(df["step"]).to_numpy(),
        "time_s": _num(df, "start_s").to_numpy(),
        "end_s": _num(df, "end_s").to_numpy(),
        "blocks_used": used.to_numpy(),
        "usage": (used / num_blocks).to_numpy() if num_blocks > 0 else np.full(len(df), np.nan),
        "running": pd.to_numeric(df["num_running"]).to_numpy(),
        "waiting": pd.to_numeric(df["num_waiting"]).to_numpy(),
    })
