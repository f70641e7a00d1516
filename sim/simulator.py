"""The SimPy twin: the engine's own Scheduler and BlockManager, with the forward pass replaced by
a predicted step duration.

An arrival process wakes the engine when requests arrive; the engine process admits every
request whose `arrival_s` is at or before its clock at a step boundary (the engine's rule),
asks the Scheduler for a plan, advances time by the predicted duration and applies the
outcome with `Scheduler.update_from_output`, exactly as `LLMEngine.step` does.

Event skipping: while every running sequence decodes and nothing can change the batch (no
admission possible, no failed allocation, no admissible arrival), steps keep their composition
through the first step in which a sequence finishes. `sim.skipping` has the Scheduler apply
such runs in bulk, with the same block bookkeeping in the same order and the same finishing
rule, so the records are identical to single-stepping (a tested property).
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import simpy

from engine.core.config import EngineConfig
from engine.core.features import features_of
from engine.core.records import StepRecord
from engine.core.request import Request, RequestTable, as_table
from engine.core.scheduler import Scheduler
from engine.core.scheduler_output import SchedulerOutput
from engine.core.sequence import SamplingParams, Sequence
from sim.request_log import RequestLog
from sim.skipping import plan_decode_run
from sim.stand_in import StandInTokens, TokenFn, fake_tokens
from sim.step_log import ChunkFn, StepLog
from sim.step_time import StepTimeModel


@dataclass
class SimResult:
    requests: pd.DataFrame  # the RequestRecord columns, in arrival order
    steps: StepLog
    scheduler: Scheduler
    stats: dict[str, int] = field(default_factory=dict)
    # Where a run asked to stop did (None: it ran to the end): the simulated time and how
    # many requests had arrived; `requests` then holds the arrived ones, unfinished ones
    # without finish times.
    stopped: dict[str, float] | None = None


class Simulator:
    def __init__(self, config: EngineConfig, num_blocks: int, step_time: StepTimeModel,
                 eos_token_ids: frozenset[int] = frozenset(), skip: bool = True,
                 token_fn: TokenFn = fake_tokens,
                 on_progress: Callable[[int], None] | None = None,
                 on_steps: ChunkFn | None = None,
                 should_stop: Callable[[], bool] | None = None, group_min: int = 32):
        self.config = config
        self.scheduler = Scheduler(config, num_blocks, eos_token_ids)
        self.tokens = StandInTokens(token_fn)
        if skip:
            self.scheduler.group_decodes(self.tokens, group_min)
        self.step_time = step_time
        self.skip = skip
        self.on_progress = on_progress
        self.env = simpy.Environment()
        self.clock = 0.0  # authoritative time; SimPy's clock follows it
        self.steps = StepLog(on_steps)  # streams its steps to on_steps when given
        self.should_stop = should_stop or (lambda: False)  # checked between steps
        self.stats = {"single_steps": 0, "skipped_steps": 0, "skip_runs": 0, "decode_runs": 0,
                      "group_steps": 0}

    def run(self, requests: RequestTable | Iterable[Request]) -> SimResult:
        """Sequences are made when their request arrives and dropped, as records, when they
        finish: only the live ones hold their tokens. A request the scheduler rejects on its
        length never has its prompt built."""
        table = as_table(requests)
        self.table = table
        self.order = np.argsort(np.asarray(table.arrival_s, dtype=float), kind="stable")
        self.arrivals = np.asarray(table.arrival_s, dtype=float)[self.order].tolist()
        self.prompt_lens = np.asarray(table.prompt_len, dtype=np.int64)[self.order]
        self.log = RequestLog(np.asarray(table.request_id)[self.order],
                              np.asarray(self.arrivals), self.prompt_lens)
        self._position: dict[int, int] = {}  # live seq_id -> arrival order
        self.cursor = 0
        with gc_paused():
            self.wake = self.env.event()
            self.env.process(self._arrivals())
            done = self.env.process(self._engine())
            self.env.run(until=done)
        self.steps.flush()
        if done.value is not None:  # stopped: what has arrived so far
            return SimResult(self.log.to_frame(rows=self.cursor), self.steps, self.scheduler,
                             dict(self.stats), done.value)
        assert self.log.ended.all(), "a request never finished"
        return SimResult(self.log.to_frame(), self.steps, self.scheduler, dict(self.stats))

    def _sequence(self, position: int) -> Sequence:
        i = int(self.order[position])
        params = SamplingParams(max_tokens=max(1, int(self.table.output_len[i])),
                                ignore_eos=True)
        seq = Sequence(self.table.prompt_of(i), params, self.table.request_id[i],
                       self.arrivals[position])
        self.tokens.add(seq, i)
        self._position[seq.seq_id] = position
        return seq

    def _record(self, seq: Sequence) -> None:
        """Keep a finished sequence as its record only."""
        self.log.end(self._position.pop(seq.seq_id), seq)
        self.tokens.drop(seq)

    # -- processes -----------------------------------------------------------------------------

    def _arrivals(self) -> Iterator[simpy.Event]:
        """Wake the engine at each arrival; the engine decides what it admits."""
        for arrival in self.arrivals:
            if arrival > self.env.now:
                yield self.env.timeout(arrival - self.env.now)
            if not self.wake.triggered:
                self.wake.succeed()

    def _engine(self) -> Iterator[simpy.Event]:
        """Steps until every request has finished (returns None), or until asked to stop
        between two steps (returns where)."""
        while True:
            if self.should_stop():
                return {"sim_time_s": self.clock, "arrived": self.cursor,
                        "requests": len(self.arrivals)}
            self.admit_arrivals(self.clock)
            if not self.scheduler.has_unfinished():
                if self.cursor == len(self.arrivals):
                    return
                yield from self._idle()
                continue
            run = plan_decode_run(self) if self.skip else None
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
        accepted, arrivals, sched = 0, self.arrivals, self.scheduler
        while self.cursor < len(arrivals) and arrivals[self.cursor] <= now:
            position = self.cursor
            self.cursor += 1
            reason = sched.rejection_reason(int(self.prompt_lens[position]))
            if reason is not None:
                self.log.reject(position, reason)
                continue
            sched.add_request(self._sequence(position))
            accepted += 1
        return accepted

    @property
    def next_arrival(self) -> float:
        return self.arrivals[self.cursor] if self.cursor < len(self.arrivals) else float("inf")

    def _single_step(self) -> Iterator[simpy.Event]:
        start = self.clock
        out = self.scheduler.schedule(start)
        if out.is_empty:
            raise RuntimeError("the scheduler planned an empty step with work pending")
        # Re-read prefix keys enter the decode-step terms only.
        decode_only = out.num_decode_seqs == out.num_scheduled
        row = features_of(out, shared=self.step_time.reads_shared and decode_only)
        duration = self.step_time.step(row, len(self.steps))
        yield from self.run_step(out, start, start + duration)

    def run_step(self, out: SchedulerOutput, start: float, end: float) -> Iterator[simpy.Event]:
        """Run a step the Scheduler planned at `start`: it ends at `end`, then is applied."""
        record = StepRecord.from_output(len(self.steps), start, out, self.scheduler)
        yield from self.advance_to(end)
        sampled = self.tokens.sampled(out)
        for seq in self.scheduler.update_from_output(out, sampled, end):
            self._record(seq)
        record.end_s = end
        self.steps.append(record)
        self.stats["single_steps"] += 1
        self.stats["group_steps"] += out.grouped is not None
        self._progress()

    def advance_to(self, t: float) -> Iterator[simpy.Event]:
        yield self.env.timeout(max(0.0, t - self.env.now))
        self.clock = t

    def _progress(self) -> None:
        if self.on_progress is not None:
            self.on_progress(self.cursor)

@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic GC: each full collection would walk every token of every sequence,
    and a run creates no garbage cycles worth collecting while it lasts."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
