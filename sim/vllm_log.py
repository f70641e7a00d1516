"""A vLLM server's start-up log -> the memory terms it measured -> kvtwin what-ifs.

Formats read (vLLM 0.8.x-0.11.x, V1 engine, and the V0 worker's profile lines), each a
`logger.info` unless noted; docs/http.md maps each to kvtwin's terms:

    gpu_model_runner  "Model loading took 1.1201 GiB and 4.53 seconds"   (0.8-0.10)
                      "Model loading took 1.12 GiB memory and 4.53 seconds"  (0.11+)
                      "Graph capturing finished in 6 secs, took 0.54 GiB"
    gpu_worker        "Available KV cache memory: 61.98 GiB"
      (debug)         "Memory profiling takes 2.1 seconds. Total non KV cache memory: 3.5GiB;
                       torch peak memory increase: 1.4GiB; non-torch forward increase memory:
                       0.1GiB; weights memory: 1.1GiB."
      (debug, 0.11+)  "Free memory on device (78.6/79.2 GiB) on startup. Desired GPU memory
                       utilization is (0.9, 71.3 GiB). Actual usage is 1.1 GiB for weight, 1.4
                       GiB for peak activation, 0.1 GiB for non-torch memory, and 0.5 GiB for
                       CUDAGraph memory. ..."
    kv_cache_utils    "GPU KV cache size: 580,304 tokens"
                      "Maximum concurrency for 4,096 tokens per request: 141.68x"
    worker (V0)       "the current vLLM instance can use total_gpu_memory (79.19GiB) x
                       gpu_memory_utilization (0.90) = 71.27GiB" / "model weights take 1.12GiB;
                       non_torch_memory takes 0.09GiB; PyTorch activation peak memory takes
                       1.40GiB; the rest of the memory reserved for KV Cache is 68.66GiB."
    executor (V0)     "# cuda blocks: 36332, # CPU blocks: 9362" (or "# GPU blocks: ...")
    api_server        "vLLM API server version 0.10.1", "non-default args: {...}" / "args:
                      Namespace(...)" (gpu_memory_utilization, block_size when given)
Every GiB figure is rounded in the log (0.01 GiB; weights 0.0001), so the KV term is
anchored on the exact token count where the log has it.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from engine.core.catalog import Hardware
from engine.core.config import EngineConfig, GiB, ModelConfig
from engine.core.memory import MemoryTerms
from sim.memory_model import MemoryPrediction, prediction_from_terms

VLLM_DEFAULT_UTILIZATION = 0.9
VLLM_DEFAULT_BLOCK_SIZE = 16
_NUM = r"(-?[\d.]+)"
_INT = r"([\d,]+)"
PATTERNS: dict[str, re.Pattern[str]] = {
    "version": re.compile(r"(?:vLLM API server version|LLM engine \(v)\s*([\w.+-]+?)\)?[\s,]"),
    "weights": re.compile(rf"(?:Model loading took|Loading model weights took) {_NUM} ?Gi?B"),
    "kv_cache": re.compile(rf"(?:Available KV cache memory:|reserved for KV Cache is) {_NUM} ?GiB"),
    "activation": re.compile(rf"(?:torch peak memory increase:|activation peak memory takes) "
                             rf"{_NUM} ?GiB"),
    "non_torch": re.compile(rf"(?:non-torch forward increase memory:|non_torch_memory takes) "
                            rf"{_NUM} ?GiB"),
    "debug_weights": re.compile(rf"weights memory: {_NUM} ?GiB"),
    "cuda_graph": re.compile(rf"Graph capturing finished in [\d.]+ secs?, took {_NUM} ?GiB"),
    "kv_tokens": re.compile(rf"GPU KV cache size: {_INT} tokens"),
    "concurrency": re.compile(rf"Maximum concurrency for {_INT} tokens per request: {_NUM}x"),
    "gpu_blocks": re.compile(r"# (?:GPU|gpu|CUDA|cuda) blocks: (\d+)"),
    "total_v0": re.compile(rf"total_gpu_memory \({_NUM} ?GiB\) x gpu_memory_utilization "
                           rf"\({_NUM}\)"),
    "usage_0_11": re.compile(
        rf"Free memory on device \({_NUM}/{_NUM} GiB\) on startup\. Desired GPU memory "
        rf"utilization is \({_NUM}, {_NUM} GiB\)\. Actual usage is {_NUM} GiB for weight, "
        rf"{_NUM} GiB for peak activation, {_NUM} GiB for non-torch memory, and {_NUM} GiB "
        r"for CUDAGraph memory"),
    "utilization_arg": re.compile(r"gpu_memory_utilization['\"]?\s*[:=]\s*([\d.]+)"),
    "block_size_arg": re.compile(r"\bblock_size['\"]?\s*[:=]\s*(\d+)"),
}


@dataclass
class VllmLogTerms:
    """What one vLLM start-up log measured (bytes; None: not in the log)."""

    version: str | None = None
    weights_bytes: int | None = None
    activation_peak_bytes: int | None = None  # torch peak increase of the profile run
    non_torch_bytes: int | None = None
    cuda_graph_bytes: int | None = None
    kv_cache_bytes: int | None = None  # "Available KV cache memory" (rounded to 0.01 GiB)
    kv_cache_tokens: int | None = None
    num_gpu_blocks: int | None = None  # V0 only
    max_model_len: int | None = None
    max_concurrency: float | None = None
    total_bytes: int | None = None
    gpu_memory_utilization: float | None = None
    block_size: int | None = None
    lines: dict[str, str] = field(default_factory=dict)  # term -> the line it came from

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_vllm_log(text: str) -> VllmLogTerms:
    """Every term the log holds; when a server started twice, its last start counts."""
    found = {key: _last(pattern, text) for key, pattern in PATTERNS.items()}
    terms = VllmLogTerms(lines={k: m.group(0) for k, m in found.items() if m})
    _read_simple(terms, found)
    _read_totals(terms, found)
    return terms


def _last(pattern: re.Pattern[str], text: str) -> re.Match[str] | None:
    match = None
    for match in pattern.finditer(text):  # noqa: B007  (the last one is wanted)
        pass
    return match


def _gib(value: str) -> int:
    return round(float(value) * GiB)


def _int(value: str) -> int:
    return int(value.replace(",", ""))


def _read_simple(t: VllmLogTerms, found: dict[str, re.Match[str] | None]) -> None:
    def group(key: str, i: int = 1) -> str | None:
        return found[key].group(i) if found[key] else None

    t.version = group("version")
    weights = group("weights") or group("debug_weights")
    t.weights_bytes = _gib(weights) if weights else None
    for name, key in (("activation_peak_bytes", "activation"), ("non_torch_bytes", "non_torch"),
                      ("cuda_graph_bytes", "cuda_graph"), ("kv_cache_bytes", "kv_cache")):
        value = group(key)
        setattr(t, name, _gib(value) if value else None)
    t.kv_cache_tokens = _int(group("kv_tokens")) if group("kv_tokens") else None
    t.num_gpu_blocks = int(group("gpu_blocks")) if group("gpu_blocks") else None
    if found["concurrency"]:
        t.max_model_len = _int(group("concurrency", 1))
        t.max_concurrency = float(group("concurrency", 2))
    t.block_size = int(group("block_size_arg")) if group("block_size_arg") else None
    util = group("utilization_arg")
    t.gpu_memory_utilization = float(util) if util else None


def _read_totals(t: VllmLogTerms, found: dict[str, re.Match[str] | None]) -> None:
    """The total and utilization the V0 line or 0.11's debug line state outright."""
    if m := found["total_v0"]:
        t.total_bytes, t.gpu_memory_utilization = _gib(m.group(1)), float(m.group(2))
    if m := found["usage_0_11"]:
        values = [float(v) for v in m.groups()]
        t.total_bytes, t.gpu_memory_utilization = _gib(m.group(2)), values[2]
        t.weights_bytes = t.weights_bytes or _gib(m.group(5))
        t.activation_peak_bytes = _gib(m.group(6))
        t.non_torch_bytes = _gib(m.group(7))
        t.cuda_graph_bytes = t.cuda_graph_bytes if t.cuda_graph_bytes is not None \
            else _gib(m.group(8))


# -- the log's terms as kvtwin's ----------------------------------------------------------


def measured_kv_bytes(log: VllmLogTerms, model: ModelConfig, kv_dtype: str) -> tuple[int, str]:
    """The KV cache the server got: exact from its token count (whole blocks), else the
    rounded GiB figure."""
    if log.kv_cache_tokens is not None:
        return log.kv_cache_tokens * model.kv_bytes_per_token(kv_dtype), "GPU KV cache size"
    if log.num_gpu_blocks is not None:
        block = log.block_size or VLLM_DEFAULT_BLOCK_SIZE
        return log.num_gpu_blocks * block * model.kv_bytes_per_token(kv_dtype), "# GPU blocks"
    if log.kv_cache_bytes is not None:
        return log.kv_cache_bytes, "Available KV cache memory"
    raise ValueError("the log holds no KV cache size: expected 'GPU KV cache size: N tokens' "
                     "or 'Available KV cache memory: X GiB' (vLLM 0.8+), or the V0 profile")


def terms_from_vllm_log(log: VllmLogTerms | str, model: ModelConfig, hardware: Hardware,
                        kv_dtype: str = "bfloat16") -> tuple[MemoryTerms, dict[str, str]]:
    """kvtwin's memory terms measured by a vLLM server, and where each came from.

    Anchored on the KV cache the server got: activation + non-torch = total x utilization
    - weights - KV, so that kvtwin recomputes the log's own num_blocks exactly. vLLM up to
    0.11 captures CUDA graphs after sizing the KV cache, outside the budget: the graph pool
    is reported (`VllmLogTerms.cuda_graph_bytes`), not subtracted (cuda_graph_bytes = 0)."""
    log = parse_vllm_log(log) if isinstance(log, str) else log
    if log.weights_bytes is None:
        raise ValueError("the log holds no weights size: expected 'Model loading took X GiB'")
    kv, kv_src = measured_kv_bytes(log, model, kv_dtype)
    total, total_src = (log.total_bytes, "log") if log.total_bytes else \
        (hardware.total_memory_bytes, f"catalog: {hardware.name}")
    util = log.gpu_memory_utilization or VLLM_DEFAULT_UTILIZATION
    budget = MemoryTerms(total, util, 0, 0).budget_bytes
    rest = budget - log.weights_bytes - kv  # activation + non-torch, all that is left
    act, non_torch, split = _split(rest, log.activation_peak_bytes)
    terms = MemoryTerms(total, util, log.weights_bytes, act, non_torch, 0,
                        source=f"vllm log{f' {log.version}' if log.version else ''}")
    sources = {"total": total_src,
               "utilization": "log" if log.gpu_memory_utilization else "vLLM default 0.9",
               "weights": "log: Model loading took", "kv_cache": f"log: {kv_src}",
               "activation": split, "non_torch": "the rest (budget - weights - KV - activation)",
               "cuda_graph": "outside the budget in vLLM <= 0.11 (not subtracted)"}
    return terms, sources


def _split(rest: int, activation: int | None) -> tuple[int, int, str]:
    if activation is None:
        return rest, 0, "budget - weights - KV (activation + non-torch together)"
    return activation, rest - activation, "log: torch peak memory increase"


def log_config(log: VllmLogTerms, config: EngineConfig, given: set[str]) -> EngineConfig:
    """`config` with the log's own utilization, max_model_len and block size wherever the
    user did not set them: the what-if starts from the server that wrote the log."""
    values = config.to_dict()
    logged = {"gpu_memory_utilization": log.gpu_memory_utilization or VLLM_DEFAULT_UTILIZATION,
              "max_model_len": log.max_model_len, "block_size": log.block_size}
    for key, value in logged.items():
        if key not in given and value is not None:
            values[key] = value
    return EngineConfig(**values)


def vllm_what_if(log: VllmLogTerms, model: ModelConfig, hardware: Hardware,
                 config: EngineConfig) -> MemoryPrediction:
    """num_blocks and the start-up verdict for `config`, on the log's measured terms: the
    utilization moves the budget; block_size the bytes per block; max_model_len the check."""
    terms, sources = terms_from_vllm_log(log, model, hardware, config.dtype)
    if config.gpu_memory_utilization != terms.gpu_memory_utilization:
        sources["utilization"] = f"what-if (the log: {terms.gpu_memory_utilization})"
        terms.gpu_memory_utilization = config.gpu_memory_utilization
    return prediction_from_terms(model, config, terms, sources)


def format_log_terms(log: VllmLogTerms) -> str:
    def gib(value: int | None) -> str:
        return "-" if value is None else f"{value / GiB:.2f} GiB"

    rows = [("vLLM version", log.version or "-"), ("total", gib(log.total_bytes)),
            ("gpu_memory_utilization", log.gpu_memory_utilization or "- (default 0.9)"),
            ("weights", gib(log.weights_bytes)),
            ("torch peak increase", gib(log.activation_peak_bytes)),
            ("non-torch increase", gib(log.non_torch_bytes)),
            ("CUDA graph pool", gib(log.cuda_graph_bytes)),
            ("available KV cache", gib(log.kv_cache_bytes)),
            ("KV cache tokens", "-" if log.kv_cache_tokens is None
             else f"{log.kv_cache_tokens:,}"),
            ("max concurrency", "-" if log.max_concurrency is None else
             f"{log.max_concurrency:.2f}x at {log.max_model_len:,} tokens")]
    return "vLLM start-up log\n" + "\n".join(f"  {k:<24}{v}" for k, v in rows)
