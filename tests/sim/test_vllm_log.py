"""vLLM start-up logs -> measured memory terms -> kvtwin what-ifs through engine.core.memory.

The excerpts are written in the formats of vLLM's source (0.8-0.11 V1, and the V0 worker);
the numbers are made up but consistent (Qwen3-0.6B, bf16, 114,688 bytes of KV per token).
"""

from __future__ import annotations

import pytest

from engine.core.catalog import load_hardware, load_model
from engine.core.config import EngineConfig, GiB
from engine.core.memory import bytes_per_block
from run import sim_main
from sim.vllm_log import log_config, parse_vllm_log, terms_from_vllm_log, vllm_what_if

MODEL = load_model("qwen3_0_6b")
H100 = load_hardware("h100_80gb")

V1_0_10 = """\
INFO 09-14 10:02:11 [api_server.py:1805] vLLM API server version 0.10.1.1
INFO 09-14 10:02:11 [utils.py:326] non-default args: {'model': 'Qwen/Qwen3-0.6B', \
'gpu_memory_utilization': 0.9}
INFO 09-14 10:02:25 [gpu_model_runner.py:1953] Model loading took 1.1201 GiB and 4.530105 seconds
INFO 09-14 10:02:31 [gpu_worker.py:276] Available KV cache memory: 69.26 GiB
INFO 09-14 10:02:31 [kv_cache_utils.py:849] GPU KV cache size: 648,416 tokens
INFO 09-14 10:02:31 [kv_cache_utils.py:853] Maximum concurrency for 4,096 tokens per request: \
158.30x
Capturing CUDA graphs (mixed prefill-decode, PIECEWISE): 100%|██████████| 67/67 [00:05<00:00]
INFO 09-14 10:02:38 [gpu_model_runner.py:2567] Graph capturing finished in 7 secs, took 0.54 GiB
"""

V1_0_11_DEBUG = """\
INFO 10-02 08:00:01 [api_server.py:1839] vLLM API server version 0.11.0
INFO 10-02 08:00:01 [utils.py:233] non-default args: {'model': 'Qwen/Qwen3-0.6B', \
'gpu_memory_utilization': 0.5, 'block_size': 32, 'max_model_len': 8192}
INFO 10-02 08:00:12 [gpu_model_runner.py:2602] Model loading took 1.12 GiB memory and 3.2 seconds
DEBUG 10-02 08:00:15 [gpu_worker.py:298] Memory profiling takes 2.14 seconds. Total non KV \
cache memory: 2.62GiB; torch peak memory increase: 1.40GiB; non-torch forward increase memory: \
0.10GiB; weights memory: 1.12GiB.
INFO 10-02 08:00:15 [gpu_worker.py:299] Available KV cache memory: 36.97 GiB
INFO 10-02 08:00:15 [kv_cache_utils.py:1087] GPU KV cache size: 346,112 tokens
INFO 10-02 08:00:15 [kv_cache_utils.py:1091] Maximum concurrency for 8,192 tokens per request: \
42.25x
INFO 10-02 08:00:21 [gpu_model_runner.py:3480] Graph capturing finished in 6 secs, took 0.61 GiB
DEBUG 10-02 08:00:21 [gpu_worker.py:391] Free memory on device (78.62/79.19 GiB) on startup. \
Desired GPU memory utilization is (0.5, 39.59 GiB). Actual usage is 1.12 GiB for weight, 1.4 \
GiB for peak activation, 0.1 GiB for non-torch memory, and 0.61 GiB for CUDAGraph memory. \
Replace gpu_memory_utilization config with `--kv-cache-memory=39028470169` (36.35 GiB) to fit \
into requested memory.
"""

V0 = """\
INFO 03-01 10:30:55 model_runner.py:1115] Loading model weights took 1.1201 GB
INFO 03-01 10:30:57 worker.py:267] Memory profiling takes 1.48 seconds
INFO 03-01 10:30:57 worker.py:267] the current vLLM instance can use total_gpu_memory \
(79.19GiB) x gpu_memory_utilization (0.90) = 71.27GiB
INFO 03-01 10:30:57 worker.py:267] model weights take 1.12GiB; non_torch_memory takes 0.09GiB; \
PyTorch activation peak memory takes 1.40GiB; the rest of the memory reserved for KV Cache is \
68.66GiB.
INFO 03-01 10:30:57 executor_base.py:110] # CUDA blocks: 40175, # CPU blocks: 2340
INFO 03-01 10:30:57 executor_base.py:115] Maximum concurrency for 4096 tokens per request: 156.93x
INFO 03-01 10:31:18 model_runner.py:1562] Graph capturing finished in 19 secs, took 0.18 GiB
"""


def test_v1_info_lines_are_read() -> None:
    log = parse_vllm_log(V1_0_10)
    assert log.version == "0.10.1.1"
    assert log.weights_bytes == round(1.1201 * GiB)
    assert log.kv_cache_bytes == round(69.26 * GiB)
    assert log.kv_cache_tokens == 648_416 and log.max_model_len == 4096
    assert log.max_concurrency == pytest.approx(158.30)
    assert log.cuda_graph_bytes == round(0.54 * GiB)
    assert log.gpu_memory_utilization == 0.9
    assert log.activation_peak_bytes is None and log.total_bytes is None
    assert "GPU KV cache size" in log.lines["kv_tokens"]


def test_v1_debug_lines_give_the_split_and_the_total() -> None:
    log = parse_vllm_log(V1_0_11_DEBUG)
    assert log.version == "0.11.0" and log.weights_bytes == round(1.12 * GiB)
    assert log.activation_peak_bytes == round(1.4 * GiB)
    assert log.non_torch_bytes == round(0.1 * GiB)
    assert log.total_bytes == round(79.19 * GiB)
    assert log.gpu_memory_utilization == 0.5 and log.block_size == 32
    assert log.cuda_graph_bytes == round(0.61 * GiB)
    assert log.max_model_len == 8192


def test_v0_profile_lines() -> None:
    log = parse_vllm_log(V0)
    assert log.total_bytes == round(79.19 * GiB) and log.gpu_memory_utilization == 0.9
    assert log.weights_bytes == round(1.1201 * GiB)
    assert log.activation_peak_bytes == round(1.40 * GiB)
    assert log.non_torch_bytes == round(0.09 * GiB)
    assert log.kv_cache_bytes == round(68.66 * GiB)
    assert log.num_gpu_blocks == 40175 and log.max_model_len == 4096


@pytest.mark.parametrize("text", [V1_0_10, V1_0_11_DEBUG])
def test_the_terms_reproduce_the_logged_cache(text: str) -> None:
    """At the log's own settings, engine.core.memory gives back the server's token count."""
    log = parse_vllm_log(text)
    config = log_config(log, EngineConfig(), set()).validate(MODEL)
    memory = vllm_what_if(log, MODEL, H100, config)
    assert memory.starts and memory.num_blocks * config.block_size == log.kv_cache_tokens
    assert memory.terms.cuda_graph_bytes == 0  # vLLM <= 0.11: graphs outside the budget


def test_split_and_anchor() -> None:
    log = parse_vllm_log(V1_0_11_DEBUG)
    terms, sources = terms_from_vllm_log(log, MODEL, H100)
    assert terms.total_bytes == log.total_bytes and sources["total"] == "log"
    assert terms.activation_peak_bytes == log.activation_peak_bytes
    assert terms.kv_cache_bytes == 346_112 * MODEL.kv_bytes_per_token("bfloat16")
    # the rest of the budget lands in non-torch: the logged 0.10 GiB, up to rounding
    assert abs(terms.non_torch_bytes - log.non_torch_bytes) < 0.02 * GiB
    info_only, sources = terms_from_vllm_log(V1_0_10, MODEL, H100)
    assert info_only.non_torch_bytes == 0 and "together" in sources["activation"]
    assert info_only.total_bytes == H100.total_memory_bytes


def test_what_ifs_move_only_the_knob() -> None:
    log = parse_vllm_log(V1_0_10)
    base = log_config(log, EngineConfig(), set())
    lower = log_config(log, EngineConfig(gpu_memory_utilization=0.5), {"gpu_memory_utilization"})
    wide = log_config(log, EngineConfig(block_size=64), {"block_size"})
    kv = vllm_what_if(log, MODEL, H100, base).terms.kv_cache_bytes
    low = vllm_what_if(log, MODEL, H100, lower)
    assert kv - low.terms.kv_cache_bytes == pytest.approx(0.4 * H100.total_memory_bytes, abs=2)
    big = vllm_what_if(log, MODEL, H100, wide)
    assert big.terms.kv_cache_bytes == kv
    assert big.num_blocks == kv // bytes_per_block(MODEL, 64, "bfloat16")
    given = {"gpu_memory_utilization", "max_model_len"}
    small = log_config(log, EngineConfig(gpu_memory_utilization=0.03, max_model_len=40960), given)
    verdict = vllm_what_if(log, MODEL, H100, small)
    assert verdict.error_type == "MaxModelLenTooLargeError" and "(40960)" in verdict.error
    none = log_config(log, EngineConfig(gpu_memory_utilization=0.02), given)
    verdict = vllm_what_if(log, MODEL, H100, none)
    assert not verdict.starts and "No available memory" in verdict.error


def test_a_log_without_sizes_is_named() -> None:
    with pytest.raises(ValueError, match="KV cache size"):
        terms_from_vllm_log("INFO Model loading took 1.0 GiB and 2 seconds\n", MODEL, H100)


def test_cli_prints_the_terms_and_the_what_if(tmp_path, capsys) -> None:
    path = tmp_path / "server.log"
    path.write_text(V1_0_10)
    code = sim_main(["capacity", "--vllm-log", str(path), "model=qwen3_0_6b",
                     "hardware=h100_80gb", "engine.block_size=32"])
    out = capsys.readouterr().out
    assert code == 0
    assert "vLLM start-up log" in out and "0.10.1.1" in out
    assert "at the log's own settings: 648,416 KV tokens (the log: 648,416)" in out
    assert "x 32 tokens" in out
