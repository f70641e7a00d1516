"""Replay a trace over HTTP against any OpenAI-compatible server, at the trace's arrival
times, from one asyncio event loop (thousands of concurrent streams).

Each request is a streamed completion of its token-id prompt with its output length forced
(`max_tokens = min_tokens = output_len`, `ignore_eos`, greedy), as `vllm bench serve` sends
them. Against kvtwin's own server (it answers `GET /kvtwin/clock`) the server's step records
and what only it knows (first scheduled, preemptions) join the records, on the replay's clock.
Ctrl-C stops the replay and keeps what finished; the rest is recorded unfinished.
"""

from __future__ import annotations

import asyncio
import resource
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from engine.core.request import Request, RequestTable, as_table
from reports.http import records
from reports.http.client import StreamResult, stream_completion
from reports.metrics import steps_frame, summarize

TIMEOUT = aiohttp.ClientTimeout(total=6 * 3600)  # vLLM's bench: a stream may run for hours


@dataclass
class HttpReplayResult:
    requests: pd.DataFrame   # RequestRecord columns, times from the replay's start
    steps: pd.DataFrame      # StepRecord columns: the kvtwin server's steps; else empty
    itl_s: np.ndarray        # every inter-token gap of every successful stream
    details: pd.DataFrame    # per request: scheduled_s, status, error, expected length, ...
    server: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0
    interrupted: bool = False

    @property
    def num_blocks(self) -> int:
        return int(self.server.get("num_blocks") or 0)

    @property
    def length_mismatches(self) -> int:
        ok = self.details["status"].eq(200) & ~self.details["error"].notna()
        return int((ok & ~self.details["length_ok"].astype(bool)).sum())

    def metrics(self, **slo: float | None) -> dict[str, Any]:
        return summarize(self.requests, self.steps, num_blocks=self.num_blocks,
                         itl_samples_s=self.itl_s, **slo)


def replay_http(endpoint: str, requests: RequestTable | Iterable[Request], *,
                model: str | None = None, time_scale: float = 1.0,
                max_concurrency: int | None = None, progress: bool = False,
                extra_body: dict[str, Any] | None = None) -> HttpReplayResult:
    """Replay `requests` against `endpoint` (e.g. http://127.0.0.1:8000); request i is sent
    `arrival_s * time_scale` seconds after the start."""
    if not time_scale > 0:
        raise ValueError(f"time_scale={time_scale!r} is invalid: must be > 0")
    table = as_table(requests)
    _raise_open_files_limit(len(table))
    replayer = _Replayer(endpoint.rstrip("/"), table, model, time_scale, max_concurrency,
                         extra_body or {})
    return asyncio.run(replayer.run(progress))


class _Replayer:
    def __init__(self, endpoint: str, table: RequestTable, model: str | None,
                 time_scale: float, max_concurrency: int | None, extra: dict[str, Any]):
        self.endpoint, self.table, self.model, self.extra = endpoint, table, model, extra
        self.arrivals = [float(a) * time_scale for a in table.arrival_s]
        self.order = sorted(range(len(table)), key=lambda i: (self.arrivals[i], i))
        self.limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        self.results: list[StreamResult | None] = [None] * len(table)
        self.tag = f"kvtwin-{time.time_ns():x}"
        self.t0 = 0.0

    async def run(self, progress: bool) -> HttpReplayResult:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
        async with aiohttp.ClientSession(connector=connector, timeout=TIMEOUT,
                                         trust_env=False) as session:
            self.model = self.model or await _served_model(session, self.endpoint)
            clock = await _server_clock(session, self.endpoint)
            self.t0 = time.perf_counter()
            with tqdm(total=len(self.table), desc="http replay", unit="req",
                      disable=not progress) as bar:
                interrupted = await self._send_all(session, bar)
            wall = time.perf_counter() - self.t0
            server = await self._server_side(session, clock)
        return self._result(server, clock, wall, interrupted)

    async def _send_all(self, session: aiohttp.ClientSession, bar: Any) -> bool:
        tasks: list[asyncio.Task] = []
        try:
            for i in self.order:
                delay = self.t0 + self.arrivals[i] - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(self._one(session, i, bar)))
            await asyncio.gather(*tasks)
            return False
        except asyncio.CancelledError:  # Ctrl-C: keep what finished
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            return True

    async def _one(self, session: aiohttp.ClientSession, i: int, bar: Any) -> None:
        req = self.table[i]
        if self.limit is not None:
            async with self.limit:
                self.results[i] = await self._post(session, req)
        else:
            self.results[i] = await self._post(session, req)
        bar.update(1)

    async def _post(self, session: aiohttp.ClientSession, req: Request) -> StreamResult:
        n = max(1, int(req.output_len))
        payload = {"model": self.model, "prompt": list(req.prompt_token_ids), "max_tokens": n,
                   "min_tokens": n, "ignore_eos": True, "temperature": 0.0, "stream": True,
                   "stream_options": {"include_usage": True}, **self.extra}
        headers = {"X-Request-Id": self._server_id(req.request_id)}
        return await stream_completion(session, self.endpoint + "/v1/completions", payload,
                                       headers)

    def _server_id(self, request_id: Any) -> str:
        return f"{self.tag}-{request_id}"

    async def _server_side(self, session: aiohttp.ClientSession,
                           clock: records.Clock | None) -> dict[str, Any]:
        info: dict[str, Any] = {"endpoint": self.endpoint, "model": self.model,
                                "kvtwin": clock is not None}
        if clock is not None:
            info["records"] = await _get_json(session, self.endpoint + "/kvtwin/records")
        return info

    def _result(self, server: dict[str, Any], clock: records.Clock | None, wall: float,
                interrupted: bool) -> HttpReplayResult:
        rows, details = [], []
        for i, result in enumerate(self.results):
            req = self.table[i]
            rows.append(records.request_row(req, result, self.t0, self.arrivals[i]))
            details.append(records.detail_row(req, result, self.arrivals[i]))
        steps = steps_frame([])
        theirs = server.pop("records", None)
        if theirs and clock is not None:
            clock = records.Clock(clock.offset_s + self.t0)  # from the replay's start
            ids = {self.table.request_id[i]: self._server_id(self.table.request_id[i])
                   for i in range(len(self.table))}
            records.merge_server_requests(rows, theirs["requests"], ids, clock)
            steps = records.server_steps(theirs["steps"], clock, wall)
            server.update(num_blocks=theirs["num_blocks"], memory=theirs["memory"])
        reqs, detail_df = records.frames(rows, details)
        return HttpReplayResult(reqs, steps, records.itl_samples(self.results), detail_df,
                                server, wall, interrupted)


async def _served_model(session: aiohttp.ClientSession, endpoint: str) -> str | None:
    body = await _get_json(session, endpoint + "/v1/models")
    data = (body or {}).get("data") or []
    return data[0]["id"] if data else None


async def _server_clock(session: aiohttp.ClientSession, endpoint: str) -> records.Clock | None:
    """kvtwin's server: the offset of its clock from this process's perf_counter."""
    before = time.perf_counter()
    body = await _get_json(session, endpoint + "/kvtwin/clock")
    after = time.perf_counter()
    if not body or "now_s" not in body:
        return None
    return records.Clock(body["now_s"] - (before + after) / 2)


async def _get_json(session: aiohttp.ClientSession, url: str) -> dict[str, Any] | None:
    try:
        async with session.get(url) as response:
            return await response.json() if response.status == 200 else None
    except (aiohttp.ClientError, ValueError):
        return None


def _raise_open_files_limit(num_streams: int) -> None:
    """One socket per concurrent stream: lift the soft limit on open files to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, num_streams + 1024)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
