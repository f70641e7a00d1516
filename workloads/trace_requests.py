"""What an engine or the simulator consumes: one request at a time, token ids included."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from workloads.schema import Trace
from workloads.tokens import TokenSpec
from workloads.tokens_bulk import all_prompt_token_ids


@dataclass(frozen=True)
class TraceRequest:
    request_id: int
    arrival_s: float
    prompt_token_ids: list[int]
    output_len: int


def iter_requests(trace: Trace, spec: TokenSpec | None = None) -> Iterator[TraceRequest]:
    """The trace's requests in arrival order (token ids built once, in bulk)."""
    prompts = all_prompt_token_ids(trace, spec)
    ids = trace.df["request_id"].tolist()
    arrivals = trace.df["arrival_s"].tolist()
    outputs = trace.df["output_len"].tolist()
    for i, (rid, arrival, output) in enumerate(zip(ids, arrivals, outputs, strict=True)):
        yield TraceRequest(rid, arrival, prompts.row_list(i), output)
