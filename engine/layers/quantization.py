"""Weight-only int8 quantization, AbsMax per output channel (`quantization=int8`).

Each row n of a linear weight W [out, in] gets one float32 scale and int8 codes:

    scale[n] = max_k |W[n, k]| / 127        codes[n, k] = round(W[n, k] / scale[n])

so a weight is off by at most scale[n] / 2, and y = x W^T is computed as (x codes^T) * scale
(the Triton W8A16 kernel, engine/layers/kernels/int8_matmul.py). Scales are float32: a bf16
scale would add its own 0.4 % rounding to every weight of the row, for 2 bytes a row saved.

Quantized at load: the model is built (seeded or from safetensors) in its dtype, then every
decoder projection (q/k/v, o, gate/up, down) is replaced in place. Two matrices stay in the
model dtype, as in vLLM's and bitsandbytes' weight-only schemes: the embedding, a lookup of a
few rows per step (int8 there saves memory but no bandwidth), and the LM head, whose error
goes straight into the logits (with tied embeddings it is the embedding itself).
"""

from __future__ import annotations

import torch
from torch import nn

INT8_MAX = 127


def absmax_quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [out, in] -> (int8 codes [out, in], float32 scales [out]). An all-zero row gets
    scale 1 (any scale reproduces it)."""
    w = weight.float()
    scale = w.abs().amax(dim=1) / INT8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round(w / scale[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return codes, scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (codes.float() * scale[:, None]).to(dtype)


@torch.no_grad()
def quantize_linears(model: nn.Module) -> int:
    """Quantize every layer of `model` that can quantize itself (the Linears) but its LM
    head, in place; returns how many."""
    head = getattr(model, "lm_head", None)
    layers = [m for m in model.modules() if hasattr(m, "quantize_") and m is not head]
    for layer in layers:
        layer.quantize_()
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the dtype weights' blocks, so no later term counts them
    return len(layers)
