"""Int8 weight-only quantization (AbsMax per output channel): the codes, the W8A16 Triton
kernel against the dequantized weights, the exact weight bytes the twin predicts, and the
tiny models end to end on the CPU.

Without a GPU the kernel runs under TRITON_INTERPRET=1 in float32 (and bf16 on a GPU).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from engine.core.catalog import load_model  # noqa: E402
from engine.core.config import ConfigError, EngineConfig  # noqa: E402
from engine.core.sequence import SamplingParams  # noqa: E402
from engine.layers.kernels.int8_matmul import (  # noqa: E402
    MAX_SPLIT_K,
    split_k,
    tile_config,
    w8a16_matmul,
)
from engine.layers.linear import Linear  # noqa: E402
from engine.layers.quantization import INT8_MAX, absmax_quantize, dequantize  # noqa: E402
from engine.runtime import loader  # noqa: E402
from engine.runtime.llm import LLM  # noqa: E402
from tests.engine.hf_tiny import hf_logits, hf_model, save_hf, tiny_model_config  # noqa: E402
from tests.engine.tiny_engine import engine_beside_twin  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.bfloat16] if CUDA else [torch.float32]
# The int8 tiny models against HF's float32 logits (prompts of 1 to 200 tokens, logits up to
# ~4): measured max |error| 0.20 (qwen3), 0.14 (llama3), relative L2 error per row 6.1 % and
# 4.7 %. Each projection alone is off by ~0.6 % (relative L2); two random layers with
# randomised norms amplify it.
LOGIT_ATOL = 0.3
LOGIT_REL = 0.08


def randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


# -- configuration -----------------------------------------------------------------------------

def test_quantization_and_kv_cache_dtype_are_validated() -> None:
    with pytest.raises(ConfigError, match=r"^quantization='int4' is invalid: must be one of "
                                          r"none, int8$"):
        EngineConfig(quantization="int4").validate()
    with pytest.raises(ConfigError, match=r"^kv_cache_dtype='fp16' is invalid: must be one of "
                                          r"auto, fp8$"):
        EngineConfig(kv_cache_dtype="fp16").validate()
    assert EngineConfig().kv_dtype == "bfloat16"
    assert EngineConfig(dtype="float32", kv_cache_dtype="fp8").kv_dtype == "float8_e4m3fn"


# -- AbsMax ------------------------------------------------------------------------------------

def test_absmax_codes_span_the_int8_range_row_by_row() -> None:
    w = randn(6, 40, seed=0, scale=0.05)
    w[2] = 0.0  # an all-zero row
    w[3, 7] = -1.0  # one outlier: only its own row's scale grows
    codes, scale = absmax_quantize(w)
    assert codes.dtype == torch.int8 and scale.dtype == torch.float32
    assert scale.shape == (6,)
    assert codes.abs().amax(dim=1).tolist() == [INT8_MAX] * 2 + [0] + [INT8_MAX] * 3
    assert codes[3, 7] == -INT8_MAX and scale[3] == pytest.approx(1.0 / INT8_MAX)
    error = (dequantize(codes, scale) - w).abs()
    assert (error <= scale[:, None] * 0.5 * (1 + 1e-5)).all()  # round to nearest
    assert torch.equal(dequantize(codes, scale)[2], torch.zeros(40))


# -- the W8A16 kernel --------------------------------------------------------------------------

SMALL_TILES = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("m", "split"), [(1, 1), (7, 4), (19, 2), (40, None)])
def test_w8a16_kernel_equals_the_dequantized_matmul(m: int, split: int | None,
                                                    dtype: torch.dtype) -> None:
    """Ragged shapes (N, K not multiples of the tiles), K split or not: the same products as
    x @ dequantized W^T, up to float32 summation order."""
    codes, scale = absmax_quantize(randn(72, 200, seed=1, scale=0.1))
    x = randn(m, 200, seed=2 + m).to(DEVICE, dtype)
    out = w8a16_matmul(x, codes.to(DEVICE), scale.to(DEVICE), split=split, **SMALL_TILES)
    expected = x.float() @ dequantize(codes, scale).to(DEVICE).T
    assert out.dtype == dtype and out.shape == (m, 72)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)


def test_w8a16_kernel_takes_strided_rows_and_leading_dims() -> None:
    codes, scale = absmax_quantize(randn(40, 64, seed=3))
    wide = randn(5, 96, seed=4).to(DEVICE)
    x = wide[:, 16:80]  # rows of stride 96
    expected = x @ dequantize(codes, scale).to(DEVICE).T
    torch.testing.assert_close(w8a16_matmul(x, codes.to(DEVICE), scale.to(DEVICE),
                                            **SMALL_TILES), expected, atol=1e-5, rtol=1e-5)
    batched = w8a16_matmul(x.reshape(5, 1, 64), codes.to(DEVICE), scale.to(DEVICE),
                           **SMALL_TILES)
    assert batched.shape == (5, 1, 40)
    assert w8a16_matmul(x[:0], codes.to(DEVICE), scale.to(DEVICE)).shape == (0, 40)


def test_decode_shapes_split_k_and_prefill_shapes_do_not() -> None:
    """Qwen3-0.6B's projections: a few decode rows fill the GPU only with K split; the split
    is a function of the shape alone (a CUDA graph's bucket always launches the same)."""
    shapes = {"qkv": (4096, 1024), "o": (1024, 2048), "gate_up": (6144, 1024),
              "down": (1024, 3072)}
    for n, k in shapes.values():
        splits = split_k(1, n, k, tile_config(1))
        assert splits > 1 and splits & (splits - 1) == 0 and splits <= MAX_SPLIT_K
        assert k // splits >= 2 * tile_config(1)["BLOCK_K"]
        assert split_k(8192, n, k, tile_config(8192)) == 1


# -- the model ---------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["qwen3", "llama3"])
def saved(request: pytest.FixtureRequest,
          tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path]:
    hf = hf_model(request.param)
    return hf, save_hf(hf, tmp_path_factory.mktemp(request.param))


@torch.no_grad()
def dense_logits(model: torch.nn.Module, token_ids: list[int]) -> torch.Tensor:
    ids = torch.tensor(token_ids)
    return model.compute_logits(model(ids, torch.arange(len(ids)))).float()


def test_only_the_decoder_projections_are_quantized(saved: tuple) -> None:
    _, path = saved
    model = loader.load_model(path, "float32", "cpu", quantization="int8")
    linears = {name: m for name, m in model.named_modules() if isinstance(m, Linear)}
    assert linears["lm_head"].weight.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.float32
    quantized = [name for name, m in linears.items() if m.weight.dtype == torch.int8]
    assert len(quantized) == 4 * model.config.num_hidden_layers  # qkv, o, gate_up, down
    assert all(linears[n].weight_scale.shape == (linears[n].out_features,) for n in quantized)


def test_int8_model_is_the_model_of_its_dequantized_weights(saved: tuple) -> None:
    """The int8 path computes exactly the float32 model whose weights are the dequantized
    codes: any error against HF is quantization error, not a wrong matmul."""
    _, path = saved
    quantized = loader.load_model(path, "float32", "cpu", quantization="int8")
    reference = loader.load_model(path, "float32", "cpu")
    with torch.no_grad():
        for name, layer in reference.named_modules():
            if isinstance(layer, Linear) and name != "lm_head":
                layer.weight.copy_(dequantize(*absmax_quantize(layer.weight)))
    for ids in ([5], list(range(3, 40))):
        torch.testing.assert_close(dense_logits(quantized, ids), dense_logits(reference, ids),
                                   atol=1e-4, rtol=1e-4)


def test_int8_logits_stay_close_to_hf(saved: tuple) -> None:
    hf, path = saved
    model = loader.load_model(path, "float32", "cpu", quantization="int8")
    gen = torch.Generator().manual_seed(1)
    for n in (1, 7, 33, 200):
        ids = torch.randint(0, 512, (n,), generator=gen).tolist()
        ours, theirs = dense_logits(model, ids), hf_logits(hf, ids)
        assert (ours - theirs).abs().max() < LOGIT_ATOL
        assert ((ours - theirs).norm(dim=-1) / theirs.norm(dim=-1)).max() < LOGIT_REL


def test_int8_generation_runs_end_to_end_on_the_cpu(saved: tuple) -> None:
    """LLM.generate (chunked prefill, prefix hits, paged cache) with int8 weights: the greedy
    tokens of a dense forward of the same int8 model, token by token."""
    _, path = saved
    llm = LLM(str(path), dtype="float32", device="cpu", quantization="int8", block_size=4,
              max_num_batched_tokens=32, max_model_len=128, num_gpu_blocks_override=100)
    prefix = torch.randint(1, 512, (20,), generator=torch.Generator().manual_seed(2)).tolist()
    prompts = [prefix + [7 + i, 9] for i in range(3)]
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=5,
                                                   ignore_eos=True))
    assert sum(o.metrics.num_cached_tokens for o in outputs) > 0
    model = llm.model_runner.model
    for prompt, output in zip(prompts, outputs, strict=True):
        ids = list(prompt)
        for _ in range(5):
            ids.append(int(dense_logits(model, ids)[-1].argmax()))
        assert output.output_token_ids == ids[len(prompt):]


@pytest.mark.parametrize("kind", ["qwen3", "llama3"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_measured_weight_bytes_equal_the_formula(kind: str, dtype: str) -> None:
    """Tied (qwen3) and untied (llama3) embeddings: int8 codes + float32 scales + the rest in
    the model dtype, byte for byte, and the twin predicts the engine's figure."""
    config = tiny_model_config(kind)
    model = loader.build_model(config, dtype, "cpu", quantization="int8")
    measured = sum(p.numel() * p.element_size() for p in model.parameters())
    assert measured == config.weight_bytes(dtype, "int8")
    assert measured < config.weight_bytes(dtype)


def test_engine_and_twin_weight_terms_agree_for_int8() -> None:
    _, report, predicted = engine_beside_twin(quantization="int8")
    assert report["weights_bytes"] == predicted.terms.weights_bytes
    assert report["num_blocks"] == predicted.num_blocks and report["quantization"] == "int8"


def test_qwen3_8b_int8_weights_in_numbers() -> None:
    """Qwen3-8B: 6.95 G linear weights become one byte each (+ 4-byte scales per output
    channel); the 2 x 0.62 G embedding and LM head stay bf16."""
    qwen = load_model("qwen3_8b")
    weights, channels = qwen.linear_sizes()
    assert weights == 36 * (4096 * (4096 + 2 * 1024) + 4096 * 4096 + 3 * 4096 * 12288)
    assert channels == 36 * ((4096 + 2 * 1024) + 4096 + 2 * 12288 + 4096)
    bf16, int8 = qwen.weight_bytes("bfloat16"), qwen.weight_bytes("bfloat16", "int8")
    assert bf16 - int8 == weights - 4 * channels
    assert 0.55 < int8 / bf16 < 0.6


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("rows", [1, 16, 200])
def test_w8a16_kernel_replays_in_a_cuda_graph(rows: int) -> None:
    """Qwen3-0.6B's qkv_proj in bf16, K split for the decode row counts: captured once,
    replayed over new inputs (no host sync, the partial sums in the graph's pool)."""
    codes, scale = (t.cuda() for t in absmax_quantize(randn(4096, 1024, seed=5, scale=0.02)))
    x = torch.zeros(rows, 1024, device="cuda", dtype=torch.bfloat16)
    w8a16_matmul(x, codes, scale)  # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = w8a16_matmul(x, codes, scale)
    for seed in (6, 7):
        x.copy_(randn(rows, 1024, seed=seed).to("cuda", torch.bfloat16))
        graph.replay()
        expected = x.float() @ dequantize(codes, scale).T
        torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)
