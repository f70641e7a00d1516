"""Attention over a paged KV cache: store the step's K/V by slot, then SDPA per sequence."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.layers.context import ForwardContext, get_forward_context

BACKENDS = ("sdpa",)


class Attention(nn.Module):
    """q: [T, num_heads, head_dim], k/v: [T, num_kv_heads, head_dim] -> [T, num_heads * head_dim].

    The runner assigns ``k_cache`` / ``v_cache`` ([num_blocks, block_size, num_kv_heads,
    head_dim]); until then (profiling) attention only sees each sequence's new tokens.
    """

    backend = "sdpa"

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} is not a multiple of "
                             f"num_kv_heads={num_kv_heads}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        ctx = get_forward_context()
        paged = ctx.slot_mapping is not None and self.k_cache.numel() > 0
        if paged:
            store_kv(k, v, self.k_cache, self.v_cache, ctx.slot_mapping)
        out = torch.empty_like(q)
        for i, (start, end, kv_len) in enumerate(ctx.spans(q.shape[0])):
            if paged:
                seq_k, seq_v = self._gather(ctx, i, kv_len)
            else:
                seq_k, seq_v = k[start:end], v[start:end]
            out[start:end] = self._sdpa(q[start:end], seq_k, seq_v)
        return out.flatten(1)

    def _gather(self, ctx: ForwardContext, i: int, kv_len: int) -> tuple[torch.Tensor, ...]:
        """Sequence i's first kv_len cached K and V, in token order."""
        block_size = self.k_cache.shape[1]
        blocks = ctx.block_tables[i, : -(-kv_len // block_size)]
        k = self.k_cache.index_select(0, blocks).flatten(0, 1)[:kv_len]
        v = self.v_cache.index_select(0, blocks).flatten(0, 1)[:kv_len]
        return k, v

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q_len, kv_len = q.shape[0], k.shape[0]
        mask, causal = None, False
        if q_len == kv_len:
            causal = q_len > 1
        elif q_len > 1:
            mask = causal_mask(q_len, kv_len, q.device)
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask,
            is_causal=causal, scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads)
        return out.transpose(0, 1)


def causal_mask(q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    """Bottom-right aligned: query i of the last q_len tokens sees keys [0, kv_len - q_len + i]."""
    ones = torch.ones(q_len, kv_len, dtype=torch.bool, device=device)
    return ones.tril(diagonal=kv_len - q_len)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write token t's K/V at flat slot ``slot_mapping[t]``; slots < 0 are skipped."""
    flat_k = k_cache.view(-1, *k_cache.shape[2:])
    flat_v = v_cache.view(-1, *v_cache.shape[2:])
    keep = slot_mapping >= 0
    slots, k, v = slot_mapping[keep], k[keep], v[keep]
    flat_k.index_copy_(0, slots, k.to(flat_k.dtype))
    flat_v.index_copy_(0, slots, v.to(flat_v.dtype))
