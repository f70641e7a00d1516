"""Event skipping: advance runs of identical-composition decode steps in bulk.

The Scheduler says how long its batch stays the same decodes if nothing arrives
(`Scheduler.decode_horizon`: every running sequence decodes, nothing can be admitted before
an arrival, up to the first finish and before the first failed allocation). The twin adds
time: it predicts the steps' durations and cuts the run before the first step that would
admit an arriving request. The Scheduler applies the steps in bulk, the finishing one
included (`Scheduler.run_decode_steps`). The records are single-stepping's (a tested
property).

When nothing waits and the blocks of every running sequence up to its finish are free, the
runs that follow each other from finish to finish (until an arrival) are planned at once,
as segments of one `PlannedRun`: after a finishing step, single-stepping would plan exactly
the next segment.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import simpy

from engine.core.features import StepRow, shared_prefix_keys
from engine.core.scheduler_output import DecodeHorizon
from engine.core.sequence import Sequence
from sim.step_log import DecodeRunSteps
from sim.step_time import DecodeRun

if TYPE_CHECKING:
    from sim.simulator import Simulator

MIN_RUN = 2
MIN_CHUNK = 16  # steps predicted at least before looking for the next arrival


@dataclass
class Segment:
    """Steps in which `seqs` (in running order) decode; ends[j] is when step j ends."""

    seqs: list[Sequence]
    ends: np.ndarray
    finishes: bool  # its last step finishes a sequence


def plan_decode_run(sim: Simulator) -> PlannedRun | None:
    horizon = sim.scheduler.decode_horizon(MIN_RUN)
    if horizon is None or horizon.num_steps < MIN_RUN:
        return None
    stop = sim.next_arrival if horizon.admits else float("inf")
    ends = step_ends(sim, horizon.seqs, 0, horizon.num_steps, sim.clock, stop)
    if len(ends) < MIN_RUN:
        return None
    finishes = horizon.finishes and len(ends) == horizon.num_steps
    segments = [Segment(horizon.seqs, ends, finishes)]
    if horizon.admits and finishes and horizon.all_blocks_free:
        _plan_next_segments(sim, segments, horizon)
    return PlannedRun(sim, segments)


def _plan_next_segments(sim: Simulator, segments: list[Segment],
                        horizon: DecodeHorizon) -> None:
    """Segments from finish to finish, up to the last finish or the next arrival."""
    remaining = {s.seq_id: k for s, k in zip(horizon.seqs, horizon.steps_to_finish,
                                             strict=True)}
    done = len(segments[0].ends)
    while segments[-1].finishes:
        seqs = [s for s in segments[-1].seqs if remaining[s.seq_id] > done]
        start = float(segments[-1].ends[-1])
        if not seqs or start >= sim.next_arrival:
            return
        k = min(remaining[s.seq_id] for s in seqs) - done
        ends = step_ends(sim, seqs, done, k, start, sim.next_arrival)
        segments.append(Segment(seqs, ends, finishes=len(ends) == k))
        done += len(ends)


def step_ends(sim: Simulator, seqs: list[Sequence], offset: int, k: int, start: float,
              stop: float) -> np.ndarray:
    """End times of up to `k` decode steps of `seqs` from `start` (`offset` steps from now),
    through the first that ends at or after `stop` (an arrival: the step after it admits
    it). Predicted in chunks, the first sized by the first step's duration (steps only grow
    longer), so a run cut short by an arrival predicts few steps more."""
    first = _first_step(sim, seqs, offset)
    first_index = len(sim.steps) + offset
    size = k if stop == float("inf") else _steps_within(sim, first, first_index, stop - start)
    chunks, done = [], 0
    while done < k and start < stop:
        count = min(size, k - done)
        run = DecodeRun(first.num_seqs, first.ctx_start + done * first.num_seqs, count,
                        None if first.max_ctx_start is None else first.max_ctx_start + done,
                        first.shared)
        ends = durations_to_ends(start, sim.step_time.decode_run(run, first_index + done))
        chunks.append(ends)
        done, start, size = done + count, float(ends[-1]), 2 * size
    ends = chunks[0] if len(chunks) == 1 else np.concatenate(chunks)
    return ends[:_before_arrival(ends, stop)]


def _steps_within(sim: Simulator, first: DecodeRun, index: int, seconds: float) -> int:
    """Decode steps that fit in `seconds` at the first one's duration, two more for margin."""
    row = StepRow(0, 0, first.num_seqs, first.ctx_start, first.num_seqs, first.max_ctx_start,
                  0, first.shared)
    return max(MIN_CHUNK, int(seconds / max(sim.step_time.step(row, index), 1e-9)) + 2)


def _before_arrival(ends: np.ndarray, arrival: float) -> int:
    """How many of the steps ending at `ends` start before `arrival` (the first one always
    does): the run stops before the first step that would admit it."""
    return min(int(ends.searchsorted(arrival)), len(ends) - 1) + 1


def _first_step(sim: Simulator, seqs: list[Sequence], offset: int) -> DecodeRun:
    """The decode step of `seqs` `offset` steps from now, as a run of one step. The prefix
    keys re-read stay put within a run: a decode's keys pass its cached prefix."""
    n, model = len(seqs), sim.step_time
    ctx = sum(s.num_computed_tokens + 1 for s in seqs) + offset * n
    longest = None  # computed only when the model reads it
    if model.reads_longest:
        longest = max(s.num_computed_tokens + 1 for s in seqs) + offset
    shared = 0
    if model.reads_shared:
        shared = shared_prefix_keys((s, s.num_computed_tokens + 1 + offset) for s in seqs)
    return DecodeRun(n, ctx, 1, longest, shared)


@dataclass
class PlannedRun:
    sim: Simulator
    segments: list[Segment]

    def apply(self) -> Iterator[simpy.Event]:
        """Every segment in bulk, then the clock to the last step's end (nothing happens in
        between that the arrival process would need to wake)."""
        self.sim.stats["decode_runs"] += 1
        for segment in self.segments:
            self._bulk(segment)
            self.sim._progress()
        yield from self.sim.advance_to(self.sim.clock)

    def _bulk(self, segment: Segment) -> None:
        sim, k = self.sim, len(segment.ends)
        sched = sim.scheduler
        waiting = len(sched.waiting)
        added = self._admit_arrivals_in_run(segment)
        bm = sched.block_manager
        used = bm.num_used_blocks
        end = float(segment.ends[-1])
        done = sched.run_decode_steps(segment.seqs, k, sim.tokens,
                                      end if segment.finishes else None)
        sim.steps.add_decode_run(DecodeRunSteps(
            sim.clock, segment.ends, len(segment.seqs), waiting, added, used,
            done.blocks_taken, bm.num_blocks))
        for seq in done.finished:
            sim._record(seq)
        sim.clock = end
        sim.stats["skipped_steps"] += k
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


def durations_to_ends(start: float, durations: np.ndarray) -> np.ndarray:
    """Step end times by sequential addition, exactly as stepping one at a time does."""
    ends = np.empty(len(durations) + 1)
    ends[0] = start
    ends[1:] = durations
    return np.add.accumulate(ends, out=ends)[1:]
