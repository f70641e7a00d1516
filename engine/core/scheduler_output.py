"""What the scheduler hands out: a step's plan (vLLM v1's sched/output.py is the model) and
a decode horizon. Plain dataclasses; pure Python (no torch)."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.core.decode_group import GroupStep
from engine.core.sequence import Sequence


@dataclass(slots=True)
class ScheduledSequence:
    """`seq` computes tokens [num_computed_tokens, num_computed_tokens + num_new_tokens)."""

    seq: Sequence
    num_new_tokens: int
    num_computed_tokens: int
    samples: bool  # the step reaches the sequence's last known token, so it samples one
    is_decode: bool


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    num_batched_tokens: int = 0
    num_decode_seqs: int = 0
    # The decode group's members, ahead of `scheduled` (the simulator's; engine steps: None).
    grouped: GroupStep | None = None

    @property
    def is_empty(self) -> bool:
        return not self.scheduled and self.grouped is None

    @property
    def num_scheduled(self) -> int:
        return len(self.scheduled) + (self.grouped.num_seqs if self.grouped else 0)

    @property
    def num_prefill_tokens(self) -> int:
        return self.num_batched_tokens - self.num_decode_seqs

    def add(self, seq: Sequence, num_new_tokens: int, admitted: bool = False) -> None:
        """An admission is always a prefill, even a one-token recompute after a prefix hit."""
        tokens, computed = len(seq.token_ids), seq.num_computed_tokens
        uncomputed = tokens - computed
        # not is_prefilling(seq), with the counts at hand
        is_decode = not admitted and num_new_tokens == 1 and uncomputed <= 1 and \
            tokens > seq.num_prompt_tokens
        self.scheduled.append(ScheduledSequence(
            seq, num_new_tokens, computed, num_new_tokens == uncomputed, is_decode))
        self.num_batched_tokens += num_new_tokens
        self.num_decode_seqs += is_decode


@dataclass(slots=True)
class DecodeHorizon:
    """What the running sequences do next if no request arrives: every one decodes a token a
    step, unchanged, for `num_steps` steps; the last of them finishes a sequence when
    `finishes`. `steps_to_finish[i]` counts the steps up to the one that finishes `seqs[i]`.
    `admits`: a request arriving during the horizon would be admitted at the next step (so
    the batch changes then). `all_blocks_free`: every sequence gets its blocks up to its own
    finish (the horizons after each finish hold too, while nothing arrives)."""

    seqs: list[Sequence]
    steps_to_finish: list[int]
    num_steps: int
    finishes: bool
    admits: bool
    all_blocks_free: bool


@dataclass(slots=True)
class DecodeSteps:
    """What `Scheduler.run_decode_steps` did: the step (from 0) of each block taken, in
    order, and the sequences its last step finished, in running order."""

    blocks_taken: list[int]
    finished: list[Sequence]
