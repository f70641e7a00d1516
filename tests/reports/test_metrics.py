"""Serving metrics: hand-computed examples for every metric, edge cases, and ITL checked
against true per-token timestamps of a run of the engine's own scheduler."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.core.config import EngineConfig
from engine.core.records import RequestRecord, StepRecord
from engine.core.scheduler import Scheduler
from engine.core.sequence import SamplingParams, Sequence
from reports.metrics import (
    StepStats,
    _stats,
    itl_samples,
    kv_usage_timeline,
    request_latencies,
    requests_frame,
    steps_frame,
    summarize,
    weighted_stats,
)


def req(rid, arrival, sched, first, finish, prompt, output, cached=0, preempt=0,
        rejected=False):
    return RequestRecord(rid, arrival, sched, first, finish, prompt, output, cached, preempt,
                         "rejected: too long" if rejected else "length", rejected)


def step(k, start, end, decode=0, running=1, waiting=0, used=0, free=0, prefill=0):
    return StepRecord(k, start, end, prefill + decode, prefill, int(prefill > 0), decode,
                      running, waiting, used, free, 0)


# r0: 3 tokens; r1: 1 token, preempted once, 16 cached; r2: rejected (the engine sets its
# finish to its arrival); r3: 4 tokens.
REQUESTS = requests_frame([
    req(0, 0.0, 0.0, 0.5, 1.5, 10, 3),
    req(1, 0.2, 0.5, 1.0, 1.0, 20, 1, cached=16, preempt=1),
    req(2, 0.4, None, None, 0.4, 5000, 0, rejected=True),
    req(3, 1.0, 1.0, 1.5, 2.5, 4, 4),
])
# Unsorted on purpose; steps 0..3 end at 1.0, 1.5, 1.7, 2.6.
STEPS = steps_frame([
    step(2, 1.5, 1.7, decode=3, running=3, waiting=0, used=6, prefill=0),
    step(0, 0.0, 1.0, decode=0, running=1, waiting=2, used=2, prefill=10),
    step(3, 1.7, 2.6, decode=1, running=1, waiting=0, used=3),
    step(1, 1.0, 1.5, decode=2, running=2, waiting=1, used=5, prefill=4),
])


def test_request_latencies_by_hand():
    lat = request_latencies(REQUESTS)
    assert lat["request_id"].tolist() == [0, 1, 3]  # the rejected request is left out
    assert lat["ttft_s"].tolist() == pytest.approx([0.5, 0.8, 0.5])
    assert lat["e2e_s"].tolist() == pytest.approx([1.5, 0.8, 1.5])
    assert lat["queue_s"].tolist() == pytest.approx([0.0, 0.3, 0.0])
    # (e2e - ttft) / (output_len - 1); a one-token output has no TPOT
    assert lat["tpot_s"][0] == pytest.approx(0.5)
    assert math.isnan(lat["tpot_s"][1])
    assert lat["tpot_s"][2] == pytest.approx(1.0 / 3.0)
    assert lat["output_len"].tolist() == [3, 1, 4]


def test_itl_samples_by_hand():
    # step 1: 2 decodes x (1.5 - 1.0); step 2: 3 x (1.7 - 1.5); step 3: 1 x (2.6 - 1.7)
    assert itl_samples(STEPS) == pytest.approx([0.5, 0.5, 0.2, 0.2, 0.2, 0.9])


def test_itl_ignores_a_first_step_with_no_predecessor():
    steps = steps_frame([step(0, 0.0, 1.0, decode=4), step(1, 1.0, 3.0, decode=1)])
    assert itl_samples(steps) == pytest.approx([2.0])
    assert itl_samples(steps_frame([step(0, 0.0, 1.0, decode=4)])).size == 0


def test_summary_counts_throughput_and_percentiles_by_hand():
    s = summarize(REQUESTS, STEPS, num_blocks=10)
    assert (s["num_requests"], s["completed"], s["rejected"], s["unfinished"]) == (4, 3, 1, 0)
    assert (s["preempted_requests"], s["total_preemptions"]) == (1, 1)
    assert s["duration_s"] == pytest.approx(2.5)  # first arrival 0.0 -> last finish 2.5
    assert (s["total_input_tokens"], s["total_output_tokens"]) == (34, 8)
    assert s["request_throughput_req_s"] == pytest.approx(3 / 2.5)
    assert s["output_throughput_tok_s"] == pytest.approx(8 / 2.5)
    assert s["total_token_throughput_tok_s"] == pytest.approx(42 / 2.5)
    # TTFT [0.5, 0.8, 0.5]: linear interpolation between order statistics, as numpy/vLLM
    assert s["ttft_mean_s"] == pytest.approx(0.6)
    assert s["ttft_median_s"] == s["ttft_p50_s"] == pytest.approx(0.5)
    assert s["ttft_p90_s"] == pytest.approx(0.5 + 0.8 * 0.3)
    assert s["ttft_p99_s"] == pytest.approx(0.5 + 0.98 * 0.3)
    # TPOT [0.5, 1/3]: the one-token request is not a sample
    assert s["tpot_mean_s"] == pytest.approx(5 / 12)
    assert s["tpot_p90_s"] == pytest.approx(1 / 3 + 0.9 * (0.5 - 1 / 3))
    assert s["e2e_mean_s"] == pytest.approx(3.8 / 3)
    assert s["e2e_p99_s"] == pytest.approx(1.5)
    assert s["itl_mean_s"] == pytest.approx(2.5 / 6)
    assert s["itl_median_s"] == pytest.approx(0.35)
    assert s["itl_p90_s"] == pytest.approx(0.5 + 0.5 * 0.4)
    assert s["queue_mean_s"] == pytest.approx(0.1)


def test_summary_step_metrics_by_hand():
    s = summarize(REQUESTS, STEPS, num_blocks=10)
    assert (s["num_steps"], s["max_concurrency"], s["max_waiting"]) == (4, 3, 2)
    assert s["kv_blocks_used_peak"] == 6 and s["kv_usage_peak"] == pytest.approx(0.6)
    # weighted by step duration: (2 x 1.0 + 5 x 0.5 + 6 x 0.2 + 3 x 0.9) / 2.6
    mean = (2.0 + 2.5 + 1.2 + 2.7) / 2.6
    assert s["kv_blocks_used_mean"] == pytest.approx(mean)
    assert s["kv_usage_mean"] == pytest.approx(mean / 10)
    assert s["prefix_cache_hit_rate"] == pytest.approx(16 / 34)  # admitted requests only


@pytest.mark.parametrize(("slos", "good"), [
    ({"slo_ttft_s": 0.6}, 2),                      # r1's TTFT 0.8 misses
    ({"slo_tpot_s": 0.4}, 2),                      # r0's TPOT 0.5 misses; r1 has none: meets
    ({"slo_ttft_s": 0.6, "slo_tpot_s": 0.4}, 1),   # only r3 meets both
    ({"slo_e2e_s": 1.0}, 1),                       # only r1 (0.8)
    ({"slo_ttft_s": 0.5, "slo_tpot_s": 0.5, "slo_e2e_s": 1.5}, 2),  # limits are inclusive
    ({"slo_ttft_s": 0.1}, 0),
])
def test_goodput_by_hand(slos, good):
    s = summarize(REQUESTS, STEPS, num_blocks=10, **slos)
    assert s["good_requests"] == good
    assert s["goodput_req_s"] == pytest.approx(good / 2.5)


def test_goodput_is_none_without_slos():
    s = summarize(REQUESTS, STEPS, num_blocks=10)
    assert s["good_requests"] is None and s["goodput_req_s"] is None


def test_unfinished_and_unscheduled_requests():
    requests = requests_frame([
        req(0, 0.0, 0.0, 1.0, 2.0, 8, 2, cached=4),
        req(1, 0.5, 1.0, 1.5, None, 8, 1, cached=8),   # running when the run stopped
        req(2, 1.5, None, None, None, 100, 0),          # still waiting, never admitted
    ])
    s = summarize(requests, steps_frame([]), num_blocks=4)
    assert (s["completed"], s["unfinished"], s["rejected"]) == (1, 2, 0)
    assert request_latencies(requests)["request_id"].tolist() == [0]
    assert s["prefix_cache_hit_rate"] == pytest.approx(12 / 16)
    assert s["duration_s"] == pytest.approx(2.0)


@pytest.mark.parametrize("frames", [
    (pd.DataFrame(), pd.DataFrame()),
    (requests_frame([]), steps_frame([])),
    (None, None),
])
def test_empty_inputs(frames):
    s = summarize(*frames, num_blocks=0)
    assert s["num_requests"] == s["completed"] == s["rejected"] == s["num_steps"] == 0
    assert s["max_concurrency"] == 0 and s["duration_s"] == 0.0
    assert s["ttft_mean_s"] is None and s["itl_p99_s"] is None
    assert s["request_throughput_req_s"] is None and s["kv_usage_peak"] is None
    json.dumps(s, allow_nan=False)
    assert request_latencies(frames[0]).empty
    assert itl_samples(frames[1]).size == 0
    assert kv_usage_timeline(frames[1], 0).empty


def test_only_rejected_requests():
    requests = requests_frame([req(0, 0.0, None, None, 0.0, 9999, 0, rejected=True)])
    s = summarize(requests, steps_frame([]), num_blocks=8, slo_ttft_s=1.0)
    assert (s["completed"], s["rejected"], s["good_requests"]) == (0, 1, 0)
    assert s["goodput_req_s"] is None and s["prefix_cache_hit_rate"] is None


def test_summary_is_plain_json():
    s = summarize(REQUESTS, STEPS, num_blocks=10, slo_ttft_s=1.0, percentiles=(25, 99.9))
    text = json.dumps(s, allow_nan=False)
    assert json.loads(text) == s
    assert all(v is None or type(v) in (int, float) for v in s.values())
    assert "ttft_p25_s" in s and "e2e_p99.9_s" in s and "ttft_p99_s" not in s


def test_kv_usage_timeline_by_hand():
    t = kv_usage_timeline(STEPS, num_blocks=10)
    assert t["step"].tolist() == [0, 1, 2, 3]
    assert t["time_s"].tolist() == pytest.approx([0.0, 1.0, 1.5, 1.7])
    assert t["blocks_used"].tolist() == [2, 5, 6, 3]
    assert t["usage"].tolist() == pytest.approx([0.2, 0.5, 0.6, 0.3])
    assert t["running"].tolist() == [1, 2, 3, 1] and t["waiting"].tolist() == [2, 1, 0, 0]
    assert kv_usage_timeline(STEPS, num_blocks=0)["usage"].isna().all()


def test_steps_out_of_order_are_read_in_step_order():
    shuffled = STEPS.iloc[[2, 0, 3, 1]]
    pd.testing.assert_frame_equal(kv_usage_timeline(shuffled, 10), kv_usage_timeline(STEPS, 10))
    np.testing.assert_array_equal(itl_samples(shuffled), itl_samples(STEPS))


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"num_blocks": -1}, "num_blocks"),
    ({"num_blocks": 1.5}, "num_blocks"),
    ({"num_blocks": 4, "percentiles": (50, 101)}, "percentiles"),
])
def test_invalid_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        summarize(REQUESTS, STEPS, **kwargs)


def test_missing_column_is_named():
    with pytest.raises(ValueError, match="'first_token_s'"):
        request_latencies(REQUESTS.drop(columns=["first_token_s"]))
    with pytest.raises(ValueError, match="'num_decode_seqs'"):
        itl_samples(STEPS.drop(columns=["num_decode_seqs"]))


# -- against the engine's scheduler -------------------------------------------------------------

def run_scheduler(arrivals: list[float], prompts: list[int], outputs: list[int],
                  num_blocks: int = 400):
    """Drive the real Scheduler on a fake clock; step time grows with the batch. Returns the
    request and step records and each request's true output-token timestamps."""
    config = EngineConfig(block_size=4, max_num_batched_tokens=48, max_num_seqs=8,
                          enable_prefix_caching=False)
    sched = Scheduler(config, num_blocks)
    seqs = [Sequence([7 + i] * n, SamplingParams(max_tokens=m, ignore_eos=True), i, a)
            for i, (a, n, m) in enumerate(zip(arrivals, prompts, outputs, strict=True))]
    token_times: dict[int, list[float]] = {s.request_id: [] for s in seqs}
    pending, records, now = sorted(seqs, key=lambda s: s.times.arrival), [], 0.0
    while pending or sched.has_unfinished():
        while pending and pending[0].times.arrival <= now:
            sched.add_request(pending.pop(0))
        out = sched.schedule(now)
        if out.is_empty:
            now = pending[0].times.arrival
            continue
        record = StepRecord.from_output(len(records), now, out, sched)
        now += 0.010 + 0.0005 * out.num_batched_tokens + 0.002 * len(out.scheduled)
        sched.update_from_output(out, [1 if s.samples else None for s in out.scheduled], now)
        record.end_s = now
        records.append(record)
        for item in out.scheduled:
            if item.samples:
                token_times[item.seq.request_id].append(now)
    return requests_frame(RequestRecord.from_sequence(s) for s in seqs), \
        steps_frame(records), token_times


def test_itl_and_latencies_match_true_token_times():
    rng = np.random.default_rng(0)
    n = 12
    arrivals = np.cumsum(rng.exponential(0.05, n)).tolist()
    prompts = rng.integers(3, 60, n).tolist()  # some prompts span several chunked steps
    outputs = rng.integers(1, 12, n).tolist()
    requests, steps, token_times = run_scheduler(arrivals, prompts, outputs)
    assert requests["num_preemptions"].sum() == 0
    assert (steps["num_decode_seqs"] > 0).any() and (steps["num_prefill_seqs"] > 1).any()
    true_gaps = np.concatenate([np.diff(t) for t in token_times.values()])
    assert np.sort(itl_samples(steps)) == pytest.approx(np.sort(true_gaps))
    lat = request_latencies(requests)
    first = [token_times[i][0] - arrivals[i] for i in lat["request_id"]]
    last = [token_times[i][-1] - arrivals[i] for i in lat["request_id"]]
    assert lat["ttft_s"].tolist() == pytest.approx(first)
    assert lat["e2e_s"].tolist() == pytest.approx(last)
    s = summarize(requests, steps, num_blocks=400)
    assert s["itl_mean_s"] == pytest.approx(float(true_gaps.mean()))
    assert s["completed"] == n and s["max_concurrency"] >= 2


def test_itl_spans_the_recompute_after_a_preemption():
    """Documented limit: across a preemption the sample is the step gap, not the true gap."""
    requests, steps, token_times = run_scheduler([0.0] * 6, [16] * 6, [40] * 6, num_blocks=40)
    assert requests["num_preemptions"].sum() > 0
    true_gaps = np.concatenate([np.diff(t) for t in token_times.values()])
    samples = itl_samples(steps)
    assert samples.max() <= true_gaps.max()
    assert samples.size < true_gaps.size  # re-prefill steps emit tokens that are not decodes


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 10), st.floats(0, 5), st.floats(0, 5),
                          st.integers(1, 50), st.booleans()), min_size=1, max_size=20))
def test_goodput_never_exceeds_throughput(rows):
    records = [req(i, a, a, a + t, a + t + e, 8, n, rejected=r)
               for i, (a, t, e, n, r) in enumerate(rows)]
    requests = requests_frame(records)
    loose = summarize(requests, None, num_blocks=1, slo_ttft_s=1e9, slo_tpot_s=1e9)
    strict = summarize(requests, None, num_blocks=1, slo_ttft_s=1.0, slo_tpot_s=0.5)
    assert loose["good_requests"] == loose["completed"] == sum(not r[4] for r in rows)
    assert strict["good_requests"] <= loose["good_requests"]
    if loose["goodput_req_s"] is not None:
        assert loose["goodput_req_s"] == pytest.approx(loose["request_throughput_req_s"])


def test_metrics_import_without_torch():
    code = "import sys, reports.metrics; assert 'torch' not in sys.modules, 'torch imported'"
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0, result.stderr


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 5, allow_nan=False), st.integers(0, 9)), min_size=1,
                max_size=60),
       st.lists(st.floats(0, 100), min_size=1, max_size=4))
def test_weighted_stats_equal_the_stats_of_the_samples_they_stand_for(pairs, qs) -> None:
    values = np.array([v for v, _ in pairs])
    counts = np.array([c for _, c in pairs], dtype=np.uint32)
    expanded = np.repeat(values, counts)
    got = weighted_stats(values, counts, "itl", qs)
    want = _stats(expanded, "itl", qs)
    assert got.keys() == want.keys()
    for key, value in want.items():
        if key.endswith("_mean_s") and value is not None:
            assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-15)
        else:
            assert got[key] == value, key


def test_step_stats_over_chunks_equal_the_whole_run() -> None:
    rng = np.random.default_rng(0)
    n = 500
    end = np.cumsum(rng.uniform(0.001, 0.01, n))
    steps = steps_frame([step(i, float(end[i - 1]) if i else 0.0, float(end[i]),
                              decode=int(rng.integers(0, 9)), used=int(rng.integers(0, 99)))
                         for i in range(n)])
    whole = StepStats().add(steps)
    parts = StepStats()
    for lo in range(0, n, 77):
        parts.add(steps.iloc[lo:lo + 77])
    assert parts.summary(100) == pytest.approx(whole.summary(100))
    assert np.array_equal(np.repeat(*parts.itl()), itl_samples(steps))
