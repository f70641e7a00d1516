"""Engine and model configuration, validated up front. Pure Python (no torch)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

POLICIES = ("v1", "prefill_first")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ATTENTION_BACKENDS = ("auto", "sdpa", "torch", "flash_attn")
DEVICES = ("auto", "cpu", "cuda")
# Weight-only int8 (AbsMax per output channel, engine/layers/quantization.py) or none.
QUANTIZATIONS = ("none", "int8")
# The KV cache in the model's dtype ("auto") or in float8 e4m3 with a per-layer scale.
KV_CACHE_DTYPES = ("auto", "fp8")
FP8_KV_DTYPE = "float8_e4m3fn"
INT8_SCALE_DTYPE = "float32"  # one AbsMax scale per output channel of a quantized linear
TP_SIZES = (1, 2, 4, 8)  # tensor_parallel_size: GPUs of one node
# Bytes per element of everything the engine stores: model dtypes, int8 weights, fp8 KV.
STORAGE_BYTES = {**DTYPE_BYTES, "int8": 1, FP8_KV_DTYPE: 1}
GiB = 1 << 30


class ConfigError(ValueError):
    """A configuration value outside its allowed range; names the field."""

    def __init__(self, field_name: str, value: Any, allowed: str):
        self.field = field_name
        self.value = value
        self.allowed = allowed
        super().__init__(f"{field_name}={value!r} is invalid: must be {allowed}")


class TensorParallelError(ConfigError):
    """A tensor_parallel_size the model's shape does not divide (worded like vLLM's)."""

    def __init__(self, value: int, message: str):
        self.field, self.value, self.allowed = "tensor_parallel_size", value, message
        ValueError.__init__(self, message)


@dataclass
class ModelConfig:
    """The shape of a decoder-only transformer, read from an HF `config.json`."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    eos_token_id: int | list[int] | None = None
    torch_dtype: str = "bfloat16"
    name: str = ""

    @classmethod
    def from_hf(cls, source: str | Path | dict[str, Any]) -> ModelConfig:
        """Build from an HF config dict, a config.json path, or a folder holding one."""
        hf = _read_hf_config(source)
        arch = (hf.get("architectures") or [hf.get("model_type", "")])[0]
        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        return cls(
            architecture=arch,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get(
                "rope_theta", 10000.0),
            rope_scaling=hf.get("rope_scaling") or rope_scaling_from_parameters(hf),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            attention_bias=hf.get("attention_bias", False),
            eos_token_id=hf.get("eos_token_id"),
            torch_dtype=str(hf.get("torch_dtype") or hf.get("dtype") or "bfloat16"),
            name=hf.get("_name_or_path", "") or "",
        )

    @property
    def is_qwen3(self) -> bool:
        return self.architecture.lower().startswith("qwen3")

    def num_parameters(self) -> int:
        """Exact parameter count of the architectures kvtwin builds (Qwen3, Llama, Mistral)."""
        h, hd = self.hidden_size, self.head_dim
        q, kv = self.num_attention_heads * hd, self.num_key_value_heads * hd
        attn = h * q + 2 * h * kv + q * h
        if self.attention_bias:  # q, k, v and o projections all carry a bias in HF
            attn += q + 2 * kv + h
        if self.is_qwen3:
            attn += 2 * hd  # q_norm and k_norm
        layer = attn + 3 * h * self.intermediate_size + 2 * h
        embed = self.vocab_size * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.num_hidden_layers * layer + embed + head + h

    def linear_sizes(self) -> tuple[int, int]:
        """(weights, output channels) of the decoder layers' linear projections (q/k/v, o,
        gate/up, down): what int8 quantization replaces. Embeddings, norms, biases and the
        LM head are not among them."""
        h, inter = self.hidden_size, self.intermediate_size
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        weights = h * (q + 2 * kv) + q * h + 3 * h * inter
        channels = (q + 2 * kv) + h + 2 * inter + h
        return self.num_hidden_layers * weights, self.num_hidden_layers * channels

    def weight_bytes(self, dtype: str, quantization: str = "none") -> int:
        """Exact bytes of the parameters; with int8, each linear weight is one byte plus a
        float32 scale per output channel, the rest stays in `dtype`."""
        total = self.num_parameters() * DTYPE_BYTES[dtype]
        if quantization == "int8":
            weights, channels = self.linear_sizes()
            total += weights * (STORAGE_BYTES["int8"] - DTYPE_BYTES[dtype]) \
                + channels * STORAGE_BYTES[INT8_SCALE_DTYPE]
        return total

    def kv_bytes_per_token(self, dtype: str) -> int:
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim \
            * STORAGE_BYTES[dtype]

    def eos_token_ids(self) -> set[int]:
        eos = self.eos_token_id
        if eos is None:
            return set()
        return set(eos) if isinstance(eos, list) else {eos}


def rope_scaling_from_parameters(hf: dict[str, Any]) -> dict[str, Any] | None:
    """transformers >= 5 writes rope scaling under `rope_parameters` (with rope_theta)."""
    params = dict(hf.get("rope_parameters") or {})
    if params.get("rope_type", params.get("type", "default")) == "default":
        return None
    params.pop("rope_theta", None)
    return params


def _read_hf_config(source: str | Path | dict[str, Any]) -> dict[str, Any]:
    if isinstance(source, dict):
        return source
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"model config not found: {path}")
    return json.loads(path.read_text())


MAX_CUDAGRAPH_TOKENS = 16384


@dataclass
class EngineConfig:
    """Serving knobs, named as in vLLM. `validate` checks every field."""

    block_size: int = 16
    max_model_len: int = 4096
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    policy: str = "v1"
    dtype: str = "bfloat16"
    attention_backend: str = "auto"
    enforce_eager: bool = False
    # Mixed and prefill steps of up to this many tokens replay one CUDA graph each, attention
    # included (engine/mixed_graphs.py); 0: they run eagerly.
    # 512 like vLLM's largest capture size: the graphs' memory grows with it.
    max_cudagraph_tokens: int = 512
    # LLM.generate schedules step N+1 while the device runs step N (engine/lookahead.py).
    async_scheduling: bool = True
    device: str = "auto"
    seed: int = 0
    # Forces the KV cache size (like vLLM's num_gpu_blocks_override); startup checks still apply.
    num_gpu_blocks_override: int | None = None
    # Total "device" memory when running on the CPU, so the memory budget path runs without a GPU.
    cpu_memory_gib: float = 1.0
    # "int8": linear weights int8 (AbsMax per output channel), matmuls W8A16; "none".
    quantization: str = "none"
    # "auto": the KV cache in `dtype`; "fp8": float8 e4m3 with per-layer scales (1.0).
    kv_cache_dtype: str = "auto"
    # GPUs the model is sharded over (Megatron-style, engine/core/parallel.py): 1, 2, 4 or 8.
    tensor_parallel_size: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ConfigError(unknown[0], kwargs[unknown[0]], f"one of {sorted(known)}")
        return cls(**kwargs)

    def validate(self, model: ModelConfig | None = None) -> EngineConfig:
        _check_block_size(self.block_size)
        max_pos = model.max_position_embeddings if model else None
        _check_int("max_model_len", self.max_model_len, 1, max_pos)
        if not (isinstance(self.gpu_memory_utilization, int | float)
                and 0 < self.gpu_memory_utilization <= 1):
            raise ConfigError("gpu_memory_utilization", self.gpu_memory_utilization,
                              "a number in (0, 1]")
        _check_int("max_num_seqs", self.max_num_seqs, 1)
        _check_int("max_num_batched_tokens", self.max_num_batched_tokens, 1)
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ConfigError("max_num_batched_tokens", self.max_num_batched_tokens,
                              f">= max_model_len ({self.max_model_len}) when "
                              "enable_chunked_prefill is False")
        _check_int("max_cudagraph_tokens", self.max_cudagraph_tokens, 0, MAX_CUDAGRAPH_TOKENS)
        _check_choice("policy", self.policy, POLICIES)
        _check_choice("dtype", self.dtype, tuple(DTYPE_BYTES))
        _check_choice("attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        _check_choice("device", self.device, DEVICES)
        _check_int("seed", self.seed, 0)
        if self.num_gpu_blocks_override is not None:
            _check_int("num_gpu_blocks_override", self.num_gpu_blocks_override, 0)
        if not (isinstance(self.cpu_memory_gib, int | float) and self.cpu_memory_gib > 0):
            raise ConfigError("cpu_memory_gib", self.cpu_memory_gib, "a number > 0")
        _check_choice("quantization", self.quantization, QUANTIZATIONS)
        _check_choice("kv_cache_dtype", self.kv_cache_dtype, KV_CACHE_DTYPES)
        check_tensor_parallel(self.tensor_parallel_size, model)
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def kv_dtype(self) -> str:
        """The KV cache's element type: the model dtype, or float8_e4m3fn."""
        return FP8_KV_DTYPE if self.kv_cache_dtype == "fp8" else self.dtype

    @property
    def cudagraph_token_limit(self) -> int:
        """The largest mixed step a CUDA graph serves (0: none), whatever the device."""
        if self.enforce_eager:
            return 0
        return min(self.max_cudagraph_tokens, self.max_num_batched_tokens)


def check_tensor_parallel(tp: Any, model: ModelConfig | None = None) -> None:
    """1, 2, 4 or 8, dividing the attention heads (vLLM's check, its words), the KV heads
    (or, with fewer KV heads than ranks, a multiple of them: each is then replicated) and the
    MLP width."""
    if tp not in TP_SIZES or isinstance(tp, bool):
        raise ConfigError("tensor_parallel_size", tp, "one of 1, 2, 4, 8")
    if model is None:
        return
    heads, kv = model.num_attention_heads, model.num_key_value_heads
    if heads % tp:
        raise TensorParallelError(tp, f"Total number of attention heads ({heads}) must be "
                                  f"divisible by tensor parallel size ({tp}).")
    if kv >= tp and kv % tp:
        raise TensorParallelError(tp, f"Total number of key-value heads ({kv}) must be "
                                  f"divisible by tensor parallel size ({tp}).")
    if kv < tp and tp % kv:
        raise TensorParallelError(tp, f"Tensor parallel size ({tp}) must be a multiple of the "
                                  f"number of key-value heads ({kv}) when it exceeds it: "
                                  "each KV head is then replicated on tp / kv ranks.")
    if model.intermediate_size % tp:
        raise TensorParallelError(tp, f"intermediate_size ({model.intermediate_size}) must be "
                                  f"divisible by tensor parallel size ({tp}).")


def _check_int(name: str, value: Any, lo: int, hi: int | None = None) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= lo
    if ok and hi is not None:
        ok = value <= hi
    if not ok:
        allowed = f"an integer in [{lo}, {hi}]" if hi is not None else f"an integer >= {lo}"
        raise ConfigError(name, value, allowed)


def _check_block_size(value: Any) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 256
    if not (ok and value & (value - 1) == 0):
        raise ConfigError("block_size", value, "a power of two from 1 to 256")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(name, value, f"one of {', '.join(choices)}")
