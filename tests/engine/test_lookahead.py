"""Async scheduling (engine/lookahead.py) against synchronous stepping, on CPU.

Looking ahead must change when the host works, never what the engine does: the same
tokens, the same step compositions and cache occupancy, valid times.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from engine.core.records import StepRecord
from engine.core.sequence import SamplingParams
from engine.runtime.llm import LLM
from engine.runtime.lookahead import Lookahead
from tests.engine.hf_tiny import hf_model, save_hf
from tests.engine.test_llm import PROMPTS, random_tokens

HOT = SamplingParams(temperature=0.9, max_tokens=7, ignore_eos=True)
CASES = {
    "prefix_caching": dict(block_size=4),
    "chunked_prefill": dict(block_size=8, max_num_batched_tokens=16),
    "preemption": dict(block_size=4, num_gpu_blocks_override=40, max_num_seqs=9),
}


@pytest.fixture(scope="module")
def path(tmp_path_factory) -> Path:
    return save_hf(hf_model("qwen3"), tmp_path_factory.mktemp("qwen3"))


def run(path: Path, async_scheduling: bool, params: list[SamplingParams] | SamplingParams,
        **engine_args) -> tuple[LLM, list]:
    args = dict(dtype="float32", device="cpu", max_model_len=128, max_num_seqs=4,
                max_num_batched_tokens=256, seed=3) | engine_args
    llm = LLM(str(path), async_scheduling=async_scheduling, **args)
    return llm, llm.generate(PROMPTS, params)


def composition(record: StepRecord) -> tuple:
    return (record.num_batched_tokens, record.num_prefill_tokens, record.num_prefill_seqs,
            record.num_decode_seqs, record.num_running, record.num_waiting,
            record.num_blocks_used, record.num_blocks_free, record.num_preempted)


def count_look_aheads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    original = Lookahead._look_ahead

    def counted(self, flight, on_finished):
        calls[0] += 1
        return original(self, flight, on_finished)
    monkeypatch.setattr(Lookahead, "_look_ahead", counted)
    return calls


@pytest.mark.parametrize("case", list(CASES))
def test_lookahead_does_what_synchronous_stepping_does(path, case, monkeypatch) -> None:
    sync_llm, sync_out = run(path, False, HOT, **CASES[case])
    calls = count_look_aheads(monkeypatch)
    llm, out = run(path, True, HOT, **CASES[case])
    mixed = sum(r.num_prefill_tokens > 0 for r in llm.step_records)
    assert calls[0] == len(llm.step_records) and mixed > 0  # every step ran ahead, mixed too
    assert [o.output_token_ids for o in out] == [o.output_token_ids for o in sync_out]
    assert [composition(r) for r in llm.step_records] == \
        [composition(r) for r in sync_llm.step_records]
    assert [o.metrics.num_cached_tokens for o in out] == \
        [o.metrics.num_cached_tokens for o in sync_out]
    assert [o.metrics.num_preemptions for o in out] == \
        [o.metrics.num_preemptions for o in sync_out]
    if case == "preemption":
        assert sum(o.metrics.num_preemptions for o in out) > 0
    check_times(llm, out)


def check_times(llm: LLM, outputs: list, contiguous: bool = True) -> None:
    records = llm.step_records
    assert [r.step for r in records] == list(range(len(records)))
    for prev, nxt in zip(records, records[1:], strict=False):
        assert prev.start_s <= prev.end_s <= nxt.start_s
        queued_ahead = contiguous and prev.num_prefill_tokens == 0
        assert prev.end_s == nxt.start_s or not queued_ahead  # it started at once
    for o in outputs:
        m = o.metrics
        assert not any(math.isnan(t) for t in (m.first_scheduled_s, m.first_token_s,
                                                m.finish_s))
        assert m.first_token_s <= m.finish_s
        assert m.first_token_s in {r.end_s for r in records}
        assert -1 not in o.output_token_ids
    seqs = llm.finished
    assert all(s.num_pending_tokens == 0 for s in seqs)


def test_steps_that_may_stop_on_eos_wait_for_their_tokens(path, monkeypatch) -> None:
    params = [SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=i % 2 == 0)
              for i in range(len(PROMPTS))]
    _, sync_out = run(path, False, params, block_size=4)
    calls = count_look_aheads(monkeypatch)
    llm, out = run(path, True, params, block_size=4)
    assert [o.output_token_ids for o in out] == [o.output_token_ids for o in sync_out]
    assert [o.finish_reason for o in out] == [o.finish_reason for o in sync_out]
    assert 0 < calls[0] < len(llm.step_records)  # some steps waited for their tokens
    check_times(llm, out, contiguous=False)


def test_generated_tokens_reach_the_prefix_cache(path) -> None:
    """A follow-up prompt made of a finished request's prompt and output hits the blocks
    the generated tokens filled, as with synchronous stepping (one block later at most)."""
    prompt = random_tokens(18, seed=5)
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    hits = {}
    for mode in (False, True):
        llm = LLM(str(path), dtype="float32", device="cpu", max_model_len=128, block_size=4,
                  async_scheduling=mode)
        first = llm.generate([prompt], params)[0]
        again = llm.generate([prompt + first.output_token_ids + [7]], params)[0]
        hits[mode] = again.metrics.num_cached_tokens
    assert hits[False] - 4 <= hits[True] <= hits[False]
    assert hits[True] > len(prompt)  # generated tokens' blocks were published
