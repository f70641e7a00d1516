"""The fresh process of a GPU point: spawn by default, forkserver on request, and a fallback
to spawn when CUDA cannot start in a forked child (exercised here on the CPU)."""

from __future__ import annotations

import pytest

import run
from engine.core.catalog import load_model
from engine.core.config import EngineConfig
from engine.core.request import Request
from engine.runtime.replay import replay_run

REQUESTS = [Request(i, 0.01 * i, list(range(5 + i, 40 + i)), 4) for i in range(3)]
CONFIG = EngineConfig(dtype="float32", device="cpu", max_model_len=256, cpu_memory_gib=0.05)


def test_forkserver_point_replays_like_a_spawned_one(monkeypatch) -> None:
    monkeypatch.setitem(run._START, "method", "forkserver")
    reqs, steps, info = run._fresh_process(replay_run, load_model("tiny_qwen3"), CONFIG,
                                           REQUESTS, None, False)
    assert len(reqs) == 3 and (reqs["output_len"] == 4).all() and len(steps) > 0
    assert info["memory"]["num_blocks"] > 0


def test_cuda_failing_in_a_forked_child_falls_back_to_spawn(monkeypatch) -> None:
    calls = []

    def in_child(method, fn, args):
        calls.append(method)
        if method == "forkserver":
            raise RuntimeError("Cannot re-initialize CUDA in forked subprocess. To use CUDA "
                               "with multiprocessing, you must use the 'spawn' start method")
        return "ok"

    monkeypatch.setitem(run._START, "method", "forkserver")
    monkeypatch.setattr(run, "_in_child", in_child)
    assert run._fresh_process(print) == "ok" and run._fresh_process(print) == "ok"
    assert calls == ["forkserver", "spawn", "spawn"]


def test_other_errors_are_not_retried(monkeypatch) -> None:
    def in_child(method, fn, args):
        raise ValueError("a start-up error of the engine")

    monkeypatch.setitem(run._START, "method", "forkserver")
    monkeypatch.setattr(run, "_in_child", in_child)
    with pytest.raises(ValueError, match="start-up error"):
        run._fresh_process(print)
    assert run._START["method"] == "forkserver"
