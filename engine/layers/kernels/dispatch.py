"""Whether a layer takes its fused Triton kernel (CUDA tensors, triton importable) or the
torch reference code. Tests switch `ENABLED` off to compare the two."""

from __future__ import annotations

import importlib.util
from functools import cache

import torch

ENABLED = True


@cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def use_triton(x: torch.Tensor) -> bool:
    return ENABLED and x.is_cuda and triton_available()
