"""Online replay on the CPU engine: wall-clock arrivals, steps that partition time exactly."""

from __future__ import annotations

import time
from dataclasses import fields

import numpy as np
import pytest

from engine.core.catalog import load_model
from engine.core.records import RequestRecord, StepRecord
from engine.core.request import Request
from engine.runtime.llm import LLM, LLMEngine
from engine.runtime.replay import ReplayResult, greedy_params, records_frames, replay

MODEL = load_model("tiny_qwen3")
ARGS = dict(dtype="float32", device="cpu", max_model_len=128, block_size=8, max_num_seqs=4,
            max_num_batched_tokens=64, num_gpu_blocks_override=128)


def make_engine(**overrides) -> LLMEngine:
    return LLMEngine(MODEL, **(ARGS | overrides))


def prompt(i: int, n: int) -> list[int]:
    return ((np.arange(n) * 37 + i * 101) % 500 + 3).tolist()


def spaced_trace() -> list[Request]:
    """A burst, requests arriving while steps run, then an idle gap and a second burst."""
    arrivals = [0.0, 0.0, 0.006, 0.012, 0.018, 0.3, 0.3, 0.307]
    lengths = [(20, 6), (45, 3), (9, 8), (70, 2), (30, 5), (12, 4), (33, 7), (8, 1)]
    return [Request(i, a, prompt(i, p), out)
            for i, (a, (p, out)) in enumerate(zip(arrivals, lengths, strict=True))]


@pytest.fixture(scope="module")
def spaced() -> tuple[list[Request], ReplayResult]:
    trace = spaced_trace()
    return trace, replay(make_engine(), trace)


def test_every_request_finishes_with_its_output_len(spaced) -> None:
    trace, result = spaced
    assert [r.request_id for r in result.requests] == [r.request_id for r in trace]
    for req, rec, tokens in zip(trace, result.requests, result.output_token_ids, strict=True):
        assert rec.output_len == len(tokens) == req.output_len
        assert rec.finish_reason == "length" and not rec.rejected
        assert rec.prompt_len == len(req.prompt_token_ids)


def test_arrivals_are_stamped_from_the_trace(spaced) -> None:
    trace, result = spaced
    for req, rec in zip(trace, result.requests, strict=True):
        assert rec.arrival_s == req.arrival_s  # the trace's value, not the clock's
        assert rec.arrival_s <= rec.first_scheduled_s <= rec.first_token_s <= rec.finish_s


def test_steps_partition_time(spaced) -> None:
    trace, result = spaced
    steps, arrivals = result.steps, {r.arrival_s for r in trace}
    assert steps[0].start_s == 0.0
    gaps = 0
    for prev, step in zip(steps, steps[1:], strict=False):
        if step.start_s != prev.end_s:
            gaps += 1
            assert step.start_s > prev.end_s and step.start_s in arrivals
            assert step.num_decode_seqs == 0, "after an idle gap nothing is left to decode"
    for step, duration in zip(steps, result.step_durations_s, strict=True):
        assert duration > 0 and step.end_s == step.start_s + duration
    assert gaps >= 1, "the trace has an idle gap; the replay should have slept through it"
    assert len(steps) - 1 - gaps >= 10, "most steps should follow each other back to back"
    assert result.wall_s >= steps[-1].end_s


def test_a_step_after_an_idle_gap_starts_at_the_arrival(spaced) -> None:
    trace, result = spaced
    woken = [s for p, s in zip(result.steps, result.steps[1:], strict=False)
             if s.start_s != p.end_s]
    firsts = {r.first_scheduled_s for r in result.requests}
    assert woken and all(s.start_s in firsts for s in woken)
    assert 0.3 in [s.start_s for s in woken]  # the first burst is long done by then
    assert result.requests[5].first_scheduled_s == 0.3


def test_idle_gap_sleeps_instead_of_spinning() -> None:
    trace = [Request(0, 0.0, prompt(0, 10), 2), Request(1, 0.4, prompt(1, 10), 2)]
    engine = make_engine()  # built outside the measured span: start-up may use many threads
    cpu0 = time.process_time()
    result = replay(engine, trace)
    cpu = time.process_time() - cpu0
    assert result.wall_s >= 0.4
    assert cpu < result.wall_s - 0.3, f"{cpu:.3f} s of CPU for a 0.4 s idle gap: busy waiting"


def test_offline_trace_runs_back_to_back() -> None:
    trace = [Request(i, 0.0, prompt(i, 5 + 9 * i), 1 + i % 4) for i in range(7)]
    result = replay(make_engine(), trace)
    assert [r.output_len for r in result.requests] == [t.output_len for t in trace]
    starts = [s.start_s for s in result.steps]
    assert starts[0] == 0.0
    assert starts[1:] == [s.end_s for s in result.steps[:-1]]


def test_rejected_requests_are_recorded() -> None:
    trace = [Request(0, 0.0, prompt(0, 10), 3), Request(1, 0.005, [], 3),
             Request(2, 0.01, prompt(2, 200), 3), Request(3, 0.02, prompt(3, 6), 2)]
    result = replay(make_engine(), trace)
    rejected = {r.request_id: r for r in result.requests if r.rejected}
    assert set(rejected) == {1, 2}
    assert rejected[1].finish_reason == "rejected: empty prompt"
    assert "max_model_len" in rejected[2].finish_reason
    for rec in rejected.values():
        assert rec.finish_s == rec.arrival_s and rec.first_scheduled_s is None
        assert result.output_token_ids[rec.request_id] == []
    assert [r.output_len for r in result.requests if not r.rejected] == [3, 2]


def test_only_rejected_requests() -> None:
    result = replay(make_engine(), [Request(0, 0.0, [], 3), Request(1, 0.01, [], 1)])
    assert all(r.rejected for r in result.requests) and result.steps == []


def test_recording_overhead_is_small(spaced) -> None:
    _, result = spaced
    assert result.record_s > 0
    assert result.record_overhead < 0.02, f"{100 * result.record_overhead:.2f} % of step time"


def test_tokens_equal_offline_generate(spaced) -> None:
    """The replay runs the model as generate does: same greedy tokens for the same prompts."""
    trace, result = spaced
    llm = LLM(MODEL, **ARGS)
    outputs = llm.generate([r.prompt_token_ids for r in trace],
                           [greedy_params(r) for r in trace])
    assert [o.output_token_ids for o in outputs] == result.output_token_ids


def test_time_scale_stretches_arrivals() -> None:
    trace = [Request(0, 0.0, prompt(0, 8), 1), Request(1, 0.1, prompt(1, 8), 1)]
    result = replay(make_engine(), trace, time_scale=0.5)
    assert [r.arrival_s for r in result.requests] == [0.0, 0.05]
    assert result.steps[1].start_s == 0.05


def test_progress_and_metadata(spaced) -> None:
    calls: list[tuple[int, int]] = []
    trace = spaced_trace()[:3]
    result = replay(make_engine(), trace, on_progress=lambda d, n: calls.append((d, n)))
    assert len(calls) == len(result.steps) and calls[-1] == (3, 3)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert result.attention_backend == "sdpa" and result.torch_version
    assert result.device and result.memory["num_blocks"] == 128


def test_records_frames_have_the_record_columns(spaced) -> None:
    _, result = spaced
    requests, steps = records_frames(result)
    assert list(requests.columns) == [f.name for f in fields(RequestRecord)]
    assert list(steps.columns) == [f.name for f in fields(StepRecord)]
    assert len(requests) == len(result.requests) and len(steps) == len(result.steps)
    assert steps["end_s"].tolist() == [s.end_s for s in result.steps]


def test_replay_needs_a_fresh_engine() -> None:
    engine = make_engine()
    replay(engine, [Request(0, 0.0, prompt(0, 4), 1)])
    with pytest.raises(ValueError, match="fresh engine"):
        replay(engine, [Request(1, 0.0, prompt(1, 4), 1)])
