"""Every invalid EngineConfig field raises an error naming the field, the value and the range."""

from __future__ import annotations

import pytest

from engine.core.config import ConfigError, EngineConfig, ModelConfig

QWEN3_06B = {
    "architectures": ["Qwen3ForCausalLM"], "vocab_size": 151936, "hidden_size": 1024,
    "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16,
    "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6, "rope_theta": 1000000, "tie_word_embeddings": True,
}

BAD = [
    ("block_size", 0, "power of two from 1 to 256"),
    ("block_size", 24, "power of two from 1 to 256"),
    ("block_size", 512, "power of two from 1 to 256"),
    ("block_size", 16.0, "power of two from 1 to 256"),
    ("max_model_len", 0, "[1, 40960]"),
    ("max_model_len", 40961, "[1, 40960]"),
    ("gpu_memory_utilization", 0.0, "(0, 1]"),
    ("gpu_memory_utilization", 1.01, "(0, 1]"),
    ("max_num_seqs", 0, ">= 1"),
    ("max_num_batched_tokens", 0, ">= 1"),
    ("policy", "fcfs", "v1, prefill_first"),
    ("dtype", "int8", "float32, bfloat16, float16"),
    ("attention_backend", "xformers", "auto, sdpa, torch, flash_attn"),
    ("device", "tpu", "auto, cpu, cuda"),
    ("seed", -1, ">= 0"),
    ("num_gpu_blocks_override", -5, ">= 0"),
    ("cpu_memory_gib", 0, "> 0"),
]


@pytest.mark.parametrize(("field", "value", "allowed"), BAD)
def test_each_bad_field_names_field_value_and_range(field: str, value, allowed: str) -> None:
    config = EngineConfig(**{field: value})
    with pytest.raises(ConfigError) as err:
        config.validate(ModelConfig.from_hf(QWEN3_06B))
    assert err.value.field == field
    message = str(err.value)
    assert message.startswith(f"{field}={value!r}")
    assert allowed in message


def test_unchunked_budget_must_cover_max_model_len() -> None:
    config = EngineConfig(max_model_len=4096, max_num_batched_tokens=2048,
                          enable_chunked_prefill=False)
    with pytest.raises(ConfigError, match=r"max_num_batched_tokens=2048.*>= max_model_len"):
        config.validate()
    EngineConfig(max_model_len=4096, max_num_batched_tokens=2048).validate()  # chunked: fine


def test_unknown_engine_arg_is_named() -> None:
    with pytest.raises(ConfigError, match="blocksize"):
        EngineConfig.from_kwargs(blocksize=16)


def test_defaults_are_valid() -> None:
    EngineConfig().validate(ModelConfig.from_hf(QWEN3_06B))


def test_qwen3_06b_shape_facts() -> None:
    model = ModelConfig.from_hf(QWEN3_06B)
    assert round(model.num_parameters() / 1e6) == 596
    assert model.kv_bytes_per_token("bfloat16") == 114_688


def test_model_config_reads_a_folder(tmp_path) -> None:
    import json
    (tmp_path / "config.json").write_text(json.dumps(QWEN3_06B))
    assert ModelConfig.from_hf(tmp_path).num_hidden_layers == 28
    with pytest.raises(FileNotFoundError, match="model config not found"):
        ModelConfig.from_hf(tmp_path / "missing")
