"""What an engine or the simulator consumes: requests, each a prompt of token ids, an
arrival time and a forced output length. Pure Python (no torch).

A `RequestTable` holds many requests as columns and makes each prompt only when asked, so a
long trace costs its columns, not its tokens: a simulator builds a prompt when its request
arrives and drops it when the request finishes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Request:
    request_id: Any
    arrival_s: float
    prompt_token_ids: list[int]
    output_len: int


class RequestTable:
    """Requests as columns (lists or numpy arrays of one length), in trace order; the
    prompt of row i is `prompt_of(i)` (a list or an int64 array of ids), made when asked
    (the same ids every time)."""

    def __init__(self, request_id: Sequence[Any], arrival_s: Sequence[float],
                 prompt_len: Sequence[int], output_len: Sequence[int],
                 prompt_of: Callable[[int], Sequence[int]]):
        n = len(request_id)
        if not len(arrival_s) == len(prompt_len) == len(output_len) == n:
            raise ValueError("request columns must have one length: "
                             f"{n}, {len(arrival_s)}, {len(prompt_len)}, {len(output_len)}")
        self.request_id, self.arrival_s = request_id, arrival_s
        self.prompt_len, self.output_len = prompt_len, output_len
        self.prompt_of = prompt_of

    @classmethod
    def of(cls, requests: Iterable[Request]) -> RequestTable:
        """A table of requests whose prompts are already built."""
        rows = list(requests)
        prompts = [list(r.prompt_token_ids) for r in rows]
        return cls([r.request_id for r in rows], [float(r.arrival_s) for r in rows],
                   [len(p) for p in prompts], [int(r.output_len) for r in rows],
                   lambda i: prompts[i])

    def __len__(self) -> int:
        return len(self.request_id)

    def __getitem__(self, i: int) -> Request:
        return Request(_plain(self.request_id[i]), float(self.arrival_s[i]),
                       list(self.prompt_of(i)), int(self.output_len[i]))

    def __iter__(self) -> Iterator[Request]:
        return (self[i] for i in range(len(self)))

    def mean_len(self) -> float | None:
        """Mean prompt + output tokens per request (None for an empty table)."""
        n = len(self)
        return (sum(map(int, self.prompt_len)) + sum(map(int, self.output_len))) / n \
            if n else None


def as_table(requests: RequestTable | Iterable[Request]) -> RequestTable:
    return requests if isinstance(requests, RequestTable) else RequestTable.of(requests)


def _plain(value: Any) -> Any:
    """numpy scalars as Python ones (ids end up in records and JSON)."""
    return value.item() if hasattr(value, "item") else value
