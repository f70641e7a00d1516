"""Rows of multi-turn conversations, vectorised over all turns of all conversations."""

from __future__ import annotations

import numpy as np
import pandas as pd

from workloads.arrivals import ArrivalSpec
from workloads.errors import SpecError
from workloads.lengths import LengthSpec
from workloads.structure import MultiTurn, SharedPrefix


def segmented_cumsum(values: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Cumulative sum restarting wherever `first` is True (first[0] must be True)."""
    total = np.cumsum(values)
    before = total - values
    segment = np.cumsum(first) - 1
    return total - before[np.flatnonzero(first)][segment]


def conversation_rows(n: int, arrivals: ArrivalSpec, prompt_lens: LengthSpec,
                      output_lens: LengthSpec, prefix: SharedPrefix | None, chat: MultiTurn,
                      rngs: dict[str, np.random.Generator]) -> pd.DataFrame:
    """Exactly n requests: conversations in start order, the last one possibly cut short.

    n conversations are drawn (each has >= 1 turn, so that is enough), then the first ones whose
    turns add up to n are kept; every stream is drawn in full so results do not depend on how
    many are kept.
    """
    starts = arrivals.sample(n, rngs["arrivals"])
    turns = chat.turns.sample(n, rngs["turns"])
    groups = prefix.sample_groups(n, rngs["prefix"]) if prefix else None
    conv = np.repeat(np.arange(n, dtype=np.int64), turns)
    first = np.r_[True, conv[1:] != conv[:-1]]
    turn = segmented_cumsum(np.ones(conv.size, dtype=np.int64), first) - 1
    user = prompt_lens.sample(conv.size, rngs["prompt_lens"])
    answer = output_lens.sample(conv.size, rngs["output_lens"])
    think = chat.sample_think(conv.size, rngs["think"])
    prefix_len = prefix.prefix_len if prefix else 0
    grown = user + np.where(first, prefix_len, np.r_[0, answer[:-1]])
    prompt = segmented_cumsum(grown, first)
    arrival = starts[conv] + segmented_cumsum(np.where(first, 0.0, think), first)
    keep = _kept_turns(prompt, answer, first, chat.max_model_len, n)
    df = pd.DataFrame({"arrival_s": arrival, "prompt_len": prompt, "output_len": answer,
                       "conversation_id": conv, "turn": turn})
    if groups is not None:
        df["prefix_group"] = groups[conv]
        df["prefix_len"] = prefix_len
    return df[keep].sort_values("arrival_s", kind="stable").reset_index(drop=True)


def _kept_turns(prompt: np.ndarray, answer: np.ndarray, first: np.ndarray,
                max_model_len: int | None, n: int) -> np.ndarray:
    keep = np.ones(prompt.size, dtype=bool)
    if max_model_len is not None:
        too_long = (prompt + answer > max_model_len).astype(np.int64)
        keep = segmented_cumsum(too_long, first) == 0
    keep &= np.cumsum(keep) <= n
    if keep.sum() < n:
        raise SpecError("MultiTurn.max_model_len", max_model_len,
                        f"large enough that {n} turns fit (only {int(keep.sum())} do)")
    return keep
