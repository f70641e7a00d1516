"""The routes: OpenAI's completions, chat completions and models, plus health, Prometheus
metrics and kvtwin's own: `GET /kvtwin/records` (the engine's step and request records, the
schema `engine.runtime.replay` writes) and `GET /kvtwin/clock` (the clock they are on)."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.responses import JSONResponse, Response, StreamingResponse

from engine.runtime.llm import LLMEngine
from engine.runtime.serve.metrics import CONTENT_TYPE
from engine.runtime.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ResponseHead,
    SamplingFields,
    error_body,
    new_request_id,
    sampling_params,
)
from engine.runtime.serve.responses import Reply, collect, sse, unless_disconnected
from engine.runtime.serve.state import ApiError, ServerState
from engine.runtime.serve.tokenizer import Detokenizer, encode_chat, has_chat_template


def build_app(state: ServerState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.start()
        yield
        state.stop()

    app = FastAPI(title="kvtwin", lifespan=lifespan)
    app.state.server = state
    _error_handlers(app)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        state.check_model(body.model)
        return await _answer(state, body, state.prompt_ids(body), body.max_tokens, request,
                             chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        state.check_model(body.model)
        if not has_chat_template(state.tokenizer):
            raise ApiError(400, "this model has no chat template (its folder has no tokenizer "
                           "with a chat_template): use /v1/completions", param="messages")
        prompt = encode_chat(state.tokenizer, [{"role": m.role, "content": m.text()}
                                               for m in body.messages])
        max_tokens = body.max_completion_tokens or body.max_tokens
        return await _answer(state, body, prompt, max_tokens, request, chat=True)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": state.model_name, "object": "model", "created": 0, "owned_by": "kvtwin",
            "root": state.root or state.model_name,
            "max_model_len": state.limits.max_model_len}]}

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if state.loop.stats.alive else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        body = state.metrics.render(state.loop.stats, state.loop.num_pending)
        return Response(body, media_type=CONTENT_TYPE)

    @app.get("/kvtwin/clock")
    async def clock() -> dict[str, float]:
        return {"now_s": state.loop.now()}

    @app.get("/kvtwin/records")
    async def records() -> dict[str, Any]:
        return await asyncio.wrap_future(state.loop.call(records_snapshot)) | {
            "now_s": state.loop.now()}

    return app


async def _answer(state: ServerState, body: SamplingFields, prompt: list[int],
                  max_tokens: int | None, request: Request, chat: bool) -> Response:
    if body.n != 1:
        raise ApiError(400, f"n={body.n} is invalid: only n=1 is supported", param="n")
    max_tokens = state.check_length(len(prompt), max_tokens)
    try:
        params = sampling_params(body, max_tokens)
    except ValueError as err:
        raise ApiError(400, str(err), param=str(err).split("=", 1)[0]) from None
    state.check_ready()
    request_id = request.headers.get("x-request-id") or body.request_id or \
        new_request_id("chatcmpl" if chat else "cmpl")
    queue = state.open(request_id, prompt, params)
    reply = Reply(ResponseHead(request_id, state.model_name, chat), body.include_usage,
                  body.return_token_ids or state.tokenizer is None,
                  Detokenizer(state.tokenizer))
    if body.stream:
        return StreamingResponse(sse(state, request_id, queue, reply),
                                 media_type="text/event-stream")
    return await unless_disconnected(request, collect(state, request_id, queue, reply))


def records_snapshot(engine: LLMEngine) -> dict[str, Any]:
    """The engine's records so far (run in the engine loop, between steps)."""
    return {"requests": [r.to_dict() for r in engine.request_records()],
            "steps": [s.to_dict() for s in engine.step_records],
            "step_durations_s": list(engine.step_durations),
            "num_blocks": engine.num_blocks, "memory": engine.memory_report(),
            "num_blocks_used": engine.scheduler.block_manager.num_used_blocks,
            "num_running": len(engine.scheduler.running),
            "num_waiting": len(engine.scheduler.waiting)}


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, err: ApiError) -> JSONResponse:
        return JSONResponse(error_body(err.message, err.err_type, err.status, err.param),
                            err.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = f"{param}: {first.get('msg', 'invalid request')}" if param else str(err)
        return JSONResponse(error_body(message, "BadRequestError", 400, param), 400)
