"""pytest-benchmark: the torch-free core on its hot paths.

Run with: python -m pytest tests/benchmarks --benchmark-enable
"""

from __future__ import annotations

import random

from engine.core.config import EngineConfig
from engine.core.kv.block_manager import BlockManager
from engine.core.scheduler import Scheduler
from engine.core.sequence import SamplingParams, Sequence


def prompts(n: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(50_000) for _ in range(length)] for _ in range(n)]


def test_block_manager_allocate_free_256x1k(benchmark) -> None:
    """Admit 256 prompts of 1,024 tokens (prefix-cache lookup + allocate), then free them."""
    bm = BlockManager(num_blocks=256 * 64 + 16, block_size=16)
    batch = prompts(256, 1024)

    def cycle() -> None:
        seqs = [Sequence(p) for p in batch]
        for seq in seqs:
            hit = bm.get_computed_blocks(seq)
            assert bm.allocate_slots(seq, seq.num_tokens - len(hit) * 16, hit)
        for seq in seqs:
            bm.free(seq)

    benchmark(cycle)
    assert bm.num_free_blocks == bm.num_blocks


def running_scheduler() -> Scheduler:
    config = EngineConfig(block_size=16, max_model_len=4096, max_num_seqs=256,
                          max_num_batched_tokens=8192).validate()
    sched = Scheduler(config, num_blocks=256 * 128)
    for p in prompts(256, 512, seed=1):
        sched.add_request(Sequence(p, SamplingParams(max_tokens=10_000, ignore_eos=True)))
    while sched.waiting or any(s.num_uncomputed_tokens > 1 for s in sched.running):
        out = sched.schedule()
        sched.update_from_output(out, [1 if s.samples else None for s in out.scheduled])
    assert len(sched.running) == 256
    return sched


def test_scheduler_decode_step_256_running(benchmark) -> None:
    """One schedule + update of a 256-sequence decode batch (blocks fill as it runs).

    A fixed number of rounds: the cache holds 1,536 more tokens per sequence, so a faster
    step (more rounds in pytest-benchmark's time budget) would otherwise end in preemption."""
    sched = running_scheduler()

    def step() -> None:
        out = sched.schedule()
        sched.update_from_output(out, [1] * len(out.scheduled))

    benchmark.pedantic(step, rounds=1000, iterations=1)
    assert len(sched.running) == 256
