"""One streamed completion, timed as `vllm bench serve` times it.

    send      just before the request is posted (vLLM's `st`)
    TTFT      the first chunk whose `choices` is not empty, minus send
    ITL       each later such chunk minus the one before it (one sample per chunk)
    E2E       the last such chunk minus send (a trailing usage chunk does not count)
    output    `usage.completion_tokens` when the server sends usage, else the tokens counted
A request succeeds when at least one such chunk came and the stream ended without an error.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from reports.http.sse import SseSplitter


@dataclass
class StreamResult:
    send_s: float  # perf_counter at the post
    status: int | None = None
    first_s: float | None = None
    last_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    num_chunks: int = 0
    num_token_ids: int = 0
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    error: str | None = None
    done: bool = False  # `data: [DONE]` came

    @property
    def success(self) -> bool:
        return self.first_s is not None and self.error is None

    @property
    def output_tokens(self) -> int:
        if self.usage and self.usage.get("completion_tokens") is not None:
            return int(self.usage["completion_tokens"])
        return self.num_token_ids or self.num_chunks

    def on_choices(self, choice: dict[str, Any], now: float) -> None:
        if self.first_s is None:
            self.first_s = now
        else:
            self.itl_s.append(now - self.last_s)
        self.last_s = now
        self.num_chunks += 1
        self.num_token_ids += len(choice.get("token_ids") or ())
        self.finish_reason = choice.get("finish_reason") or self.finish_reason


async def stream_completion(session: aiohttp.ClientSession, url: str, payload: dict[str, Any],
                            headers: dict[str, str] | None = None) -> StreamResult:
    result = StreamResult(time.perf_counter())
    try:
        async with session.post(url, json=payload, headers=headers) as response:
            result.status = response.status
            if response.status != 200:
                result.error = _error_message(await response.text(), response.reason)
                return result
            await _read(response, result)
    except Exception as err:  # a failed request is a record, never a crash of the replay
        result.error = f"{type(err).__name__}: {err}"
    return result


async def _read(response: aiohttp.ClientResponse, result: StreamResult) -> None:
    splitter = SseSplitter()
    async for chunk in response.content.iter_any():
        for message in splitter.feed(chunk):
            if message == "[DONE]":
                result.done = True
                return
            _take(json.loads(message), result, time.perf_counter())
            if result.error is not None:
                return


def _take(data: dict[str, Any], result: StreamResult, now: float) -> None:
    if "error" in data:
        result.error = _error_message(json.dumps(data), "error event")
    elif choices := data.get("choices"):
        result.on_choices(choices[0], now)
    if usage := data.get("usage"):
        result.usage = usage


def _error_message(body: str, reason: str | None) -> str:
    try:
        error = json.loads(body).get("error")
        return str(error.get("message") if isinstance(error, dict) else error or body)
    except (json.JSONDecodeError, AttributeError):
        return body.strip() or str(reason)
