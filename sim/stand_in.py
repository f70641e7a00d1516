"""The tokens the twin's sequences sample: stand-ins, distinct per request, with no
randomness (a test may give its own `TokenFn`, e.g. a real engine's samples)."""

from __future__ import annotations

from array import array
from collections.abc import Callable
from collections.abc import Sequence as SeqOf

from engine.core.scheduler_output import SchedulerOutput
from engine.core.sequence import Sequence

TokenFn = Callable[[int, int, int], SeqOf[int]]  # (request index, position, count) -> ids

FAKE_PERIOD = 100_000
# 7919 is prime to the period, so position p of request i gets the token at (p + shift(i)) in
# one table: 1000 + (i * 1_000_003 + p * 7919) % period == _FAKE[(p + shift(i)) % period].
_FAKE = array("q", [1000 + q * 7919 % FAKE_PERIOD for q in range(FAKE_PERIOD)])
_UNSTRIDE = pow(7919, -1, FAKE_PERIOD)


def fake_shift(index: int) -> int:
    """Request `index`'s offset into the table of stand-in tokens."""
    return index * 1_000_003 * _UNSTRIDE % FAKE_PERIOD


def fake_tokens(index: int, position: int, count: int = 1) -> array:
    """Stand-in samples for `count` positions, distinct per request, with no randomness:
    1000 + (index * 1_000_003 + position * 7919) % 100_000 (as table slices)."""
    start = (position + fake_shift(index)) % FAKE_PERIOD
    tokens = _FAKE[start:start + count]
    while len(tokens) < count:  # wrapped around the period
        tokens += _FAKE[:count - len(tokens)]
    return tokens


class StandInTokens:
    """What each live sequence samples next, from its request's index in the trace. Its own
    object (not the Simulator's methods): the scheduler keeps it for its decode groups, and
    a reference back to the Simulator would keep a finished run's tables alive until the
    cyclic GC ran."""

    def __init__(self, token_fn: TokenFn = fake_tokens):
        self.token_fn = token_fn
        self.index: dict[int, int] = {}  # live seq_id -> index of its request in the table
        self.shift: dict[int, int] = {}  # live seq_id -> fake_shift of its request

    def add(self, seq: Sequence, index: int) -> None:
        self.index[seq.seq_id] = index
        self.shift[seq.seq_id] = fake_shift(index)

    def drop(self, seq: Sequence) -> None:
        del self.index[seq.seq_id], self.shift[seq.seq_id]

    def __call__(self, seq: Sequence, count: int) -> SeqOf[int]:
        """The next `count` tokens `seq` samples."""
        if self.token_fn is fake_tokens:  # fake_tokens' table slice, its shift kept
            start = (len(seq.token_ids) + self.shift[seq.seq_id]) % FAKE_PERIOD
            tokens = _FAKE[start:start + count]
            if len(tokens) == count:
                return tokens
        return self.token_fn(self.index[seq.seq_id], len(seq.token_ids), count)

    def next_token(self, seq: Sequence) -> int:
        """The next token `seq` samples (fake_tokens' without the slicing)."""
        if self.token_fn is not fake_tokens:
            return self(seq, 1)[0]
        return _FAKE[(len(seq.token_ids) + self.shift[seq.seq_id]) % FAKE_PERIOD]

    def sampled(self, out: SchedulerOutput) -> list[int | None]:
        """The token of each scheduled sequence that samples (None: mid-prefill)."""
        if self.token_fn is not fake_tokens:
            return [self.next_token(i.seq) if i.samples else None for i in out.scheduled]
        shift, fake, period = self.shift, _FAKE, FAKE_PERIOD  # next_token's, inlined
        return [fake[(len(s.token_ids) + shift[s.seq_id]) % period] if i.samples else None
                for i in out.scheduled for s in (i.seq,)]
