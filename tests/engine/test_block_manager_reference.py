"""The struct-of-arrays BlockManager behaves exactly like the previous object-per-block one.

Two schedulers run the same random request stream in lockstep, one on `BlockManager`, one on
`ReferenceBlockManager` (the old implementation, verbatim). After every step they must agree on
the plan, every block table, prefix hit, the free queue's order, the cache index (lazily
published blocks count with the hash they will be published under) and the content ids, up to
a renaming (only their equality is behaviour: lazily published blocks get theirs when hashed).
Runs of decode steps done in bulk by `allocate_decode_steps` must equal the same rounds of
`allocate_slots`.
A weak hash (4 values) forces collisions, so the verification paths run too; lazy publication
is off there, since under a collision it may keep the other of two blocks cached.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from xxhash import xxh3_64_intdigest

import engine.core.kv.prefix_cache as cache_module
import tests.engine.reference_block_manager as ref_module
from engine.core.config import EngineConfig
from engine.core.kv.block_manager import BlockManager, provisional_content_id
from engine.core.kv.prefix_cache import PENDING, ROOT
from engine.core.scheduler import Scheduler, is_prefilling
from engine.core.scheduler_output import SchedulerOutput
from engine.core.sequence import SamplingParams, Sequence
from tests.engine.driver import next_token
from tests.engine.reference_block_manager import ReferenceBlockManager
from tests.engine.test_core_properties import scenarios

Request = tuple[int, list[int], int]


def pair(config: EngineConfig, num_blocks: int,
         lazy: bool = True) -> tuple[Scheduler, Scheduler]:
    new, ref = Scheduler(config, num_blocks), Scheduler(config, num_blocks)
    new.block_manager = BlockManager(num_blocks, config.block_size,
                                     config.enable_prefix_caching, lazy)
    ref.block_manager = ReferenceBlockManager(num_blocks, config.block_size,  # type: ignore
                                              config.enable_prefix_caching)
    return new, ref


class Renaming:
    """A bijection between the two implementations' content ids, built as they are compared."""

    def __init__(self) -> None:
        self.forward: dict[int, int] = {}
        self.backward: dict[int, int] = {}

    def same(self, mine: list[int], theirs: list[int]) -> bool:
        for a, b in zip(mine, theirs, strict=True):
            if ROOT in (a, b):
                if a != b:
                    return False
            elif self.forward.setdefault(a, b) != b or self.backward.setdefault(b, a) != a:
                return False
        return True


def contents(seq: Sequence) -> list[int]:
    """The sequence's content ids, with the provisional id of a lazily published block's."""
    return [provisional_content_id(seq.block_table[i]) if c == PENDING else c
            for i, c in enumerate(seq.block_content_ids)]


def plan(out: SchedulerOutput) -> list[tuple]:
    return [(i.seq.request_id, i.num_new_tokens, i.num_computed_tokens, i.is_decode,
             tuple(i.seq.block_table), i.seq.num_cached_tokens)
            for i in out.scheduled] + [("preempted", s.request_id) for s in out.preempted]


def assert_same_plan(outs: list[SchedulerOutput]) -> None:
    assert plan(outs[0]) == plan(outs[1])
    renaming = Renaming()
    for a, b in zip(outs[0].scheduled, outs[1].scheduled, strict=True):
        assert renaming.same(contents(a.seq), b.seq.block_content_ids)


def block_state(bm, block_id: int) -> tuple:
    b = bm.blocks[block_id]
    tokens = None if b.token_src is None else b.token_src[b.token_start:b.token_start + 8]
    return b.ref_count, b.block_hash, tokens


def cache_index(bm) -> dict[int, int]:
    return {b.block_hash: b.block_id for b in bm.blocks.values() if b.block_hash is not None}


def assert_same_state(new: BlockManager, ref: ReferenceBlockManager) -> None:
    assert list(new.free_queue) == list(ref.free_queue)
    assert cache_index(new) == ref.cached
    assert new.next_fresh == ref.next_fresh
    assert new.num_free_blocks == ref.num_free_blocks
    renaming, new_blocks, ref_blocks = Renaming(), new.blocks, ref.blocks
    for block_id in range(new.next_fresh):
        assert block_state(new, block_id) == block_state(ref, block_id), block_id
        a, b = new_blocks[block_id], ref_blocks[block_id]
        assert renaming.same([a.content_id, a.parent_content_id],
                             [b.content_id, b.parent_content_id]), block_id


def admit(scheds: tuple[Scheduler, Scheduler], request: tuple[int, Request]) -> None:
    i, (_, prompt, max_tokens) = request
    for sched in scheds:
        sched.add_request(Sequence(prompt, SamplingParams(max_tokens=max_tokens,
                                                          ignore_eos=True), i))


def step(scheds: tuple[Scheduler, Scheduler], now: float) -> None:
    outs = [sched.schedule(now) for sched in scheds]
    assert_same_plan(outs)
    for sched, out in zip(scheds, outs, strict=True):
        sampled = [next_token(s.seq) if s.samples else None for s in out.scheduled]
        sched.update_from_output(out, sampled, now + 0.5)


def bulk_decode(scheds: tuple[Scheduler, Scheduler], num_steps: int) -> None:
    """`num_steps` decode rounds: bulk on the first scheduler, one call each on the other."""
    new, ref = scheds
    max_len = new.config.max_model_len
    k = min(new.block_manager.max_decode_steps(new.running, num_steps),
            min(min(s.sampling_params.max_tokens - s.num_output_tokens, max_len - s.num_tokens)
                for s in new.running) - 1)
    if k <= 0 or any(is_prefilling(s) for s in new.running):
        return
    for seq_a, seq_b in zip(new.running, ref.running, strict=True):
        for _ in range(k):
            token = next_token(seq_a)
            seq_a.append_token(token)
            seq_b.append_token(token)
    rounds = new.block_manager.allocate_decode_steps(new.running, k)
    assert rounds == reference_rounds(ref, k)
    for seq in new.running:
        seq.num_computed_tokens += k
    assert_same_state(new.block_manager, ref.block_manager)


def reference_rounds(ref: Scheduler, k: int) -> list[int]:
    start = [s.num_computed_tokens for s in ref.running]
    rounds = []
    for j in range(k):
        for seq, c in zip(ref.running, start, strict=True):
            seq.num_computed_tokens = c + j
            before = len(seq.block_table)
            assert ref.block_manager.allocate_slots(seq, 1)
            rounds += [j] * (len(seq.block_table) - before)
    for seq, c in zip(ref.running, start, strict=True):
        seq.num_computed_tokens = c + k
    return rounds


def lockstep(config: EngineConfig, num_blocks: int, requests: list[Request],
             bulk: list[int], lazy: bool = True) -> None:
    scheds = pair(config, num_blocks, lazy)
    pending = sorted(enumerate(requests), key=lambda r: (r[1][0], r[0]))
    n = 0
    while (pending or scheds[0].has_unfinished()) and n < 5000:
        while pending and pending[0][1][0] <= n:
            admit(scheds, pending.pop(0))
        if bulk and scheds[0].running and not scheds[0].waiting:
            bulk_decode(scheds, bulk.pop())
        step(scheds, float(n))
        assert_same_state(scheds[0].block_manager, scheds[1].block_manager)
        n += 1
    assert not scheds[0].has_unfinished()


def weak_hash(data: bytes) -> int:
    return xxh3_64_intdigest(data) % 4


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(), st.lists(st.integers(1, 40), max_size=6))
def test_same_behaviour_as_the_reference(scenario, bulk: list[int]) -> None:
    lockstep(*scenario, bulk)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(), st.lists(st.integers(1, 40), max_size=6))
def test_same_behaviour_as_the_reference_under_collisions(scenario, bulk: list[int]) -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cache_module, "xxh3_64_intdigest", weak_hash)
        mp.setattr(ref_module, "xxh3_64_intdigest", weak_hash)
        lockstep(*scenario, bulk, lazy=False)
