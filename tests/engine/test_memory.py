"""KV budget arithmetic and the two start-up errors."""

from __future__ import annotations

import pytest

from engine.core.config import EngineConfig, GiB, ModelConfig
from engine.core.memory import (
    KVCacheSize,
    MaxModelLenTooLargeError,
    MemoryTerms,
    NoCacheMemoryError,
    bytes_per_block,
    check_startup,
    decide_num_blocks,
    estimate_activation_bytes,
    max_concurrency,
)
from tests.engine.test_config import QWEN3_06B

QWEN = ModelConfig.from_hf(QWEN3_06B)


def test_bytes_per_block_matches_the_formula() -> None:
    assert bytes_per_block(QWEN, 16, "bfloat16") == 2 * 28 * 16 * 8 * 128 * 2
    assert bytes_per_block(QWEN, 1, "bfloat16") == 114_688


def test_num_blocks_from_terms() -> None:
    terms = MemoryTerms(total_bytes=80 * GiB, gpu_memory_utilization=0.5,
                        weights_bytes=QWEN.weight_bytes("bfloat16"),
                        activation_peak_bytes=2 * GiB, non_torch_bytes=GiB // 2,
                        cuda_graph_bytes=GiB // 4)
    kv = 40 * GiB - QWEN.weight_bytes("bfloat16") - 2 * GiB - GiB // 2 - GiB // 4
    assert terms.kv_cache_bytes == kv
    size = decide_num_blocks(terms, QWEN, EngineConfig(block_size=16))
    assert size == KVCacheSize(kv // (16 * 114_688), 16 * 114_688)
    override = decide_num_blocks(terms, QWEN, EngineConfig(num_gpu_blocks_override=77))
    assert override.num_blocks == 77


def starts(num_blocks: int, max_model_len: int) -> None:
    check_startup(KVCacheSize(num_blocks, 16 * 114_688),
                  EngineConfig(block_size=16, max_model_len=max_model_len))


def test_no_memory_error_is_worded_like_vllm() -> None:
    with pytest.raises(NoCacheMemoryError, match=r"^No available memory for the cache blocks"):
        starts(0, 2048)
    with pytest.raises(NoCacheMemoryError, match="Try increasing `gpu_memory_utilization`"):
        starts(-3, 2048)


def test_max_model_len_error_gives_largest_len_and_concurrency() -> None:
    with pytest.raises(MaxModelLenTooLargeError) as err:
        starts(100, 4096)
    msg = str(err.value)
    assert "max seq len (4096)" in msg
    assert "estimated maximum model length is 1600" in msg
    assert "maximum concurrency at max_model_len=4096: 0.39x" in msg
    assert "decreasing `max_model_len`" in msg
    starts(256, 4096)  # exactly one request: starts


def test_max_concurrency_counts_whole_requests_of_blocks() -> None:
    assert max_concurrency(256, 16, 4096) == 1.0
    assert max_concurrency(1000, 16, 4000) == 1000 / 250


def test_activation_estimate_grows_with_tokens() -> None:
    small = estimate_activation_bytes(QWEN, 1024, 256, "bfloat16")
    big = estimate_activation_bytes(QWEN, 8192, 256, "bfloat16")
    assert 0 < small < big
