"""Triton kernels over the paged KV cache: the slot-mapped K/V write and paged decode attention.

The cache of a layer is [num_blocks, block_size, num_kv_heads, head_dim]; token slot s lives at
block s // block_size, offset s % block_size. Both kernels read their lengths and slots from
device tensors, so a CUDA graph can replay them with new contents. Under TRITON_INTERPRET=1
they run on the CPU (the test suite checks them there against the SDPA reference).

An fp8 cache (float8 e4m3) holds K / scale and V / scale, one float32 scale per layer for
each (engine/layers/kv_quant.py): the store scales and saturates, and the attention kernels
fold the scales into their math (K's into the softmax scale, V's into the output) instead of
dequantizing every key.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.core.shapes import DecodeSplit
from engine.layers.kv_quant import FP8, FP8_MAX, KVScales

_FP8_MAX = tl.constexpr(FP8_MAX)


@triton.jit
def to_cache(x, scale_ptr, cache_ptr, FP8_CACHE: tl.constexpr):
    """x as the cache stores it: divided by its scale, saturated into e4m3's range and
    rounded to it for an fp8 cache, else as is."""
    if FP8_CACHE:
        x = x.to(tl.float32) / tl.load(scale_ptr)
        x = _e4m3_grid(tl.minimum(tl.maximum(x, -_FP8_MAX), _FP8_MAX))
    return x.to(cache_ptr.dtype.element_ty)


@triton.jit
def _e4m3_grid(x):
    """float32 x (|x| <= 448) rounded to the nearest e4m3 value, ties to even, as torch's
    cast rounds. The cast that follows is then exact: on the GPU this only repeats the
    hardware's rounding, and Triton's interpreter (3.9) drops the carry of a rounded-up
    mantissa (1.97 became 1.0), which the tests would otherwise inherit."""
    bits = x.to(tl.uint32, bitcast=True)
    sign = bits & 0x80000000
    size = bits ^ sign
    normal = (size + 0x7FFFF + ((size >> 20) & 1)) & 0xFFF00000  # 3 of 23 mantissa bits
    magnitude = size.to(tl.float32, bitcast=True)
    subnormal = ((magnitude * 512.0 + 12582912.0) - 12582912.0) * 0.001953125  # k * 2^-9
    size = tl.where(magnitude < 0.015625, subnormal.to(tl.uint32, bitcast=True), normal)
    return (size | sign).to(tl.float32, bitcast=True)


@triton.jit
def cache_scales(k_scale_ptr, v_scale_ptr, FP8_CACHE: tl.constexpr):
    """(K scale, V scale) of the cache: 1 unless it is fp8."""
    if FP8_CACHE:
        return tl.load(k_scale_ptr), tl.load(v_scale_ptr)
    return 1.0, 1.0


def scale_args(cache: torch.Tensor, scales: KVScales | None) -> tuple[torch.Tensor, ...]:
    """The kernels' (k_scale, v_scale, FP8_CACHE) arguments; the scale pointers are unread
    (the cache itself stands in) unless the cache is fp8."""
    if cache.dtype != FP8:
        return cache, cache, False
    if scales is None or any(s is None for s in scales):
        raise ValueError("an fp8 KV cache needs its K and V scales")
    return *scales, True


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, k_scale_ptr,
                     v_scale_ptr, stride_k, stride_v, width, BLOCK: tl.constexpr,
                     FP8_CACHE: tl.constexpr):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < tl.where(slot >= 0, width, 0)  # slot -1: write nothing
    k = tl.load(k_ptr + token * stride_k + offs, mask=mask)
    v = tl.load(v_ptr + token * stride_v + offs, mask=mask)
    k = to_cache(k, k_scale_ptr, k_cache_ptr, FP8_CACHE)
    v = to_cache(v, v_scale_ptr, v_cache_ptr, FP8_CACHE)
    tl.store(k_cache_ptr + slot * width + offs, k, mask=mask)
    tl.store(v_cache_ptr + slot * width + offs, v, mask=mask)


def store_kv_triton(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                    scales: KVScales | None = None) -> None:
    """k, v: [T, kv_heads, head_dim] (each token's heads contiguous); slot -1 = skip.
    `scales`: an fp8 cache's K and V scales."""
    width = k.shape[1] * k.shape[2]
    if k.stride(2) != 1 or k.stride(1) != k.shape[2] or v.stride(2) != 1 \
            or v.stride(1) != v.shape[2]:
        raise ValueError("store_kv_triton needs each token's K/V heads contiguous")
    if k.shape[0] == 0:
        return
    k_scale, v_scale, fp8 = scale_args(k_cache, scales)
    _store_kv_kernel[(k.shape[0],)](k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale,
                                    k.stride(0), v.stride(0), width,
                                    BLOCK=triton.next_power_of_2(width), FP8_CACHE=fp8)


@triton.jit(do_not_specialize=["stride_bt"])  # the table width changes step to step
def _paged_decode_kernel(out_ptr, part_ptr, stats_ptr, q_ptr, k_cache_ptr, v_cache_ptr,
                         block_tables_ptr, seq_lens_ptr, order_ptr, k_scale_ptr, v_scale_ptr,
                         scale, stride_q, stride_o,
                         stride_bt, NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr,
                         GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                         BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                         NUM_SPLITS: tl.constexpr, MIN_SHARE: tl.constexpr,
                         HEAD_MAJOR: tl.constexpr, HAS_ORDER: tl.constexpr,
                         FP8_CACHE: tl.constexpr):
    """Program (kv head, seq, split): the split's share of the sequence's keys for the query
    heads of that KV head. One split writes the normalised output; several write their
    unnormalised sums and (max, denominator) for `_combine_splits_kernel`. A share is at
    least MIN_SHARE keys, so a short sequence leaves its last splits empty. With HAS_ORDER
    the programs take sequences in order_ptr's order (longest first: the GPU starts programs
    in index order, so the long ones do not straggle at the end)."""
    if HEAD_MAJOR:  # a sequence's KV heads, adjacent in each cache row, are read together
        kv_head, seq = tl.program_id(0), tl.program_id(1)
    else:
        seq, kv_head = tl.program_id(0), tl.program_id(1)
    if HAS_ORDER:
        seq = tl.load(order_ptr + seq)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    share = tl.maximum(tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N, MIN_SHARE)
    first = split * share
    last = tl.minimum(seq_len, first + share)
    rows = tl.arange(0, GROUP_PAD)
    heads = kv_head * GROUP + rows
    dims = tl.arange(0, HEAD_DIM)
    q_mask = (rows < GROUP)[:, None]
    q = tl.load(q_ptr + seq * stride_q + heads[:, None] * HEAD_DIM + dims[None, :],
                mask=q_mask, other=0.0)
    k_scale, v_scale = cache_scales(k_scale_ptr, v_scale_ptr, FP8_CACHE)
    qk_scale = scale * k_scale
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    slot_stride = NUM_KV_HEADS * HEAD_DIM
    for start in range(first, last, BLOCK_N):
        tokens = start + tl.arange(0, BLOCK_N)
        valid = tokens < last
        block = tl.load(block_tables_ptr + seq * stride_bt + tokens // BLOCK_SIZE,
                        mask=valid, other=0).to(tl.int64)
        slots = block * BLOCK_SIZE + tokens % BLOCK_SIZE
        offs = slots[:, None] * slot_stride + kv_head * HEAD_DIM + dims[None, :]
        k = tl.load(k_cache_ptr + offs, mask=valid[:, None], other=0.0).to(q.dtype)
        v = tl.load(v_cache_ptr + offs, mask=valid[:, None], other=0.0).to(q.dtype)
        scores = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        p = tl.exp(scores - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new
    acc = acc * v_scale
    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # seq_len 0: a padded graph row
        tl.store(out_ptr + seq * stride_o + heads[:, None] * HEAD_DIM + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=q_mask)
    else:
        part = (seq * NUM_KV_HEADS * GROUP + heads) * NUM_SPLITS + split
        tl.store(part_ptr + part[:, None] * HEAD_DIM + dims[None, :], acc, mask=q_mask)
        tl.store(stats_ptr + part * 2, m_i, mask=rows < GROUP)
        tl.store(stats_ptr + part * 2 + 1, l_i, mask=rows < GROUP)


@triton.jit
def _combine_splits_kernel(out_ptr, part_ptr, stats_ptr, stride_o, NUM_HEADS: tl.constexpr,
                           HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr):
    """Program (seq, head): the splits' partial softmax sums, rescaled to their common max."""
    seq, head = tl.program_id(0), tl.program_id(1)
    splits = tl.arange(0, NUM_SPLITS)
    dims = tl.arange(0, HEAD_DIM)
    part = (seq * NUM_HEADS + head) * NUM_SPLITS + splits
    m = tl.load(stats_ptr + part * 2)
    l_i = tl.load(stats_ptr + part * 2 + 1)
    m_max = tl.max(m, 0)
    weight = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_max))  # empty splits weigh 0
    acc = tl.load(part_ptr + part[:, None] * HEAD_DIM + dims[None, :])
    total = tl.sum(weight * l_i, 0)
    out = tl.sum(acc * weight[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + seq * stride_o + head * HEAD_DIM + dims,
             out.to(out_ptr.dtype.element_ty))


# Measured on an H100 (256 seqs x 8 KV heads x 128, bf16): ~3.0 TB/s, at its copy bandwidth.
DECODE_LAUNCH = {"BLOCK_N": DecodeSplit(1).block_n, "num_warps": 4, "num_stages": 3}
MIN_SHARE = DecodeSplit(1).min_share  # keys; shorter shares cost more in combining
MAX_SPLITS = DecodeSplit(1).max_splits
HEAD_MAJOR = True


def decode_splits(batch: int, num_kv_heads: int) -> int:
    """Splits per sequence for a batch (engine.core.config.DecodeSplit): 1 once the batch alone
    fills the GPU. It depends on the batch size only, so a CUDA graph captured for a bucket
    stays valid for any context lengths."""
    return DecodeSplit(num_kv_heads).splits(batch)


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                 out: torch.Tensor | None = None, num_splits: int | None = None,
                 min_share: int = MIN_SHARE, order: torch.Tensor | None = None,
                 kv_scales: KVScales | None = None, **launch: int) -> torch.Tensor:
    """q: [B, heads, head_dim], one query per sequence over its first seq_lens[b] cached
    tokens (block_tables[b] lists its blocks) -> [B, heads, head_dim]. Each sequence's keys
    are split up to `num_splits` ways (default: `decode_splits`), `min_share` keys or more
    per split. `order` ([B] int32, a permutation) is the order to start sequences in.
    `kv_scales`: an fp8 cache's K and V scales."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    splits = num_splits or decode_splits(batch, num_kv_heads)
    if splits & (splits - 1):
        raise ValueError(f"num_splits must be a power of two, got {splits}")
    out = torch.empty_like(q) if out is None else out
    if batch == 0:
        return out
    part = stats = out
    if splits > 1:
        part = torch.empty(batch, num_heads, splits, head_dim, dtype=torch.float32,
                           device=q.device)
        stats = torch.empty(batch, num_heads, splits, 2, dtype=torch.float32, device=q.device)
    grid = (num_kv_heads, batch, splits) if HEAD_MAJOR else (batch, num_kv_heads, splits)
    k_scale, v_scale, fp8 = scale_args(k_cache, kv_scales)
    _paged_decode_kernel[grid](
        out, part, stats, q, k_cache, v_cache, block_tables, seq_lens,
        seq_lens if order is None else order, k_scale, v_scale, scale, q.stride(0),
        out.stride(0), block_tables.stride(0),
        NUM_KV_HEADS=num_kv_heads, GROUP=num_heads // num_kv_heads,
        GROUP_PAD=max(16, triton.next_power_of_2(num_heads // num_kv_heads)),
        HEAD_DIM=head_dim, BLOCK_SIZE=block_size, NUM_SPLITS=splits,
        MIN_SHARE=min_share if splits > 1 else 0, HEAD_MAJOR=HEAD_MAJOR,
        HAS_ORDER=order is not None, FP8_CACHE=fp8,
        **(DECODE_LAUNCH | launch))
    if splits > 1:
        _combine_splits_kernel[(batch, num_heads)](out, part, stats, out.stride(0),
                                                   NUM_HEADS=num_heads, HEAD_DIM=head_dim,
                                                   NUM_SPLITS=splits)
    return out
