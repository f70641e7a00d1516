"""One step's plan: which sequences run and how many tokens each. Pure Python (no torch).

Policies (DESIGN.md "Scheduling policy"):
- ``v1``: decodes and chunked prefills share one token budget in a mixed batch; running
  sequences are served first, then waiting ones are admitted unless this step preempted.
- ``prefill_first``: a step is all prefill when any prefill can run, otherwise all decode.
Preemption is by recompute of the most recently admitted running sequence.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from engine.core.config import EngineConfig
from engine.core.decode_group import DecodeGroup, NextTokens
from engine.core.kv.block_manager import BlockManager
from engine.core.scheduler_output import DecodeHorizon, DecodeSteps, SchedulerOutput
from engine.core.sequence import Sequence, SequenceStatus


def is_prefilling(seq: Sequence) -> bool:
    return seq.num_output_tokens == 0 or seq.num_uncomputed_tokens > 1


GROUP_PAUSE = 64  # steps without a group after one could not run a step
GROUP_IDLE = 32  # steps a group outlives an empty queue (then decode runs are skipped)


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
        self.group: DecodeGroup | None = None
        self._group_tokens: NextTokens | None = None  # set: decode groups are formed
        self._group_min = 0
        self._group_pause = 0
        self._group_idle = 0  # steps since a request last waited

    def group_decodes(self, next_tokens: NextTokens, min_size: int = 32) -> None:
        """Under saturation (requests wait), advance at least `min_size` running decodes as a
        `DecodeGroup`, their samples drawn from `next_tokens`: the simulator's choice, with
        single-stepping's records (a tested property)."""
        self._group_tokens, self._group_min = next_tokens, max(1, min_size)

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
        self._end_group()
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
            candidates = self.running
            if self._group_tokens is not None:
                candidates, budget = self._schedule_group(out, budget)
            budget = self._schedule_running(out, budget, candidates)
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
        running, allocate, add = SequenceStatus.RUNNING, self.block_manager.allocate_slots, out.add
        # Iterated live: preemption pops victims off the back of `running` only, so the loop
        # either stops before them or meets them with their new status.
        for seq in candidates:
            if budget <= 0:
                break
            if seq.status is not running:
                continue  # preempted earlier in this loop
            n = len(seq.token_ids) - seq.num_computed_tokens
            if n > budget:
                n = budget
            if not allocate(seq, n) and not self._preempt_until_allocated(seq, n, out):
                break
            add(seq, n)
            budget -= n
        return budget

    def _preempt_until_allocated(self, seq: Sequence, n: int, out: SchedulerOutput) -> bool:
        """Preempt from the back of `running` until `seq` gets its blocks; False if `seq` went."""
        while True:
            victim = self.running.pop()
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is seq:
                return False
            if self.block_manager.allocate_slots(seq, n):
                return True

    # -- decode groups (the simulator's) ---------------------------------------------------------

    def _schedule_group(self, out: SchedulerOutput, budget: int) -> tuple[list[Sequence], int]:
        """The group members' part of the step, as single-stepping would plan it: members
        with a block to start or fill get their blocks first, in running order. Returns the
        sequences left to plan and the budget left."""
        group = self._current_group(budget)
        if group is None:
            return self.running, budget
        group.next_due()
        bm = self.block_manager
        if group.blocks_to_take() > bm.num_free_blocks:  # a member would preempt: no group
            self._end_group(pause=True)
            return self.running, budget
        group.allocate()
        group.requeue()
        out.grouped = planned = group.planned()
        out.num_batched_tokens += planned.num_seqs
        out.num_decode_seqs += planned.num_seqs
        return self.running[planned.num_seqs:], budget - planned.num_seqs

    def _current_group(self, budget: int) -> DecodeGroup | None:
        """The group to run the next step with, the decodes right behind it joined: kept
        while it is large and requests wait (or waited within GROUP_IDLE steps: a queue
        that empties for a moment would otherwise end and re-form it), else a new one."""
        group = self.group
        self._group_idle = 0 if self.waiting else self._group_idle + 1
        if group is not None and (self._group_idle > GROUP_IDLE or
                                  group.num_active < self._group_min):
            self._end_group()
            group = None
        if group is None:
            return self._new_group(budget)
        start = group.num_active
        end = self._leading_decodes(start)
        if end > start and not self._join(group, start, end, budget):
            self._end_group(pause=True)
            return None
        return group

    def _new_group(self, budget: int) -> DecodeGroup | None:
        """A group of the leading decodes, where requests wait and they are enough."""
        if self._group_pause > 0:
            self._group_pause -= 1
            return None
        end = self._leading_decodes(0) if self.waiting else 0
        if end < self._group_min:
            return None
        assert self._group_tokens is not None  # group_decodes was called
        group = DecodeGroup(self.block_manager, self._group_tokens)
        if not self._join(group, 0, end, budget):
            self._group_pause = GROUP_PAUSE
            return None
        self.group = group
        return group

    def _leading_decodes(self, start: int) -> int:
        """Where the run of decodes in `running` from `start` ends."""
        running, end = self.running, start
        while end < len(running) and not is_prefilling(running[end]):
            end += 1
        return end

    def _join(self, group: DecodeGroup, start: int, end: int, budget: int) -> bool:
        """Add running[start:end] to the group; False where it could not run the next step
        then (one may stop on EOS, or the members overflow the token budget)."""
        to_finish = self._decodes_to_finish(self.running[start:end], 1)
        if to_finish is None or end > budget:
            return False
        group.join(self.running[start:end], to_finish)
        return True

    def _end_group(self, pause: bool = False) -> None:
        if self.group is not None:
            self.group.dissolve()
            self.group = None
        if pause:
            self._group_pause = GROUP_PAUSE

    def _group_update(self, now: float) -> list[Sequence]:
        """Apply the step to the group: its members whose length stop it was finish."""
        group = self.group
        assert group is not None, "a step planned with a decode group that has ended"
        left = group.finishing()
        finished = []
        for i in left:
            seq = group.sync(i, group.step + 1)
            if not self._sampled(seq, seq.token_ids[-1], now):
                raise RuntimeError(f"decode group member {seq.request_id} did not finish")
            finished.append(seq)
        group.applied(left)
        return finished

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
        if n == 0 or n > cfg.max_num_batched_tokens or self.group is not None:
            return None
        blocked = n >= cfg.max_num_seqs or cfg.max_num_batched_tokens - n <= 0
        if self.waiting and not blocked:
            return None
        to_finish = self._decodes_to_finish(running, min_steps)
        if to_finish is None:
            return None
        first = min(to_finish)
        bm = self.block_manager
        all_free = bm.decode_blocks_needed(running, to_finish) <= bm.num_free_blocks
        k = first if all_free else bm.max_decode_steps(running, first)
        return DecodeHorizon(list(running), to_finish, k, k == first, not blocked, all_free)

    def _decodes_to_finish(self, seqs: list[Sequence], min_steps: int) -> list[int] | None:
        """Per sequence of `seqs`, the decode steps up to the one that stops it on length
        (`_stop_reason`); None as soon as one prefills, may stop on EOS, or stops within
        fewer than `min_steps` steps."""
        max_len, eos = self.config.max_model_len, bool(self.eos_token_ids)
        to_finish = []
        for s in seqs:
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
            self._drop_finished(finished)
        return DecodeSteps(taken, finished)

    # -- applying a step's result --------------------------------------------------------------

    def update_from_output(self, out: SchedulerOutput, sampled: list[int | None],
                           now: float = 0.0) -> list[Sequence]:
        """Advance each scheduled sequence by the step; returns the sequences that finished."""
        finished = [] if out.grouped is None else self._group_update(now)
        eos, max_len = self.eos_token_ids, self.config.max_model_len
        for item, token in zip(out.scheduled, sampled, strict=True):
            seq = item.seq
            tokens = seq.token_ids
            seq.num_computed_tokens = computed = seq.num_computed_tokens + item.num_new_tokens
            if computed < len(tokens):
                continue  # mid-prefill: nothing sampled yet
            assert token is not None, f"sequence {seq.request_id} completed a step unsampled"
            tokens.append(token)
            # Most samples change nothing more: `_sampled` only where one might.
            may_stop = token in eos or len(tokens) >= seq.max_num_tokens or \
                len(tokens) >= max_len
            if (may_stop or seq.times.first_token is None) and self._sampled(seq, token, now):
                finished.append(seq)
        if finished:
            self._drop_finished(finished)
        return finished

    def _drop_finished(self, finished: list[Sequence]) -> None:
        """`running` without the sequences that just finished (the only ones in it that do
        not run), in order. A new list: callers may hold the old one. One removal each is a
        C-level scan; filtering the whole batch in Python cost ~8 % of a saturated run."""
        self.running = running = self.running.copy()
        for seq in finished:
            running.remove(seq)

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
        if tokens >= seq.max_num_tokens or tokens >= self.config.max_model_len:
            return "length"
        return None
