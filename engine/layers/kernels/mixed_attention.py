"""Paged attention for a whole mixed step in one launch, graph-safe.

Every sequence of the step (decodes and prefill chunks alike) attends to its keys straight
from the paged cache, so no prefix is gathered and no length reaches the host. The grid
depends only on the step's row count and the number of sequence slots: sequence s owns the
query tiles starting at ``query_start_loc[s] // BLOCK_Q + s`` (one more tile per sequence
than its rows need at most), and a program finds its sequence by binary search over those
starts. Tiles past a sequence's rows, and sequences with no rows, return at once. A CUDA
graph captured for a token bucket therefore replays any step padded to that bucket.

Rows of a tile are (token, query head of the program's KV head) pairs, so the KV heads'
query groups share every key load (GQA). An fp8 cache's scales fold into the softmax scale
(K) and the output (V), as in the paged decode kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.layers.kernels.paged_cache import cache_scales, scale_args
from engine.layers.kv_quant import KVScales

LOG2E = 1.4426950408889634


@triton.jit
def _tile_start(cu_q_ptr, seq, BLOCK_Q: tl.constexpr):
    return tl.load(cu_q_ptr + seq) // BLOCK_Q + seq


@triton.jit
def _find_seq(cu_q_ptr, tile, num_seqs, BLOCK_Q: tl.constexpr):
    """The last sequence whose first tile is at or before `tile` (tile starts increase)."""
    lo = 0
    hi = num_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        ok = _tile_start(cu_q_ptr, mid, BLOCK_Q) <= tile
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
    return lo


@triton.jit(do_not_specialize=["num_seqs", "stride_bt"])
def _mixed_attention_kernel(out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr,
                            seq_lens_ptr, cu_q_ptr, k_scale_ptr, v_scale_ptr, num_seqs,
                            scale_log2, stride_q, stride_o,
                            stride_bt, NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr,
                            GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                            BLOCK_SIZE: tl.constexpr, BLOCK_Q: tl.constexpr,
                            BLOCK_N: tl.constexpr, FP8_CACHE: tl.constexpr):
    """Program (tile, kv head): BLOCK_Q query tokens of one sequence x the GROUP query heads
    of the KV head, over the causally visible keys of that sequence."""
    tile, kv_head = tl.program_id(0), tl.program_id(1)
    seq = _find_seq(cu_q_ptr, tile, num_seqs, BLOCK_Q)
    q_first = tl.load(cu_q_ptr + seq)
    q_len = tl.load(cu_q_ptr + seq + 1) - q_first
    local = (tile - _tile_start(cu_q_ptr, seq, BLOCK_Q)) * BLOCK_Q
    if local >= q_len:
        return
    kv_len = tl.load(seq_lens_ptr + seq)
    context = kv_len - q_len  # keys computed before this step
    rows = tl.arange(0, BLOCK_Q * GROUP_PAD)
    token = local + rows // GROUP_PAD
    head = kv_head * GROUP + rows % GROUP_PAD
    valid = (token < q_len) & (rows % GROUP_PAD < GROUP)
    dims = tl.arange(0, HEAD_DIM)
    q_offs = (q_first + token)[:, None] * stride_q + head[:, None] * HEAD_DIM + dims[None, :]
    q = tl.load(q_ptr + q_offs, mask=valid[:, None], other=0.0)
    position = context + token  # the key index each row may see up to
    k_scale, v_scale = cache_scales(k_scale_ptr, v_scale_ptr, FP8_CACHE)
    qk_scale = scale_log2 * k_scale
    m_i = tl.full([BLOCK_Q * GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q * GROUP_PAD], tl.float32)
    acc = tl.zeros([BLOCK_Q * GROUP_PAD, HEAD_DIM], tl.float32)
    slot_stride = NUM_KV_HEADS * HEAD_DIM
    last = tl.minimum(kv_len, context + local + BLOCK_Q)
    for start in range(0, last, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        in_range = keys < last
        block = tl.load(block_tables_ptr + seq * stride_bt + keys // BLOCK_SIZE,
                        mask=in_range, other=0).to(tl.int64)
        slots = block * BLOCK_SIZE + keys % BLOCK_SIZE
        offs = slots[:, None] * slot_stride + kv_head * HEAD_DIM + dims[None, :]
        k = tl.load(k_cache_ptr + offs, mask=in_range[:, None], other=0.0).to(q.dtype)
        v = tl.load(v_cache_ptr + offs, mask=in_range[:, None], other=0.0).to(q.dtype)
        scores = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        seen = (keys[None, :] <= position[:, None]) & in_range[None, :] & valid[:, None]
        scores = tl.where(seen, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that see nothing yet
        p = tl.math.exp2(scores - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new
    out = acc * v_scale / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_offs = (q_first + token)[:, None] * stride_o + head[:, None] * HEAD_DIM + dims[None, :]
    tl.store(out_ptr + o_offs, out.to(out_ptr.dtype.element_ty), mask=valid[:, None])


MIXED_LAUNCH = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}


def mixed_grid_tiles(num_rows: int, num_seqs: int, block_q: int) -> int:
    """Query tiles a step of `num_rows` rows over `num_seqs` sequence slots may need."""
    return num_rows // block_q + num_seqs


def block_q(num_heads: int, num_kv_heads: int, block_m: int) -> int:
    """Query tokens per tile: `block_m` rows hold that many tokens x the padded group."""
    group_pad = triton.next_power_of_2(num_heads // num_kv_heads)
    return max(1, block_m // group_pad)


def mixed_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, seq_lens: torch.Tensor,
                    query_start_loc: torch.Tensor, scale: float,
                    out: torch.Tensor | None = None, kv_scales: KVScales | None = None,
                    **launch: int) -> torch.Tensor:
    """q [T, heads, head_dim]: sequence s's queries are rows query_start_loc[s] to
    query_start_loc[s + 1], the last of its seq_lens[s] tokens, whose K/V are in the cache
    already (block_tables[s] lists its blocks) -> [T, heads, head_dim]. Rows no sequence
    owns are left as they are. Every argument is a device tensor of fixed shape for a
    given T, so a CUDA graph can capture the call. `kv_scales`: an fp8 cache's scales."""
    num_rows, num_heads, head_dim = q.shape
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    out = torch.empty_like(q) if out is None else out
    num_seqs = seq_lens.shape[0]
    if num_rows == 0 or num_seqs == 0:
        return out
    params = MIXED_LAUNCH | launch
    bq = block_q(num_heads, num_kv_heads, params.pop("BLOCK_M"))
    grid = (mixed_grid_tiles(num_rows, num_seqs, bq), num_kv_heads)
    group = num_heads // num_kv_heads
    k_scale, v_scale, fp8 = scale_args(k_cache, kv_scales)
    _mixed_attention_kernel[grid](
        out, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, k_scale, v_scale,
        num_seqs, scale * LOG2E, q.stride(0), out.stride(0), block_tables.stride(0),
        NUM_KV_HEADS=num_kv_heads, GROUP=group, GROUP_PAD=triton.next_power_of_2(group),
        HEAD_DIM=head_dim, BLOCK_SIZE=block_size, BLOCK_Q=bq, FP8_CACHE=fp8, **params)
    return out
