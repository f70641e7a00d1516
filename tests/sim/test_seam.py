"""The seam: fed the engine's measured step durations (and its sampled tokens), the simulator
reproduces the engine's run exactly — every step's batch and cache state, every request's
times, prefix hits and preemptions, with times equal as floats, not approximately.

Why exactness is possible: the simulator drives the engine's own Scheduler and BlockManager,
and `engine.runtime.replay` partitions engine time with the simulator's arrival rule (admit at step
boundaries everything that has arrived; when idle, jump to the next arrival). A step ends at
`start + duration` in both, computed by the same float addition from the same two floats.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from pandas.testing import assert_frame_equal

from engine.core.catalog import load_model
from engine.core.request import Request
from engine.runtime.llm import LLMEngine
from engine.runtime.replay import ReplayResult, records_frames, replay
from sim.simulator import Simulator
from sim.stand_in import TokenFn
from sim.step_time import ReplayedStepTime

MODEL = load_model("tiny_qwen3")
BASE = dict(dtype="float32", device="cpu", max_model_len=128, block_size=8, max_num_seqs=3,
            max_num_batched_tokens=48, num_gpu_blocks_override=256)
CASES = {
    "v1_prefix_caching": {},
    "v1_no_prefix_caching": dict(enable_prefix_caching=False),
    "prefill_first": dict(policy="prefill_first"),
    "prefill_first_no_prefix_caching": dict(policy="prefill_first",
                                            enable_prefix_caching=False),
    "v1_preemption": dict(block_size=4, max_model_len=64, num_gpu_blocks_override=16),
    "prefill_first_preemption": dict(block_size=4, max_model_len=64,
                                     num_gpu_blocks_override=16, policy="prefill_first"),
}
PREEMPTING = ("v1_preemption", "prefill_first_preemption")


def tokens(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, 500, n).tolist()


def shared_prefix_trace(max_len: int) -> list[Request]:
    """Two prefix groups, bursts (one larger than max_num_seqs), arrivals during steps, idle
    gaps and one empty prompt. Listed out of arrival order on purpose (both must sort)."""
    groups = [tokens(1, 24), tokens(2, 17)]
    arrivals = [0.0, 0.0, 0.006, 0.012, 0.012, 0.02, 0.3, 0.3, 0.3, 0.3, 0.307, 0.6, 0.61]
    trace = []
    for i, arrival in enumerate(arrivals):
        body = groups[i % 2] + tokens(10 + i, 3 + (7 * i) % 19)
        trace.append(Request(100 + i, arrival, body[: max_len - 16], 4 + (5 * i) % 11))
    trace.append(Request(99, 0.012, [], 3))
    return trace[::-1]


def engine_token_fn(trace: list[Request], result: ReplayResult) -> TokenFn:
    """The engine's sampled tokens, by (trace index, position, count)."""
    def token_fn(index: int, position: int, count: int) -> list[int]:
        offset = position - len(trace[index].prompt_token_ids)
        return result.output_token_ids[index][offset:offset + count]
    return token_fn


def simulate(engine: LLMEngine, trace: list[Request], result: ReplayResult,
             skip: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    sim = Simulator(engine.config, engine.num_blocks,
                    ReplayedStepTime(np.asarray(result.step_durations_s)),
                    eos_token_ids=frozenset(engine.model_config.eos_token_ids()), skip=skip,
                    token_fn=engine_token_fn(trace, result))
    out = sim.run(trace)
    requests = out.requests
    return requests, out.steps.to_frame()


def by_id(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values("request_id").reset_index(drop=True)


@pytest.fixture(scope="module", params=list(CASES))
def run(request) -> tuple[str, LLMEngine, list[Request], ReplayResult]:
    engine = LLMEngine(MODEL, **(BASE | CASES[request.param]))
    trace = shared_prefix_trace(engine.config.max_model_len)
    return request.param, engine, trace, replay(engine, trace)


@pytest.mark.parametrize("skip", [False, True], ids=["single_step", "event_skipping"])
def test_sim_reproduces_the_engine_exactly(run, skip: bool) -> None:
    _, engine, trace, result = run
    engine_requests, engine_steps = records_frames(result)
    sim_requests, sim_steps = simulate(engine, trace, result, skip)
    assert_frame_equal(sim_steps, engine_steps.astype(sim_steps.dtypes.to_dict()),
                       check_exact=True)
    assert_frame_equal(by_id(sim_requests), by_id(engine_requests), check_exact=True)


def test_the_run_exercises_the_mechanisms(run) -> None:
    """So that an exact match cannot come from a trivial run."""
    case, engine, _, result = run
    requests, steps = records_frames(result)
    gaps = (steps.start_s.iloc[1:].to_numpy() != steps.end_s.iloc[:-1].to_numpy()).sum()
    assert gaps >= 2, "idle gaps: steps woken by an arrival"
    assert (requests.arrival_s < requests.first_scheduled_s).any(), "arrivals during steps"
    assert (steps.num_waiting > 0).any(), "requests queued behind max_num_seqs"
    assert requests.rejected.sum() == 1
    assert (steps.num_prefill_seqs > 1).any() or case.startswith("prefill_first")
    assert ((steps.num_prefill_seqs > 0) & (steps.num_decode_seqs > 0)).any() \
        == (engine.config.policy == "v1")
    chunked = (steps.num_batched_tokens == engine.config.max_num_batched_tokens).any()
    assert chunked, "a prefill chunked by the token budget"
    cached = requests.num_cached_tokens.sum()
    assert (cached > 0) == engine.config.enable_prefix_caching
    assert (requests.num_preemptions.sum() > 0) == (case in PREEMPTING)
