"""Drive the torch-free Scheduler with a fake model, checking invariants after every step.

The fake model keeps a shadow KV store: for each block slot, the token whose KV was written
there. A step that reads its context from the cache must find exactly its own tokens, which
proves that prefix-cache hits, chunking and preemption never hand a sequence foreign KV.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from engine.core.config import EngineConfig
from engine.core.scheduler import Scheduler
from engine.core.scheduler_output import SchedulerOutput
from engine.core.sequence import SamplingParams, Sequence, SequenceStatus


@dataclass
class ShadowKV:
    block_size: int
    slots: dict[int, int] = field(default_factory=dict)  # flat slot -> token id

    def slot(self, seq: Sequence, pos: int) -> int:
        return seq.block_table[pos // self.block_size] * self.block_size + pos % self.block_size

    def run(self, out: SchedulerOutput) -> None:
        # Like each attention layer: write every new K/V of the batch first, then read, so a
        # sequence may attend to blocks another sequence of the same step is filling.
        for item in out.scheduled:
            seq, start = item.seq, item.num_computed_tokens
            for pos in range(start, start + item.num_new_tokens):
                self.slots[self.slot(seq, pos)] = seq.token_ids[pos]
        for item in out.scheduled:
            seq = item.seq
            for pos in range(item.num_computed_tokens + item.num_new_tokens):
                got = self.slots.get(self.slot(seq, pos))
                assert got == seq.token_ids[pos], (
                    f"seq {seq.request_id} pos {pos}: cache holds {got}, "
                    f"expected {seq.token_ids[pos]}")


def next_token(seq: Sequence) -> int:
    """A deterministic fake sample that depends on the sequence's content."""
    return (sum(seq.token_ids[-4:]) * 31 + seq.num_tokens) % 997 + 3


def check_invariants(sched: Scheduler, out: SchedulerOutput) -> None:
    bm, cfg = sched.block_manager, sched.config
    owners: Counter[int] = Counter()
    for seq in sched.running:
        assert len(set(seq.block_table)) == len(seq.block_table), "block owned twice by a seq"
        owners.update(seq.block_table)
    for block in bm.blocks.values():
        assert block.ref_count == owners[block.block_id], f"ref count of {block.block_id}"
        assert (block.ref_count == 0) == (block.block_id in bm.free_queue)
    assert set(owners) <= set(bm.blocks), "a sequence holds a block never handed out"
    assert all(b < bm.next_fresh for b in bm.blocks)
    assert bm.num_free_blocks + bm.num_used_blocks == bm.num_blocks
    assert out.num_batched_tokens <= cfg.max_num_batched_tokens
    assert len(sched.running) <= cfg.max_num_seqs
    for seq in sched.waiting:
        assert not seq.block_table and seq.status is SequenceStatus.WAITING
    for block_hash, block_id in bm.cached.items():
        assert bm.blocks[block_id].block_hash == block_hash


@dataclass
class Step:
    out: SchedulerOutput
    was_running: set[int]  # seq_ids running before this step was scheduled


def drive(config: EngineConfig, num_blocks: int, requests: list[tuple[int, list[int], int]],
          max_steps: int = 20000) -> tuple[Scheduler, list[Sequence], list[Step]]:
    """requests: (arrival step, prompt, max_tokens). Returns the scheduler, seqs and steps."""
    sched = Scheduler(config, num_blocks)
    shadow = ShadowKV(config.block_size)
    pending = sorted(enumerate(requests), key=lambda r: (r[1][0], r[0]))
    seqs: list[Sequence] = []
    steps: list[Step] = []
    step = 0
    while (pending or sched.has_unfinished()) and step < max_steps:
        while pending and pending[0][1][0] <= step:
            i, (_, prompt, max_tokens) = pending.pop(0)
            seq = Sequence(prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True), i)
            sched.add_request(seq)
            seqs.append(seq)
        was_running = {s.seq_id for s in sched.running}
        out = sched.schedule(float(step))
        check_invariants(sched, out)
        shadow.run(out)
        sampled = [next_token(s.seq) if s.samples else None for s in out.scheduled]
        sched.update_from_output(out, sampled, float(step) + 0.5)
        steps.append(Step(out, was_running))
        step += 1
    assert step < max_steps, "scheduler made no progress"
    return sched, sorted(seqs, key=lambda s: s.request_id), steps
