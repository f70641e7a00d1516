"""KV-cache budget arithmetic shared by the engine and the simulator. Pure Python (no torch).

budget    = total device memory x gpu_memory_utilization
kv_bytes  = budget - weights - peak activation - non-torch memory - CUDA-graph pool
num_blocks = kv_bytes // bytes_per_block

Memory other processes hold is not a term of the budget (vLLM V1 budgets a share of the
total); it only decides whether the engine starts at all (`check_free_memory`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from engine.core.config import DTYPE_BYTES, EngineConfig, GiB, ModelConfig
from engine.core.parallel import RankShapes, rank_kv_bytes_per_token


class StartupError(ValueError):
    """The engine cannot start with this configuration (worded like vLLM's errors)."""


class NoCacheMemoryError(StartupError):
    pass


class MaxModelLenTooLargeError(StartupError):
    pass


class FreeMemoryError(StartupError):
    """Less memory is free at start than the budget asks for (others hold the rest)."""


@dataclass
class MemoryTerms:
    """Every term of the start-up budget, in bytes, and where each came from."""

    total_bytes: int
    gpu_memory_utilization: float
    weights_bytes: int
    activation_peak_bytes: int
    non_torch_bytes: int = 0
    cuda_graph_bytes: int = 0
    source: str = "measured"  # or "estimated", "profile:<name>"
    # In use on the device when the engine starts: other processes' memory and this process's
    # CUDA context. Not in the budget; `check_free_memory` compares what it leaves free.
    used_at_start_bytes: int = 0

    @property
    def budget_bytes(self) -> int:
        return int(self.total_bytes * self.gpu_memory_utilization)

    @property
    def free_at_start_bytes(self) -> int:
        return self.total_bytes - self.used_at_start_bytes

    @property
    def kv_cache_bytes(self) -> int:
        return (self.budget_bytes - self.weights_bytes - self.activation_peak_bytes
                - self.non_torch_bytes - self.cuda_graph_bytes)

    def to_dict(self) -> dict[str, float | int | str]:
        d: dict[str, float | int | str] = asdict(self)
        d["budget_bytes"] = self.budget_bytes
        d["kv_cache_bytes"] = self.kv_cache_bytes
        d["free_at_start_bytes"] = self.free_at_start_bytes
        return d


def bytes_per_block(model: ModelConfig, block_size: int, kv_dtype: str, tp: int = 1) -> int:
    """2 (K and V) x layers x block_size x kv_heads x head_dim x dtype bytes, the KV heads
    those of one rank of `tp` (engine.core.parallel)."""
    return block_size * rank_kv_bytes_per_token(model, tp, kv_dtype)


@dataclass(frozen=True)
class KVCacheSize:
    """The KV cache a configuration gets: `num_blocks` of `block_bytes` each (zero or
    negative: no memory is left for cache blocks)."""

    num_blocks: int
    block_bytes: int


def decide_num_blocks(terms: MemoryTerms, model: ModelConfig,
                      config: EngineConfig) -> KVCacheSize:
    """The engine's rule, which the twin calls too: `num_gpu_blocks_override` when set,
    else what the budget leaves after every other term, in whole blocks of the KV dtype."""
    block_bytes = bytes_per_block(model, config.block_size, config.kv_dtype,
                                  config.tensor_parallel_size)
    num_blocks = config.num_gpu_blocks_override
    if num_blocks is None:
        num_blocks = terms.kv_cache_bytes // block_bytes
    return KVCacheSize(num_blocks, block_bytes)


def min_over_ranks(sizes: list[KVCacheSize]) -> KVCacheSize:
    """Tensor parallelism: every rank allocates the fewest blocks any rank can hold (vLLM
    takes the minimum of its workers' KV memory; the engine all-reduces num_blocks, MIN)."""
    return min(sizes, key=lambda size: size.num_blocks)


def blocks_per_request(max_model_len: int, block_size: int) -> int:
    return -(-max_model_len // block_size)


def max_concurrency(num_blocks: int, block_size: int, max_model_len: int) -> float:
    """How many `max_model_len` requests fit in the cache at once."""
    return max(num_blocks, 0) / blocks_per_request(max_model_len, block_size)


def largest_max_model_len(num_blocks: int, block_size: int) -> int:
    return max(num_blocks, 0) * block_size


def check_startup(size: KVCacheSize, config: EngineConfig) -> None:
    """Raise the error the engine would raise at start-up, or return if it starts."""
    num_blocks, block_bytes = size.num_blocks, size.block_bytes
    block_size, max_model_len = config.block_size, config.max_model_len
    if num_blocks <= 0:
        raise NoCacheMemoryError(
            "No available memory for the cache blocks "
            f"(num_blocks={num_blocks}). Try increasing `gpu_memory_utilization` when "
            "initializing the engine.")
    needed = blocks_per_request(max_model_len, block_size)
    if num_blocks < needed:
        largest = largest_max_model_len(num_blocks, block_size)
        raise MaxModelLenTooLargeError(
            f"To serve at least one request with the model's max seq len ({max_model_len}), "
            f"{needed * block_bytes / GiB:.2f} GiB KV cache is needed, which is larger than "
            f"the available KV cache memory ({num_blocks * block_bytes / GiB:.2f} GiB, "
            f"{num_blocks} blocks of {block_size} tokens). Based on the available memory, "
            f"the estimated maximum model length is {largest} (maximum concurrency at "
            f"max_model_len={max_model_len}: "
            f"{max_concurrency(num_blocks, block_size, max_model_len):.2f}x). Try increasing "
            "`gpu_memory_utilization` or decreasing `max_model_len` when initializing the "
            "engine.")


def check_free_memory(free_bytes: int, total_bytes: int, utilization: float,
                      device: str = "cuda:0") -> None:
    """vLLM V1's start-up check (its GPU worker, before loading the model): the engine asks
    for `utilization x total` and refuses to start when less than that is free.

    Other processes' memory enters here only. Past this check vLLM V1 budgets
    `total x utilization - weights - peak activation - non-torch - CUDA graphs` for the KV
    cache (`determine_available_memory`), the non-torch term counted from this moment on:
    a process holding N GiB changes whether the engine starts, never its num_blocks.
    """
    requested = total_bytes * utilization
    if free_bytes < requested:
        raise FreeMemoryError(
            f"Free memory on device {device} ({_gib(free_bytes)}/{_gib(total_bytes)} GiB) on "
            f"startup is less than desired GPU memory utilization ({utilization}, "
            f"{_gib(requested)} GiB). Decrease GPU memory utilization or reduce GPU memory "
            "used by other processes.")


def _gib(num_bytes: float) -> float:
    return round(num_bytes / GiB, 2)


SAMPLER_COPIES = 10  # float32 rows x vocab buffers live at the sampler's peak


def estimate_activation_bytes(model: ModelConfig, num_tokens: int, num_seqs: int,
                              dtype: str, tp: int = 1, rank: int = 0) -> int:
    """Documented fallback for the peak activation of a `num_tokens` dummy step.

    Live at the MLP of one layer: the residual stream and hidden state (2 x hidden), the
    fused QKV output, and the fused gate/up output plus its activated half (3 x intermediate),
    all in `dtype`. Then the sampler over the `num_seqs` sampled rows: logits, scaled logits,
    probabilities, sorted values and int64 indices for top-k/top-p, cumulative sums and masks,
    about SAMPLER_COPIES float32 copies of rows x vocab (Qwen3-0.6B bf16 on an H200 peaked at
    ~1.62 GB with 256 rows, nearly flat from 2,048 to 8,192 tokens: the sampler dominates).
    Measured profiles replace this where they exist.

    Rank `rank` of `tp`: the projections' outputs are its shards (the residual stream whole);
    rank 0 samples over the gathered logits, the other ranks hold one copy of their logits
    shard (the sampler's rows x vocab-per-rank, in `dtype`).
    """
    s = RankShapes.of(model, tp)
    q, kv = s.num_heads * model.head_dim, s.num_kv_heads * model.head_dim
    per_token = 2 * model.hidden_size + q + 2 * kv + 3 * s.intermediate
    if rank == 0:
        sampler = SAMPLER_COPIES * num_seqs * model.vocab_size * 4
    else:
        sampler = num_seqs * s.vocab * DTYPE_BYTES[dtype]
    return num_tokens * per_token * DTYPE_BYTES[dtype] + sampler


def mixed_buffer_bytes(model: ModelConfig, tokens: int, dtype: str, max_num_seqs: int,
                       max_blocks_per_seq: int) -> int:
    """The mixed-step graphs' static buffers for `tokens` rows (engine.runtime.mixed_graphs): input
    ids, positions and slots (int64) and the hidden states per row; query starts, KV lengths
    and block tables (int32) per sequence slot (max_num_seqs + the padding sequence)."""
    slots = max_num_seqs + 1
    per_token = 3 * 8 + model.hidden_size * DTYPE_BYTES[dtype]
    return tokens * per_token + 4 * ((slots + 1) + slots + slots * max_blocks_per_seq)
