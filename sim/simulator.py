"""The SimPy twin: the engine's own Scheduler and BlockManager, with the forward pass replaced by
a predicted step duration.

An arrival process wakes the engine when requests arrive; the engine process admits every
request whose `arrival_s` is at or before its clock at a step boundary (the engine's rule),
asks the Scheduler for a plan, advances time by the predicted duration and applies the
outcome with `Scheduler.update_from_output`, exactly as `LLMEngine.step` does.

Event skipping: while every running sequence decodes and nothing can change the batch (no
admission possible, no finish, no failed allocation, no admissible arrival), steps keep their
composition. `sim.skipping` advances such runs in bulk with the same block bookkeeping in the
same order, so the records are identical to single-stepping (a tested property).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import simpy

from engine.config import EngineConfig
from engine.records import RequestRecord, StepRecord
from engine.scheduler import Scheduler
from engine.sequence import SamplingParams, Sequence
from sim.features import features_of
from sim.step_log import StepLog
from sim.step_time import StepTimeModel
from workloads.trace_requests import TraceRequest

TokenFn = Callable[[int, int, int], list[int]]  # (request index, position, count) -> ids


def fake_tokens(index: int, position: int, count: int = 1) -> list[int]:
    """Stand-in samples for `count` positions, distinct per request, with no randomness."""
    if count == 1:
        return [1000 + (index * 1_000_003 + position * 7919) % 100_000]
    positions = np.arange(position, position + count, dtype=np.int64)
    return (1000 + (index * 1_000_003 + positions * 7919) % 100_000).tolist()


@dataclass
class SimResult:
    requests: list[RequestRecord]
    steps: StepLog
    sequences: list[Sequence]
    scheduler: Scheduler
    stats: dict[str, int] = field(default_factory=dict)


class Simulator:
    def __init__(self, config: EngineConfig, num_blocks: int, step_time: StepTimeModel,
                 eos_token_ids: frozenset[int] = frozenset(), skip: bool = True,
                 token_fn: TokenFn = fake_tokens,
                 on_progress: Callable[[int], None] | None = None):
        self.config = config
        self.scheduler = Scheduler(config, num_blocks, eos_token_ids)
        self.step_time = step_time
        self.skip = skip
        self.token_fn = token_fn
        self.on_progress = on_progress
        self.env = simpy.Environment()
        self.clock = 0.0  # authoritative time; SimPy's clock follows it
        self.steps = StepLog()
        self.stats = {"single_steps": 0, "skipped_steps": 0, "skip_runs": 0}

    def run(self, requests: list[TraceRequest]) -> SimResult:
        order = sorted(range(len(requests)), key=lambda i: (requests[i].arrival_s, i))
        self.seqs = [self._sequence(requests[i]) for i in order]
        self.index = {s.seq_id: order[k] for k, s in enumerate(self.seqs)}
        self.cursor = 0
        self.wake = self.env.event()
        self.env.process(self._arrivals())
        done = self.env.process(self._engine())
        self.env.run(until=done)
        records = [RequestRecord.from_sequence(s) for s in self.seqs]
        return SimResult(records, self.steps, self.seqs, self.scheduler, dict(self.stats))

    @staticmethod
    def _sequence(req: TraceRequest) -> Sequence:
        params = SamplingParams(max_tokens=max(1, req.output_len), ignore_eos=True)
        return Sequence(req.prompt_token_ids, params, req.request_id, float(req.arrival_s))

    # -- processes -----------------------------------------------------------------------------

    def _arrivals(self) -> Iterator[simpy.Event]:
        """Wake the engine at each arrival; the engine decides what it admits."""
        for seq in self.seqs:
            if seq.times.arrival > self.env.now:
                yield self.env.timeout(seq.times.arrival - self.env.now)
            if not self.wake.triggered:
                self.wake.succeed()

    def _engine(self) -> Iterator[simpy.Event]:
        while True:
            self.admit_arrivals(self.clock)
            if not self.scheduler.has_unfinished():
                if self.cursor == len(self.seqs):
                    return
                yield from self._idle()
                continue
            run = self._skippable_run() if self.skip else None
            if run is not None:
                yield from run.apply()
            else:
                yield from self._single_step()

    def _idle(self) -> Iterator[simpy.Event]:
        if self.next_arrival > self.env.now:
            self.wake = self.env.event()
            yield self.wake
        self.clock = max(self.clock, self.next_arrival)

    def admit_arrivals(self, now: float) -> int:
        """Add every request that has arrived by `now`; returns how many were accepted."""
        accepted = 0
        while self.cursor < len(self.seqs) and self.seqs[self.cursor].times.arrival <= now:
            seq = self.seqs[self.cursor]
            self.cursor += 1
            if self.scheduler.add_request(seq):
                accepted += 1
            else:
                seq.times.finish = seq.times.arrival
        return accepted

    @property
    def next_arrival(self) -> float:
        return self.seqs[self.cursor].times.arrival if self.cursor < len(self.seqs) \
            else float("inf")

    def _single_step(self) -> Iterator[simpy.Event]:
        start = self.clock
        out = self.scheduler.schedule(start)
        if out.is_empty:
            raise RuntimeError("the scheduler planned an empty step with work pending")
        record = StepRecord.from_output(len(self.steps), start, out, self.scheduler)
        duration = float(self.step_time.predict(features_of(out), len(self.steps))[0])
        end = start + duration
        yield from self.advance_to(end)
        sampled = [self.token_fn(self.index[i.seq.seq_id], i.seq.num_tokens, 1)[0]
                   if i.samples else None for i in out.scheduled]
        self.scheduler.update_from_output(out, sampled, end)
        record.end_s = end
        self.steps.append(record)
        self.stats["single_steps"] += 1
        self._progress()

    def advance_to(self, t: float) -> Iterator[simpy.Event]:
        yield self.env.timeout(max(0.0, t - self.env.now))
        self.clock = t

    def _progress(self) -> None:
        if self.on_progress is not None:
            self.on_progress(self.cursor)

    def _skippable_run(self):  # -> DecodeRun | None (import cycle kept local)
        from sim.skipping import plan_decode_run

        return plan_decode_run(self)


def durations_to_ends(start: float, durations: np.ndarray) -> np.ndarray:
    """Step end times by sequential addition, exactly as stepping one at a time does."""
    return np.add.accumulate(np.concatenate(([start], durations)))[1:]
