"""The CUDA attention backends: varlen flash attention for prefill, paged kernels for decode.

- ``torch``: PyTorch's built-in FlashAttention-2 varlen kernel (``torch.nn.attention.varlen``)
  for prefill chunks, and this project's Triton paged decode kernel for decodes.
- ``flash_attn``: the flash-attn package, ``flash_attn_varlen_func`` for prefill and
  ``flash_attn_with_kvcache`` (reading the paged cache through ``block_table``) for decode.

Both write the step's K/V into the paged cache with the Triton slot-mapping kernel first.
Prefill chunks with computed tokens before them (chunked prefill, prefix hits) attend to keys
gathered from the cache by slot, so every chunk sees its whole prefix. A step replayed from a
CUDA graph (``PagedMetadata.whole_step``) runs the mixed attention kernel over every row
instead, on either backend: its launch does not depend on the sequence lengths.
"""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Callable
from functools import cache, partial

import torch
import torch.nn.functional as F

from engine.layers.context import ForwardContext, PagedMetadata
from engine.layers.kv_quant import KVScales, dequantize_kv

FLASH_ATTN_BLOCK_MULTIPLE = 256  # flash_attn_with_kvcache's paged-KV page size
FLASH_DTYPES = (torch.float16, torch.bfloat16)


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


@cache
def torch_varlen() -> Callable[..., torch.Tensor]:
    """varlen_attn with causal masking, across the torch versions that spell it differently."""
    # not in every torch version; imported where the backend is picked
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    kwargs: dict[str, object] = ({"window_size": (-1, 0)} if "window_size" in params
                                 else {"is_causal": True})
    if "enable_gqa" in params:
        kwargs["enable_gqa"] = True
    return partial(varlen_attn, **kwargs)


def paged_forward(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, ctx: ForwardContext,
                  scale: float, kv_stored: bool = False, out: torch.Tensor | None = None,
                  kv_scales: KVScales | None = None) -> torch.Tensor:
    """q [T, H, D], k/v [T, KVH, D] of one step -> [T, H, D] (into `out` if given); K/V go
    to the cache first unless `kv_stored`. `kv_scales`: an fp8 cache's K and V scales."""
    # Triton compiles at import: only the GPU path loads its kernels
    from engine.layers.kernels.mixed_attention import mixed_attention
    from engine.layers.kernels.paged_cache import store_kv_triton

    meta = ctx.paged
    assert meta is not None, "the varlen backends need ForwardContext.paged"
    cached = ctx.slot_mapping is not None and k_cache.numel() > 0
    if cached and not kv_stored:
        store_kv_triton(k, v, k_cache, v_cache, ctx.slot_mapping, kv_scales)
    out = torch.empty_like(q) if out is None else out
    if meta.whole_step:
        return mixed_attention(q, k_cache, v_cache, ctx.block_tables, ctx.seq_lens,
                               ctx.query_start_loc, scale, out, kv_scales)
    nd = meta.num_decodes
    # Rows past the context's tokens pad an eager step (ModelRunner.eager_rows): zeros.
    end = ctx.query_start_loc_cpu[-1] if ctx.query_start_loc_cpu else q.shape[0]
    if nd:
        decode = flash_attn_decode if backend == "flash_attn" else triton_decode
        decode(q[:nd], k_cache, v_cache, meta, scale, out[:nd], kv_scales)
    if end > nd:
        keys, values = prefill_keys(k[nd:end], v[nd:end], k_cache, v_cache, meta, kv_scales)
        prefill = flash_attn_prefill if backend == "flash_attn" else torch_prefill
        out[nd:end] = prefill(q[nd:end], keys, values, meta, scale)
    if end < q.shape[0]:
        out[end:].zero_()
    return out


def prefill_keys(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, meta: PagedMetadata,
                 kv_scales: KVScales | None = None) -> tuple[torch.Tensor, ...]:
    """The chunks' keys and values: their own K/V, or all of them from the cache (an fp8
    cache dequantized) when some chunk has keys before it."""
    if meta.prefill_kv_slots is None:
        return k, v
    slots, scales = meta.prefill_kv_slots, kv_scales or (None, None)
    return tuple(dequantize_kv(cache.flatten(0, 1).index_select(0, slots), k.dtype, scale)
                 for cache, scale in zip((k_cache, v_cache), scales, strict=True))


def torch_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: PagedMetadata,
                  scale: float) -> torch.Tensor:
    varlen = torch_varlen() if q.dtype in FLASH_DTYPES else sdpa_varlen
    return varlen(q, k, v, meta.prefill_cu_q, meta.prefill_cu_k, meta.prefill_max_q,
                  meta.prefill_max_k, scale=scale)


def sdpa_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor,
                cu_k: torch.Tensor, max_q: int, max_k: int,
                scale: float | None = None) -> torch.Tensor:
    """The same causal varlen attention, one SDPA call per sequence: for float32, which
    FlashAttention does not take, and as the CPU stand-in in tests."""
    outs = []
    qs, ks = cu_q.tolist(), cu_k.tolist()
    for q0, q1, k0, k1 in zip(qs, qs[1:], ks, ks[1:], strict=False):
        mask = torch.ones(q1 - q0, k1 - k0, dtype=torch.bool, device=q.device).tril(
            (k1 - k0) - (q1 - q0))
        outs.append(F.scaled_dot_product_attention(
            q[q0:q1].transpose(0, 1), k[k0:k1].transpose(0, 1), v[k0:k1].transpose(0, 1),
            attn_mask=mask, scale=scale, enable_gqa=True).transpose(0, 1))
    return torch.cat(outs)


def triton_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  meta: PagedMetadata, scale: float, out: torch.Tensor,
                  kv_scales: KVScales | None = None) -> None:
    # Triton compiles at import: only the GPU path loads its kernels
    from engine.layers.kernels.paged_cache import paged_decode

    paged_decode(q, k_cache, v_cache, meta.decode_block_tables, meta.decode_seq_lens, scale,
                 out=out, order=meta.decode_order, kv_scales=kv_scales)


def flash_attn_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       meta: PagedMetadata, scale: float) -> torch.Tensor:
    # flash-attn is an optional package
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(q, k, v, meta.prefill_cu_q, meta.prefill_cu_k,
                                  meta.prefill_max_q, meta.prefill_max_k,
                                  softmax_scale=scale, causal=True)


def flash_attn_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      meta: PagedMetadata, scale: float, out: torch.Tensor,
                      kv_scales: KVScales | None = None) -> None:
    """The model-dtype cache only (resolve_backend refuses flash_attn with an fp8 cache)."""
    # flash-attn is an optional package
    from flash_attn import flash_attn_with_kvcache

    out.copy_(flash_attn_with_kvcache(
        q.unsqueeze(1), k_cache, v_cache, cache_seqlens=meta.decode_seq_lens,
        block_table=meta.decode_block_tables, softmax_scale=scale, causal=True).squeeze(1))


def dense_metadata(seq_lens: list[int], device: torch.device) -> PagedMetadata:
    """Independent causal sequences, no cache (the start-up profiling step)."""
    starts = [0]
    for n in seq_lens:
        starts.append(starts[-1] + n)
    cu = torch.tensor(starts, dtype=torch.int32, device=device)
    longest = max(seq_lens, default=0)
    return PagedMetadata(num_decodes=0, prefill_cu_q=cu, prefill_cu_k=cu,
                         prefill_max_q=longest, prefill_max_k=longest)
