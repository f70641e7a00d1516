"""What serving needs of the scheduler: abort (a client went away; its blocks are freed) and
min_tokens (EOS does not stop a request early)."""

from __future__ import annotations

from engine.core.config import EngineConfig
from engine.core.scheduler import Scheduler
from engine.core.sequence import SamplingParams, Sequence, SequenceStatus


def make(num_blocks: int = 16, **kw) -> Scheduler:
    args = dict(block_size=4, max_model_len=64, max_num_batched_tokens=32, max_num_seqs=2) | kw
    return Scheduler(EngineConfig(**args).validate(), num_blocks)


def add(sched: Scheduler, rid: int, n: int = 10, max_tokens: int = 8) -> Sequence:
    seq = Sequence([rid * 100 + i for i in range(n)],
                   SamplingParams(max_tokens=max_tokens, ignore_eos=True), rid)
    assert sched.add_request(seq)
    return seq


def step(sched: Scheduler) -> None:
    out = sched.schedule()
    sched.update_from_output(out, [7 if s.samples else None for s in out.scheduled])


def test_abort_a_running_sequence_frees_its_blocks() -> None:
    sched = make()
    a, b = add(sched, 0), add(sched, 1)
    step(sched)
    assert sched.running == [a, b] and sched.block_manager.num_used_blocks == 6
    assert sched.abort(a)
    assert sched.running == [b] and a.block_table == []
    assert sched.block_manager.num_used_blocks == 3
    assert a.status is SequenceStatus.FINISHED and a.finish_reason == "abort"
    assert a.times.finish is None  # unfinished in the records: it never completed
    step(sched)
    assert b.num_output_tokens == 2


def test_abort_a_waiting_sequence_and_an_unknown_one() -> None:
    sched = make(max_num_seqs=1)
    a, b = add(sched, 0), add(sched, 1)
    step(sched)
    assert list(sched.waiting) == [b]
    assert sched.abort(b) and not sched.waiting
    assert not sched.abort(b)  # already gone
    assert not sched.abort(Sequence([1, 2, 3]))
    assert sched.running == [a]


def test_abort_a_preempted_sequence_holding_no_blocks() -> None:
    sched = make(num_blocks=5, max_num_seqs=2)
    add(sched, 0, n=8), add(sched, 1, n=8)
    for _ in range(4):
        step(sched)
    preempted = [s for s in sched.waiting if s.num_preemptions]
    assert preempted, "the tiny cache should have preempted one sequence"
    assert sched.abort(preempted[0]) and preempted[0].block_table == []
    while sched.has_unfinished():
        step(sched)
    assert sched.block_manager.num_used_blocks == 0


def test_min_tokens_holds_eos_back() -> None:
    sched = Scheduler(EngineConfig(block_size=4, max_model_len=64).validate(), 16,
                      eos_token_ids=[7])
    early = Sequence([1, 2, 3], SamplingParams(max_tokens=8, min_tokens=3), "early")
    plain = Sequence([1, 2, 4], SamplingParams(max_tokens=8), "plain")
    sched.add_request(early), sched.add_request(plain)
    for _ in range(3):
        step(sched)  # samples token 7 (EOS) every step
    assert plain.finish_reason == "stop" and plain.num_output_tokens == 1
    assert early.finish_reason == "stop" and early.num_output_tokens == 3
