"""Per-request and per-step records, the same schema from the simulator and the engine.

Pure Python (no torch). Times are seconds on the driver's clock: wall time since the engine
started, or simulated time.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from operator import attrgetter
from typing import Any

from engine.core.scheduler import Scheduler
from engine.core.scheduler_output import SchedulerOutput
from engine.core.sequence import Sequence, SequenceStatus


@dataclass
class RequestRecord:
    request_id: Any
    arrival_s: float
    first_scheduled_s: float | None
    first_token_s: float | None
    finish_s: float | None
    prompt_len: int
    output_len: int
    num_cached_tokens: int
    num_preemptions: int
    finish_reason: str | None
    rejected: bool

    @classmethod
    def from_sequence(cls, seq: Sequence) -> RequestRecord:
        t = seq.times
        return cls(seq.request_id, t.arrival, t.first_scheduled, t.first_token, t.finish,
                   seq.num_prompt_tokens, seq.num_output_tokens, seq.num_cached_tokens,
                   seq.num_preemptions, seq.finish_reason,
                   seq.status is SequenceStatus.REJECTED)

    def to_dict(self) -> dict[str, Any]:
        return dict(zip(REQUEST_FIELDS, _request_values(self), strict=True))


@dataclass
class StepRecord:
    step: int
    start_s: float
    end_s: float
    num_batched_tokens: int
    num_prefill_tokens: int
    num_prefill_seqs: int
    num_decode_seqs: int
    num_running: int
    num_waiting: int
    num_blocks_used: int
    num_blocks_free: int
    num_preempted: int

    @classmethod
    def from_output(cls, step: int, start_s: float, out: SchedulerOutput,
                    scheduler: Scheduler) -> StepRecord:
        """Snapshot right after scheduling: the batch and the cache as the step runs them."""
        bm = scheduler.block_manager
        decode = out.num_decode_seqs
        return cls(step, start_s, start_s, out.num_batched_tokens, out.num_prefill_tokens,
                   out.num_scheduled - decode, decode, len(scheduler.running),
                   len(scheduler.waiting), bm.num_used_blocks, bm.num_free_blocks,
                   len(out.preempted))

    def to_dict(self) -> dict[str, Any]:
        return dict(zip(STEP_FIELDS, _step_values(self), strict=True))


# Shallow: every field is a scalar (dataclasses.asdict would deep-copy each one).
REQUEST_FIELDS = tuple(f.name for f in fields(RequestRecord))
STEP_FIELDS = tuple(f.name for f in fields(StepRecord))
_request_values = attrgetter(*REQUEST_FIELDS)
_step_values = attrgetter(*STEP_FIELDS)
