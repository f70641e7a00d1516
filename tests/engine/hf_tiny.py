"""Tiny HF transformers models (random weights, randomised norms) saved as safetensors folders.

Shared by test_models_hf.py and test_model_runner.py. Everything runs on the CPU in float32.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from engine.core.config import ModelConfig

SHAPE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             max_position_embeddings=512, initializer_range=0.1)
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def hf_config(kind: str) -> PretrainedConfig:
    """qwen3 (tied embeddings), llama3 (rope_scaling llama3) or mistral (no scaling)."""
    if kind == "qwen3":
        config = Qwen3Config(tie_word_embeddings=True, **SHAPE)
    elif kind == "llama3":
        # theta and the short original context put the 8 frequencies in all three llama3 bands.
        config = LlamaConfig(rope_theta=500000.0, rope_scaling=dict(LLAMA3_SCALING), **SHAPE)
    elif kind == "mistral":
        config = MistralConfig(sliding_window=None, rope_theta=1000000.0, **SHAPE)
    else:
        raise ValueError(kind)
    config._attn_implementation = "eager"
    return config


HF_CLASSES = {"qwen3": Qwen3ForCausalLM, "llama3": LlamaForCausalLM,
              "mistral": MistralForCausalLM}


def tiny_model_config(kind: str) -> ModelConfig:
    """Our ModelConfig of the same tiny model, without saving it first."""
    raw = hf_config(kind).to_dict()
    raw["architectures"] = [HF_CLASSES[kind].__name__]
    return ModelConfig.from_hf(raw)


def hf_model(kind: str, seed: int = 0) -> PreTrainedModel:
    """A random HF model whose norm weights are not all ones (so a skipped norm shows)."""
    torch.manual_seed(seed)
    model = HF_CLASSES[kind](hf_config(kind)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model


def save_hf(model: PreTrainedModel, path: Path, **kwargs: object) -> Path:
    model.save_pretrained(path, **kwargs)
    return path


@torch.no_grad()
def hf_logits(model: PreTrainedModel, token_ids: list[int]) -> torch.Tensor:
    """Full-sequence float32 logits [len, vocab] of one prompt."""
    return model(torch.tensor([token_ids])).logits[0].float()
