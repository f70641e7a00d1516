"""W8A16 matmul: activations in the model dtype times int8 weights with per-output-channel
scales (engine/layers/quantization.py), dequantized in registers tile by tile.

Program (m, n, split) accumulates a BLOCK_M x BLOCK_N tile of x @ codes^T in float32 over its
share of K: each BLOCK_K x BLOCK_N tile of codes is loaded as int8 (half the bytes of bf16),
converted to x's dtype (exact: |code| <= 127) and fed to tl.dot; the output channels' scales
multiply the finished sum once. No dequantized matrix ever exists in memory.

Decode steps are few rows against a whole weight matrix: memory-bound, and a grid of
ceil(N / BLOCK_N) programs would leave most SMs idle. So K is split (a power of two, by shape
alone: a CUDA graph captured for a row bucket replays the same launch) until the grid has
about TARGET_PROGRAMS programs; the splits write float32 partial sums that a second kernel
adds, in a fixed order, and scales. Nothing syncs with the host, and every size comes from
the tensors' shapes, so the call can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# About two programs per SM of an H100 / H200 (132 SMs); more splits cost more partial sums.
TARGET_PROGRAMS = 256
MAX_SPLIT_K = 16


@triton.jit
def _w8a16_kernel(x_ptr, w_ptr, scale_ptr, out_ptr, part_ptr, M, N, K, stride_xm, stride_om,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  SPLIT_K: tl.constexpr):
    pid_m, pid_n, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    share = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K
    first = split * share
    last = tl.minimum(K, first + share)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for start in range(first, last, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        in_k = ks < last
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :],
                    mask=(rows < M)[:, None] & in_k[None, :], other=0.0)
        codes = tl.load(w_ptr + cols[None, :].to(tl.int64) * K + ks[:, None],
                        mask=(cols < N)[None, :] & in_k[:, None], other=0)
        acc = tl.dot(x, codes.to(x.dtype), acc, input_precision="ieee")
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    if SPLIT_K == 1:
        scale = tl.load(scale_ptr + cols, mask=cols < N, other=0.0)
        tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :],
                 (acc * scale[None, :]).to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(part_ptr + (split * M + rows[:, None]) * N + cols[None, :], acc, mask=mask)


@triton.jit
def _sum_splits_kernel(part_ptr, scale_ptr, out_ptr, M, N, stride_om, SPLIT_K: tl.constexpr,
                       BLOCK: tl.constexpr):
    """Program (row, column block): the splits' partial sums, added in split order, scaled."""
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    acc = tl.zeros([BLOCK], tl.float32)
    for split in tl.static_range(SPLIT_K):
        acc += tl.load(part_ptr + (split * M + row) * N + cols, mask=mask, other=0.0)
    scale = tl.load(scale_ptr + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * stride_om + cols, (acc * scale).to(out_ptr.dtype.element_ty),
             mask=mask)


def tile_config(m: int) -> dict[str, int]:
    """Tiles and launch parameters by row count (first choices, not tuned on a GPU yet:
    engine/tools/bench_quant.py measures them)."""
    if m <= 16:
        return {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4}
    if m <= 64:
        return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4}
    return {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}


def split_k(m: int, n: int, k: int, config: dict[str, int]) -> int:
    """Splits of K: doubled while the grid is short of TARGET_PROGRAMS and every split
    keeps two BLOCK_K tiles or more."""
    programs = triton.cdiv(m, config["BLOCK_M"]) * triton.cdiv(n, config["BLOCK_N"])
    splits = 1
    while (splits < MAX_SPLIT_K and programs * splits < TARGET_PROGRAMS
           and 4 * splits * config["BLOCK_K"] <= k):
        splits *= 2
    return splits


def w8a16_matmul(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                 split: int | None = None, **launch: int) -> torch.Tensor:
    """x [..., K] @ (codes [N, K] int8 * scale [N] float32)^T -> [..., N] in x's dtype.
    `split` and `launch` override the shape-based choices (tests)."""
    if x.dim() != 2 or x.stride(1) != 1:
        return w8a16_matmul(x.reshape(-1, x.shape[-1]).contiguous(), codes, scale, split,
                            **launch).view(*x.shape[:-1], codes.shape[0])
    m, k = x.shape
    n = codes.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    config = tile_config(m) | launch
    splits = split or split_k(m, n, k, config)
    part = out if splits == 1 else torch.empty(splits, m, n, dtype=torch.float32,
                                               device=x.device)
    grid = (triton.cdiv(m, config["BLOCK_M"]), triton.cdiv(n, config["BLOCK_N"]), splits)
    _w8a16_kernel[grid](x, codes, scale, out, part, m, n, k, x.stride(0), out.stride(0),
                        SPLIT_K=splits, **config)
    if splits > 1:
        block = min(1024, triton.next_power_of_2(n))
        _sum_splits_kernel[(m, triton.cdiv(n, block))](part, scale, out, m, n, out.stride(0),
                                                       SPLIT_K=splits, BLOCK=block)
    return out
