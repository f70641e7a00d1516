"""Fused Triton kernels (RMSNorm, RoPE, SiLU-and-mul) against the layers' torch code.

Without a GPU they run under TRITON_INTERPRET=1 in float32; on a GPU also in bfloat16, where
the kernels round where torch rounds, so the results agree to the last bit or one bf16 ulp.
"""

from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from engine.layers.activation import SiluAndMul  # noqa: E402
from engine.layers.kernels import dispatch  # noqa: E402
from engine.layers.kernels.elementwise import rms_norm, rotary, silu_and_mul  # noqa: E402
from engine.layers.norm import RMSNorm  # noqa: E402
from engine.layers.rotary import RotaryEmbedding  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.bfloat16] if CUDA else [torch.float32]


@pytest.fixture(autouse=True)
def torch_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """The layers' own forward is the reference: never let them take the fused path here."""
    monkeypatch.setattr(dispatch, "ENABLED", False)


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    if actual.dtype == torch.bfloat16:
        torch.testing.assert_close(actual.float(), expected.float(), atol=1e-2, rtol=1e-2)
    else:
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def randn(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_with_and_without_residual(dtype: torch.dtype) -> None:
    norm = RMSNorm(96, eps=1e-6).to(DEVICE, dtype)
    with torch.no_grad():
        norm.weight.copy_(randn(96, dtype=dtype, seed=1))
    x, residual = randn(7, 96, dtype=dtype, seed=2), randn(7, 96, dtype=dtype, seed=3)
    close(rms_norm(x, norm.weight, 1e-6)[0], norm(x))
    out, summed = rms_norm(x, norm.weight, 1e-6, residual)
    expected, expected_sum = norm.forward_with_residual(x, residual)
    close(out, expected)
    close(summed, expected_sum)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_over_heads_of_a_strided_qkv_view(dtype: torch.dtype) -> None:
    """Qwen3's q_norm/k_norm: one norm per head of a [T, heads, head_dim] slice of qkv."""
    qkv = randn(5, 3 * 4 * 16, dtype=dtype, seed=4)
    k = qkv[:, 64:128].view(5, 4, 16)
    norm = RMSNorm(16).to(DEVICE, dtype)
    close(rms_norm(k, norm.weight, 1e-6)[0], norm(k))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_equals_the_reference(dtype: torch.dtype) -> None:
    rope = RotaryEmbedding(32, 512, 10000.0).to(DEVICE)
    qkv = randn(6, (4 + 2 + 2) * 32, dtype=dtype, seed=5)
    q, k = qkv[:, :128].view(6, 4, 32), qkv[:, 128:192].view(6, 2, 32)
    positions = torch.tensor([0, 1, 7, 100, 511, 3], device=DEVICE)
    expected_q, expected_k = rope(positions, q, k)
    close(rotary(q, rope.cos_cache, rope.sin_cache, positions), expected_q)
    close(rotary(k, rope.cos_cache, rope.sin_cache, positions), expected_k)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_equals_the_reference(dtype: torch.dtype) -> None:
    x = randn(9, 2 * 1500, dtype=dtype, seed=6)  # 1500 > one 1024-wide block: two programs
    close(silu_and_mul(x), SiluAndMul()(x))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qk_norm", [True, False])
def test_qk_norm_rope_equals_the_attention_layers_reference(dtype: torch.dtype,
                                                            qk_norm: bool) -> None:
    """One launch for q_norm, k_norm and RoPE of q and k, read straight from qkv rows."""
    from engine.core.config import ModelConfig
    from engine.models.llama import LlamaAttention

    config = ModelConfig(name="t", architecture="Qwen3ForCausalLM", hidden_size=64,
                         num_attention_heads=6, num_key_value_heads=2, head_dim=32,
                         num_hidden_layers=1, intermediate_size=64, vocab_size=64,
                         rope_theta=10000.0, max_position_embeddings=512)
    rope = RotaryEmbedding(32, 512, 10000.0).to(DEVICE)
    layer = LlamaAttention(config, rope, qk_norm=qk_norm).to(DEVICE, dtype)
    if qk_norm:
        with torch.no_grad():
            layer.q_norm.weight.copy_(randn(32, dtype=dtype, seed=8))
            layer.k_norm.weight.copy_(randn(32, dtype=dtype, seed=9))
    qkv = randn(5, (6 + 2 + 2) * 32, dtype=dtype, seed=7)
    positions = torch.tensor([0, 1, 9, 300, 511], device=DEVICE)
    expected_q, expected_k = layer._qk(positions, qkv)
    q, k = layer._fused_qk(positions, qkv)
    assert q.shape == (5, 6, 32) and k.shape == (5, 2, 32)
    close(q, expected_q)
    close(k, expected_k)


@pytest.mark.parametrize("dtype", DTYPES)
def test_qk_norm_rope_writes_the_cache_as_store_kv_does(dtype: torch.dtype) -> None:
    """The fused store puts the rotated K and the V of each token at its slot; slot -1
    (a padded row) writes nothing."""
    from engine.layers.attention import store_kv
    from engine.layers.kernels.elementwise import qk_norm_rope

    rope = RotaryEmbedding(32, 512, 10000.0).to(DEVICE)
    qkv = randn(4, (6 + 2 + 2) * 32, dtype=dtype, seed=10)
    positions = torch.tensor([3, 4, 5, 6], device=DEVICE)
    slots = torch.tensor([5, -1, 0, 11], device=DEVICE)
    weights = randn(32, dtype=dtype, seed=11), randn(32, dtype=dtype, seed=12)
    caches = [randn(3, 4, 2, 32, dtype=dtype, seed=13 + i) for i in range(2)]
    expected = [c.clone() for c in caches]
    q, k = qk_norm_rope(qkv, 6, 2, rope.cos_cache, rope.sin_cache, positions, weights, 1e-6,
                        (*caches, slots))
    q_only, k_only = qk_norm_rope(qkv, 6, 2, rope.cos_cache, rope.sin_cache, positions,
                                  weights, 1e-6)
    assert torch.equal(q, q_only) and torch.equal(k, k_only)
    store_kv(k, qkv[:, 256:].view(4, 2, 32), *expected, slots)
    assert torch.equal(caches[0], expected[0]) and torch.equal(caches[1], expected[1])


def test_layers_take_the_fused_path_only_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dispatch, "ENABLED", True)
    assert dispatch.use_triton(torch.zeros(1, device=DEVICE)) == CUDA
    assert not dispatch.use_triton(torch.zeros(1))


def test_gumbel_argmax_samples_the_tempered_softmax() -> None:
    from engine.layers.kernels.elementwise import gumbel_argmax

    rows = 100_000 if CUDA else 300  # the interpreter runs ~20 ms per program
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5, 3.0, -2.0, 1.5] * 3, device=DEVICE)
    logits = logits[None, :].expand(rows, -1).contiguous()  # 24 columns: two blocks of 16
    seeds = torch.arange(rows, device=DEVICE) * 7919 + 1
    inv_temp = torch.full((rows,), 1 / 0.7, device=DEVICE)
    tokens = gumbel_argmax(logits, inv_temp, seeds, block=16)
    assert torch.equal(tokens, gumbel_argmax(logits, inv_temp, seeds, block=16))
    freq = torch.bincount(tokens % 8, minlength=8).float().cpu() / rows
    expected = torch.softmax(logits[0, :8].cpu() / 0.7, 0)
    atol = 0.006 if CUDA else 0.1  # ~4 sigma of a frequency near 0.4
    torch.testing.assert_close(freq, expected, atol=atol, rtol=0)
    assert set((tokens // 8).tolist()) == {0, 1, 2}  # columns of both blocks are drawn
    greedy = gumbel_argmax(logits[:50], torch.full((50,), 1e4, device=DEVICE), seeds[:50], 16)
    assert set(greedy.tolist()) <= {5, 13, 21}  # a tiny temperature takes the best logit


def test_gumbel_argmax_is_independent_of_the_vocab_split_and_noise_free_rows_are_greedy(
) -> None:
    from engine.layers.kernels.elementwise import gumbel_argmax

    rows = 40
    logits = randn(rows, 100, dtype=torch.float32, seed=3).to(DEVICE)
    seeds = torch.arange(rows, device=DEVICE) * 31 + 7
    inv_temp = torch.full((rows,), 1.0, device=DEVICE)
    noise = torch.tensor([0.0, 1.0] * (rows // 2), device=DEVICE)
    one_chunk = gumbel_argmax(logits, inv_temp, seeds, block=16, noise=noise, chunk=128)
    two = gumbel_argmax(logits, inv_temp, seeds, block=16, noise=noise, chunk=64)
    assert torch.equal(one_chunk, two)  # Philox noise is keyed by column, not by program
    assert torch.equal(two[0::2], logits[0::2].argmax(dim=1))
    assert not torch.equal(two[1::2], logits[1::2].argmax(dim=1))
    with pytest.raises(ValueError, match="chunk"):
        gumbel_argmax(logits, inv_temp, seeds, block=16, chunk=48)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_sampler_fused_path_keeps_seeded_requests_batch_independent(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.core.sequence import SamplingParams
    from engine.layers.sampler import Sampler

    monkeypatch.setattr(dispatch, "ENABLED", True)
    logits = randn(4, 151_936, dtype=torch.float32, seed=7)
    seeded, hot, greedy = (SamplingParams(temperature=0.8, seed=5),
                           SamplingParams(temperature=0.8), SamplingParams(temperature=0.0))

    def draw(rows: list[int], params: list[SamplingParams]) -> list[int]:
        gens = [torch.Generator("cuda").manual_seed(5) if p.seed else None for p in params]
        return Sampler(torch.Generator("cuda").manual_seed(0))(logits[rows], params,
                                                                gens).tolist()

    alone = draw([0], [seeded])
    mixed = draw([1, 0, 2, 3], [hot, seeded, greedy, hot])
    assert mixed[1] == alone[0]
    assert mixed[2] == int(logits[2].argmax())
