"""The engine's start-up, run by every tensor-parallel rank alike: build the model (its
shard), profile memory, size and allocate the KV cache, capture the CUDA graphs.

Like vLLM: free memory is read before the model loads (and checked against the budget),
a dummy step of max_num_batched_tokens gives the peak activation, the graph pool is probed,
and num_blocks is what the budget leaves after every term, in whole blocks. With
tensor parallelism each rank measures its own terms (its shard, its KV heads) and every rank
allocates the smallest num_blocks of any rank (an all-reduce MIN); the ranks run the same
steps in the same order, so their collectives (the dummy step's, the graphs' captures) meet.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.core.config import EngineConfig, GiB, ModelConfig
from engine.core.memory import (
    KVCacheSize,
    MemoryTerms,
    check_free_memory,
    check_startup,
    decide_num_blocks,
    estimate_activation_bytes,
)
from engine.core.shapes import graph_buckets
from engine.layers.parallel import get_tp
from engine.runtime.distributed import gather_objects, min_over_ranks
from engine.runtime.model_runner import ModelRunner


@dataclass
class Started:
    runner: ModelRunner
    memory: MemoryTerms
    size: KVCacheSize
    cuda_graph_bytes_captured: int
    # Tensor parallelism: every rank's own terms and num_blocks before the minimum.
    rank_memory: list[dict[str, Any]] = field(default_factory=list)


def start_runner(model_config: ModelConfig, config: EngineConfig, device: torch.device,
                 model_path: str | None) -> Started:
    free_before = cuda_free_bytes(device)
    used_at_start = check_shared_device(device, free_before, config.gpu_memory_utilization)
    runner = ModelRunner(model_config, config, device, model_path)
    memory = profile_memory(runner, free_before)
    memory.used_at_start_bytes = used_at_start
    memory.cuda_graph_bytes = probe_graph_memory(runner)
    own = decide_num_blocks(memory, model_config, config)
    rank_memory = gather_objects({**memory.to_dict(), "rank": get_tp().rank,
                                  "num_blocks": own.num_blocks, "bytes_per_block":
                                  own.block_bytes})
    size = KVCacheSize(min_over_ranks(own.num_blocks), own.block_bytes)
    check_startup(size, config)
    runner.allocate_kv_cache(size.num_blocks)
    captured = runner.capture_cuda_graphs()
    runner.warm_up()
    return Started(runner, memory, size, captured,
                   rank_memory if get_tp().size > 1 else [])


def profile_memory(runner: ModelRunner, free_before: int) -> MemoryTerms:
    cfg, device = runner.config, runner.device
    peak = runner.profile_run()
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        # Only what this process took since start-up counts, never other processes' memory.
        non_torch = max(0, free_before - free - torch.cuda.memory_reserved(device))
        return MemoryTerms(total, cfg.gpu_memory_utilization, runner.weight_bytes, peak or 0,
                           non_torch_bytes=non_torch, source="measured")
    num_seqs = min(cfg.max_num_seqs, cfg.max_num_batched_tokens)
    tp = get_tp()
    act = peak if peak is not None else estimate_activation_bytes(
        runner.model_config, cfg.max_num_batched_tokens, num_seqs, cfg.dtype, tp.size,
        tp.rank)
    return MemoryTerms(int(cfg.cpu_memory_gib * GiB), cfg.gpu_memory_utilization,
                       runner.weight_bytes, act,
                       source="cpu: configured total, estimated activation")


def probe_graph_memory(runner: ModelRunner) -> int:
    """The graph pool's size, from capturing the largest decode graph and the largest
    mixed-step bucket over a one-block cache: graphs must be captured over the real
    cache, which they are sized for."""
    if not runner.uses_cuda_graphs:
        return 0
    runner.allocate_kv_cache(1)
    largest = graph_buckets(runner.config.max_num_seqs)[-1]
    tokens = runner.config.cudagraph_token_limit
    probed = runner.capture_cuda_graphs([largest], [tokens] if tokens else None)
    runner.release_cuda_graphs()
    runner.release_kv_cache()
    return probed


def cuda_free_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    torch.cuda.init()
    gc.collect()  # as vLLM before its snapshot: engines dropped in this process give back
    torch.cuda.empty_cache()  # the blocks torch still caches for them
    return torch.cuda.mem_get_info(device)[0]


def check_shared_device(device: torch.device, free: int, utilization: float) -> int:
    """vLLM V1's start-up check on a CUDA device that other processes may share (before the
    model loads); returns the bytes in use at start, 0 off CUDA."""
    if device.type != "cuda":
        return 0
    total = torch.cuda.mem_get_info(device)[1]
    index = device.index if device.index is not None else torch.cuda.current_device()
    check_free_memory(free, total, utilization, f"cuda:{index}")
    return total - free
