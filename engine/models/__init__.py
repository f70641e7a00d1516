"""Model registry: the architecture name in an HF config picks the class."""

from __future__ import annotations

from torch import nn

from engine.core.config import ModelConfig
from engine.models.llama import LlamaForCausalLM, MistralForCausalLM
from engine.models.qwen3 import Qwen3ForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
}


def get_model_class(model_config: ModelConfig) -> type[nn.Module]:
    arch = model_config.architecture
    if arch not in MODEL_REGISTRY:
        raise ValueError(f"unsupported architecture {arch!r}; supported: "
                         f"{', '.join(MODEL_REGISTRY)}")
    return MODEL_REGISTRY[arch]
