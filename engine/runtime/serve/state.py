"""What the routes share: the engine loop, the per-request output queues, the tokenizer, the
metrics, and the checks that turn a bad request into an OpenAI-style error before it queues."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from engine.core.sequence import SamplingParams
from engine.runtime.serve.engine_loop import EngineLoop, Output, Submission
from engine.runtime.serve.metrics import ServerMetrics
from engine.runtime.serve.protocol import CompletionRequest
from engine.runtime.serve.tokenizer import encode


class ApiError(Exception):
    """An error answered as OpenAI's error JSON with this HTTP status."""

    def __init__(self, status: int, message: str, err_type: str = "BadRequestError",
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.err_type, self.param = status, message, err_type, param


@dataclass(frozen=True)
class Limits:
    max_model_len: int
    vocab_size: int
    max_queue: int | None  # 503 once this many requests wait (None: no limit)


class ServerState:
    def __init__(self, loop: EngineLoop, metrics: ServerMetrics, model_name: str,
                 limits: Limits, tokenizer: Any | None = None, root: str | None = None):
        self.loop = loop
        self.metrics = metrics
        self.model_name = model_name
        self.limits = limits
        self.tokenizer = tokenizer
        self.root = root
        self.streams: dict[str, asyncio.Queue[Output]] = {}
        self._aio: asyncio.AbstractEventLoop | None = None

    # -- lifecycle (event-loop thread) ---------------------------------------------------------

    def start(self) -> None:
        self._aio = asyncio.get_running_loop()
        self.loop.start()

    def stop(self) -> None:
        self.loop.stop()

    def deliver(self, outputs: list[Output]) -> None:
        """Called by the engine loop, once per step: one hop to the event loop for them all."""
        if self._aio is not None and not self._aio.is_closed():
            self._aio.call_soon_threadsafe(self._dispatch, outputs)

    def _dispatch(self, outputs: list[Output]) -> None:
        for out in outputs:
            queue = self.streams.get(out.request_id)
            if queue is not None:
                queue.put_nowait(out)

    # -- one request -----------------------------------------------------------------------

    def open(self, request_id: str, prompt: list[int],
             params: SamplingParams) -> asyncio.Queue[Output]:
        if request_id in self.streams:
            raise ApiError(400, f"request id {request_id!r} is already in flight",
                           param="request_id")
        queue: asyncio.Queue[Output] = asyncio.Queue()
        self.streams[request_id] = queue
        self.loop.submit(Submission(request_id, prompt, params, self.loop.now()))
        return queue

    def close(self, request_id: str, finished: bool) -> None:
        """The response is over; a request that did not finish (its client left) is aborted."""
        self.streams.pop(request_id, None)
        if not finished:
            self.loop.abort(request_id)

    # -- checks ----------------------------------------------------------------------------

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in (self.model_name, self.root):
            raise ApiError(404, f"The model `{model}` does not exist.", "NotFoundError",
                           "model")

    def check_ready(self) -> None:
        stats = self.loop.stats
        if not stats.alive:
            raise ApiError(503, f"the engine is not running ({self.loop.error or 'stopped'})",
                           "ServiceUnavailableError")
        limit = self.limits.max_queue
        waiting = stats.num_waiting + self.loop.num_pending
        if limit is not None and waiting >= limit:
            raise ApiError(503, f"the server is overloaded: {waiting} requests are waiting "
                           f"(max_queue={limit}); retry later", "ServiceUnavailableError")

    def check_length(self, num_prompt: int, max_tokens: int | None) -> int:
        """The request's max_tokens (the room left when not given), or a 400."""
        limit = self.limits.max_model_len
        if num_prompt == 0:
            raise ApiError(400, "the prompt is empty", param="prompt")
        if num_prompt > limit:
            raise ApiError(400, f"This model's maximum context length is {limit} tokens. "
                           f"However, your request has {num_prompt} input tokens.",
                           param="prompt")
        if max_tokens is None:
            return max(1, limit - num_prompt)
        if num_prompt + max_tokens > limit:
            raise ApiError(400, f"This model's maximum context length is {limit} tokens. "
                           f"However, you requested {num_prompt + max_tokens} tokens "
                           f"({num_prompt} in the prompt, {max_tokens} in the completion). "
                           "Please reduce the length of the prompt or completion.",
                           param="max_tokens")
        return max_tokens

    def prompt_ids(self, body: CompletionRequest) -> list[int]:
        prompt = body.prompt
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], list | str):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return self._checked_ids(prompt)
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ApiError(400, "this model folder has no tokenizer: send the prompt as "
                               "token ids (a list of integers)", param="prompt")

            return encode(self.tokenizer, prompt)
        raise ApiError(400, "only one prompt per request is supported", param="prompt")

    def _checked_ids(self, ids: list[int]) -> list[int]:
        vocab = self.limits.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ApiError(400, f"token id {bad} is out of range [0, {vocab})", param="prompt")
        return ids
