"""The scheduler's decode horizon: the steps it names are single-stepping's, and applying
them in bulk leaves the scheduler as single-stepping does."""

from __future__ import annotations

import copy

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from engine.core.config import EngineConfig
from engine.core.scheduler import Scheduler
from engine.core.sequence import SamplingParams, Sequence


@st.composite
def states(draw: st.DrawFn) -> Scheduler:
    """A scheduler some steps into random requests (shared prefixes, caching on or off)."""
    block_size = draw(st.sampled_from([1, 2, 4, 16]))
    max_len = draw(st.integers(16, 80))
    config = EngineConfig(block_size=block_size, max_model_len=max_len,
                          max_num_seqs=draw(st.integers(1, 6)),
                          max_num_batched_tokens=draw(st.integers(max_len, 2 * max_len)),
                          enable_prefix_caching=draw(st.booleans())).validate()
    min_blocks = -(-max_len // block_size)
    sched = Scheduler(config, draw(st.integers(min_blocks, 3 * min_blocks)))
    for i in range(draw(st.integers(1, 8))):
        prompt = ([5] * draw(st.integers(0, 12)) + [100 + i] * max_len)[:draw(
            st.integers(1, max_len))]
        params = SamplingParams(max_tokens=draw(st.integers(1, max_len)), ignore_eos=True)
        sched.add_request(Sequence(prompt, params, i))
    for _ in range(draw(st.integers(0, 40))):
        if not sched.has_unfinished():
            break
        step(sched)
    return sched


def step(sched: Scheduler):
    out = sched.schedule()
    finished = sched.update_from_output(out, [7 if s.samples else None
                                              for s in out.scheduled])
    return out, finished


def state(sched: Scheduler) -> list[tuple]:
    """Every sequence's tokens, progress and blocks, and the cache. Content ids are
    renumbered by first appearance: only which blocks share one matters, not its value."""
    bm, labels = sched.block_manager, {}
    seqs = [(s.request_id, list(s.token_ids), s.num_computed_tokens, list(s.block_table),
             [labels.setdefault(c, len(labels)) for c in s.block_content_ids])
            for s in [*sched.running, *sched.waiting]]
    return [*seqs, (bm.num_free_blocks, bm.num_used_blocks, sorted(bm.cached.items()))]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(states())
def test_the_horizon_is_what_single_stepping_does(sched: Scheduler) -> None:
    horizon = sched.decode_horizon()
    event(f"horizon: {'none' if horizon is None else 'steps'}")
    if horizon is None:
        return
    for j in range(horizon.num_steps):
        out, finished = step(sched)
        assert not out.preempted
        assert [i.seq for i in out.scheduled] == horizon.seqs
        assert all(i.is_decode for i in out.scheduled)
        assert bool(finished) == (horizon.finishes and j == horizon.num_steps - 1)
    if not horizon.finishes:  # it ended because the next step could not get its blocks
        out, _ = step(sched)
        assert out.preempted or [i.seq for i in out.scheduled] != horizon.seqs


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(states(), st.data())
def test_running_a_horizon_in_bulk_equals_single_steps(sched: Scheduler, data) -> None:
    """Any prefix of the horizon; its last step finishes sequences as update_from_output
    does (same ones, same order of freed blocks)."""
    horizon = sched.decode_horizon()
    event(f"bulk: {'none' if horizon is None or not horizon.num_steps else 'steps'}")
    if horizon is None or not horizon.num_steps:
        return
    k = data.draw(st.one_of(st.just(horizon.num_steps), st.integers(1, horizon.num_steps)))
    last = k == horizon.num_steps
    event(f"bulk: {'to the finish' if last and horizon.finishes else 'no finish'}")
    single, finished = copy.deepcopy(sched), []
    for _ in range(k):
        finished = step(single)[1]
    done = sched.run_decode_steps(horizon.seqs, k, lambda seq, count: [7] * count,
                                  0.0 if last else None)
    assert [s.request_id for s in done.finished] == [s.request_id for s in finished]
    assert state(sched) == state(single)
    assert list(sched.block_manager.free_queue) == list(single.block_manager.free_queue)


def test_no_horizon_while_a_request_could_be_admitted() -> None:
    config = EngineConfig(block_size=4, max_model_len=64, max_num_seqs=4).validate()
    sched = Scheduler(config, 64)
    sched.add_request(Sequence([1, 2, 3], SamplingParams(max_tokens=20, ignore_eos=True)))
    step(sched)
    assert sched.decode_horizon().num_steps == 19
    sched.add_request(Sequence([4, 5], SamplingParams(max_tokens=5, ignore_eos=True)))
    assert sched.decode_horizon() is None
