"""Length bounds of a trace, checked on load before anything is built from a length.

Every prompt_len and output_len is an integer in [1, MAX_STORED_LEN] (what the format stores).
A request is *too long* when prompt_len or output_len exceeds `max_len` (the schema's MAX_LEN
by default) or, with `max_model_len`, when prompt_len + output_len exceeds it (the model cannot
hold it; vLLM refuses such a request).

too_long="error" (default): the first too-long request is a TraceError naming its row, column
and the allowed range. too_long="keep": they are kept (and counted in one TraceWarning); the
scheduler rejects a prompt over max_model_len by its length before any token is made, and an
output stops at max_model_len.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from workloads.errors import SpecError, TraceError, TraceWarning, check_number
from workloads.schema import MAX_LEN, MAX_STORED_LEN

TOO_LONG = ("error", "keep")
KEEP_HINT = "; too_long='keep' keeps such requests for the scheduler to reject"


@dataclass(frozen=True)
class LengthBounds:
    max_model_len: int | None = None
    too_long: str = "error"
    max_len: int = MAX_LEN

    def __post_init__(self) -> None:
        check_number("max_len", self.max_len, 1, MAX_STORED_LEN, integer=True)
        if self.max_model_len is not None:
            check_number("max_model_len", self.max_model_len, 2, MAX_STORED_LEN, integer=True)
        if self.too_long not in TOO_LONG:
            raise SpecError("too_long", self.too_long, "'error' or 'keep'")

    @property
    def prompt_max(self) -> int:
        """The longest prompt that fits (one output token must fit beside it)."""
        if self.max_model_len is None:
            return self.max_len
        return min(self.max_len, self.max_model_len - 1)

    def over(self, prompt: np.ndarray, output: np.ndarray) -> np.ndarray:
        """Which requests are too long (int64 lengths)."""
        over = (prompt > self.max_len) | (output > self.max_len)
        if self.max_model_len is not None:
            over |= prompt + output > self.max_model_len
        return over

    def check(self, df: pd.DataFrame) -> int:
        """How many rows of `df` (typed prompt_len / output_len, indexed by file row) are too
        long; with too_long="error", a TraceError at the first one instead."""
        prompt = df["prompt_len"].to_numpy(dtype=np.int64)
        output = df["output_len"].to_numpy(dtype=np.int64)
        over = self.over(prompt, output)
        if not over.any():
            return 0
        if self.too_long == "keep":
            return int(over.sum())
        pos = int(np.flatnonzero(over)[0])
        raise self.error(int(df.index[pos]), int(prompt[pos]), int(output[pos]))

    def error(self, row: int | None, prompt: int, output: int) -> TraceError:
        mml = self.max_model_len
        if prompt > self.prompt_max:
            why = ("max_model_len - 1: one output token must fit" if mml is not None
                   and mml - 1 < self.max_len else "MAX_LEN")
            return TraceError("prompt_len", row, prompt,
                              f"an integer in [1, {self.prompt_max}] ({why}){KEEP_HINT}")
        if mml is not None and mml - prompt < self.max_len:
            hi, why = mml - prompt, f"max_model_len={mml} - prompt_len"
        else:
            hi, why = self.max_len, "MAX_LEN"
        return TraceError("output_len", row, output, f"an integer in [1, {hi}] ({why}){KEEP_HINT}")

    def kept_warning(self, count: int) -> TraceWarning:
        limit = f"max_model_len={self.max_model_len}" if self.max_model_len is not None \
            else f"MAX_LEN={self.max_len}"
        return TraceWarning(f"requests longer than {limit}: {count}, kept (too_long='keep'): "
                            "the scheduler rejects a prompt over max_model_len, an output stops "
                            "at it")


DEFAULT_BOUNDS = LengthBounds()
