"""Async scheduling for offline generation: the host runs one step ahead of the device.

While the device runs step N, the host applies step N's outcome with placeholder tokens,
schedules step N+1, builds its batch and queues it, the placeholders' ids filled in on the
device from step N's sampled tokens. Only then does it wait for step N's tokens, write them
into the sequences and record step N. So the device never waits for the host's scheduling.

The schedule is the one synchronous stepping makes: the host looks ahead only past a step
whose every sampling sequence ignores EOS, so that step's outcome (a token each, lengths
reached) does not depend on the tokens' values; otherwise it waits first. A block that a
pending token completes reaches the prefix cache one step later, when the token is known.
Replay and calibration step synchronously (`LLMEngine.step`), as the simulator models.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from engine.core.records import StepRecord
from engine.core.scheduler_output import SchedulerOutput
from engine.core.sequence import Sequence
from engine.layers.host import to_device
from engine.runtime.model_runner import InputFill, LaunchedStep
from engine.runtime.step_input import HostBatch

if TYPE_CHECKING:
    from engine.runtime.llm import LLMEngine

PENDING = -1  # a placeholder token id: never a valid one
OnFinished = Callable[[list[Sequence]], None]


@dataclass
class InFlight:
    out: SchedulerOutput
    record: StepRecord
    launched: LaunchedStep

    def sampling_seqs(self) -> list[Sequence]:
        return [self.out.scheduled[i].seq for i in self.launched.sample_seqs]


class Lookahead:
    def __init__(self, engine: LLMEngine):
        self.engine = engine

    def run(self, on_finished: OnFinished) -> None:
        """Step until nothing more can be scheduled."""
        flight = self._launch(self.engine.now())
        try:
            while flight is not None:
                if _may_look_ahead(flight):
                    flight = self._look_ahead(flight, on_finished)
                else:
                    self._settle(flight, on_finished)
                    flight = self._launch(self.engine.now())
        finally:
            self.engine._steps_in_flight = 0

    def _launch(self, start: float, fill_from: InFlight | None = None) -> InFlight | None:
        planned = self.engine.plan_step(start)
        if planned is None:
            return None
        out, record = planned
        runner = self.engine.model_runner
        host = runner.build_host(out.scheduled)
        fill = None if fill_from is None else pending_fill(host, out, fill_from)
        return InFlight(out, record, runner.launch(out.scheduled, host, fill))

    def _settle(self, flight: InFlight, on_finished: OnFinished) -> None:
        """Wait for the step's tokens, then apply them (synchronous stepping)."""
        sampled = flight.launched.sampled()
        on_finished(self.engine.settle_step(flight.out, flight.record, sampled))

    def _look_ahead(self, flight: InFlight, on_finished: OnFinished) -> InFlight | None:
        """Apply the step with placeholders, queue the next one, then settle this one."""
        engine = self.engine
        seqs = flight.sampling_seqs()
        finished = engine.scheduler.update_from_output(flight.out, _placeholders(flight),
                                                       math.nan)
        for seq in seqs:
            seq.num_pending_tokens += 1
        positions = [seq.num_tokens - 1 for seq in seqs]
        engine._steps_in_flight = 1
        ahead = self._launch(engine.now(), flight) if engine.has_unfinished() else None
        tokens = [t for t in flight.launched.sampled() if t is not None]
        duration = engine.now() - flight.record.start_s
        end = flight.record.start_s + duration
        _commit(seqs, positions, tokens, end)
        engine._steps_in_flight = 0
        engine.finish_step(flight.record, duration, finished)
        on_finished(finished)
        if ahead is not None:
            ahead.record.start_s = end  # it runs once this step is done
        return ahead


def _may_look_ahead(flight: InFlight) -> bool:
    """Past steps (decode-only or mixed) whose sampling sequences all ignore EOS."""
    return all(s.sampling_params.ignore_eos for s in flight.sampling_seqs())


def _placeholders(flight: InFlight) -> list[int | None]:
    sampled: list[int | None] = [None] * len(flight.out.scheduled)
    for i in flight.launched.sample_seqs:
        sampled[i] = PENDING
    return sampled


def _commit(seqs: list[Sequence], positions: list[int], tokens: list[int | None],
            end: float) -> None:
    """Write the read-back tokens over their placeholders; times the step set provisionally
    (NaN) become its end."""
    for seq, pos, token in zip(seqs, positions, tokens, strict=True):
        seq.token_ids[pos] = token
        seq.num_pending_tokens -= 1
        times = seq.times
        if times.first_token is not None and math.isnan(times.first_token):
            times.first_token = end
        if times.finish is not None and math.isnan(times.finish):
            times.finish = end


def pending_fill(host: HostBatch, out: SchedulerOutput, prev: InFlight) -> InputFill | None:
    """The device copy of `prev`'s sampled tokens into the rows of `host` that hold
    placeholders (a decode's input, or a re-admitted sequence's last prompt token)."""
    rows = np.flatnonzero(host.input_ids == PENDING)
    if not rows.size:
        return None
    index = {seq.seq_id: k for k, seq in enumerate(prev.sampling_seqs())}
    owners = np.searchsorted(np.asarray(host.query_start_loc), rows, side="right") - 1
    src = [index[out.scheduled[host.order[j]].seq.seq_id] for j in owners.tolist()]
    tokens = prev.launched.tokens
    dst_rows = to_device(rows.astype(np.int64), tokens.device)
    src_rows = to_device(np.asarray(src, dtype=np.int64), tokens.device)

    def fill(input_ids: torch.Tensor) -> None:
        input_ids[dst_rows] = tokens[src_rows]
    return fill
