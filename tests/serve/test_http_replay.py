"""A trace replayed over HTTP with 64 concurrent streams against kvtwin's server, beside the
same trace replayed in process: the same requests complete with the same output lengths."""

from __future__ import annotations

import numpy as np
import pytest

from engine.core.request import Request
from engine.runtime.replay import records_frames, replay
from reports.http import HttpReplayResult, replay_http
from reports.metrics import REQUEST_SCHEMA, STEP_SCHEMA, summarize
from tests.serve.conftest import call, make_engine, prompt


def burst(n: int = 64) -> list[Request]:
    """n requests at once (n concurrent streams), then a straggler after an idle gap."""
    reqs = [Request(i, 0.0, prompt(i, 8 + (13 * i) % 90), 4 + (7 * i) % 21) for i in range(n)]
    return [*reqs, Request(n, 0.5, prompt(n, 40), 6)]


@pytest.fixture(scope="module")
def over_http(server) -> HttpReplayResult:
    return replay_http(server.url, burst())


def test_same_requests_complete_with_the_same_lengths_as_in_process(over_http) -> None:
    trace = burst()
    local, _ = records_frames(replay(make_engine(), trace))
    http = over_http.requests
    assert list(http.columns) == list(REQUEST_SCHEMA)
    assert http["request_id"].tolist() == local["request_id"].tolist()
    assert http["output_len"].tolist() == local["output_len"].tolist() == \
        [r.output_len for r in trace]
    assert http["prompt_len"].tolist() == local["prompt_len"].tolist()
    assert http["finish_reason"].eq("length").all() and not http["rejected"].any()
    assert over_http.length_mismatches == 0 and not over_http.interrupted


def test_times_follow_vllm_bench_definitions(over_http) -> None:
    df = over_http.requests
    assert (df["arrival_s"] <= df["first_token_s"]).all()
    assert (df["first_token_s"] <= df["finish_s"]).all()
    assert df.loc[64, "arrival_s"] >= 0.5  # the straggler waited for its arrival
    # one ITL sample per chunk after the first: output_len - 1 per request
    assert len(over_http.itl_s) == int((df["output_len"] - 1).sum())
    assert (over_http.itl_s > 0).all()
    m = over_http.metrics(slo_ttft_s=10.0)
    assert m["completed"] == 65 and m["good_requests"] == 65
    assert m["itl_p50_s"] == pytest.approx(float(np.median(over_http.itl_s)))
    assert m["tpot_p50_s"] is not None and m["output_throughput_tok_s"] > 0


def test_the_kvtwin_server_adds_its_steps_and_queue_times(over_http) -> None:
    steps, reqs = over_http.steps, over_http.requests
    assert list(steps.columns) == list(STEP_SCHEMA) and len(steps) > 10
    assert over_http.server["kvtwin"] and over_http.num_blocks == 512
    assert reqs["first_scheduled_s"].notna().all()
    assert (reqs["num_preemptions"] == 0).all()
    assert steps["num_decode_seqs"].max() == 16  # max_num_seqs: the burst queued
    summary = summarize(reqs, steps, num_blocks=over_http.num_blocks)
    assert summary["max_waiting"] > 0 and summary["kv_usage_peak"] > 0


def test_server_records_partition_time_like_replay(server, over_http) -> None:
    status, body = call(server.url, "/kvtwin/records")
    assert status == 200
    steps, durations = body["steps"], body["step_durations_s"]
    for step, duration in zip(steps, durations, strict=True):
        assert step["end_s"] == step["start_s"] + duration and duration > 0
    gaps = [b["start_s"] - a["end_s"] for a, b in zip(steps, steps[1:], strict=False)]
    assert all(g >= 0 for g in gaps)
    assert sum(g == 0 for g in gaps) > len(gaps) // 2  # back to back while work goes on
    assert body["num_running"] == body["num_waiting"] == body["num_blocks_used"] == 0


def test_the_model_name_comes_from_v1_models(server) -> None:
    result = replay_http(server.url, burst(4)[:4], extra_body={"return_token_ids": True})
    assert result.requests["finish_s"].notna().all()
    assert result.server["model"] == "tiny-qwen3"
