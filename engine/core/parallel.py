"""Tensor parallelism's per-rank arithmetic, shared by the engine and the twin. Pure Python.

Megatron-style sharding, as vLLM shards its `ColumnParallelLinear`, `RowParallelLinear`,
`VocabParallelEmbedding` and `ParallelLMHead`:
- column-parallel (qkv_proj, gate_up_proj): output rows split over the ranks, biases with them;
- row-parallel (o_proj, down_proj): input columns split, partial outputs all-reduced; a bias
  is stored whole on every rank (added once, by rank 0, before the all-reduce);
- vocab-parallel embedding and LM head: vocabulary rows split, the vocabulary first padded to
  a multiple of VOCAB_PADDING when TP > 1 (vLLM's DEFAULT_VOCAB_PADDING_SIZE);
- norms (and Qwen3's per-head q/k norms) replicated: every rank stores them whole;
- attention heads split; KV heads split while there are at least as many as ranks, else each
  KV head is replicated on tp / kv_heads ranks, one per rank (vLLM's `get_num_kv_heads`:
  max(1, kv_heads // tp), and `QKVParallelLinear`'s num_kv_head_replicas).

Every rank holds the same shapes, so weights and KV bytes are equal across ranks; the start-up
activation is not (rank 0 samples over the gathered logits), which is why num_blocks is the
minimum over the ranks (vLLM takes the minimum of its workers' available KV memory).
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.core.config import (
    DTYPE_BYTES,
    INT8_SCALE_DTYPE,
    STORAGE_BYTES,
    GiB,
    ModelConfig,
)

VOCAB_PADDING = 64  # vLLM's DEFAULT_VOCAB_PADDING_SIZE (vocab_parallel_embedding.py)

# Device memory the TP communicators take outside torch's allocator, per rank, TP > 1: vLLM's
# start-up profile of Llama-3-8B on H100 80GB (vllm-project/vllm PR #10511, 2024-12-14)
# logged non_torch_memory 1.79 GiB at TP=1 and 3.58 GiB at TP=2: NCCL's communicator
# buffers (NCCL_BUFFSIZE, 4 MiB per channel and peer by default) plus vLLM's custom
# all-reduce buffers, +1.79 GiB per GPU. One point only, taken for every TP > 1; the engine's
# measured non-torch memory at TP=2 (engine/tools/bench_tp.py) replaces it.
TP_COMM_BYTES = int(1.79 * GiB)


@dataclass(frozen=True)
class RankShapes:
    """What one rank of `tp` holds of a model (the same on every rank)."""

    tp: int
    num_heads: int          # query heads per rank
    num_kv_heads: int       # KV heads per rank
    kv_head_replicas: int   # ranks holding each KV head (1: KV heads split, not replicated)
    intermediate: int       # MLP width per rank
    vocab_padded: int       # the vocabulary padded for sharding (the vocabulary at TP=1)
    vocab: int              # vocabulary rows per rank (embedding and LM head)

    @classmethod
    def of(cls, model: ModelConfig, tp: int = 1) -> RankShapes:
        kv = model.num_key_value_heads
        padded = model.vocab_size if tp == 1 else round_up(model.vocab_size, VOCAB_PADDING)
        return cls(tp, model.num_attention_heads // tp, max(1, kv // tp), max(1, tp // kv),
                   model.intermediate_size // tp, padded, padded // tp)

    def kv_head_start(self, rank: int) -> int:
        """The first KV head rank `rank` holds (consecutive ranks share a replicated head)."""
        return (rank // self.kv_head_replicas) * self.num_kv_heads

    def vocab_start(self, rank: int) -> int:
        return rank * self.vocab


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def rank_num_parameters(model: ModelConfig, tp: int = 1) -> int:
    """Parameters one rank stores: equal to `ModelConfig.num_parameters()` at TP=1."""
    s, h, hd = RankShapes.of(model, tp), model.hidden_size, model.head_dim
    q, kv = s.num_heads * hd, s.num_kv_heads * hd
    attn = h * (q + 2 * kv) + q * h
    if model.attention_bias:  # column-parallel qkv bias split, row-parallel o bias whole
        attn += q + 2 * kv + h
    if model.is_qwen3:
        attn += 2 * hd  # q_norm and k_norm, replicated
    layer = attn + 3 * h * s.intermediate + 2 * h
    embed = s.vocab * h
    head = 0 if model.tie_word_embeddings else s.vocab * h
    return model.num_hidden_layers * layer + embed + head + h


def rank_linear_sizes(model: ModelConfig, tp: int = 1) -> tuple[int, int]:
    """(weights, output channels) of one rank's decoder projections (what int8 replaces): a
    row-parallel layer keeps every output channel, so each rank has a scale per channel."""
    s, h = RankShapes.of(model, tp), model.hidden_size
    q, kv = s.num_heads * model.head_dim, s.num_kv_heads * model.head_dim
    weights = h * (q + 2 * kv) + q * h + 3 * h * s.intermediate
    channels = (q + 2 * kv) + h + 2 * s.intermediate + h
    return model.num_hidden_layers * weights, model.num_hidden_layers * channels


def rank_weight_bytes(model: ModelConfig, tp: int, dtype: str,
                      quantization: str = "none") -> int:
    """Bytes of one rank's parameters (`ModelConfig.weight_bytes` at TP=1)."""
    total = rank_num_parameters(model, tp) * DTYPE_BYTES[dtype]
    if quantization == "int8":
        weights, channels = rank_linear_sizes(model, tp)
        total += weights * (STORAGE_BYTES["int8"] - DTYPE_BYTES[dtype]) \
            + channels * STORAGE_BYTES[INT8_SCALE_DTYPE]
    return total


def rank_kv_bytes_per_token(model: ModelConfig, tp: int, kv_dtype: str) -> int:
    """2 (K and V) x layers x KV heads per rank x head_dim x KV dtype bytes."""
    return 2 * model.num_hidden_layers * RankShapes.of(model, tp).num_kv_heads \
        * model.head_dim * STORAGE_BYTES[kv_dtype]


def comm_buffer_bytes(tp: int, device_kind: str = "gpu") -> int:
    """The TP communicators' device memory per rank (TP_COMM_BYTES on a GPU at TP > 1; gloo's
    buffers on the CPU are host memory outside the budgeted total)."""
    return TP_COMM_BYTES if tp > 1 and device_kind == "gpu" else 0


def allreduces_per_step(model: ModelConfig) -> int:
    """All-reduces of [tokens, hidden] a forward pass makes at TP > 1: the attention output
    and the MLP down projection of every layer, and the vocab-parallel embedding."""
    return 2 * model.num_hidden_layers + 1
