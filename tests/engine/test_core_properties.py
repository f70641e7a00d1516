"""Property-based tests of BlockManager + Scheduler over random request streams."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.core.config import EngineConfig
from engine.core.scheduler import Scheduler, is_prefilling
from engine.core.sequence import SequenceStatus
from tests.engine.driver import drive

PREFIXES = [[7] * 40, list(range(100, 140)), [5, 6] * 20]


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[EngineConfig, int, list[tuple[int, list[int], int]]]:
    block_size = draw(st.sampled_from([1, 2, 4, 8, 16]))
    max_model_len = draw(st.integers(8, 64))
    chunked = draw(st.booleans())
    lo = 1 if chunked else max_model_len
    config = EngineConfig(
        block_size=block_size, max_model_len=max_model_len,
        max_num_seqs=draw(st.integers(1, 8)),
        max_num_batched_tokens=draw(st.integers(lo, max(lo, 80))),
        enable_chunked_prefill=chunked,
        enable_prefix_caching=draw(st.booleans()),
        policy=draw(st.sampled_from(["v1", "prefill_first"])),
    ).validate()
    min_blocks = -(-max_model_len // block_size)
    num_blocks = draw(st.integers(min_blocks, 3 * min_blocks + 4))
    requests = draw(st.lists(request(max_model_len), min_size=1, max_size=12))
    return config, num_blocks, requests


def request(max_model_len: int) -> st.SearchStrategy[tuple[int, list[int], int]]:
    @st.composite
    def build(draw: st.DrawFn) -> tuple[int, list[int], int]:
        prefix = draw(st.sampled_from(PREFIXES))[: draw(st.integers(0, max_model_len))]
        tail = draw(st.lists(st.integers(0, 50), max_size=max_model_len))
        prompt = (prefix + tail)[: draw(st.integers(0, max_model_len + 4))]
        return draw(st.integers(0, 20)), prompt, draw(st.integers(1, max_model_len))
    return build()


def expected_output_len(prompt_len: int, max_tokens: int, max_model_len: int) -> int:
    return max(1, min(max_tokens, max_model_len - prompt_len))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_random_streams_keep_every_invariant(scenario) -> None:
    config, num_blocks, requests = scenario
    sched, seqs, steps = drive(config, num_blocks, requests)  # checks invariants each step
    for seq, (_, prompt, max_tokens) in zip(seqs, requests, strict=True):
        if not prompt or len(prompt) > config.max_model_len:
            assert seq.status is SequenceStatus.REJECTED and "rejected" in seq.finish_reason
            continue
        assert seq.status is SequenceStatus.FINISHED
        assert seq.num_output_tokens == expected_output_len(len(prompt), max_tokens,
                                                            config.max_model_len)
        assert seq.token_ids[: len(prompt)].tolist() == prompt
    bm = sched.block_manager
    assert bm.num_free_blocks == num_blocks, "blocks leaked after every request finished"
    assert 0 <= bm.stats.hits <= bm.stats.queries
    for step in steps:
        check_policy(config, step)


def check_policy(config: EngineConfig, step) -> None:
    out = step.out
    if config.policy == "prefill_first":
        kinds = {item.is_decode for item in out.scheduled}
        assert len(kinds) <= 1, "prefill_first mixed prefill and decode in one step"
    if out.preempted and config.policy == "v1":
        admitted = [i for i in out.scheduled if i.seq.seq_id not in step.was_running]
        assert not admitted, "a step that preempted also admitted a waiting request"


@settings(max_examples=60, deadline=None)
@given(scenarios())
def test_same_stream_gives_identical_schedules(scenario) -> None:
    config, num_blocks, requests = scenario

    def plan() -> list[list[tuple[object, int]]]:
        _, _, steps = drive(config, num_blocks, requests)
        return [[(i.seq.request_id, i.num_new_tokens) for i in s.out.scheduled] for s in steps]

    assert plan() == plan()


def test_is_prefilling_tracks_pending_sample() -> None:
    sched = Scheduler(EngineConfig(block_size=4, max_model_len=16), 8)
    from engine.core.sequence import Sequence
    seq = Sequence([1, 2, 3])
    assert is_prefilling(seq)
    sched.add_request(seq)
    out = sched.schedule()
    sched.update_from_output(out, [9])
    assert not is_prefilling(seq) and seq.num_uncomputed_tokens == 1
