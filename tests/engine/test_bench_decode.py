"""engine.tools.bench_decode: its decode plan is a valid decode step; it refuses to run
without a GPU."""

from __future__ import annotations

import pytest
import torch

from engine.core.catalog import load_model
from engine.runtime.llm import LLM
from engine.tools import bench_decode


def test_decode_plan_is_one_token_per_sequence_over_its_own_blocks() -> None:
    llm = LLM(load_model("tiny_qwen3"), dtype="float32", device="cpu", max_model_len=64)
    plan = bench_decode.decode_plan(batch=3, context=40, block_size=16, temperature=0.6)
    host = llm.model_runner.prepare_inputs(plan.scheduled).host
    assert host.is_decode_only and host.num_tokens == 3
    assert host.seq_lens == [40, 40, 40]
    assert host.slot_mapping.tolist() == [2 * 16 + 7, 5 * 16 + 7, 8 * 16 + 7]
    assert all(t is not None for t in llm.model_runner.execute_model(plan))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_refuses_without_a_gpu() -> None:
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        bench_decode.main([])
