"""OpenAI-compatible request and response bodies (the subset kvtwin serves), as vLLM names them.

Unknown request fields are accepted and ignored, as vLLM does. Usage in a stream follows
vLLM's and OpenAI's `stream_options: {"include_usage": true}`: one last chunk with empty
`choices` and the `usage` object, sent only when asked for.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from engine.core.sequence import SamplingParams


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """The fields completions and chat completions share."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    n: int = 1
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    temperature: float | None = None  # None: 1.0, OpenAI's default
    top_p: float = 1.0
    top_k: int = Field(0, ge=-1)  # 0 or -1: no top-k filter (vLLM accepts both)
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    return_token_ids: bool = False  # vLLM's flag: token ids beside the text
    request_id: str | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingFields):
    prompt: list[int] | str | list[str] | list[list[int]]
    max_tokens: int | None = 16


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # [{"type": "text", "text": ...}, ...]
            return "".join(part.get("text", "") for part in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None


def sampling_params(body: SamplingFields, max_tokens: int) -> SamplingParams:
    """Raises ValueError (naming the field) for a value the engine cannot take."""
    temperature = 1.0 if body.temperature is None else body.temperature
    return SamplingParams(temperature=temperature, top_k=max(0, body.top_k), top_p=body.top_p,
                          max_tokens=max_tokens, ignore_eos=body.ignore_eos, seed=body.seed,
                          min_tokens=body.min_tokens)


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


# -- responses ------------------------------------------------------------------------------


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}


@dataclass
class ResponseHead:
    """What every chunk of one response repeats."""

    id: str
    model: str
    chat: bool
    created: int = 0

    def __post_init__(self) -> None:
        self.created = self.created or int(time.time())

    def body(self, choices: list[dict[str, Any]], chunk: bool,
             usage: Usage | None = None) -> dict[str, Any]:
        obj = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat \
            else "text_completion"
        out: dict[str, Any] = {"id": self.id, "object": obj, "created": self.created,
                               "model": self.model, "choices": choices}
        if usage is not None:
            out["usage"] = usage.to_dict()
        return out


def completion_choice(text: str, finish_reason: str | None, token_ids: list[int] | None,
                      ) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "text": text, "logprobs": None,
                              "finish_reason": finish_reason}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return choice


def chat_choice(text: str, finish_reason: str | None, token_ids: list[int] | None,
                chunk: bool, first: bool) -> dict[str, Any]:
    key = "delta" if chunk else "message"
    message: dict[str, Any] = {"content": text}
    if first or not chunk:
        message = {"role": "assistant", **message}
    choice: dict[str, Any] = {"index": 0, key: message, "logprobs": None,
                              "finish_reason": finish_reason}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return choice


def error_body(message: str, err_type: str, status: int,
               param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": err_type, "param": param, "code": status}}
