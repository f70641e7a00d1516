"""The KV cache in float8 e4m3 (`kv_cache_dtype=fp8`): the torch side of its scaling.

As vLLM does, each attention layer has one float32 scale for K and one for V (per tensor):
the cache stores ``x / scale`` in e4m3, saturated at +-448 (e4m3fn has no infinity, and a
plain cast turns an overflow into NaN), and readers multiply it back. The scales are 1.0,
vLLM's default when a checkpoint brings none: RMS-normed hidden states and RoPE-rotated keys
of the catalog models sit well inside e4m3's range (2^-9 .. 448), and a fixed scale keeps
the cache independent of the data the engine happened to see first. They live in device
memory, so the kernels (and CUDA graphs) read whatever a calibration might write there.
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
KV_DTYPES = {"float8_e4m3fn": FP8}
KVScales = tuple[torch.Tensor, torch.Tensor]  # a layer's (K scale, V scale), [1] float32 each


def kv_torch_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """EngineConfig.kv_dtype -> the cache's torch dtype (a model dtype name: the model's)."""
    return KV_DTYPES.get(name, model_dtype)


def quantize_kv(x: torch.Tensor, cache_dtype: torch.dtype,
                scale: torch.Tensor | None) -> torch.Tensor:
    """x as a cache of `cache_dtype` stores it."""
    if cache_dtype != FP8:
        return x.to(cache_dtype)
    return (x.float() / _scale(scale, x)).clamp_(-FP8_MAX, FP8_MAX).to(FP8)


def dequantize_kv(x: torch.Tensor, dtype: torch.dtype,
                  scale: torch.Tensor | None) -> torch.Tensor:
    """Cache entries back in the attention's `dtype`."""
    if x.dtype != FP8:
        return x
    return (x.float() * _scale(scale, x)).to(dtype)


def _scale(scale: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | float:
    return 1.0 if scale is None else scale.to(x.device)


def raw(x: torch.Tensor) -> torch.Tensor:
    """float8 as bytes, for index_copy_ (which torch lacks for float8 on the CPU)."""
    return x.view(torch.uint8) if x.dtype == FP8 else x
