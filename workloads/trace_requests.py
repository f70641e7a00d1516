"""A trace as the requests an engine or the simulator consumes, prompts made on demand."""

from __future__ import annotations

from array import array

import numpy as np

from engine.core.request import RequestTable
from workloads.schema import TOKENS_COLUMN, Trace
from workloads.tokens import PromptPlan, TokenSpec


def model_requests(trace: Trace, vocab_size: int) -> RequestTable:
    """The trace's requests with prompt ids inside a model's vocabulary (`TokenSpec`'s
    default range, narrowed for a vocabulary under 8,000 ids)."""
    return request_table(trace, TokenSpec(vocab_size=vocab_size,
                                          low=min(1000, vocab_size // 8)))


def request_table(trace: Trace, spec: TokenSpec | None = None) -> RequestTable:
    """The trace's requests in trace (arrival) order; a prompt's token ids are made when
    the request is asked for (`workloads.tokens`' scheme, the same ids every time)."""
    df = trace.df
    if trace.has_explicit_tokens:
        column = df[TOKENS_COLUMN]
        def prompt_of(i: int) -> array:
            return _ids(column.iat[i])
    else:
        plan = PromptPlan(trace, spec)
        def prompt_of(i: int) -> array:
            return _ids(plan.prompt_of(i))
    return RequestTable(df["request_id"].to_numpy(), df["arrival_s"].to_numpy(dtype=float),
                        df["prompt_len"].to_numpy(dtype=np.int64),
                        df["output_len"].to_numpy(dtype=np.int64), prompt_of)


def _ids(tokens: np.ndarray) -> array:
    """Token ids as a Sequence holds them (int64s), copied in one block."""
    return array("q", np.asarray(tokens, dtype=np.int64).tobytes())
