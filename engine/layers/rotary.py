"""Rotary position embedding (RoPE), rotate-half layout, with a float32 cos/sin cache.

Frequencies follow the published formulas: inv_freq_j = theta^(-2j / d) (RoFormer), and for
``rope_type == "llama3"`` Meta's Llama 3.1 rescaling: wavelengths longer than
``original_max_position_embeddings / low_freq_factor`` are divided by ``factor``, shorter than
``original_max_position_embeddings / high_freq_factor`` are kept, and the band in between is
interpolated linearly in ``original_max_position_embeddings / wavelength``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from engine.layers.kernels import dispatch


def default_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    return 1.0 / (theta ** exponents)


def llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, blended)
    return torch.where(wavelen < old_len / high, inv_freq, scaled)


def rope_type(scaling: dict[str, Any] | None) -> str:
    if not scaling:
        return "default"
    return scaling.get("rope_type") or scaling.get("type") or "default"


def compute_inv_freq(head_dim: int, theta: float,
                     scaling: dict[str, Any] | None) -> torch.Tensor:
    inv_freq = default_inv_freq(head_dim, theta)
    kind = rope_type(scaling)
    if kind == "llama3":
        return llama3_inv_freq(inv_freq, scaling)
    if kind != "default":
        raise NotImplementedError(f"rope_scaling type {kind!r} is not supported "
                                  "(supported: default, llama3)")
    return inv_freq


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, theta: float,
                 scaling: dict[str, Any] | None = None):
        super().__init__()
        inv_freq = compute_inv_freq(head_dim, theta, scaling)
        freqs = torch.arange(max_position, dtype=torch.float32)[:, None] * inv_freq[None, :]
        self.register_buffer("cos_cache", freqs.cos(), persistent=False)
        self.register_buffer("sin_cache", freqs.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor,
                k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k: [T, heads, head_dim]; positions: [T]."""
        if dispatch.use_triton(q):
            # Triton compiles at import: only the GPU path loads its kernels
            from engine.layers.kernels.elementwise import rotary

            return (rotary(q, self.cos_cache, self.sin_cache, positions),
                    rotary(k, self.cos_cache, self.sin_cache, positions))
        cos = self.cos_cache[positions].unsqueeze(1)
        sin = self.sin_cache[positions].unsqueeze(1)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_j, x_{j + d/2}) by angle position * inv_freq_j."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
