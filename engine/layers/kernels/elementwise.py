"""Fused Triton kernels for the decoder's elementwise work: (residual add +) RMSNorm, RoPE,
Qwen3's q/k norm with RoPE, SiLU-and-mul. One launch each instead of five to ten small torch
kernels per call.

Each kernel rounds to the activation dtype where the torch code does (an op on bf16 tensors
computes in float32 and rounds its result), so it reproduces the reference path up to the
float32 summation order of the norm.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from engine.layers.kernels.paged_cache import scale_args, to_cache


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
def _weighted(normed, w, dtype: tl.constexpr):
    """RMSNorm's last two roundings: the normalised value, then its product with the weight."""
    return (w.to(tl.float32) * normed.to(dtype).to(tl.float32)).to(dtype).to(tl.float32)


@triton.jit
def _qk_norm_rope_kernel(qkv_ptr, q_out_ptr, k_out_ptr, q_w_ptr, k_w_ptr, cos_ptr, sin_ptr,
                         pos_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, k_scale_ptr, v_scale_ptr,
                         stride_t, eps,
                         NUM_Q: tl.constexpr, NUM_KV: tl.constexpr, HEADS: tl.constexpr,
                         KV_PAD: tl.constexpr, HALF: tl.constexpr, HAS_NORM: tl.constexpr,
                         STORE: tl.constexpr, FP8_CACHE: tl.constexpr):
    """Program t: every q and k head of token t (adjacent in its qkv row), per-head RMSNorm
    (Qwen3) then RoPE, rounded where the separate kernels round; with STORE, token t's
    rotated K and its V also go to the paged cache at slot_mapping[t] (-1: nowhere), scaled
    into an fp8 cache as `store_kv_triton` does."""
    token = tl.program_id(0)
    pos = tl.load(pos_ptr + token)
    dtype = q_out_ptr.dtype.element_ty
    j = tl.arange(0, HALF)[None, :]
    heads = tl.arange(0, HEADS)[:, None]
    mask = heads < NUM_Q + NUM_KV
    row = qkv_ptr + token * stride_t
    x1 = tl.load(row + heads * 2 * HALF + j, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(row + heads * 2 * HALF + HALF + j, mask=mask, other=0.0).to(tl.float32)
    if HAS_NORM:
        rstd = 1.0 / tl.sqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * HALF) + eps)
        is_q = heads < NUM_Q
        x1 = _weighted(x1 * rstd[:, None],
                       tl.where(is_q, tl.load(q_w_ptr + j), tl.load(k_w_ptr + j)), dtype)
        x2 = _weighted(x2 * rstd[:, None], tl.where(is_q, tl.load(q_w_ptr + HALF + j),
                                                    tl.load(k_w_ptr + HALF + j)), dtype)
    cos = tl.load(cos_ptr + pos * HALF + j).to(dtype).to(tl.float32)
    sin = tl.load(sin_ptr + pos * HALF + j).to(dtype).to(tl.float32)
    a = ((x1 * cos).to(dtype).to(tl.float32) - (x2 * sin).to(dtype).to(tl.float32)).to(dtype)
    b = ((x2 * cos).to(dtype).to(tl.float32) + (x1 * sin).to(dtype).to(tl.float32)).to(dtype)
    q_dst = q_out_ptr + (token * NUM_Q + heads) * 2 * HALF + j
    k_dst = k_out_ptr + (token * NUM_KV + heads - NUM_Q) * 2 * HALF + j
    dst = tl.where(heads < NUM_Q, q_dst, k_dst)
    tl.store(dst, a, mask=mask)
    tl.store(dst + HALF, b, mask=mask)
    if STORE:
        slot = tl.load(slot_ptr + token).to(tl.int64)
        width = NUM_KV * 2 * HALF
        k_mask = (heads >= NUM_Q) & (heads < tl.where(slot >= 0, NUM_Q + NUM_KV, 0))
        k_slot = k_cache_ptr + slot * width + (heads - NUM_Q) * 2 * HALF + j
        tl.store(k_slot, to_cache(a, k_scale_ptr, k_cache_ptr, FP8_CACHE), mask=k_mask)
        tl.store(k_slot + HALF, to_cache(b, k_scale_ptr, k_cache_ptr, FP8_CACHE), mask=k_mask)
        cols = tl.arange(0, KV_PAD * 2 * HALF)
        v_mask = cols < tl.where(slot >= 0, width, 0)
        v = tl.load(row + (NUM_Q + NUM_KV) * 2 * HALF + cols, mask=v_mask)
        tl.store(v_cache_ptr + slot * width + cols,
                 to_cache(v, v_scale_ptr, v_cache_ptr, FP8_CACHE), mask=v_mask)


def qk_norm_rope(qkv: torch.Tensor, num_heads: int, num_kv_heads: int,
                 cos_cache: torch.Tensor, sin_cache: torch.Tensor, positions: torch.Tensor,
                 norm_weights: tuple[torch.Tensor, torch.Tensor] | None, eps: float,
                 store: tuple[torch.Tensor | None, ...] | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """qkv: [T, (H + 2 KVH) * D] rows, the last dim contiguous -> q [T, H, D], k [T, KVH, D],
    each head RMSNorm-ed by its q / k weight (if given), then rotated: one launch for what
    the separate layers do in four. `store` = (k_cache, v_cache, slot_mapping[, k_scale,
    v_scale]) also writes each token's K and V into the paged cache, as `store_kv_triton`
    would."""
    tokens = qkv.shape[0]
    head_dim = cos_cache.shape[1] * 2
    q = torch.empty(tokens, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    k = torch.empty(tokens, num_kv_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    q_w, k_w = norm_weights if norm_weights is not None else (cos_cache, cos_cache)
    k_cache, v_cache, slots, *scales = store if store is not None else (q, q, positions)
    k_scale, v_scale, fp8 = scale_args(k_cache, tuple(scales) or None)
    if tokens:
        _qk_norm_rope_kernel[(tokens,)](
            qkv, q, k, q_w, k_w, cos_cache, sin_cache, positions, k_cache, v_cache, slots,
            k_scale, v_scale, qkv.stride(0), eps, NUM_Q=num_heads, NUM_KV=num_kv_heads,
            HEADS=triton.next_power_of_2(num_heads + num_kv_heads),
            KV_PAD=triton.next_power_of_2(num_kv_heads), HALF=head_dim // 2,
            HAS_NORM=norm_weights is not None, STORE=store is not None, FP8_CACHE=fp8)
    return q, k


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
def _ln(x, FAST: tl.constexpr):
    """Natural log; FAST: the GPU's approximate log2 instruction (absolute error ~2e-7 in
    log2), about twice as fast as the accurate libdevice log."""
    if FAST:
        return tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=r,r", [x],
                                         dtype=tl.float32, is_pure=True,
                                         pack=1) * 0.6931471805599453
    return tl.log(x)


@triton.jit
def _gumbel(u, FAST: tl.constexpr):
    """-log(-log(u)). For u near 1 (the draws that win), -log(u) comes from its series in
    v = 1 - u (exact in float32), so an approximate log never decides the winner."""
    v = 1.0 - u
    series = v * (1.0 + v * (0.5 + v * (0.3333333333333333 + v * 0.25)))
    return -_ln(tl.where(v < 0.01, series, -_ln(u, FAST)), FAST)


@triton.jit
def _take_better(logits_ptr, cols, u, vocab, inv_temp, noise, best, best_col,
                 FAST: tl.constexpr):
    """Each lane keeps the larger of its best score and column `cols`' Gumbel-perturbed one."""
    mask = cols < vocab
    x = tl.load(logits_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    score = tl.where(mask, x * inv_temp + noise * _gumbel(u, FAST), float("-inf"))
    better = score > best
    return tl.where(better, score, best), tl.where(better, cols, best_col)


@triton.jit
def _gumbel_argmax_kernel(logits_ptr, inv_temp_ptr, noise_ptr, seed_ptr, best_ptr, col_ptr,
                          vocab, stride, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                          FAST: tl.constexpr):
    """Program (row, chunk): the best score of CHUNK columns and its column. One Philox call
    draws the uniforms of four BLOCK-wide column groups."""
    row, chunk = tl.program_id(0), tl.program_id(1)
    inv_temp = tl.load(inv_temp_ptr + row)
    noise = tl.load(noise_ptr + row)
    seed = tl.load(seed_ptr + row)
    logits_ptr += row * stride
    lanes = tl.arange(0, BLOCK)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_col = tl.zeros([BLOCK], tl.int32)
    for start in range(chunk * CHUNK, chunk * CHUNK + CHUNK, 4 * BLOCK):
        u0, u1, u2, u3 = tl.rand4x(seed, start // 4 + lanes)
        best, best_col = _take_better(logits_ptr, start + lanes, u0, vocab, inv_temp, noise,
                                      best, best_col, FAST)
        best, best_col = _take_better(logits_ptr, start + BLOCK + lanes, u1, vocab, inv_temp,
                                      noise, best, best_col, FAST)
        best, best_col = _take_better(logits_ptr, start + 2 * BLOCK + lanes, u2, vocab,
                                      inv_temp, noise, best, best_col, FAST)
        best, best_col = _take_better(logits_ptr, start + 3 * BLOCK + lanes, u3, vocab,
                                      inv_temp, noise, best, best_col, FAST)
    lane = tl.argmax(best, 0)
    out = row * tl.num_programs(1) + chunk
    tl.store(best_ptr + out, tl.max(best, 0))
    tl.store(col_ptr + out, tl.sum(tl.where(lanes == lane, best_col, 0), 0))


def fast_log_supported(device: torch.device) -> bool:
    """The PTX approximate log: compiled NVIDIA kernels only (not ROCm, not the interpreter)."""
    return device.type == "cuda" and torch.version.cuda is not None and \
        os.environ.get("TRITON_INTERPRET", "0") in ("", "0")


def gumbel_argmax(logits: torch.Tensor, inv_temperature: torch.Tensor,
                  seeds: torch.Tensor, block: int = 512, noise: torch.Tensor | None = None,
                  chunk: int | None = None) -> torch.Tensor:
    """One token per row, drawn from softmax(logits * inv_temperature) by the Gumbel-max
    trick, the noise from Philox keyed by the row's seed and scaled by `noise` (0: the
    row's argmax). The vocabulary is split into chunks, each reduced by its own program, so
    a few rows still fill the GPU; the chunks' winners are then compared."""
    rows, vocab = logits.shape
    chunk = chunk or 16 * block  # measured best on an H100 for 64-256 rows of 151,936
    if chunk % (4 * block):
        raise ValueError(f"chunk must be a multiple of 4 * block = {4 * block}, got {chunk}")
    num_chunks = triton.cdiv(vocab, chunk)
    if noise is None:
        noise = torch.ones(rows, device=logits.device)
    best = torch.empty(rows, num_chunks, dtype=torch.float32, device=logits.device)
    cols = torch.empty(rows, num_chunks, dtype=torch.int32, device=logits.device)
    if rows:
        _gumbel_argmax_kernel[(rows, num_chunks)](logits, inv_temperature, noise, seeds, best,
                                                  cols, vocab, logits.stride(0), CHUNK=chunk,
                                                  BLOCK=block,
                                                  FAST=fast_log_supported(logits.device))
    return cols.gather(1, best.argmax(dim=1, keepdim=True)).squeeze(1).long()
