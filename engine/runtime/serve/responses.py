"""One request's answer, streamed (SSE `data: {...}` chunks then `data: [DONE]`) or whole.

Each engine step that gives the request a token becomes one chunk. A response that ends
before its request finished (the client went away, the stream was cancelled) aborts the
request, which frees its blocks.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from engine.runtime.serve.engine_loop import Output
from engine.runtime.serve.protocol import (
    ResponseHead,
    Usage,
    chat_choice,
    completion_choice,
    error_body,
)
from engine.runtime.serve.state import ServerState
from engine.runtime.serve.tokenizer import Detokenizer

CLIENT_CLOSED = 499  # nginx's status for a request whose client went away


@dataclass
class Reply:
    """How to shape one request's chunks."""

    head: ResponseHead
    include_usage: bool
    token_ids: bool  # send token ids beside the text
    detokenizer: Detokenizer
    first: bool = True
    usage: Usage | None = None
    text: list[str] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None

    def choice(self, out: Output, chunk: bool) -> dict[str, Any]:
        text = self.detokenizer.add(out.token_ids)
        ids = out.token_ids if self.token_ids else None
        if self.head.chat:
            choice = chat_choice(text, out.finish_reason, ids, chunk, self.first)
        else:
            choice = completion_choice(text, out.finish_reason, ids)
        self.first = False
        return choice

    def take(self, out: Output) -> None:
        self.text.append(self.detokenizer.add(out.token_ids))
        self.ids.extend(out.token_ids)
        self.finish(out)

    def finish(self, out: Output) -> None:
        if out.finish_reason is not None:
            self.finish_reason = out.finish_reason
            self.usage = Usage(out.num_prompt_tokens, len(self.ids), out.num_cached_tokens)


async def sse(state: ServerState, request_id: str, queue: asyncio.Queue[Output],
              reply: Reply) -> AsyncIterator[str]:
    finished = False
    sent = 0
    try:
        while not finished:
            out = await queue.get()
            finished = out.finished
            if out.error is not None:
                yield _data(error_body(out.error, "InternalServerError", 500))
                break
            sent += len(out.token_ids)
            yield _data(reply.head.body([reply.choice(out, chunk=True)], chunk=True))
            if finished and reply.include_usage:
                usage = Usage(out.num_prompt_tokens, sent, out.num_cached_tokens)
                yield _data(reply.head.body([], chunk=True, usage=usage))
        yield "data: [DONE]\n\n"
    finally:
        state.close(request_id, finished)


async def collect(state: ServerState, request_id: str, queue: asyncio.Queue[Output],
                  reply: Reply) -> JSONResponse:
    finished = False
    try:
        while not finished:
            out = await queue.get()
            finished = out.finished
            if out.error is not None:
                return JSONResponse(error_body(out.error, "InternalServerError", 500), 500)
            reply.take(out)
    finally:
        state.close(request_id, finished)
    return JSONResponse(_whole(reply))


def _whole(reply: Reply) -> dict[str, Any]:
    text, ids = "".join(reply.text), reply.ids if reply.token_ids else None
    if reply.head.chat:
        choice = chat_choice(text, reply.finish_reason, ids, chunk=False, first=True)
    else:
        choice = completion_choice(text, reply.finish_reason, ids)
    return reply.head.body([choice], chunk=False, usage=reply.usage)


async def unless_disconnected(request: Request, answer: Awaitable[Response]) -> Response:
    """`answer`, or 499 once the client disconnects first (the answer is cancelled, which
    aborts its request)."""
    task = asyncio.ensure_future(answer)
    watcher = asyncio.ensure_future(_disconnect(request))
    done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        watcher.cancel()
        return task.result()
    task.cancel()
    with suppress(asyncio.CancelledError):
        await task
    return Response(status_code=CLIENT_CLOSED)


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _data(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"
