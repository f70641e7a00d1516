"""Event skipping: advance runs of identical-composition decode steps in bulk.

A run is planned only when single-stepping provably repeats one composition: every running
sequence decodes one token per step; no admission can happen (nothing waits, or `max_num_seqs`
or the token budget is reached, which no decode step changes); and the run stops at the first
step in which a sequence finishes, and before the first step in which an allocation would fail
(preemption) or an admissible request arrives. Within the run the only per-sequence effects
are the token appended and `BlockManager.allocate_slots(seq, 1)`; the BlockManager does those
rounds in bulk (`allocate_decode_steps`), in the same (step, running order). A run that ends
on a finishing step runs that step through the Scheduler, as single-stepping does.

When nothing waits and the blocks of every running sequence up to its finish are free (none
freed by the finishes counted), the runs that follow each other from finish to finish (until an
arrival) are planned at once, as segments of one `DecodeRun`: after a finishing step,
single-stepping would plan exactly the next segment.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import simpy

from engine.scheduler import SchedulerOutput, is_prefilling
from engine.sequence import Sequence
from sim.features import DecodeDurations, decode_run_features, shared_prefix_keys
from sim.step_log import DecodeRunSteps
from sim.step_time import CalibratedStepTime, RooflineStepTime, StepTimeModel

if TYPE_CHECKING:
    from sim.simulator import Simulator

MIN_RUN = 2
# Step-time models whose prediction depends on the features only: decode runs use memoised
# durations (others, like replayed engine times, are indexed by step and predicted per run).
FEATURE_ONLY = (CalibratedStepTime, RooflineStepTime)


@dataclass
class Segment:
    """Steps in which `seqs` (in running order) decode; ends[j] is when step j ends."""

    seqs: list[Sequence]
    ends: np.ndarray
    finishes: bool  # its last step finishes a sequence: it runs through the Scheduler

    @property
    def num_bulk_steps(self) -> int:
        return len(self.ends) - 1 if self.finishes else len(self.ends)


def plan_decode_run(sim: Simulator) -> DecodeRun | None:
    sched, cfg = sim.scheduler, sim.config
    running = sched.running
    n = len(running)
    if n == 0 or n > cfg.max_num_batched_tokens or any(is_prefilling(s) for s in running):
        return None
    if sched.eos_token_ids and not all(s.sampling_params.ignore_eos for s in running):
        return None
    blocked = n >= cfg.max_num_seqs or cfg.max_num_batched_tokens - n <= 0
    if sched.waiting and not blocked:
        return None
    to_finish = [_steps_to_finish(s, cfg.max_model_len) for s in running]
    bm = sched.block_manager
    all_free = bm.decode_blocks_needed(running, to_finish) <= bm.num_free_blocks
    first = _first_segment(sim, list(running), min(to_finish), blocked, all_free)
    if first is None:
        return None
    segments = [first]
    if not blocked and first.finishes and all_free:
        remaining = {s.seq_id: k for s, k in zip(running, to_finish, strict=True)}
        _plan_next_segments(sim, segments, remaining)
    return DecodeRun(sim, segments)


def _steps_to_finish(seq: Sequence, max_model_len: int) -> int:
    """Decode steps up to the one that finishes `seq` (forced length or max_model_len)."""
    return min(seq.sampling_params.max_tokens - seq.num_output_tokens,
               max_model_len - seq.num_tokens)


def _first_segment(sim: Simulator, seqs: list[Sequence], to_finish: int, blocked: bool,
                   all_free: bool) -> Segment | None:
    """Up to the first finish; `all_free`: every sequence gets its blocks up to its finish."""
    k = to_finish if all_free else sim.scheduler.block_manager.max_decode_steps(seqs, to_finish)
    if k < MIN_RUN:
        return None
    ends = durations_to_ends(sim.clock, _durations(sim, seqs, 0, k))
    if not blocked:
        k = _before_arrival(ends, sim.next_arrival)
    if k < MIN_RUN:
        return None
    return Segment(seqs, ends[:k], finishes=k == to_finish)


def _plan_next_segments(sim: Simulator, segments: list[Segment],
                        remaining: dict[int, int]) -> None:
    """Segments from finish to finish, up to the last finish or the next arrival."""
    done = len(segments[0].ends)
    while segments[-1].finishes:
        seqs = [s for s in segments[-1].seqs if remaining[s.seq_id] > done]
        if not seqs:
            return
        start = float(segments[-1].ends[-1])
        if start >= sim.next_arrival:
            return
        k = min(remaining[s.seq_id] for s in seqs) - done
        ends = durations_to_ends(start, _durations(sim, seqs, done, k))
        k_run = _before_arrival(ends, sim.next_arrival)
        segments.append(Segment(seqs, ends[:k_run], finishes=k_run == k))
        done += k_run


def _before_arrival(ends: np.ndarray, arrival: float) -> int:
    """How many of the steps ending at `ends` start before `arrival` (the first one always
    does): the run stops before the first step that would admit it."""
    return min(int(ends.searchsorted(arrival)), len(ends) - 1) + 1


def memoised_durations(step_time: StepTimeModel) -> DecodeDurations | None:
    return DecodeDurations(step_time.predict) if isinstance(step_time, FEATURE_ONLY) else None


def _durations(sim: Simulator, seqs: list[Sequence], offset: int, k: int) -> np.ndarray:
    """Durations of `k` decode steps of `seqs`, starting `offset` steps from now."""
    n = len(seqs)
    ctx = sum(s.num_computed_tokens + 1 for s in seqs) + offset * n
    longest = None  # kept out of the memo's key unless the model reads it
    if getattr(sim.step_time, "uses_longest_decode", False):
        longest = max(s.num_computed_tokens + 1 for s in seqs) + offset
    shared = 0
    if getattr(sim.step_time, "uses_shared_decode", False):
        shared = shared_prefix_keys((s, s.num_computed_tokens + 1 + offset) for s in seqs)
    if sim.decode_durations is not None:
        return sim.decode_durations.run(n, ctx, k, longest, shared)
    return sim.step_time.predict(decode_run_features(n, ctx, k, longest, shared),
                                 len(sim.steps) + offset)


@dataclass
class DecodeRun:
    sim: Simulator
    segments: list[Segment]

    def apply(self) -> Iterator[simpy.Event]:
        self.sim.stats["decode_runs"] += 1
        for segment in self.segments:
            self._bulk(segment)
            if segment.finishes:
                yield from self._finishing_step(segment)
            else:
                yield from self.sim.advance_to(float(segment.ends[-1]))
                self.sim._progress()

    def _bulk(self, segment: Segment) -> None:
        sim, bulk = self.sim, segment.num_bulk_steps
        if bulk == 0:
            return
        sched = sim.scheduler
        waiting = len(sched.waiting)
        added = self._admit_arrivals_in_run(segment)
        bm = sched.block_manager
        used = bm.num_used_blocks
        self._append_tokens(segment.seqs, bulk)
        taken = bm.allocate_decode_steps(segment.seqs, bulk)
        assert taken is not None, "a planned decode run ran out of blocks"
        for seq in segment.seqs:
            seq.num_computed_tokens += bulk
        sim.steps.add_decode_run(DecodeRunSteps(
            sim.clock, segment.ends[:bulk], len(segment.seqs), waiting,
            [j for j in added if j < bulk], used, taken, bm.num_blocks))
        sim.clock = float(segment.ends[bulk - 1])
        sim.stats["skipped_steps"] += bulk
        sim.stats["skip_runs"] += 1

    def _admit_arrivals_in_run(self, segment: Segment) -> list[int]:
        """Requests arriving during a blocked run join the queue at the step they would;
        returns the step of each one accepted."""
        sim, added, ends = self.sim, [], segment.ends
        if len(ends) < 2 or sim.next_arrival > ends[-2]:  # after the last step's start
            return added
        starts = np.concatenate(([sim.clock], ends[:-1]))
        while sim.next_arrival <= starts[-1]:
            j = int(np.searchsorted(starts, sim.next_arrival, side="left"))
            added += [j] * sim.admit_arrivals(sim.next_arrival)
        return added

    def _append_tokens(self, seqs: list[Sequence], k: int) -> None:
        sim = self.sim
        for seq in seqs:
            seq.token_ids.extend(sim.token_fn(sim.index[seq.seq_id], seq.num_tokens, k))

    def _finishing_step(self, segment: Segment) -> Iterator[simpy.Event]:
        sim = self.sim
        start = sim.clock
        out = sim.scheduler.schedule(start)
        assert _all_decode(out, segment.seqs), "a decode run's last step changed the batch"
        yield from sim.run_step(out, start, float(segment.ends[-1]))


def _all_decode(out: SchedulerOutput, seqs: list[Sequence]) -> bool:
    return not out.preempted and len(out.scheduled) == len(seqs) and \
        all(i.is_decode and i.seq is s for i, s in zip(out.scheduled, seqs, strict=True))


def durations_to_ends(start: float, durations: np.ndarray) -> np.ndarray:
    """Step end times by sequential addition, exactly as stepping one at a time does."""
    ends = np.empty(len(durations) + 1)
    ends[0] = start
    ends[1:] = durations
    return np.add.accumulate(ends, out=ends)[1:]
