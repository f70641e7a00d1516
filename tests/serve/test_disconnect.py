"""A client that leaves mid-stream aborts its request: out of the batch, its blocks freed,
recorded unfinished with finish_reason "abort"."""

from __future__ import annotations

import asyncio

import aiohttp

from tests.serve.conftest import call, prompt, wait_for


def test_disconnect_mid_stream_frees_the_blocks(server) -> None:
    asyncio.run(_leave_early(server.url))

    def aborted() -> bool:
        body = call(server.url, "/kvtwin/records")[1]
        mine = [r for r in body["requests"] if r["request_id"] == "leaver"]
        return bool(mine) and mine[0]["finish_reason"] == "abort" and \
            body["num_running"] == 0 and body["num_blocks_used"] == 0

    wait_for(aborted)
    body = call(server.url, "/kvtwin/records")[1]
    record = next(r for r in body["requests"] if r["request_id"] == "leaver")
    assert record["finish_s"] is None and 3 <= record["output_len"] < 1900
    status, metrics = call(server.url, "/metrics")
    assert 'vllm:request_success_total{finished_reason="abort",model_name="tiny-qwen3"}' \
        in metrics


async def _leave_early(url: str) -> None:
    body = {"prompt": prompt(3, 30), "max_tokens": 1900, "min_tokens": 1900,
            "ignore_eos": True, "stream": True}
    async with aiohttp.ClientSession() as session:
        response = await session.post(url + "/v1/completions", json=body,
                                      headers={"X-Request-Id": "leaver"})
        chunks = 0
        async for line in response.content:
            chunks += line.startswith(b"data: ")
            if chunks == 3:
                break
        response.close()  # drops the connection mid-stream
