"""Request state as the scheduler and the model runner see it. Pure Python (no torch)."""

from __future__ import annotations

import itertools
from array import array
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum, auto


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()
    REJECTED = auto()


@dataclass
class SamplingParams:
    """temperature 0 means greedy. top_k <= 0 and top_p == 1 disable those filters."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_tokens: int = 16
    ignore_eos: bool = False
    seed: int | None = None
    min_tokens: int = 0  # EOS does not stop a request before this many output tokens

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} is invalid: must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} is invalid: must be in (0, 1]")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens} is invalid: must be >= 1")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens={self.min_tokens} is invalid: must be in "
                             f"[0, max_tokens={self.max_tokens}]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class RequestTimes:
    """Timestamps in the clock of whoever drives the scheduler (wall or simulated)."""

    arrival: float = 0.0
    first_scheduled: float | None = None
    first_token: float | None = None
    finish: float | None = None


class Sequence:
    """One request: its tokens, its KV blocks, and how far the model has computed it."""

    _ids = itertools.count()

    def __init__(self, token_ids: Iterable[int], sampling_params: SamplingParams | None = None,
                 request_id: str | int | None = None, arrival: float = 0.0):
        self.seq_id = next(Sequence._ids)
        self.request_id = self.seq_id if request_id is None else request_id
        # int64s in one buffer: 8 bytes a token (a list holds a 36-byte object per id), and a
        # block's bytes for its prefix-cache hash are a slice, not a conversion.
        self.token_ids = array("q", token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.sampling_params = sampling_params or SamplingParams()
        # Where it stops on length at the latest (max_model_len may stop it sooner).
        self.max_num_tokens = self.num_prompt_tokens + self.sampling_params.max_tokens
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # chained hashes of the full blocks, in order
        self.block_content_ids: list[int] = []  # prefix-cache identity of each full block's KV
        self.num_computed_tokens = 0       # tokens whose KV is (or is being) written
        self.num_cached_tokens = 0         # prefix-cache hit at the latest admission
        self.num_preemptions = 0
        # Sampled on the device but not read back yet (async scheduling): the last tokens.
        self.num_pending_tokens = 0
        self.finish_reason: str | None = None
        self.times = RequestTimes(arrival=arrival)

    def __len__(self) -> int:
        return len(self.token_ids)

    def __repr__(self) -> str:
        return (f"Sequence(id={self.request_id}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, {self.status.name})")

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens].tolist()

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:].tolist()

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status in (SequenceStatus.FINISHED, SequenceStatus.REJECTED)

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
