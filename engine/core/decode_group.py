"""A decode group: the running decodes at the front of `running`, advanced lazily.

Under saturation nearly every step mixes a prefill into ~max_num_seqs decodes, so no run of
steps keeps one composition (`Scheduler.decode_horizon`) and each step would touch every
sequence. A group's members decode one token a step until each one's length stop, so what a
step does to them is known ahead: only the members that start a block (they take one), fill
one (it is published) or finish in that step need their state. A member's tokens and
`num_computed_tokens` are brought up to date (`sync`) just before such an event, in running
order, so the block manager sees the calls single-stepping would make, in the same order.

Pure Python (no torch). The simulator turns it on (`Scheduler.group_decodes`); the engine
never does: its model runner reads every sequence every step.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.core.sequence import Sequence, SequenceStatus

if TYPE_CHECKING:
    from engine.core.kv.block_manager import BlockManager

NextTokens = Callable[[Sequence, int], Iterable[int]]  # (sequence, count) -> its next tokens


@dataclass(slots=True)
class GroupStep:
    """What a group's members do in one step: `num_seqs` decodes (one token each, ahead of
    the step's other sequences in running order) attending `ctx` keys in all, the longest
    `max_ctx`; `cached` are the members with a prefix-cache hit."""

    num_seqs: int
    ctx: int
    max_ctx: int
    cached: list[Sequence]


class DecodeGroup:
    def __init__(self, block_manager: BlockManager, next_tokens: NextTokens):
        self.bm = block_manager  # it says when a member's allocation takes or publishes
        self.next_tokens = next_tokens
        self.seqs: list[Sequence] = []  # every member so far, in running order
        # Per member: computed tokens less the step it joined at (so that step j's allocation
        # counts base + j tokens), the step it finishes in, the step whose update its state
        # includes, and whether it still runs.
        self.base: list[int] = []
        self.finish: list[int] = []
        self.synced: list[int] = []
        self.active: list[bool] = []
        # Per member: the tokens at which its next allocation takes a block, and publishes one.
        self.takes_at: list[int] = []
        self.publishes_at: list[int] = []
        self.num_active = 0
        self.step = 0  # steps applied
        self.ctx_base = 0  # sum of the active members' base
        self._bases: list[tuple[int, int]] = []  # heap of (-base, member): the longest
        self.cached: list[Sequence] = []
        self.events: dict[int, list[int]] = {}
        self.due: list[int] = []  # members with an event in the step being run

    def join(self, seqs: list[Sequence], steps_to_finish: list[int]) -> None:
        """Add decodes that follow the members in running order (between two steps);
        `steps_to_finish[i]` counts the steps up to the one that stops `seqs[i]`."""
        step, first = self.step, len(self.seqs)
        for i, (seq, k) in enumerate(zip(seqs, steps_to_finish, strict=True), first):
            base = seq.num_computed_tokens - step
            self.seqs.append(seq)
            self.base.append(base)
            self.finish.append(step + k)
            self.synced.append(step)
            self.active.append(True)
            self.takes_at.append(0)
            self.publishes_at.append(0)
            self.ctx_base += base
            heapq.heappush(self._bases, (-base, i))
            if seq.num_cached_tokens and seq.block_hashes:
                self.cached.append(seq)
            self._queue(i, step + 1)
        self.num_active += len(seqs)

    @property
    def max_base(self) -> int:
        bases, active = self._bases, self.active
        while not active[bases[0][1]]:
            heapq.heappop(bases)
        return -bases[0][0]

    def _queue(self, i: int, first: int) -> None:
        """File member `i` under the next step from `first` in which it starts or fills a
        block (the allocation of step j counts base + j tokens) or finishes."""
        takes_at, publishes_at = self.bm.decode_events(self.seqs[i])
        self.takes_at[i], self.publishes_at[i] = takes_at, publishes_at
        step = min(takes_at, publishes_at) - self.base[i]
        if step < first:
            step = first
        if self.finish[i] < step:
            step = self.finish[i]
        events = self.events.get(step)
        if events is None:
            self.events[step] = [i]
        else:
            events.append(i)

    def sync(self, i: int, step: int) -> Sequence:
        """Member `i` as single-stepping leaves it after `step`'s update."""
        seq, lag = self.seqs[i], step - self.synced[i]
        if lag:
            seq.token_ids.extend(self.next_tokens(seq, lag))
            seq.num_computed_tokens += lag
            self.synced[i] = step
        return seq

    def next_due(self) -> list[int]:
        """The members with an event in the next step, in running order."""
        self.due = sorted(self.events.pop(self.step + 1, ()))
        return self.due

    def allocate(self) -> None:
        """The due members' allocations of the next step, in running order, each as
        single-stepping makes it (`allocate_slots(seq, 1)` after the steps before). A member
        that only starts a block needs no tokens for it: its lagging state asks for the
        lagged tokens as well, the same total. One that publishes needs them (they are hashed)."""
        j, allocate_slots = self.step + 1, self.bm.allocate_slots
        for i in self.due:
            if self.finish[i] == j or self.base[i] + j >= self.publishes_at[i]:
                self.sync(i, j - 1)
            if not allocate_slots(self.seqs[i], j - self.synced[i]):
                raise RuntimeError("a decode group ran out of blocks")

    def blocks_to_take(self) -> int:
        """Blocks the due members take in the next step (those that start one)."""
        j, base, takes_at = self.step + 1, self.base, self.takes_at
        return sum(1 for i in self.due if base[i] + j >= takes_at[i])

    def planned(self) -> GroupStep:
        """The next step of the members (their context grows by one a step)."""
        j, n = self.step + 1, self.num_active
        return GroupStep(n, self.ctx_base + j * n, self.max_base + j, self.cached)

    def requeue(self) -> None:
        """After the next step's allocations: file the due members that go on."""
        j = self.step + 1
        for i in self.due:
            if self.finish[i] != j:
                self._queue(i, j + 1)

    def finishing(self) -> list[int]:
        """The due members whose length stop is the next step."""
        j = self.step + 1
        return [i for i in self.due if self.finish[i] == j]

    def applied(self, left: list[int]) -> None:
        """The next step is applied; members `left` finished in it."""
        self.step += 1
        self.due = []
        if not left:
            return
        for i in left:
            self.active[i] = False
            self.ctx_base -= self.base[i]
        self.num_active -= len(left)
        if self.cached:
            self.cached = [s for s in self.cached if s.status is SequenceStatus.RUNNING]
        if len(self.seqs) > 2 * self.num_active + 64:
            self._compact()

    def _compact(self) -> None:
        """Forget the finished members (and their tokens): renumber the others, in order."""
        keep = [i for i, active in enumerate(self.active) if active]
        index = {old: new for new, old in enumerate(keep)}
        self.seqs = [self.seqs[i] for i in keep]
        self.base = [self.base[i] for i in keep]
        self.finish = [self.finish[i] for i in keep]
        self.synced = [self.synced[i] for i in keep]
        self.takes_at = [self.takes_at[i] for i in keep]
        self.publishes_at = [self.publishes_at[i] for i in keep]
        self.active = [True] * len(keep)
        self._bases = [(-base, i) for i, base in enumerate(self.base)]
        heapq.heapify(self._bases)
        self.events = {step: [index[i] for i in members]
                       for step, members in self.events.items()}

    def dissolve(self) -> None:
        """Bring every member up to date (the group ends between two steps)."""
        for i, active in enumerate(self.active):
            if active:
                self.sync(i, self.step)
        self.num_active = 0
