"""A kvtwin server on the tiny model, on 127.0.0.1 and a free port, for the module's tests."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from engine.core.catalog import load_model
from engine.runtime.llm import LLMEngine
from engine.runtime.serve import ServeOptions, ServerThread

MODEL = load_model("tiny_qwen3")
# cpu_tiny's knobs, smaller: float32 on the CPU with SDPA, one torch thread (tests/conftest.py)
ENGINE = dict(dtype="float32", device="cpu", attention_backend="sdpa", max_model_len=2048,
              block_size=16, max_num_seqs=16, max_num_batched_tokens=512,
              num_gpu_blocks_override=512)


def make_engine(**overrides: Any) -> LLMEngine:
    return LLMEngine(MODEL, **(ENGINE | overrides))


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    with ServerThread(make_engine(), ServeOptions(port=0)) as running:
        yield running


def call(url: str, path: str, body: dict[str, Any] | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """(status, parsed JSON body or text) of a GET (no body) or a POST."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data,
                                     headers={"Content-Type": "application/json",
                                              **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        status, text = err.code, err.read().decode()
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def wait_for(check: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the server")
        time.sleep(0.02)


def prompt(i: int, n: int) -> list[int]:
    return [(37 * j + 101 * i) % 500 + 3 for j in range(n)]
