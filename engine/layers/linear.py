"""Linear layers whose parameters are allocated, not initialised (the loader fills them);
optionally int8 weight-only (engine/layers/quantization.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.layers.kernels import dispatch
from engine.layers.quantization import absmax_quantize


class Linear(nn.Module):
    """y = x W^T + b, with W stored [out_features, in_features] like torch and HF. After
    `quantize_`, W is int8 codes and `weight_scale` their per-output-channel scales."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.register_parameter("weight_scale", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_scale is None:
            return F.linear(x, self.weight, self.bias)
        return int8_linear(x, self.weight, self.weight_scale, self.bias)

    @torch.no_grad()
    def quantize_(self) -> None:
        """Replace the weight by its int8 AbsMax codes and float32 scales (once loaded)."""
        codes, scale = absmax_quantize(self.weight)
        self.weight = nn.Parameter(codes, requires_grad=False)
        self.weight_scale = nn.Parameter(scale, requires_grad=False)


def int8_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, in] times the dequantized weight, in x's dtype: the Triton W8A16 kernel on CUDA
    (dequantizing tile by tile), else torch in float32 (the codes converted whole)."""
    if dispatch.use_triton(x):
        # Triton compiles at import: only the GPU path loads its kernels
        from engine.layers.kernels.int8_matmul import w8a16_matmul

        out = w8a16_matmul(x, codes, scale)
    else:
        out = (F.linear(x.float(), codes.float()) * scale).to(x.dtype)
    return out if bias is None else out + bias


class MergedLinear(Linear):
    """Several projections of one input stacked along the output dim (qkv_proj, gate_up_proj).

    Shard i occupies output rows ``[sum(output_sizes[:i]), sum(output_sizes[:i + 1]))``.
    """

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False):
        super().__init__(in_features, sum(output_sizes), bias)
        self.output_sizes = list(output_sizes)

    def shard(self, param: torch.Tensor, index: int) -> torch.Tensor:
        """A view of shard `index` of `param` (this layer's weight or bias)."""
        offset = sum(self.output_sizes[:index])
        return param.narrow(0, offset, self.output_sizes[index])

    def load_shard(self, param: torch.Tensor, loaded: torch.Tensor, index: int) -> None:
        target = self.shard(param, index)
        if target.shape != loaded.shape:
            raise ValueError(f"shard {index} expects shape {tuple(target.shape)}, "
                             f"got {tuple(loaded.shape)}")
        target.copy_(loaded)


class VocabEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)
