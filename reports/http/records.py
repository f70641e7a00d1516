"""A replay's streams as records: `RequestRecord` rows (times in seconds from the replay's
start), per-request details the schema has no column for, and — from a kvtwin server — the
server's own step records moved onto the replay's clock."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from engine.core.request import Request
from reports.http.client import StreamResult
from reports.metrics import requests_frame, steps_frame

DETAIL_COLUMNS = ("request_id", "scheduled_s", "status", "error", "expected_output_len",
                  "length_ok", "num_chunks")


@dataclass(frozen=True)
class Clock:
    """Maps the server's clock to the replay's: replay time = server time - offset."""

    offset_s: float

    def __call__(self, server_s: float | None) -> float | None:
        return None if server_s is None else server_s - self.offset_s


def request_row(request: Request, result: StreamResult | None, t0: float,
                scheduled_s: float) -> dict[str, Any]:
    """One RequestRecord row; a request never sent (the replay was stopped) is unfinished."""
    prompt_len = len(request.prompt_token_ids)
    if result is None:
        return _row(request.request_id, scheduled_s, prompt_len, 0, None, False)
    usage = result.usage or {}
    rejected = result.status is not None and result.status != 200
    reason = f"rejected: HTTP {result.status}: {result.error}" if rejected else \
        (f"error: {result.error}" if result.error else result.finish_reason)
    row = _row(request.request_id, result.send_s - t0, usage.get("prompt_tokens") or prompt_len,
               result.output_tokens if result.success else 0, reason, rejected)
    if result.first_s is not None:
        row["first_token_s"] = result.first_s - t0
    if result.success:
        row["finish_s"] = result.last_s - t0
    row["num_cached_tokens"] = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    return row


def _row(request_id: Any, arrival_s: float, prompt_len: int, output_len: int,
         finish_reason: str | None, rejected: bool) -> dict[str, Any]:
    return {"request_id": request_id, "arrival_s": arrival_s, "first_scheduled_s": None,
            "first_token_s": None, "finish_s": None, "prompt_len": int(prompt_len),
            "output_len": int(output_len), "num_cached_tokens": None, "num_preemptions": None,
            "finish_reason": finish_reason, "rejected": rejected}


def detail_row(request: Request, result: StreamResult | None, scheduled_s: float,
               ) -> dict[str, Any]:
    ok = result is not None and result.success
    return {"request_id": request.request_id, "scheduled_s": scheduled_s,
            "status": None if result is None else result.status,
            "error": None if result is None else result.error,
            "expected_output_len": request.output_len,
            "length_ok": bool(ok and result.output_tokens == request.output_len),
            "num_chunks": 0 if result is None else result.num_chunks}


def itl_samples(results: list[StreamResult | None]) -> np.ndarray:
    gaps = [r.itl_s for r in results if r is not None and r.success]
    return np.concatenate(gaps) if gaps else np.empty(0)


def merge_server_requests(rows: list[dict[str, Any]], server: list[dict[str, Any]],
                          server_id: dict[Any, str], clock: Clock) -> None:
    """Fill what only the server knows (first scheduled, preemptions, prefix hits)."""
    by_id = {r["request_id"]: r for r in server}
    for row in rows:
        theirs = by_id.get(server_id.get(row["request_id"]))
        if theirs is None:
            continue
        row["first_scheduled_s"] = clock(theirs["first_scheduled_s"])
        row["num_preemptions"] = theirs["num_preemptions"]
        if row["num_cached_tokens"] is None:
            row["num_cached_tokens"] = theirs["num_cached_tokens"]


def server_steps(steps: list[dict[str, Any]], clock: Clock, end_s: float) -> pd.DataFrame:
    """The server's steps that ran during the replay, on the replay's clock."""
    moved = []
    for step in steps:
        start, end = clock(step["start_s"]), clock(step["end_s"])
        if end > 0 and start < end_s:
            moved.append({**step, "start_s": start, "end_s": end})
    return steps_frame(moved)


def frames(rows: list[dict[str, Any]], details: list[dict[str, Any]],
           ) -> tuple[pd.DataFrame, pd.DataFrame]:
    return requests_frame(rows), pd.DataFrame(details, columns=list(DETAIL_COLUMNS))
