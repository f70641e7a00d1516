"""RMSNorm computed in float32, as HF does, with an optional fused residual add."""

from __future__ import annotations

import torch
from torch import nn

from engine.layers.kernels import dispatch


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if dispatch.use_triton(x):
            # Triton compiles at import: only the GPU path loads its kernels
            from engine.layers.kernels.elementwise import rms_norm

            return rms_norm(x, self.weight, self.eps)[0]
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)

    def forward_with_residual(self, x: torch.Tensor,
                              residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (norm(x + residual), x + residual): the pre-norm decoder's residual stream."""
        if dispatch.use_triton(x):
            # Triton compiles at import: only the GPU path loads its kernels
            from engine.layers.kernels.elementwise import rms_norm

            return rms_norm(x, self.weight, self.eps, residual)
        x = x + residual
        return self(x), x
