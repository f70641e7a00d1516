"""OpenAI-style errors: 400 for what the engine cannot take (both numbers for a prompt too
long), 404 for an unknown model (as vLLM and OpenAI answer), 503 over max_queue."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from engine.runtime.serve import ServeOptions, ServerThread
from tests.serve.conftest import call, make_engine, prompt, wait_for


def error_of(body: dict) -> dict:
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_a_prompt_longer_than_max_model_len_names_both_numbers(server) -> None:
    status, body = call(server.url, "/v1/completions", {"prompt": prompt(0, 3000)})
    err = error_of(body)
    assert status == 400 and err["code"] == 400 and err["param"] == "prompt"
    assert "2048" in err["message"] and "3000" in err["message"]
    status, body = call(server.url, "/v1/completions",
                        {"prompt": prompt(0, 2000), "max_tokens": 100})
    assert status == 400 and "2100" in error_of(body)["message"]


@pytest.mark.parametrize(("field", "value"), [
    ("temperature", -1.0), ("top_p", 0.0), ("top_k", -2), ("max_tokens", "many"),
    ("min_tokens", 99), ("n", 2), ("prompt", [3, 9999]), ("prompt", "text but no tokenizer"),
])
def test_invalid_parameters_are_400_naming_the_field(server, field, value) -> None:
    body = {"prompt": prompt(1, 10), "max_tokens": 8, field: value}
    status, answer = call(server.url, "/v1/completions", body)
    err = error_of(answer)
    assert status == 400 and err["type"] == "BadRequestError"
    assert field in (err["param"] or "") or field in err["message"]


def test_unknown_model_and_missing_chat_template(server) -> None:
    status, body = call(server.url, "/v1/completions", {"prompt": [5], "model": "gpt-9"})
    assert status == 404 and "gpt-9" in error_of(body)["message"]
    status, body = call(server.url, "/v1/chat/completions",
                        {"messages": [{"role": "user", "content": "hi"}]})
    assert status == 400 and "chat template" in error_of(body)["message"]
    status, body = call(server.url, "/v1/completions", {"prompt": [5, 6], "max_tokens": 2,
                                                          "model": "tiny-qwen3"})
    assert status == 200 and body["usage"]["completion_tokens"] >= 1


def test_503_once_max_queue_requests_wait() -> None:
    engine = make_engine(max_num_seqs=1)
    with ServerThread(engine, ServeOptions(port=0, max_queue=1)) as srv:
        asyncio.run(_overload(srv))


async def _overload(srv: ServerThread) -> None:
    long = {"prompt": prompt(2, 10), "max_tokens": 1500, "min_tokens": 1500, "ignore_eos": True,
            "stream": True}
    async with aiohttp.ClientSession() as session:
        running = await session.post(srv.url + "/v1/completions", json=long)
        await running.content.readline()  # streaming: it holds the only running slot
        queued = asyncio.create_task(session.post(srv.url + "/v1/completions",
                                                  json={**long, "stream": False}))
        await asyncio.to_thread(wait_for, lambda: srv.state.loop.stats.num_waiting == 1)
        async with session.post(srv.url + "/v1/completions", json=long) as refused:
            body = await refused.json()
        assert refused.status == 503 and body["error"]["type"] == "ServiceUnavailableError"
        assert "max_queue=1" in body["error"]["message"]
        running.close()  # the stream's client leaves: the queued request gets its turn
        answer = await queued
        assert answer.status == 200
        assert (await answer.json())["usage"]["completion_tokens"] == 1500
