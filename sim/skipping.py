"""Event skipping: advance a run of identical-composition decode steps in bulk.

A run is planned only when single-stepping provably repeats one composition: every running
sequence decodes one token per step; no admission can happen (nothing waits, or `max_num_seqs`
or the token budget is reached, which no decode step changes); and the run stops before the
first step in which a sequence finishes, an allocation would fail (preemption), or an
admissible request arrives. Within the run the only per-sequence effects are the token
appended and `BlockManager.allocate_slots(seq, 1)`, which takes a block when a decode starts
one and publishes a block when a decode fills one. Those calls are made here, through the
same API, in the same (step, running order), and only where they do something.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import simpy

from engine.scheduler import is_prefilling
from engine.sequence import Sequence
from sim.features import decode_run_features
from sim.simulator import durations_to_ends

if TYPE_CHECKING:
    from sim.simulator import Simulator

MIN_RUN = 2


def plan_decode_run(sim: Simulator) -> DecodeRun | None:
    sched, cfg = sim.scheduler, sim.config
    running = list(sched.running)
    n = len(running)
    if n == 0 or n > cfg.max_num_batched_tokens or any(is_prefilling(s) for s in running):
        return None
    if sched.eos_token_ids and not all(s.sampling_params.ignore_eos for s in running):
        return None
    blocked = n >= cfg.max_num_seqs or cfg.max_num_batched_tokens - n <= 0
    if sched.waiting and not blocked:
        return None
    k = min(_steps_before_finish(s, cfg.max_model_len) for s in running)
    k = min(k, _steps_before_failed_allocation(sim, running, k))
    if k < MIN_RUN:
        return None
    ctx = sum(s.num_computed_tokens + 1 for s in running)
    durations = sim.step_time.predict(decode_run_features(n, ctx, k), len(sim.steps))
    ends = durations_to_ends(sim.clock, durations)
    starts = np.concatenate(([sim.clock], ends[:-1]))
    if not blocked:  # stop before the first step that would admit an arrival
        k = int(np.searchsorted(starts[1:], sim.next_arrival, side="left")) + 1
    if k < MIN_RUN:
        return None
    return DecodeRun(sim, running, starts[:k], ends[:k])


def _steps_before_finish(seq: Sequence, max_model_len: int) -> int:
    """Decode steps before the one that finishes `seq` (forced length or max_model_len)."""
    remaining = min(seq.sampling_params.max_tokens - seq.num_output_tokens,
                    max_model_len - seq.num_tokens)
    return remaining - 1


def _block_starts(running: list[Sequence], block_size: int, k: int) -> np.ndarray:
    """New blocks needed at each of the next k steps: a decode at position p % bs == 0."""
    per_residue = np.zeros(block_size, dtype=np.int64)
    for seq in running:
        per_residue[seq.num_computed_tokens % block_size] += 1
    return per_residue[(-np.arange(k)) % block_size]


def _steps_before_failed_allocation(sim: Simulator, running: list[Sequence], k: int) -> int:
    if k <= 0:
        return 0
    bm = sim.scheduler.block_manager
    needed = np.cumsum(_block_starts(running, bm.block_size, k))
    over = np.flatnonzero(needed > bm.num_free_blocks)
    return int(over[0]) if len(over) else k


@dataclass
class DecodeRun:
    sim: Simulator
    running: list[Sequence]
    starts: np.ndarray
    ends: np.ndarray

    @property
    def num_steps(self) -> int:
        return len(self.starts)

    def apply(self) -> Iterator[simpy.Event]:
        sim = self.sim
        bm = sim.scheduler.block_manager
        used = bm.num_used_blocks + np.cumsum(
            _block_starts(self.running, bm.block_size, self.num_steps))
        waiting = self._admit_arrivals_in_run()
        self._append_tokens()
        self._allocate_in_order()
        yield from sim.advance_to(float(self.ends[-1]))
        sim.steps.extend(self._records(used, waiting))
        sim.stats["skipped_steps"] += self.num_steps
        sim.stats["skip_runs"] += 1
        sim._progress()

    def _admit_arrivals_in_run(self) -> np.ndarray:
        """Requests arriving during a blocked run join the queue at the step they would."""
        sim = self.sim
        waiting = np.full(self.num_steps, len(sim.scheduler.waiting), dtype=np.int64)
        last_start = float(self.starts[-1])
        while sim.next_arrival <= last_start:
            j = int(np.searchsorted(self.starts, sim.next_arrival, side="left"))
            waiting[j:] += sim.admit_arrivals(sim.next_arrival)
        return waiting

    def _append_tokens(self) -> None:
        sim, k = self.sim, self.num_steps
        for seq in self.running:
            index, n = sim.index[seq.seq_id], seq.num_tokens
            seq.token_ids.extend(sim.token_fn(index, n, k))

    def _allocate_in_order(self) -> None:
        bm, k = self.sim.scheduler.block_manager, self.num_steps
        bs, n = bm.block_size, len(self.running)
        start = [s.num_computed_tokens for s in self.running]
        keys: set[int] = set()  # step * n + running index, for each decode that does something
        for idx, c in enumerate(start):
            keys.update(range(((-c) % bs) * n + idx, k * n, bs * n))  # opens a block
            if bm.enable_prefix_caching:                                # fills (publishes) one
                keys.update(range(((-c - 1) % bs) * n + idx, k * n, bs * n))
        for key in sorted(keys):
            j, idx = divmod(key, n)
            seq = self.running[idx]
            seq.num_computed_tokens = start[idx] + j
            ok = bm.allocate_slots(seq, 1)
            assert ok, "a planned decode run ran out of blocks"
        for seq, c in zip(self.running, start, strict=True):
            seq.num_computed_tokens = c + k

    def _records(self, used: np.ndarray, waiting: np.ndarray) -> dict[str, np.ndarray]:
        sim, k, n = self.sim, self.num_steps, len(self.running)
        bm = sim.scheduler.block_manager
        const = np.full(k, n, dtype=np.int64)
        zeros = np.zeros(k, dtype=np.int64)
        first = len(sim.steps)
        return {
            "step": np.arange(first, first + k), "start_s": self.starts, "end_s": self.ends,
            "num_batched_tokens": const, "num_prefill_tokens": zeros,
            "num_prefill_seqs": zeros, "num_decode_seqs": const, "num_running": const,
            "num_waiting": waiting, "num_blocks_used": used,
            "num_blocks_free": bm.num_blocks - used, "num_preempted": zeros,
        }
