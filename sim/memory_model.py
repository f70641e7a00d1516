"""Predict every start-up memory term, then num_blocks and the start-up verdict through
`engine.core.memory` (`decide_num_blocks`, `check_startup`): the engine's own rule and errors.

Sources, stated per term:
- weights: exact, from the model config, dtype and quantization (int8: one byte per linear
  weight, a float32 scale per output channel, embeddings and LM head in dtype);
- activation, non-torch, CUDA-graph pool: a calibration profile when one exists for this
  hardware + model, else the documented formulas below;
- KV blocks: in the KV cache dtype (`EngineConfig.kv_dtype`: fp8 halves a bf16 block).

A GPU shared with other processes (`Hardware.used_by_others_gib`), as vLLM V1 treats it:
free at start = total - others - this engine's CUDA context; the engine refuses to start when
that is below total x gpu_memory_utilization (`check_free_memory`), and otherwise budgets
total x utilization exactly as on a GPU of its own: others' memory never changes num_blocks.

Tensor parallelism (`EngineConfig.tensor_parallel_size`), per rank, through
`engine.core.parallel`: the rank's weight shard, its KV heads (bytes_per_block), its
activation (rank 0 samples over the gathered logits), the communicators' buffers as non-torch
memory (`comm_buffer_bytes`, sourced there); num_blocks is the minimum over the ranks.
Calibration profiles are measured at TP=1: at TP > 1 the formulas stand in for them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine.core.catalog import Hardware
from engine.core.config import EngineConfig, GiB, ModelConfig
from engine.core.memory import (
    MemoryTerms,
    StartupError,
    blocks_per_request,
    check_free_memory,
    check_startup,
    decide_num_blocks,
    estimate_activation_bytes,
    min_over_ranks,
    mixed_buffer_bytes,
)
from engine.core.parallel import RankShapes, comm_buffer_bytes, rank_weight_bytes
from engine.core.shapes import graph_buckets
from sim.profile import Profile


@dataclass
class MemoryPrediction:
    terms: MemoryTerms
    block_bytes: int
    num_blocks: int
    sources: dict[str, str] = field(default_factory=dict)
    error: str | None = None  # the engine's start-up error, word for word, if it cannot start
    error_type: str | None = None
    # Tensor parallelism: every rank's num_blocks (num_blocks is their minimum; `terms` are
    # the rank that set it) and the per-rank shapes. Empty at TP=1.
    rank_num_blocks: list[int] = field(default_factory=list)
    parallel: dict[str, Any] = field(default_factory=dict)

    @property
    def starts(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        d = {**self.terms.to_dict(), "bytes_per_block": self.block_bytes,
             "num_blocks": self.num_blocks, "sources": dict(self.sources),
             "starts": self.starts, "error": self.error, "error_type": self.error_type}
        if self.parallel:
            d.update(rank_num_blocks=list(self.rank_num_blocks), parallel=dict(self.parallel))
        return d


# What the engine's graph probe measures beyond the largest batch's activations: the warm-up
# forward's cached blocks and the libraries' workspaces. Measured on an H100 (2026-11-21,
# Qwen3-0.6B, max_num_seqs 256): 136,314,880 B in all, of which the activations ~7.9 MB.
GRAPH_POOL_OVERHEAD_BYTES = 128 << 20

# The engine's own CUDA context (and the libraries' start-up allocations), in use before it
# reads the free memory. An estimate, not measured on this repo's GPUs: a CUDA 12+ context
# with lazy module loading takes ~0.5 GiB on Hopper. `LLMEngine.memory_report()`'s
# used_at_start_bytes measures it on a GPU held by no other process.
CUDA_CONTEXT_BYTES = 512 << 20


def estimate_cuda_graph_bytes(model: ModelConfig, config: EngineConfig) -> int:
    """Graphs share one pool sized by the largest captured step's activations (the
    largest decode batch's, or the largest mixed-step bucket's: the forward pass only, as
    sampling runs outside the graphs), plus a measured overhead and the mixed-step graphs'
    static buffers."""
    if config.enforce_eager:
        return 0
    largest = graph_buckets(config.max_num_seqs)[-1]
    tokens = config.cudagraph_token_limit
    pool = estimate_activation_bytes(model, max(largest, tokens), 0, config.dtype,
                                     config.tensor_parallel_size)
    return pool + GRAPH_POOL_OVERHEAD_BYTES + _mixed_buffers(model, config, tokens)


def mixed_graph_bytes(model: ModelConfig, config: EngineConfig, tokens: int) -> int:
    """What mixed-step graphs of up to `tokens` rows add to the graph memory (formula)."""
    return (estimate_activation_bytes(model, tokens, 0, config.dtype,
                                      config.tensor_parallel_size)
            + _mixed_buffers(model, config, tokens))


def _mixed_buffers(model: ModelConfig, config: EngineConfig, tokens: int) -> int:
    if not tokens:
        return 0
    return mixed_buffer_bytes(model, tokens, config.dtype, config.max_num_seqs,
                              blocks_per_request(config.max_model_len, config.block_size))


def predict_memory(model: ModelConfig, hardware: Hardware, config: EngineConfig,
                   profile: Profile | None = None) -> MemoryPrediction:
    if config.tensor_parallel_size > 1:
        return predict_rank_memory(model, hardware, config)
    terms, sources = _terms(model, hardware, config, profile)
    terms.used_at_start_bytes, sources["used_at_start"] = _used_at_start(hardware)
    return prediction_from_terms(model, config, terms, sources)


def predict_rank_memory(model: ModelConfig, hardware: Hardware,
                        config: EngineConfig) -> MemoryPrediction:
    """Every rank's terms (formulas), num_blocks the minimum over the ranks, the start-up
    verdict that rank's: the engine all-reduces num_blocks (MIN) before its checks."""
    tp = config.tensor_parallel_size
    ranks = []
    for rank in range(tp):
        terms, sources = rank_terms(model, hardware, config, rank)
        terms.used_at_start_bytes, sources["used_at_start"] = _used_at_start(hardware)
        ranks.append((terms, sources))
    sizes = [decide_num_blocks(terms, model, config) for terms, _ in ranks]
    low = sizes.index(min_over_ranks(sizes))
    prediction = prediction_from_terms(model, config, *ranks[low])
    shapes = RankShapes.of(model, tp)
    prediction.rank_num_blocks = [size.num_blocks for size in sizes]
    prediction.parallel = {
        "tensor_parallel_size": tp, "min_rank": low, "num_heads_per_rank": shapes.num_heads,
        "kv_heads_per_rank": shapes.num_kv_heads, "kv_head_replicas": shapes.kv_head_replicas,
        "vocab_per_rank": shapes.vocab,
        "comm_buffer_bytes": comm_buffer_bytes(tp, hardware.kind)}
    return prediction


def rank_terms(model: ModelConfig, hardware: Hardware, config: EngineConfig,
               rank: int) -> tuple[MemoryTerms, dict[str, str]]:
    """One rank's start-up terms at TP > 1, by formula (engine.core.parallel)."""
    tp, tokens = config.tensor_parallel_size, config.max_num_batched_tokens
    weights = rank_weight_bytes(model, tp, config.dtype, config.quantization)
    act = estimate_activation_bytes(model, tokens, min(config.max_num_seqs, tokens),
                                    config.dtype, tp, rank)
    sources = {"weights": f"exact, rank shard of TP={tp}", "activation": f"formula, rank {rank}"}
    if hardware.kind == "cpu":
        terms = MemoryTerms(int(config.cpu_memory_gib * GiB), config.gpu_memory_utilization,
                            weights, act, source="predicted")
        return terms, {"total": "EngineConfig.cpu_memory_gib", **sources,
                       "non_torch": "none on CPU (gloo buffers in host memory)",
                       "cuda_graph": "none on CPU"}
    non_torch = hardware.non_torch_bytes_default + comm_buffer_bytes(tp, hardware.kind)
    terms = MemoryTerms(hardware.total_memory_bytes, config.gpu_memory_utilization, weights,
                        act, non_torch, estimate_cuda_graph_bytes(model, config),
                        source="predicted")
    return terms, {"total": f"catalog: {hardware.name}", **sources,
                   "non_torch": "catalog default + TP communicator buffers "
                                "(engine.core.parallel.TP_COMM_BYTES)",
                   "cuda_graph": "formula" if not config.enforce_eager else "enforce_eager"}


def prediction_from_terms(model: ModelConfig, config: EngineConfig, terms: MemoryTerms,
                          sources: dict[str, str]) -> MemoryPrediction:
    """num_blocks and the start-up verdict from memory terms, however they were obtained:
    the engine's own checks (free memory at start, then the KV cache) in its order."""
    size = decide_num_blocks(terms, model, config)
    prediction = MemoryPrediction(terms, size.block_bytes, size.num_blocks, sources)
    try:
        check_free_memory(terms.free_at_start_bytes, terms.total_bytes,
                          config.gpu_memory_utilization)
        check_startup(size, config)
    except StartupError as err:
        prediction.error, prediction.error_type = str(err), type(err).__name__
    return prediction


def _used_at_start(hardware: Hardware) -> tuple[int, str]:
    """Other processes' memory, plus the engine's CUDA context on a GPU."""
    others = int(hardware.used_by_others_gib * GiB)
    if hardware.kind == "cpu":
        return others, "catalog: used_by_others_gib"
    return others + CUDA_CONTEXT_BYTES, "catalog: used_by_others_gib + CUDA context estimate"


def _terms(model: ModelConfig, hardware: Hardware, config: EngineConfig,
           profile: Profile | None) -> tuple[MemoryTerms, dict[str, str]]:
    weights = model.weight_bytes(config.dtype, config.quantization)
    tokens = config.max_num_batched_tokens
    if hardware.kind == "cpu":  # the CPU engine budgets a configured total, like this
        act = estimate_activation_bytes(model, tokens, min(config.max_num_seqs, tokens),
                                        config.dtype)
        terms = MemoryTerms(int(config.cpu_memory_gib * GiB), config.gpu_memory_utilization,
                            weights, act, source="predicted")
        return terms, {"total": "EngineConfig.cpu_memory_gib", "weights": "exact",
                       "activation": "formula", "non_torch": "none on CPU",
                       "cuda_graph": "none on CPU"}
    if profile is not None and profile.memory:
        return _terms_from_profile(model, hardware, config, profile, weights)
    act = estimate_activation_bytes(model, tokens, min(config.max_num_seqs, tokens),
                                    config.dtype)
    terms = MemoryTerms(hardware.total_memory_bytes, config.gpu_memory_utilization, weights,
                        act, hardware.non_torch_bytes_default,
                        estimate_cuda_graph_bytes(model, config), source="predicted")
    return terms, {"total": f"catalog: {hardware.name}", "weights": "exact",
                   "activation": "formula", "non_torch": "catalog default",
                   "cuda_graph": "formula" if not config.enforce_eager else "enforce_eager"}


def _terms_from_profile(model: ModelConfig, hardware: Hardware, config: EngineConfig,
                        profile: Profile, weights: int) -> tuple[MemoryTerms, dict[str, str]]:
    mem = profile.memory
    act = profile.activation_bytes(config.max_num_batched_tokens)
    graph, graph_src = _graph_bytes_from_profile(model, config, profile)
    terms = MemoryTerms(int(mem.get("total_bytes", hardware.total_memory_bytes)),
                        config.gpu_memory_utilization, weights, act,
                        int(mem.get("non_torch_bytes", hardware.non_torch_bytes_default)),
                        graph, source=f"profile:{profile.name}")
    src = f"profile {profile.name}"
    return terms, {"total": src, "weights": "exact", "activation": src, "non_torch": src,
                   "cuda_graph": graph_src}


def _graph_bytes_from_profile(model: ModelConfig, config: EngineConfig,
                              profile: Profile) -> tuple[int, str]:
    """The profile's measured graph memory; where this configuration's mixed-step graphs
    reach another token count than the calibration's (memory "cuda_graph_tokens"), the
    difference by formula. Profiles without that key predate graphs of mixed steps."""
    if config.enforce_eager:
        return 0, "enforce_eager"
    measured, src = int(profile.memory.get("cuda_graph_bytes", 0)), f"profile {profile.name}"
    calibrated = profile.memory.get("cuda_graph_tokens")
    tokens = config.cudagraph_token_limit
    if calibrated is None or tokens == calibrated:
        return measured, src
    delta = mixed_graph_bytes(model, config, tokens) - mixed_graph_bytes(model, config,
                                                                          int(calibrated))
    return measured + delta, f"{src}, mixed-step graphs of {tokens} tokens by formula"
