"""Scheduler policies, step by step, on small hand-checked cases."""

from __future__ import annotations

from engine.core.config import EngineConfig
from engine.core.scheduler import Scheduler
from engine.core.scheduler_output import SchedulerOutput
from engine.core.sequence import SamplingParams, Sequence, SequenceStatus


def make(policy: str = "v1", num_blocks: int = 64, **kw) -> Scheduler:
    args = dict(block_size=4, max_model_len=64, max_num_batched_tokens=16, max_num_seqs=8,
                policy=policy) | kw
    return Scheduler(EngineConfig(**args).validate(), num_blocks)


def add(sched: Scheduler, n: int, max_tokens: int = 4, rid: int | None = None) -> Sequence:
    seq = Sequence(list(range(1000 + n * 7, 1000 + n * 8)) if rid is None else
                   [rid * 100 + i for i in range(n)],
                   SamplingParams(max_tokens=max_tokens, ignore_eos=True), rid)
    sched.add_request(seq)
    return seq


def run(sched: Scheduler) -> SchedulerOutput:
    out = sched.schedule()
    sched.update_from_output(out, [7 if s.samples else None for s in out.scheduled])
    return out


def plan(out: SchedulerOutput) -> list[tuple[object, int]]:
    return [(s.seq.request_id, s.num_new_tokens) for s in out.scheduled]


def test_v1_chunks_a_long_prompt_and_mixes_decodes() -> None:
    sched = make()
    add(sched, 6, rid=0)
    add(sched, 30, rid=1)
    assert plan(run(sched)) == [(0, 6), (1, 10)]       # budget 16 shared, 1 is chunked
    assert plan(run(sched)) == [(0, 1), (1, 15)]       # decode first, then the rest
    out = run(sched)
    assert plan(out) == [(0, 1), (1, 5)]
    assert out.num_decode_seqs == 1 and out.num_prefill_tokens == 5


def test_v1_without_chunking_waits_for_room() -> None:
    sched = make(enable_chunked_prefill=False, max_model_len=16)
    add(sched, 6, rid=0)
    add(sched, 12, rid=1)
    assert plan(run(sched)) == [(0, 6)]                # 12 > remaining budget 10: waits
    assert plan(run(sched)) == [(0, 1), (1, 12)]


def test_v1_respects_max_num_seqs() -> None:
    sched = make(max_num_seqs=2)
    for rid in range(3):
        add(sched, 2, rid=rid)
    assert [r for r, _ in plan(run(sched))] == [0, 1]
    assert len(sched.waiting) == 1


def test_v1_preempts_latest_admitted_and_admits_nothing_that_step() -> None:
    sched = make(num_blocks=4, max_num_batched_tokens=64)   # 16 slots
    a = add(sched, 7, max_tokens=20, rid=0)                 # 2 blocks
    b = add(sched, 7, max_tokens=20, rid=1)                 # 2 blocks
    run(sched)                                              # both prefilled: cache full
    c = add(sched, 2, rid=2)
    run(sched)                                              # tokens 8: still in block 2
    out = run(sched)                                        # token 9 of a needs a new block
    assert out.preempted == [b]
    assert plan(out) == [(0, 1)]
    assert b.status is SequenceStatus.WAITING and b.num_preemptions == 1
    assert list(sched.waiting) == [b, c]                    # back at the front of the queue
    assert b.num_computed_tokens == 0 and b.block_table == []
    assert a.status is SequenceStatus.RUNNING


def test_v1_preempts_itself_when_it_is_the_latest() -> None:
    sched = make(num_blocks=3, max_num_batched_tokens=64)   # 12 slots
    a = add(sched, 8, max_tokens=20, rid=0)                 # 2 blocks
    b = add(sched, 4, max_tokens=20, rid=1)                 # 1 block
    run(sched)
    out = run(sched)                                        # a's 9th token needs a block
    assert out.preempted == [b] and plan(out) == [(0, 1)]
    assert a.status is SequenceStatus.RUNNING


def test_prefill_first_separates_prefill_and_decode_steps() -> None:
    sched = make("prefill_first")
    add(sched, 6, rid=0)
    assert plan(run(sched)) == [(0, 6)]
    add(sched, 5, rid=1)
    assert plan(run(sched)) == [(1, 5)]                # prefill step: 0 does not decode
    assert plan(run(sched)) == [(0, 1), (1, 1)]        # decode step


def test_request_times_follow_the_clock_given() -> None:
    sched = make()
    seq = add(sched, 3, max_tokens=2, rid=0)
    out = sched.schedule(now=1.0)
    sched.update_from_output(out, [5], now=1.5)
    out = sched.schedule(now=2.0)
    sched.update_from_output(out, [6], now=2.5)
    assert (seq.times.first_scheduled, seq.times.first_token, seq.times.finish) == \
        (1.0, 1.5, 2.5)
    assert seq.finish_reason == "length" and seq.output_token_ids == [5, 6]


def test_eos_stops_unless_ignored() -> None:
    sched = Scheduler(EngineConfig(block_size=4, max_model_len=32).validate(), 16,
                      eos_token_ids=[7])
    stop = Sequence([1, 2], SamplingParams(max_tokens=5))
    keep = Sequence([1, 2], SamplingParams(max_tokens=5, ignore_eos=True))
    sched.add_request(stop)
    sched.add_request(keep)
    while sched.has_unfinished():
        run(sched)
    assert stop.finish_reason == "stop" and stop.num_output_tokens == 1
    assert keep.finish_reason == "length" and keep.num_output_tokens == 5


def test_bad_prompts_are_rejected_with_a_reason_while_others_run() -> None:
    sched = make(max_model_len=16)
    empty = Sequence([])
    long = Sequence(list(range(17)))
    fine = add(sched, 3, max_tokens=2, rid=9)
    assert not sched.add_request(empty) and not sched.add_request(long)
    assert empty.finish_reason == "rejected: empty prompt"
    assert "17 tokens is longer than max_model_len=16" in long.finish_reason
    assert sched.rejected == [empty, long]
    while sched.has_unfinished():
        run(sched)
    assert fine.status is SequenceStatus.FINISHED and fine.num_output_tokens == 2


def test_generation_stops_at_max_model_len() -> None:
    sched = make(max_model_len=8)
    seq = add(sched, 6, max_tokens=100, rid=0)
    while sched.has_unfinished():
        run(sched)
    assert seq.num_tokens == 8 and seq.finish_reason == "length"
