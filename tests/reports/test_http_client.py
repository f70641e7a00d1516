"""The HTTP replay's pieces without a server: SSE framing, and streams as records."""

from __future__ import annotations

import pytest

from engine.core.request import Request
from reports.http.client import StreamResult, _take
from reports.http.records import detail_row, request_row
from reports.http.sse import SseSplitter


def test_sse_messages_split_across_chunks_and_crlf() -> None:
    sse = SseSplitter()
    assert sse.feed(b'data: {"a": 1}\n\ndata: {"b"') == ['{"a": 1}']
    assert sse.feed(b': 2}\r\n\r\n: keep-alive\n\ndata: [DONE]\n\n') == ['{"b": 2}', "[DONE]"]
    assert sse.feed("data: \u00e9".encode()[:-1]) == []  # half a UTF-8 character waits
    assert sse.feed("data: \u00e9".encode()[-1:] + b"\n\n") == ["\u00e9"]


def test_stream_timing_follows_vllm_bench() -> None:
    result = StreamResult(send_s=10.0)
    _take({"choices": [{"text": "", "token_ids": [5]}]}, result, 10.5)
    _take({"choices": [{"text": "x", "token_ids": [6], "finish_reason": None}]}, result, 10.7)
    _take({"choices": [{"text": "y", "finish_reason": "length"}]}, result, 11.0)
    _take({"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 3}}, result, 12.0)
    assert result.success and result.first_s == 10.5 and result.last_s == 11.0
    assert result.itl_s == pytest.approx([0.2, 0.3])
    assert result.output_tokens == 3 and result.finish_reason == "length"
    row = request_row(Request(7, 1.0, [1, 2, 3, 4], 3), result, t0=9.0, scheduled_s=1.0)
    assert (row["arrival_s"], row["first_token_s"], row["finish_s"]) == (1.0, 1.5, 2.0)
    assert row["output_len"] == 3 and row["prompt_len"] == 4 and not row["rejected"]


def test_errors_and_unsent_requests_are_records() -> None:
    req = Request(1, 2.0, [1, 2], 5)
    refused = StreamResult(send_s=3.0, status=400, error="too long")
    row = request_row(req, refused, t0=0.0, scheduled_s=2.0)
    assert row["rejected"] and row["finish_reason"] == "rejected: HTTP 400: too long"
    assert row["finish_s"] is None and not detail_row(req, refused, 2.0)["length_ok"]
    cut = StreamResult(send_s=3.0, status=200)
    _take({"choices": [{"text": "a"}]}, cut, 3.5)
    _take({"error": {"message": "boom"}}, cut, 3.6)
    row = request_row(req, cut, t0=0.0, scheduled_s=2.0)
    assert row["first_token_s"] == 3.5 and row["finish_s"] is None and not row["rejected"]
    assert row["finish_reason"].startswith("error: boom")
    unsent = request_row(req, None, t0=0.0, scheduled_s=2.0)
    assert unsent["arrival_s"] == 2.0 and unsent["finish_s"] is None
