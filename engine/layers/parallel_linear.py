"""Megatron-style tensor-parallel linear layers, embedding and LM head (vLLM's vocabulary).

- `ColumnParallelLinear`: W [out, in] split by output rows; rank r computes its slice of y.
- `MergedColumnParallelLinear`: several column-parallel projections of one input stacked
  (gate_up_proj): each is split on its own, the rank's slices stacked in order.
- `QKVParallelLinear`: q, k, v by heads: q heads split; KV heads split while there are at
  least as many as ranks, else each replicated on tp / kv ranks (engine.core.parallel).
- `RowParallelLinear`: W split by input columns; the input is already the rank's slice (the
  column-parallel output before it); partial outputs are summed by an all-reduce. Its bias is
  whole on every rank and added once, by rank 0, before the sum.
- `VocabParallelEmbedding`: vocabulary rows split (padded to a multiple of 64 at TP > 1); a
  rank looks up the ids it holds, zeros the others, and the ranks' rows are summed.
- `ParallelLMHead`: the LM head split like the embedding (shared with it when tied); each rank
  computes its vocabulary slice of the logits, gathered on rank 0.

At TP=1 every layer has the shapes, parameters and results of the plain layers.
Every parameter can be set from its full (unsharded) tensor: `full_shape(name)` and
`shard_full(name, full)`; a fused projection's HF parts through `shard_part(part, index)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.core.parallel import VOCAB_PADDING, round_up
from engine.layers.linear import Linear, MergedLinear, VocabEmbedding, int8_linear
from engine.layers.parallel import all_reduce, divide, gather_to_first, get_tp

Segment = tuple[int, int, int]  # (full size, rank's start in it, rank's length)


class ShardedRows:
    """Output rows made of segments, each split on its own (mixed into the column layers)."""

    segments: list[Segment]
    in_features: int

    def full_shape(self, name: str) -> tuple[int, ...]:
        rows = sum(full for full, _, _ in self.segments)
        return (rows, self.in_features) if name == "weight" else (rows,)

    def shard_full(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """The rank's rows of the full weight or bias (its segments' slices, stacked)."""
        if all(n == size for size, _, n in self.segments):
            return full
        parts, offset = [], 0
        for size, start, n in self.segments:
            parts.append(full.narrow(0, offset + start, n))
            offset += size
        return torch.cat(parts)

    def shard_part(self, part: torch.Tensor, index: int) -> torch.Tensor:
        """The rank's slice of one projection of a fused layer (an HF q_proj, up_proj ...)."""
        size, start, n = self.segments[index]
        return part if n == size else part.narrow(0, start, n)


def even_segment(size: int, rank: int, tp: int) -> Segment:
    n = divide(size, tp)
    return size, rank * n, n


class ColumnParallelLinear(ShardedRows, Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        tp = get_tp()
        segment = even_segment(out_features, tp.rank, tp.size)
        Linear.__init__(self, in_features, segment[2], bias)
        self.segments = [segment]


class MergedColumnParallelLinear(ShardedRows, MergedLinear):
    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False):
        tp = get_tp()
        segments = [even_segment(size, tp.rank, tp.size) for size in output_sizes]
        MergedLinear.__init__(self, in_features, [n for _, _, n in segments], bias)
        self.segments = segments


class QKVParallelLinear(MergedColumnParallelLinear):
    """q, k and v of `num_heads` / `num_kv_heads` heads of `head_dim`, split by heads."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False):
        tp = get_tp()
        heads, kv_heads = divide(num_heads, tp.size), max(1, num_kv_heads // tp.size)
        replicas = max(1, tp.size // num_kv_heads)
        kv_start = (tp.rank // replicas) * kv_heads * head_dim
        kv = (num_kv_heads * head_dim, kv_start, kv_heads * head_dim)
        q = (num_heads * head_dim, tp.rank * heads * head_dim, heads * head_dim)
        MergedLinear.__init__(self, hidden_size, [q[2], kv[2], kv[2]], bias)
        self.segments = [q, kv, kv]
        self.num_heads, self.num_kv_heads = heads, kv_heads


class RowParallelLinear(Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        tp = get_tp()
        super().__init__(divide(in_features, tp.size), out_features, bias)
        self.tp_rank, self.tp_size = tp.rank, tp.size
        self.full_in = in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias if self.tp_rank == 0 else None
        if self.weight_scale is None:
            y = F.linear(x, self.weight, bias)
        else:
            y = int8_linear(x, self.weight, self.weight_scale, bias)
        return all_reduce(y) if self.tp_size > 1 else y

    def full_shape(self, name: str) -> tuple[int, ...]:
        return (self.out_features, self.full_in) if name == "weight" else (self.out_features,)

    def shard_full(self, name: str, full: torch.Tensor) -> torch.Tensor:
        if name != "weight" or self.tp_size == 1:
            return full
        return full.narrow(1, self.tp_rank * self.in_features, self.in_features)


def vocab_shard(vocab_size: int) -> tuple[int, int]:
    """(rows per rank, the rank's first row): the vocabulary padded to VOCAB_PADDING at TP > 1
    (engine.core.parallel.RankShapes, which the twin reads)."""
    tp = get_tp()
    padded = vocab_size if tp.size == 1 else round_up(vocab_size, VOCAB_PADDING)
    rows = padded // tp.size
    return rows, tp.rank * rows


def vocab_rows(full: torch.Tensor, vocab_size: int, rows: int, start: int) -> torch.Tensor:
    """Rows [start, start + rows) of a [vocab, ...] tensor, zero past the vocabulary."""
    if rows == vocab_size:
        return full
    out = full.new_zeros((rows, *full.shape[1:]))
    real = max(0, min(rows, vocab_size - start))
    out[:real] = full[start:start + real]
    return out


class VocabParallelEmbedding(VocabEmbedding):
    def __init__(self, num_embeddings: int, embedding_dim: int):
        rows, start = vocab_shard(num_embeddings)
        super().__init__(rows, embedding_dim)
        self.vocab_size, self.rows, self.start = num_embeddings, rows, start
        self.tp_size = get_tp().size

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.start
        held = (local >= 0) & (local < self.rows)
        out = F.embedding(torch.where(held, local, 0), self.weight)
        out.mul_(held.unsqueeze(-1).to(out.dtype))  # graph-safe: no data-dependent shapes
        return all_reduce(out)

    def full_shape(self, name: str) -> tuple[int, ...]:
        return (self.vocab_size, self.weight.shape[1])

    def shard_full(self, name: str, full: torch.Tensor) -> torch.Tensor:
        return vocab_rows(full, self.vocab_size, self.rows, self.start)


class ParallelLMHead(Linear):
    """hidden [N, H] -> logits [N, vocab] on rank 0 (None on the others at TP > 1)."""

    def __init__(self, hidden_size: int, vocab_size: int):
        rows, start = vocab_shard(vocab_size)
        super().__init__(hidden_size, rows)
        self.vocab_size, self.rows, self.start = vocab_size, rows, start
        self.tp_size = get_tp().size

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:
        logits = F.linear(hidden, self.weight)
        if self.tp_size == 1:
            return logits
        full = gather_to_first(logits)
        return None if full is None else full[:, :self.vocab_size]

    def full_shape(self, name: str) -> tuple[int, ...]:
        return (self.vocab_size, self.in_features)

    def shard_full(self, name: str, full: torch.Tensor) -> torch.Tensor:
        return vocab_rows(full, self.vocab_size, self.rows, self.start)
