"""Linear layers whose parameters are allocated, not initialised (the loader fills them)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Module):
    """y = x W^T + b, with W stored [out_features, in_features] like torch and HF."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


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
