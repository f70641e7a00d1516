"""One step's plan: which sequences run and how many tokens each. Pure Python (no torch).

Policies (DESIGN.md "Scheduling policy"):
- ``v1``: decodes and chunked prefills share one token budget in a mixed batch; running
  sequences are served first, then waiting ones are admitted unless this step preempted.
- ``prefill_first``: a step is all prefill when any prefill can run, otherwise all decode.
Preemption is by recompute of the most recently admitted running sequence.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable

from engine.core.config import EngineConfig
from engine.core.kv.block_manager import BlockManager
from engine.core.scheduler_output import DecodeHorizon, DecodeSteps, SchedulerOutput
from engine.core.sequence import Sequence, SequenceStatus


def is_prefilling(seq: Sequence) -> bool:
    return seq.num_output_tokens == 0 or seq.num_uncomputed_tokens > 1


NextTokens = Callable[[Sequence, int], Iterable[int]]  # (sequence, count) -> its next tokens


class Scheduler:
    def __init__(self, config: EngineConfig, num_blocks: int,
                 eos_token_ids: Iterable[int] = ()):
        self.config = config
        self.block_manager = BlockManager(num_blocks, config.block_size,
                                          config.enable_prefix_caching)
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.rejected: list[Sequence] = []

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # -- admission control ----------------------------------------------------------------------

    def add_request(self, seq: Sequence) -> bool:
        """Queue `seq`, or reject it (recorded, with a reason) when it can never run."""
        reason = self.rejection_reason(seq.num_prompt_tokens)
        if reason is not None:
            seq.status, seq.finish_reason = SequenceStatus.REJECTED, reason
            self.rejected.append(seq)
            return False
        self.waiting.append(seq)
        return True

    def rejection_reason(self, num_prompt_tokens: int) -> str | None:
        """Why a prompt of this length can never run here (None: it can be queued)."""
        n, limit = num_prompt_tokens, self.config.max_model_len
        if n == 0:
            return "rejected: empty prompt"
        if n > limit:
            return f"rejected: prompt of {n} tokens is longer than max_model_len={limit}"
        bm = self.block_manager
        if bm.blocks_needed(n) > bm.num_blocks:
            return (f"rejected: prompt of {n} tokens needs {bm.blocks_needed(n)} KV blocks, "
                    f"the cache has {bm.num_blocks}")
        return None

    def abort(self, seq: Sequence) -> bool:
        """Drop an unfinished `seq` (its client went away): out of the queues, its blocks
        freed. False when it is not queued here. Call between steps, never mid-step."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        else:
            return False
        self.block_manager.free(seq)
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, "abort"
        return True

    # -- planning ------------------------------------------------------------------------------

    def schedule(self, now: float = 0.0) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        if self.config.policy == "prefill_first":
            self._schedule_prefill_first(out, budget, now)
        else:
            budget = self._schedule_running(out, budget, self.running)
            if not out.preempted:
                self._admit_waiting(out, budget, now)
        return out

    def _schedule_prefill_first(self, out: SchedulerOutput, budget: int, now: float) -> None:
        partial = [s for s in self.running if is_prefilling(s)]
        budget = self._schedule_running(out, budget, partial)
        if not out.preempted:
            self._admit_waiting(out, budget, now)
        if out.is_empty:
            self._schedule_running(out, self.config.max_num_batched_tokens, self.running)

    def _schedule_running(self, out: SchedulerOutput, budget: int,
                          candidates: list[Sequence]) -> int:
        running = SequenceStatus.RUNNING
        for seq in list(candidates):
            if budget <= 0:
                break
            if seq.status is not running:
                continue  # preempted earlier in this loop
            n = min(len(seq.token_ids) - seq.num_computed_tokens, budget)
            if not self._allocate_or_preempt(seq, n, out):
                break
            out.add(seq, n)
            budget -= n
        return budget

    def _allocate_or_preempt(self, seq: Sequence, n: int, out: SchedulerOutput) -> bool:
        """Preempt from the back of `running` until `seq` gets its blocks; False if `seq` went."""
        while not self.block_manager.allocate_slots(seq, n):
            victim = self.running.pop()
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _admit_waiting(self, out: SchedulerOutput, budget: int, now: float) -> None:
        cfg, bm = self.config, self.block_manager
        while self.waiting and budget > 0 and len(self.running) < cfg.max_num_seqs:
            seq = self.waiting[0]
            computed = bm.get_computed_blocks(seq)
            num_cached = len(computed) * bm.block_size
            n = seq.num_tokens - num_cached
            if n > budget and not cfg.enable_chunked_prefill:
                break
            n = min(n, budget)
            if not bm.allocate_slots(seq, n, computed):
                break
            self.waiting.popleft()
            self._start(seq, num_cached, now)
            out.add(seq, n, admitted=True)
            budget -= n

    def _start(self, seq: Sequence, num_cached: int, now: float) -> None:
        self.block_manager.stats.record(seq.num_tokens, num_cached)
        seq.num_computed_tokens = seq.num_cached_tokens = num_cached
        seq.status = SequenceStatus.RUNNING
        if seq.times.first_scheduled is None:
            seq.times.first_scheduled = now
        self.running.append(seq)

    # -- decode horizon: runs of identical decode steps, for the simulator ----------------------

    def decode_horizon(self, min_steps: int = 1) -> DecodeHorizon | None:
        """How long the next steps stay one batch of the same decodes (None: not even
        `min_steps` steps are sure to: a sequence prefills or finishes sooner, may stop on
        EOS, or the decodes overflow the token budget). Such steps neither admit nor
        preempt: admission is blocked (`max_num_seqs` or the budget) or nothing waits, and
        the horizon ends before the first step whose allocation would fail."""
        cfg, running = self.config, self.running
        n = len(running)
        if n == 0 or n > cfg.max_num_batched_tokens:
            return None
        blocked = n >= cfg.max_num_seqs or cfg.max_num_batched_tokens - n <= 0
        if self.waiting and not blocked:
            return None
        to_finish = self._decodes_to_finish(min_steps)
        if to_finish is None:
            return None
        first = min(to_finish)
        bm = self.block_manager
        all_free = bm.decode_blocks_needed(running, to_finish) <= bm.num_free_blocks
        k = first if all_free else bm.max_decode_steps(running, first)
        return DecodeHorizon(list(running), to_finish, k, k == first, not blocked, all_free)

    def _decodes_to_finish(self, min_steps: int) -> list[int] | None:
        """Per running sequence, the decode steps up to the one that stops it on length
        (`_stop_reason`); None as soon as one prefills, may stop on EOS, or stops within
        fewer than `min_steps` steps."""
        max_len, eos = self.config.max_model_len, bool(self.eos_token_ids)
        to_finish = []
        for s in self.running:
            tokens, params = len(s.token_ids), s.sampling_params
            output = tokens - s.num_prompt_tokens
            if output == 0 or tokens - s.num_computed_tokens > 1 or \
                    (eos and not params.ignore_eos):
                return None
            k = min(params.max_tokens - output, max_len - tokens)
            if k < min_steps:
                return None
            to_finish.append(k)
        return to_finish

    def run_decode_steps(self, seqs: list[Sequence], num_steps: int, next_tokens: NextTokens,
                         finish_at: float | None = None) -> DecodeSteps:
        """Apply `num_steps` steps of a decode horizon at once: what as many schedule() +
        update_from_output() rounds do to `seqs`. Only the last step may finish sequences,
        and only when the horizon's last step is run (`finish_at`: when that step ends)."""
        for seq in seqs:
            seq.token_ids.extend(next_tokens(seq, num_steps))
        taken = self.block_manager.allocate_decode_steps(seqs, num_steps)
        if taken is None:
            raise RuntimeError("a decode horizon ran out of blocks")
        for seq in seqs:
            seq.num_computed_tokens += num_steps
        if finish_at is None:
            return DecodeSteps(taken, [])
        finished = [s for s in seqs if self._sampled(s, s.token_ids[-1], finish_at)]
        if finished:
            self.running = [s for s in self.running if s.status is SequenceStatus.RUNNING]
        return DecodeSteps(taken, finished)

    # -- applying a step's result --------------------------------------------------------------

    def update_from_output(self, out: SchedulerOutput, sampled: list[int | None],
                           now: float = 0.0) -> list[Sequence]:
        """Advance each scheduled sequence by the step; returns the sequences that finished."""
        finished = []
        for item, token in zip(out.scheduled, sampled, strict=True):
            seq = item.seq
            seq.num_computed_tokens += item.num_new_tokens
            if seq.num_computed_tokens < len(seq.token_ids):
                continue  # mid-prefill: nothing sampled yet
            assert token is not None, f"sequence {seq.request_id} completed a step unsampled"
            seq.token_ids.append(token)
            if self._sampled(seq, token, now):
                finished.append(seq)
        if finished:
            self.running = [s for s in self.running if s.status is SequenceStatus.RUNNING]
        return finished

    def _sampled(self, seq: Sequence, token: int, now: float) -> bool:
        """After `seq` sampled `token` (its last): its first-token time, and whether it
        stops there (then it finishes and frees its blocks)."""
        if seq.times.first_token is None:
            seq.times.first_token = now
        reason = self._stop_reason(seq, token)
        if reason is None:
            return False
        seq.finish_reason, seq.status = reason, SequenceStatus.FINISHED
        seq.times.finish = now
        self.block_manager.free(seq)
        return True

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        params, tokens = seq.sampling_params, len(seq.token_ids)
        if not params.ignore_eos and token in self.eos_token_ids and \
                tokens - seq.num_prompt_tokens >= params.min_tokens:
            return "stop"
        if tokens - seq.num_prompt_tokens >= params.max_tokens or \
                tokens >= self.config.max_model_len:
            return "length"
        return None
