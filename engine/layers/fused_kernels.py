"""Fused Triton kernels for the decoder's elementwise work: (residual add +) RMSNorm, RoPE,
SiLU-and-mul. One launch each instead of five to ten small torch kernels per call.

Each kernel rounds to the activation dtype where the torch code does (an op on bf16 tensors
computes in float32 and rounds its result), so it reproduces the reference path up to the
float32 summation order of the norm.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, out_ptr, res_out_ptr, w_ptr, n_cols, inner,
                     stride_outer, stride_inner, stride_res, eps,
                     HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    dtype = out_ptr.dtype.element_ty
    src = x_ptr + (row // inner) * stride_outer + (row % inner) * stride_inner
    x = tl.load(src + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        res = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0).to(tl.float32)
        x = (x + res).to(dtype).to(tl.float32)
        tl.store(res_out_ptr + row * n_cols + cols, x.to(dtype), mask=mask)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / n_cols + eps)
    normed = (x * rstd).to(dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * n_cols + cols, (w * normed).to(dtype), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x: [..., N] (the last dim contiguous; [T, heads, N] views of qkv work) -> (norm(x +
    residual), x + residual); residual is [rows, N] with rows = x.numel() // N."""
    n = x.shape[-1]
    rows = x.numel() // n
    inner = x.shape[-2] if x.dim() == 3 else 1
    outer_stride = x.stride(0)
    inner_stride = x.stride(-2) if x.dim() == 3 else 0
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(out) if residual is not None else None
    if rows:
        _rms_norm_kernel[(rows,)](
            x, residual if residual is not None else x, out,
            res_out if res_out is not None else out, weight, n, inner, outer_stride,
            inner_stride, residual.stride(0) if residual is not None else 0, eps,
            HAS_RES=residual is not None, BLOCK=triton.next_power_of_2(n))
    return out, res_out


@triton.jit
def _rotary_kernel(x_ptr, out_ptr, cos_ptr, sin_ptr, pos_ptr, num_heads, stride_t, stride_h,
                   HALF: tl.constexpr, HEADS: tl.constexpr):
    token = tl.program_id(0)
    pos = tl.load(pos_ptr + token)
    dtype = out_ptr.dtype.element_ty
    j = tl.arange(0, HALF)
    heads = tl.arange(0, HEADS)
    mask = (heads < num_heads)[:, None]
    cos = tl.load(cos_ptr + pos * HALF + j).to(dtype).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + pos * HALF + j).to(dtype).to(tl.float32)[None, :]
    src = x_ptr + token * stride_t + heads[:, None] * stride_h + j[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    a = (x1 * cos).to(dtype).to(tl.float32) - (x2 * sin).to(dtype).to(tl.float32)
    b = (x2 * cos).to(dtype).to(tl.float32) + (x1 * sin).to(dtype).to(tl.float32)
    dst = out_ptr + token * num_heads * 2 * HALF + heads[:, None] * 2 * HALF + j[None, :]
    tl.store(dst, a.to(dtype), mask=mask)
    tl.store(dst + HALF, b.to(dtype), mask=mask)


def rotary(x: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor,
           positions: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim] (the last dim contiguous) -> rotated, contiguous."""
    tokens, heads, head_dim = x.shape
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if tokens:
        _rotary_kernel[(tokens,)](x, out, cos_cache, sin_cache, positions, heads,
                                  x.stride(0), x.stride(1), HALF=head_dim // 2,
                                  HEADS=triton.next_power_of_2(heads))
    return out


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, n_cols, stride_x, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    dtype = out_ptr.dtype.element_ty
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    tl.store(out_ptr + row * n_cols + cols, (act * up).to(dtype), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2 * I] = [gate | up] -> silu(gate) * up, [T, I]."""
    rows, n = x.shape[0], x.shape[1] // 2
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(n))
    if rows:
        _silu_and_mul_kernel[(rows, triton.cdiv(n, block))](x, out, n, x.stride(0), BLOCK=block)
    return out


@triton.jit
def _gumbel_argmax_kernel(logits_ptr, inv_temp_ptr, noise_ptr, seed_ptr, best_ptr, col_ptr,
                          vocab, stride, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Program (row, chunk): the best score of CHUNK columns and its column."""
    row, chunk = tl.program_id(0), tl.program_id(1)
    inv_temp = tl.load(inv_temp_ptr + row)
    noise = tl.load(noise_ptr + row)
    seed = tl.load(seed_ptr + row)
    lanes = tl.arange(0, BLOCK)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_col = tl.zeros([BLOCK], tl.int32)
    for start in range(chunk * CHUNK, chunk * CHUNK + CHUNK, BLOCK):
        cols = start + lanes
        mask = cols < vocab
        x = tl.load(logits_ptr + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
        gumbel = -tl.log(-tl.log(tl.rand(seed, cols)))
        score = tl.where(mask, x * inv_temp + noise * gumbel, float("-inf"))
        better = score > best
        best = tl.where(better, score, best)
        best_col = tl.where(better, cols, best_col)
    lane = tl.argmax(best, 0)
    out = row * tl.num_programs(1) + chunk
    tl.store(best_ptr + out, tl.max(best, 0))
    tl.store(col_ptr + out, tl.sum(tl.where(lanes == lane, best_col, 0), 0))


def gumbel_argmax(logits: torch.Tensor, inv_temperature: torch.Tensor,
                  seeds: torch.Tensor, block: int = 1024, noise: torch.Tensor | None = None,
                  chunk: int | None = None) -> torch.Tensor:
    """One token per row, drawn from softmax(logits * inv_temperature) by the Gumbel-max
    trick, the noise from Philox keyed by the row's seed and scaled by `noise` (0: the
    row's argmax). The vocabulary is split into chunks, each reduced by its own program, so
    a few rows still fill the GPU; the chunks' winners are then compared."""
    rows, vocab = logits.shape
    chunk = chunk or 4 * block
    num_chunks = triton.cdiv(vocab, chunk)
    if noise is None:
        noise = torch.ones(rows, device=logits.device)
    best = torch.empty(rows, num_chunks, dtype=torch.float32, device=logits.device)
    cols = torch.empty(rows, num_chunks, dtype=torch.int32, device=logits.device)
    if rows:
        _gumbel_argmax_kernel[(rows, num_chunks)](logits, inv_temperature, noise, seeds, best,
                                                  cols, vocab, logits.stride(0), CHUNK=chunk,
                                                  BLOCK=block)
    return cols.gather(1, best.argmax(dim=1, keepdim=True)).squeeze(1).long()
