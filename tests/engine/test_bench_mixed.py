"""engine.tools.bench_mixed: its compositions are valid mixed steps; it refuses to run
without a GPU."""

from __future__ import annotations

import pytest
import torch

from engine.core.catalog import load_model
from engine.runtime.llm import LLM
from engine.tools import bench_mixed
from engine.tools.bench_mixed import Composition


def test_mixed_plan_is_decodes_then_a_chunk_over_their_own_blocks() -> None:
    llm = LLM(load_model("tiny_qwen3"), dtype="float32", device="cpu", max_model_len=128)
    plan = bench_mixed.mixed_plan(Composition(2, 40, 30, 33), block_size=16)
    host = llm.model_runner.prepare_inputs(plan.scheduled).host
    assert host.num_decodes == 2 and host.num_tokens == 32
    assert host.seq_lens == [40, 40, 63]
    assert host.query_start_loc == [0, 1, 2, 32]
    # decode blocks 0-2 and 3-5, the chunk's 6-9: its first new token is its 34th
    assert host.slot_mapping[:3].tolist() == [2 * 16 + 7, 5 * 16 + 7, 6 * 16 + 33]
    assert all(t is not None for t in llm.model_runner.execute_model(plan))


def test_every_composition_fits_the_default_graphs() -> None:
    from engine.core.shapes import token_buckets

    largest = token_buckets(4096)[-1]
    assert all(0 < c.num_tokens <= largest for c in bench_mixed.COMPOSITIONS)
    assert len(set(bench_mixed.COMPOSITIONS)) == len(bench_mixed.COMPOSITIONS)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_refuses_without_a_gpu() -> None:
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        bench_mixed.main([])
