"""Attention over a paged KV cache, and the ``sdpa`` backend (the CPU reference).

The ``sdpa`` backend stores the step's K/V by slot, then runs SDPA.

Decodes (one new token) of a step share one SDPA call over their gathered, padded KV;
each prefill chunk gets its own call with a bottom-right aligned causal mask, which SDPA
can serve with its fused kernels. All inputs are 4-D ([batch, heads, tokens, head_dim]) so
that CUDA picks flash / memory-efficient kernels instead of the math fallback.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import CausalBias, causal_lower_right

from engine.layers.attention_backends import paged_forward
from engine.layers.context import DecodeBatch, ForwardContext, get_forward_context
from engine.layers.kv_quant import KVScales, dequantize_kv, quantize_kv, raw

BACKENDS = ("sdpa", "torch", "flash_attn")


class Attention(nn.Module):
    """q: [T, num_heads, head_dim], k/v: [T, num_kv_heads, head_dim] -> [T, num_heads * head_dim].

    The runner assigns ``k_cache`` / ``v_cache`` ([num_blocks, block_size, num_kv_heads,
    head_dim]), ``kv_scales`` (the K and V scales of an fp8 cache, [1] float32 each) and
    ``backend``; until the cache exists (profiling) attention only sees each sequence's new
    tokens.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} is not a multiple of "
                             f"num_kv_heads={num_kv_heads}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.gqa = num_heads != num_kv_heads
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)
        self.kv_scales: KVScales | None = None
        self.backend = "sdpa"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_stored: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
        """kv_stored: the step's K/V are in the cache already (written where `kv_store`
        pointed); out: where the paged backends write the result ([T, H, D])."""
        ctx = get_forward_context()
        if self.backend != "sdpa":
            return paged_forward(self.backend, q, k, v, self.k_cache, self.v_cache, ctx,
                                 self.scale, kv_stored, out, self.kv_scales).flatten(1)
        result = self._forward_sdpa(q, k, v, ctx)
        if out is None:
            return result
        out.copy_(result.view_as(out))
        return out.flatten(1)

    def kv_store(self) -> tuple[torch.Tensor | None, ...] | None:
        """(k_cache, v_cache, slot_mapping, k_scale, v_scale) where a fused kernel may write
        this step's K/V for the paged backends, or None (no cache yet, or the sdpa backend)."""
        ctx = get_forward_context()
        if self.backend == "sdpa" or ctx.slot_mapping is None or self.k_cache.numel() == 0:
            return None
        return self.k_cache, self.v_cache, ctx.slot_mapping, *(self.kv_scales or (None, None))

    def _forward_sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      ctx: ForwardContext) -> torch.Tensor:
        out = torch.empty_like(q)
        if ctx.slot_mapping is None or self.k_cache.numel() == 0:
            for start, end, _ in ctx.spans(q.shape[0]):
                out[start:end] = self._sdpa(q[start:end], k[start:end], v[start:end])
            return out.flatten(1)
        store_kv(k, v, self.k_cache, self.v_cache, ctx.slot_mapping, ctx.all_slots_valid,
                 self.kv_scales)
        decodes = ctx.decode_batch
        if decodes is not None:
            out[decodes.rows] = self._decode(q[decodes.rows], decodes)
        skip = set(decodes.seqs) if decodes is not None else set()
        for i, (start, end, kv_len) in enumerate(ctx.spans(q.shape[0])):
            if i not in skip:
                out[start:end] = self._sdpa(q[start:end], *self._gather(ctx, i, kv_len, q.dtype))
        return out.flatten(1)

    def _gather(self, ctx: ForwardContext, i: int, kv_len: int,
                dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """Sequence i's first kv_len cached K and V, in token order."""
        block_size = self.k_cache.shape[1]
        k, v = self._read(ctx.block_tables[i, : -(-kv_len // block_size)], dtype)
        return k.flatten(0, 1)[:kv_len], v.flatten(0, 1)[:kv_len]

    def _read(self, blocks: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """The cache's K and V blocks `blocks`, in `dtype` (an fp8 cache dequantized)."""
        scales = self.kv_scales or (None, None)
        return tuple(dequantize_kv(cache.index_select(0, blocks), dtype, scale)
                     for cache, scale in zip((self.k_cache, self.v_cache), scales, strict=True))

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """One sequence: q [q_len, H, D] are the last q_len of its kv_len tokens."""
        q_len, kv_len = q.shape[0], k.shape[0]
        mask = bottom_right_mask(q_len, kv_len, q.device) if 1 < q_len < kv_len else None
        out = F.scaled_dot_product_attention(
            _heads_first(q), _heads_first(k), _heads_first(v), attn_mask=mask,
            is_causal=q_len == kv_len > 1, scale=self.scale, enable_gqa=self.gqa)
        return out[0].transpose(0, 1)

    def _decode(self, q: torch.Tensor, batch: DecodeBatch) -> torch.Tensor:
        """q [num_decodes, H, D]: each one query over its whole (padded, masked) context."""
        block_size = self.k_cache.shape[1]
        tables = batch.block_tables[:, : -(-batch.max_seq_len // block_size)]
        k, v = (x.view(tables.shape[0], -1, *x.shape[2:])
                for x in self._read(tables.flatten(), q.dtype))
        keys = torch.arange(k.shape[1], device=k.device)
        mask = (keys[None, :] < batch.seq_lens[:, None])[:, None, None, :]
        out = F.scaled_dot_product_attention(
            q[:, :, None, :], k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
            scale=self.scale, enable_gqa=self.gqa)
        return out[:, :, 0, :]


def bottom_right_mask(q_len: int, kv_len: int,
                      device: torch.device) -> torch.Tensor | CausalBias:
    """Query i of the last q_len tokens sees keys [0, kv_len - q_len + i].

    On CUDA a CausalBias, which SDPA serves with flash / memory-efficient kernels; elsewhere
    a boolean mask (CausalBias dispatch costs milliseconds per call on the CPU).
    """
    if device.type == "cuda":
        return causal_lower_right(q_len, kv_len)
    return torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(kv_len - q_len)


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    """[tokens, heads, D] -> [1, heads, tokens, D]."""
    return x.transpose(0, 1).unsqueeze(0)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, all_valid: bool = False,
             kv_scales: KVScales | None = None) -> None:
    """Write token t's K/V at flat slot ``slot_mapping[t]`` (scaled into an fp8 cache by
    `kv_scales`); slots < 0 are skipped."""
    if not all_valid:
        keep = slot_mapping >= 0  # boolean indexing: one device sync
        slot_mapping, k, v = slot_mapping[keep], k[keep], v[keep]
    for x, cache, scale in zip((k, v), (k_cache, v_cache), kv_scales or (None, None),
                               strict=True):
        flat = cache.view(-1, *cache.shape[2:])
        raw(flat).index_copy_(0, slot_mapping, raw(quantize_kv(x, flat.dtype, scale)))
