"""The fp8 (e4m3) KV cache: the store kernels round as torch does, the paged decode and mixed
attention kernels read what they stored, the cache gets twice the blocks of bf16, and the
tiny models stay close to HF end to end.

Without a GPU the Triton kernels run under TRITON_INTERPRET=1 in float32.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from engine.core.catalog import load_model  # noqa: E402
from engine.core.config import EngineConfig, GiB  # noqa: E402
from engine.core.memory import MemoryTerms, decide_num_blocks  # noqa: E402
from engine.core.sequence import SamplingParams  # noqa: E402
from engine.layers.attention import store_kv  # noqa: E402
from engine.layers.kernels.elementwise import qk_norm_rope  # noqa: E402
from engine.layers.kernels.mixed_attention import mixed_attention  # noqa: E402
from engine.layers.kernels.paged_cache import paged_decode, store_kv_triton  # noqa: E402
from engine.layers.kv_quant import FP8, dequantize_kv, quantize_kv  # noqa: E402
from engine.layers.rotary import RotaryEmbedding  # noqa: E402
from tests.engine import test_mixed_attention as mixed_tests  # noqa: E402
from tests.engine import test_model_runner as runner_tests  # noqa: E402
from tests.engine.hf_tiny import hf_model, save_hf  # noqa: E402
from tests.engine.tiny_engine import engine_beside_twin  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
SCALES = (torch.tensor([0.5], device=DEVICE), torch.tensor([2.0], device=DEVICE))
# Attention over an fp8 cache against the float32 one (random K/V ~ N(0, 1), scales 0.5 and
# 2): measured relative L2 error of the output 2.4-3.9 % (K and V themselves: 2.6 %; e4m3
# keeps 3 mantissa bits).
ATTENTION_REL = 0.06
# The tiny models over an fp8 cache against HF's float32 logits (logits up to ~3.6):
# measured max |error| 0.29 (qwen3) and 0.17 (llama3) when every key comes from the cache.
LOGIT_ATOL = 0.4


def randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(
        DEVICE)


def special_values() -> torch.Tensor:
    """Every e4m3 value, the midpoints between neighbours (ties), and overflows."""
    grid = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    grid = grid[grid.isfinite()].sort().values
    mids = (grid[1:] + grid[:-1]) / 2
    return torch.cat([grid, mids, torch.tensor([500.0, -1e4, 449.0])])


def bytes_of(cache: torch.Tensor) -> torch.Tensor:
    return cache.view(torch.uint8)


# -- the store ---------------------------------------------------------------------------------

def test_store_kernel_rounds_and_saturates_like_torch() -> None:
    """Scaled, saturated at +-448 (never NaN) and rounded to nearest even, bit for bit as
    torch's cast, ties and subnormals included."""
    values = special_values()
    n = -(-values.numel() // 32) * 32
    flat = torch.zeros(n)
    flat[:values.numel()] = values
    k = flat.view(-1, 2, 16).to(DEVICE) * SCALES[0]
    v = flat.flip(0).view(-1, 2, 16).to(DEVICE) * SCALES[1]
    slots = torch.randperm(k.shape[0] + 5, generator=torch.Generator().manual_seed(0))
    slots = slots[:k.shape[0]].to(DEVICE)
    caches = [torch.zeros(k.shape[0] // 4 + 2, 4, 2, 16, dtype=FP8, device=DEVICE)
              for _ in range(4)]
    store_kv_triton(k, v, caches[0], caches[1], slots, SCALES)
    store_kv(k, v, caches[2], caches[3], slots, kv_scales=SCALES)
    assert torch.equal(bytes_of(caches[0]), bytes_of(caches[2]))
    assert torch.equal(bytes_of(caches[1]), bytes_of(caches[3]))
    assert not caches[0].float().isnan().any()
    assert caches[0].float().abs().max() == 448.0


def test_fused_qk_norm_rope_stores_fp8_like_store_kv() -> None:
    rope = RotaryEmbedding(32, 512, 10000.0).to(DEVICE)
    qkv = randn(4, (6 + 2 + 2) * 32, seed=10)
    positions = torch.tensor([3, 4, 5, 6], device=DEVICE)
    slots = torch.tensor([5, -1, 0, 11], device=DEVICE)
    weights = randn(32, seed=11), randn(32, seed=12)
    caches = [torch.zeros(3, 4, 2, 32, dtype=FP8, device=DEVICE) for _ in range(4)]
    _, k = qk_norm_rope(qkv, 6, 2, rope.cos_cache, rope.sin_cache, positions, weights, 1e-6,
                        (caches[0], caches[1], slots, *SCALES))
    store_kv(k, qkv[:, 256:].view(4, 2, 32), caches[2], caches[3], slots, kv_scales=SCALES)
    assert torch.equal(bytes_of(caches[0]), bytes_of(caches[2]))
    assert torch.equal(bytes_of(caches[1]), bytes_of(caches[3]))
    with pytest.raises(ValueError, match="fp8 KV cache needs its K and V scales"):
        store_kv_triton(k, k, caches[0], caches[1], slots)


# -- the readers -------------------------------------------------------------------------------

def quantized(cache: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the fp8 cache, what it dequantizes to in float32)."""
    fp8 = quantize_kv(cache, FP8, scale)
    return fp8, dequantize_kv(fp8, torch.float32, scale)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected.float()).norm() / expected.float().norm())


@pytest.mark.parametrize("num_splits", [1, 4])
def test_paged_decode_reads_the_fp8_cache(num_splits: int) -> None:
    """Exactly attention over the dequantized cache; within ATTENTION_REL of the float32
    cache the values came from."""
    lens = [1, 40, 129, 0]
    k_full, v_full = randn(20, 16, 2, 32, seed=1), randn(20, 16, 2, 32, seed=2)
    (k8, k_deq), (v8, v_deq) = quantized(k_full, SCALES[0]), quantized(v_full, SCALES[1])
    tables = torch.arange(20, dtype=torch.int32, device=DEVICE).flip(0)[None, :].repeat(4, 1)
    q = randn(4, 4, 32, seed=3)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)

    def decode(k: torch.Tensor, v: torch.Tensor, scales: tuple | None) -> torch.Tensor:
        return paged_decode(q, k, v, tables, seq_lens, 32 ** -0.5, num_splits=num_splits,
                            min_share=16, kv_scales=scales, BLOCK_N=16)

    out = decode(k8, v8, SCALES)
    assert out.dtype == torch.float32 and torch.equal(out[3], torch.zeros_like(out[3]))
    torch.testing.assert_close(out, decode(k_deq, v_deq, None), atol=1e-5, rtol=1e-5)
    for i, n in enumerate(lens[:3]):
        blocks = tables[i, : -(-n // 16)].long()
        k, v = (c[blocks].flatten(0, 1)[:n].transpose(0, 1) for c in (k_full, v_full))
        ref = F.scaled_dot_product_attention(q[i][:, None], k, v, scale=32 ** -0.5,
                                             enable_gqa=True)[:, 0]
        assert relative_error(out[i], ref) < ATTENTION_REL


@pytest.mark.parametrize("case", ["mixed", "chunk after a long context"])
def test_mixed_attention_reads_the_fp8_cache(case: str) -> None:
    q_lens, kv_lens = mixed_tests.CASES[case]
    step = mixed_tests.paged_step(q_lens, kv_lens, 16, 2, 32, torch.float32, seed=5)
    full = dict(step)
    step["k_cache"], deq_k = quantized(full["k_cache"], SCALES[0])
    step["v_cache"], deq_v = quantized(full["v_cache"], SCALES[1])
    q = randn(sum(q_lens), 4, 32, seed=7)
    args = (step["block_tables"], step["seq_lens"], step["query_start_loc"], 32 ** -0.5)
    out = mixed_attention(q, step["k_cache"], step["v_cache"], *args, kv_scales=SCALES,
                          BLOCK_M=16, BLOCK_N=16)
    torch.testing.assert_close(out, mixed_attention(q, deq_k, deq_v, *args, BLOCK_M=16,
                                                    BLOCK_N=16), atol=1e-5, rtol=1e-5)
    assert relative_error(out, mixed_tests.reference(q, full, 32 ** -0.5)) < ATTENTION_REL


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("num_splits", [1, 8])
def test_paged_decode_bfloat16_over_fp8_at_full_size(num_splits: int) -> None:
    """Qwen3-0.6B's attention shape (16 heads over 8 KV heads of 128), bf16 queries, the
    hardware's fp8 conversions."""
    k_full, v_full = randn(300, 16, 8, 128, seed=4), randn(300, 16, 8, 128, seed=5)
    (k8, k_deq), (v8, v_deq) = quantized(k_full, SCALES[0]), quantized(v_full, SCALES[1])
    tables = torch.randperm(300)[: 3 * 64].view(3, 64).int().cuda()
    q = randn(3, 16, 128, seed=6).bfloat16()
    seq_lens = torch.tensor([1000, 17, 1023], dtype=torch.int32, device="cuda")
    out = paged_decode(q, k8, v8, tables, seq_lens, 128 ** -0.5, num_splits=num_splits,
                       kv_scales=SCALES)
    ref = paged_decode(q, k_deq.bfloat16(), v_deq.bfloat16(), tables, seq_lens, 128 ** -0.5,
                       num_splits=num_splits)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


# -- blocks ------------------------------------------------------------------------------------

def test_an_fp8_cache_gets_twice_the_blocks_of_bf16() -> None:
    qwen = load_model("qwen3_0_6b")
    terms = MemoryTerms(80 * GiB, 0.9, qwen.weight_bytes("bfloat16"), 2 * GiB)
    bf16 = decide_num_blocks(terms, qwen, EngineConfig())
    fp8 = decide_num_blocks(terms, qwen, EngineConfig(kv_cache_dtype="fp8"))
    assert fp8.block_bytes * 2 == bf16.block_bytes == 16 * 114_688
    assert fp8.num_blocks in (2 * bf16.num_blocks, 2 * bf16.num_blocks + 1)


def test_engine_allocates_the_fp8_cache_the_twin_predicts() -> None:
    llm, report, predicted = engine_beside_twin(kv_cache_dtype="fp8")
    assert llm.model_runner.kv_cache.dtype == FP8
    assert report["kv_dtype"] == "float8_e4m3fn"
    assert report["bytes_per_block"] == predicted.block_bytes == 2 * 2 * 2 * 16 * 16 * 1
    assert report["num_blocks"] == predicted.num_blocks
    tokens = llm.generate([[5, 6, 7, 8, 9]], SamplingParams(temperature=0.0, max_tokens=4,
                                                            ignore_eos=True))
    assert len(tokens[0].output_token_ids) == 4


# -- the tiny models end to end ----------------------------------------------------------------

@pytest.fixture(scope="module", params=["qwen3", "llama3"])
def hf_saved(request: pytest.FixtureRequest,
             tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path]:
    model = hf_model(request.param)
    return model, save_hf(model, tmp_path_factory.mktemp(request.param))


def record_logits(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """Make run_mixed_batch keep each step's logits instead of checking them."""
    rows: list[torch.Tensor] = []

    def keep(runner: object, hf: object, plan: object, atol: float = 0.0) -> list:
        step = runner.prepare_inputs(plan.scheduled)
        rows.append(runner.compute_step_logits(step).float().cpu())
        return [plan.scheduled[i].seq for i in step.sample_seqs]

    monkeypatch.setattr(runner_tests, "check_step", keep)
    return rows


def test_sdpa_path_over_an_fp8_cache_is_close_to_hf(hf_saved: tuple) -> None:
    """Chunked prefill, a prefix hit and decodes, every key and value read back from the fp8
    cache (CPU: the torch reference path)."""
    runner = runner_tests.run_mixed_batch(*hf_saved, 16, DEVICE, atol=LOGIT_ATOL,
                                          kv_cache_dtype="fp8")
    assert runner.kv_cache.dtype == FP8


def test_kernels_and_sdpa_path_read_the_same_fp8_cache(hf_saved: tuple, torch_backend: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The store, mixed attention (every mixed step) and paged decode kernels against the
    torch path on the same steps: both read every key from the fp8 cache, so they agree as
    closely as the float32 runs do, far closer than either is to HF."""
    rows = record_logits(monkeypatch)
    runner_tests.run_mixed_batch(*hf_saved, 16, DEVICE, kv_cache_dtype="fp8",
                                 mixed_graphs=True, attention_backend=torch_backend)
    kernels = list(rows)
    rows.clear()
    monkeypatch.undo()
    rows = record_logits(monkeypatch)
    runner_tests.run_mixed_batch(*hf_saved, 16, DEVICE, kv_cache_dtype="fp8")
    assert len(kernels) == len(rows) == 3
    for ours, reference in zip(kernels, rows, strict=True):
        torch.testing.assert_close(ours, reference, atol=1e-4, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_bfloat16_engine_with_int8_weights_and_fp8_cache_on_cuda(hf_saved: tuple) -> None:
    """Both quantizations at once, CUDA graphs on: bf16 rounding, int8 weights and the fp8
    cache together stay within a bound of HF's float32 logits."""
    runner = runner_tests.run_mixed_batch(*hf_saved, 16, "cuda", dtype="bfloat16", atol=0.6,
                                          kv_cache_dtype="fp8", quantization="int8",
                                          mixed_graphs=True)
    assert runner.mixed.replays == 2
