"""Capacity plan: does a configuration start, how many blocks, how many requests at once."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from engine.core.catalog import Hardware
from engine.core.config import EngineConfig, GiB, ModelConfig
from engine.core.memory import blocks_per_request, largest_max_model_len, max_concurrency
from sim.memory_model import MemoryPrediction, predict_memory
from sim.profile import Profile


@dataclass
class CapacityPlan:
    model: str
    hardware: str
    starts: bool
    error: str | None
    num_blocks: int
    block_size: int
    kv_cache_tokens: int
    kv_cache_gib: float
    max_model_len: int
    max_concurrency_at_max_len: float
    mean_request_len: float | None
    max_concurrency_at_mean_len: float | None
    largest_max_model_len: int
    # Tensor parallelism: the figures above are per rank (every rank holds num_blocks blocks
    # of its KV heads; a block still holds block_size tokens of every layer).
    tensor_parallel_size: int = 1
    rank_num_blocks: list[int] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_capacity(model: ModelConfig, hardware: Hardware, config: EngineConfig,
                  profile: Profile | None = None, mean_request_len: float | None = None,
                  memory: MemoryPrediction | None = None) -> CapacityPlan:
    memory = memory or predict_memory(model, hardware, config, profile)
    n, bs = memory.num_blocks, config.block_size
    at_mean = None
    if mean_request_len:
        at_mean = max(n, 0) / blocks_per_request(max(1, round(mean_request_len)), bs)
    largest = min(largest_max_model_len(n, bs), model.max_position_embeddings)
    return CapacityPlan(
        model.name, hardware.name, memory.starts, memory.error, n, bs, max(n, 0) * bs,
        max(n, 0) * memory.block_bytes / GiB, config.max_model_len,
        max_concurrency(n, bs, config.max_model_len), mean_request_len, at_mean, largest,
        config.tensor_parallel_size, list(memory.rank_num_blocks) or None)


def format_plan(plan: CapacityPlan, memory: MemoryPrediction) -> str:
    gib = {k: v / GiB for k, v in memory.terms.to_dict().items() if k.endswith("_bytes")}
    tp = plan.tensor_parallel_size
    lines = [
        f"capacity plan  {plan.model} on {plan.hardware}"
        + (f", tensor_parallel_size={tp} (memory and KV blocks per rank)" if tp > 1 else ""),
        f"  memory       total {gib['total_bytes']:.2f} GiB x {memory.terms.gpu_memory_utilization}"
        f" = budget {gib['budget_bytes']:.2f} GiB",
        f"               weights {gib['weights_bytes']:.2f} + activation "
        f"{gib['activation_peak_bytes']:.2f} + non-torch {gib['non_torch_bytes']:.2f} + "
        f"graphs {gib['cuda_graph_bytes']:.2f} GiB -> KV {gib['kv_cache_bytes']:.2f} GiB",
        f"  sources      {', '.join(f'{k}: {v}' for k, v in memory.sources.items())}",
        f"  starts       {'yes' if plan.starts else 'NO'}",
    ]
    if plan.error:
        lines.append(f"  error        {plan.error}")
    if plan.rank_num_blocks:
        p = memory.parallel
        lines.append(f"  ranks        KV blocks by rank {plan.rank_num_blocks} -> min "
                     f"{plan.num_blocks:,}; {p['num_heads_per_rank']} query / "
                     f"{p['kv_heads_per_rank']} KV heads per rank (KV heads replicated "
                     f"x{p['kv_head_replicas']}), TP buffers "
                     f"{p['comm_buffer_bytes'] / GiB:.2f} GiB per rank")
    lines += [
        f"  KV blocks    {plan.num_blocks:,} x {plan.block_size} tokens = "
        f"{plan.kv_cache_tokens:,} tokens ({plan.kv_cache_gib:.2f} GiB)",
        f"  concurrency  {plan.max_concurrency_at_max_len:.2f}x at max_model_len="
        f"{plan.max_model_len:,}" + (f", {plan.max_concurrency_at_mean_len:.2f}x at the "
                                     f"workload's mean {plan.mean_request_len:,.0f} tokens"
                                     if plan.max_concurrency_at_mean_len is not None else ""),
        f"  largest max_model_len that fits: {plan.largest_max_model_len:,}",
    ]
    return "\n".join(lines)
