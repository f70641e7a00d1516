"""The model and hardware catalog: every entry loads, names resolve loosely, facts hold."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from engine.core.catalog import (
    CONF_DIR,
    Hardware,
    list_hardware,
    list_models,
    load_hardware,
    load_model,
    model_from_dict,
)
from engine.core.config import ModelConfig

GiB = 1 << 30
MiB = 1 << 20
HF_KEYS = {"architectures", "vocab_size", "hidden_size", "intermediate_size",
           "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
           "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling",
           "tie_word_embeddings", "attention_bias", "eos_token_id", "torch_dtype"}


def test_catalog_lists_every_file():
    assert list_models() == ["llama3_1_70b", "llama3_1_8b", "mistral_7b_v0_3", "qwen3_0_6b",
                             "qwen3_32b", "qwen3_8b", "tiny_llama", "tiny_qwen3"]
    assert list_hardware() == ["a100_80gb", "cpu", "h100_80gb", "h100_80gb_x8", "h200_141gb",
                               "h200_141gb_x8", "l4_24gb"]


@pytest.mark.parametrize("name", list_models())
def test_every_model_loads_with_all_hf_fields(name):
    raw = yaml.safe_load((CONF_DIR / "model" / f"{name}.yaml").read_text())
    assert set(raw["hf_config"]) >= HF_KEYS, HF_KEYS - set(raw["hf_config"])
    model = load_model(name)
    assert isinstance(model, ModelConfig)
    assert model.name == raw["name"]
    assert model.head_dim * model.num_attention_heads >= model.hidden_size // 2
    assert model.num_attention_heads % model.num_key_value_heads == 0


def test_qwen3_0_6b_published_facts():
    model = load_model("Qwen3-0.6B")
    assert model.name == "Qwen3-0.6B"
    assert model.architecture == "Qwen3ForCausalLM" and model.tie_word_embeddings
    assert round(model.num_parameters() / 1e6) == 596
    assert model.kv_bytes_per_token("bfloat16") == 114_688


@pytest.mark.parametrize(("name", "params_b", "kv_bytes"), [
    ("qwen3_8b", 8.19, 147_456),          # 36 layers x 8 KV heads x 128 x 2 x 2 bytes
    ("llama3_1_8b", 8.03, 131_072),       # 32 layers x 8 KV heads x 128 x 2 x 2 bytes
    ("mistral_7b_v0_3", 7.25, 131_072),
])
def test_large_model_sizes(name, params_b, kv_bytes):
    model = load_model(name)
    assert round(model.num_parameters() / 1e9, 2) == params_b
    assert model.kv_bytes_per_token("bfloat16") == kv_bytes


def test_llama3_1_rope_scaling_and_tiny_models():
    llama = load_model("Llama-3.1-8B")
    assert llama.rope_theta == 500_000.0
    assert llama.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 8192}
    tiny_q, tiny_l = load_model("tiny_qwen3"), load_model("tiny_llama")
    for tiny in (tiny_q, tiny_l):
        assert (tiny.num_hidden_layers, tiny.hidden_size, tiny.num_attention_heads,
                tiny.num_key_value_heads, tiny.head_dim, tiny.intermediate_size,
                tiny.vocab_size, tiny.max_position_embeddings) == (2, 64, 4, 2, 16, 128, 512, 2048)
        assert tiny.eos_token_ids() == {1}
    assert tiny_q.is_qwen3 and tiny_q.tie_word_embeddings
    assert tiny_l.architecture == "LlamaForCausalLM" and not tiny_l.tie_word_embeddings
    assert tiny_l.rope_scaling["original_max_position_embeddings"] == 1024


@pytest.mark.parametrize("spelling", ["h100_80gb", "H100-80GB", "h100 80gb", "H100_80GB",
                                      "NVIDIA H100 80GB HBM3 (SXM)"])
def test_hardware_name_variants_resolve(spelling):
    assert load_hardware(spelling) == load_hardware("h100_80gb")


@pytest.mark.parametrize(("spelling", "stem"), [
    ("Qwen3-0.6B", "qwen3_0_6b"), ("qwen3_0_6b", "qwen3_0_6b"), ("QWEN3-0.6b", "qwen3_0_6b"),
    ("Qwen/Qwen3-8B", "qwen3_8b"), ("Llama-3.1-8B", "llama3_1_8b"),
    ("meta-llama/Llama-3.1-8B", "llama3_1_8b"), ("Mistral-7B-v0.3", "mistral_7b_v0_3"),
    ("tiny-qwen3", "tiny_qwen3"),
])
def test_model_name_variants_resolve(spelling, stem):
    assert load_model(spelling) == load_model(stem)


def test_paths_load_directly(tmp_path):
    assert load_model(str(CONF_DIR / "model" / "qwen3_0_6b.yaml")).name == "Qwen3-0.6B"
    custom = tmp_path / "my_gpu.yaml"
    data = yaml.safe_load((CONF_DIR / "hardware" / "l4_24gb.yaml").read_text())
    custom.write_text(yaml.safe_dump({**data, "name": "My GPU"}))
    assert load_hardware(custom).name == "My GPU"
    with pytest.raises(FileNotFoundError, match="no_such.yaml"):
        load_hardware(tmp_path / "no_such.yaml")


def test_unknown_names_list_the_available_entries():
    with pytest.raises(ValueError) as err:
        load_hardware("B200-192GB")
    msg = str(err.value)
    assert "hardware" in msg and "'B200-192GB'" in msg
    assert all(name in msg for name in list_hardware())
    with pytest.raises(ValueError) as err:
        load_model("Qwen3-1.7B")
    msg = str(err.value)
    assert "model" in msg and "'Qwen3-1.7B'" in msg
    assert all(name in msg for name in list_models())


@pytest.mark.parametrize("name", list_hardware())
def test_every_hardware_entry_is_sane(name):
    hw = load_hardware(name)
    assert isinstance(hw, Hardware) and hw.kind in ("gpu", "cpu")
    assert hw.total_memory_bytes >= GiB
    assert hw.hbm_bandwidth_bytes_per_s > 0 and hw.peak_bf16_flops > 0
    assert 0 <= hw.driver_reserved_bytes < GiB
    assert 0 <= hw.non_torch_bytes_default < GiB
    assert hw.physical_memory_bytes == hw.total_memory_bytes + hw.driver_reserved_bytes
    if hw.kind == "gpu":
        # every GPU entry is pinned to nvidia-smi's whole-MiB memory.total
        assert hw.physical_memory_bytes % MiB == 0
        assert 10 < hw.ridge_flops_per_byte < 1000


@pytest.mark.parametrize(("name", "smi_mib", "flops", "bandwidth"), [
    ("h100_80gb", 81_559, 989e12, 3.35e12),
    ("h200_141gb", 143_771, 989e12, 4.8e12),
    ("a100_80gb", 81_920, 312e12, 2.039e12),
    ("l4_24gb", 23_034, 121e12, 300e9),
])
def test_gpu_datasheet_values(name, smi_mib, flops, bandwidth):
    hw = load_hardware(name)
    assert hw.physical_memory_bytes == smi_mib * MiB
    assert (hw.peak_bf16_flops, hw.hbm_bandwidth_bytes_per_s) == (flops, bandwidth)


def test_h100_total_is_the_measured_cuda_total():
    hw = load_hardware("h100_80gb")
    assert hw.total_memory_bytes == 85_017_493_504 == 81_079 * MiB
    assert round(hw.total_memory_bytes / GiB, 2) == 79.18


def test_cpu_entry_mirrors_the_engine_default():
    from engine.core.config import EngineConfig

    hw = load_hardware("cpu")
    assert hw.kind == "cpu"
    assert hw.total_memory_bytes == int(EngineConfig().cpu_memory_gib * GiB)
    assert hw.driver_reserved_bytes == 0 and hw.non_torch_bytes_default == 0


@pytest.mark.parametrize(("change", "field", "allowed"), [
    ({"kind": "tpu"}, "kind", "gpu, cpu"),
    ({"total_memory_bytes": 0}, "total_memory_bytes", "> 0"),
    ({"driver_reserved_bytes": -1}, "driver_reserved_bytes", ">= 0"),
    ({"peak_bf16_flops": "fast"}, "peak_bf16_flops", "> 0"),
    ({"hbm_bandwidth_bytes_per_s": 0.0}, "hbm_bandwidth_bytes_per_s", "> 0"),
    ({"colour": "green"}, "colour", "allowed"),
])
def test_hardware_errors_name_the_field(change, field, allowed):
    data = yaml.safe_load((CONF_DIR / "hardware" / "h100_80gb.yaml").read_text())
    with pytest.raises(ValueError, match=field) as err:
        Hardware.from_dict({**data, **change}, source="test.yaml")
    assert allowed in str(err.value) and "test.yaml" in str(err.value)


def test_missing_hardware_and_model_fields_are_named():
    data = yaml.safe_load((CONF_DIR / "hardware" / "h100_80gb.yaml").read_text())
    del data["hbm_bandwidth_bytes_per_s"]
    with pytest.raises(ValueError, match="missing field 'hbm_bandwidth_bytes_per_s'"):
        Hardware.from_dict(data)
    with pytest.raises(ValueError, match="hf_config"):
        model_from_dict({"name": "x"})
    with pytest.raises(ValueError, match="missing required field 'hidden_size'"):
        model_from_dict({"name": "x", "hf_config": {"num_attention_heads": 4}})


def test_catalog_loads_without_hydra_or_torch():
    """A capacity planner installs no torch: the catalog must not import it (nor need Hydra)."""
    code = ("import sys; from engine.core.catalog import load_model, load_hardware; "
            "load_model('Qwen3-0.6B'); load_hardware('h100_80gb'); "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "assert 'hydra' not in sys.modules, 'hydra imported'")
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_entries_composed_by_hydra_load_as_dictconfig():
    """run.py gets each group as a DictConfig; the same builders accept it."""
    from omegaconf import OmegaConf

    hw = OmegaConf.load(CONF_DIR / "hardware" / "a100_80gb.yaml")
    assert Hardware.from_dict(hw) == load_hardware("a100_80gb")
    model = model_from_dict(OmegaConf.load(CONF_DIR / "model" / "tiny_llama.yaml"))
    assert model == load_model("tiny_llama") and isinstance(model.rope_scaling, dict)
