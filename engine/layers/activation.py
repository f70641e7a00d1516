"""Gated activation of the Llama-style MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.layers.kernels import dispatch


class SiluAndMul(nn.Module):
    """x = [gate | up] along the last dim -> silu(gate) * up."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if dispatch.use_triton(x):
            # Triton compiles at import: only the GPU path loads its kernels
            from engine.layers.kernels.elementwise import silu_and_mul

            return silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
