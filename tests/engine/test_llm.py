"""LLM end to end on CPU: greedy tokens equal HF transformers' with the same weights.

Each case exercises one mechanism and checks that it really happened (prefix hits,
chunked prefill, preemption), so a pass cannot come from the mechanism being skipped.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.core.memory import MaxModelLenTooLargeError, NoCacheMemoryError
from engine.core.sequence import SamplingParams
from engine.runtime.llm import LLM
from tests.engine.hf_tiny import hf_logits, hf_model, save_hf

MAX_TOKENS = 6
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


def random_tokens(n: int, seed: int) -> list[int]:
    return torch.randint(3, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


SYSTEM = random_tokens(70, seed=1)
PROMPTS = ([SYSTEM + random_tokens(3 + 5 * i, seed=10 + i) for i in range(5)]
           + [random_tokens(n, seed=20 + n) for n in (1, 17, 64, 90)])


@pytest.fixture(scope="module", params=["qwen3", "llama3"])
def model(request, tmp_path_factory) -> tuple[Path, list[list[int]]]:
    """An HF model saved with save_pretrained, and its greedy continuations of PROMPTS."""
    hf = hf_model(request.param)
    path = save_hf(hf, tmp_path_factory.mktemp(request.param))
    expected = []
    for prompt in PROMPTS:
        ids = list(prompt)
        for _ in range(MAX_TOKENS):
            ids.append(int(hf_logits(hf, ids)[-1].argmax()))
        expected.append(ids[len(prompt):])
    return path, expected


CASES = {
    "block_size_1": dict(block_size=1),
    "block_size_16": dict(block_size=16),
    "block_size_64": dict(block_size=64),
    "no_prefix_caching": dict(block_size=16, enable_prefix_caching=False),
    "chunked_prefill": dict(block_size=8, max_num_batched_tokens=16),
    "preemption": dict(block_size=4, num_gpu_blocks_override=40, max_num_seqs=9),
    "prefill_first": dict(block_size=8, policy="prefill_first"),
}


def generate(path: Path, **engine_args) -> tuple[LLM, list]:
    args = dict(dtype="float32", device="cpu", max_model_len=128, max_num_seqs=4,
                max_num_batched_tokens=256) | engine_args
    llm = LLM(str(path), **args)
    return llm, llm.generate(PROMPTS, GREEDY)


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_tokens_equal_hf(model, case: str) -> None:
    path, expected = model
    llm, outputs = generate(path, **CASES[case])
    assert [o.output_token_ids for o in outputs] == expected
    assert all(o.finish_reason == "length" for o in outputs)
    check_mechanism(case, llm, outputs)


def check_mechanism(case: str, llm: LLM, outputs: list) -> None:
    cached = sum(o.metrics.num_cached_tokens for o in outputs)
    if llm.config.enable_prefix_caching:
        shared = len(SYSTEM) // llm.config.block_size * llm.config.block_size
        assert cached >= 4 * shared > 0, "the shared system prompt should hit the prefix cache"
    else:
        assert cached == 0
    steps = llm.step_records
    if case == "chunked_prefill":
        assert max(s.num_batched_tokens for s in steps) == 16
        assert any(s.num_prefill_tokens and s.num_decode_seqs for s in steps)
    if case == "preemption":
        assert sum(o.metrics.num_preemptions for o in outputs) > 0
    if case == "prefill_first":
        assert all(not (s.num_prefill_tokens and s.num_decode_seqs) for s in steps)


def test_bad_prompts_rejected_while_others_finish(model) -> None:
    path, expected = model
    llm = LLM(str(path), dtype="float32", device="cpu", max_model_len=128, block_size=16)
    outputs = llm.generate([PROMPTS[0], [], list(range(3, 132)), PROMPTS[1]], GREEDY)
    assert outputs[0].output_token_ids == expected[0]
    assert outputs[3].output_token_ids == expected[1]
    assert outputs[1].finish_reason == "rejected: empty prompt"
    assert "longer than max_model_len=128" in outputs[2].finish_reason
    assert outputs[1].metrics.rejected and outputs[2].metrics.rejected
    assert outputs[2].output_token_ids == []


def test_too_few_blocks_fails_at_startup_like_vllm(model) -> None:
    path, _ = model
    with pytest.raises(MaxModelLenTooLargeError, match=r"max seq len \(128\).*estimated "
                       r"maximum model length is 64"):
        LLM(str(path), dtype="float32", device="cpu", max_model_len=128, block_size=16,
            num_gpu_blocks_override=4)


def test_memory_budget_path_on_cpu(model) -> None:
    path, _ = model
    with pytest.raises(NoCacheMemoryError, match="No available memory for the cache blocks"):
        LLM(str(path), dtype="float32", device="cpu", max_model_len=128,
            cpu_memory_gib=0.001, gpu_memory_utilization=0.5)
    llm = LLM(str(path), dtype="float32", device="cpu", max_model_len=128,
              cpu_memory_gib=0.25, gpu_memory_utilization=0.5)
    report = llm.memory_report()
    for term in ("total_bytes", "budget_bytes", "weights_bytes", "activation_peak_bytes",
                 "non_torch_bytes", "cuda_graph_bytes", "kv_cache_bytes", "num_blocks"):
        assert term in report
    assert report["budget_bytes"] == int(0.25 * 2**30 * 0.5)
    assert report["num_blocks"] == report["kv_cache_bytes"] // report["bytes_per_block"]
    assert report["weights_bytes"] == llm.model_config.weight_bytes("float32")


def test_online_add_request_and_step(model) -> None:
    path, expected = model
    engine = LLM(str(path), dtype="float32", device="cpu", max_model_len=128)
    first = engine.add_request(PROMPTS[2], GREEDY, request_id="a")
    engine.step()
    second = engine.add_request(PROMPTS[3], GREEDY, request_id="b")
    while engine.has_unfinished():
        engine.step()
    assert first.output_token_ids == expected[2] and second.output_token_ids == expected[3]
    records = {r.request_id: r for r in engine.request_records()}
    assert records["a"].first_token_s <= records["a"].finish_s
    assert records["b"].arrival_s >= records["a"].first_scheduled_s
