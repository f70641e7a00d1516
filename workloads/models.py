"""KV bytes per token for `describe`: a model from the catalog (conf/model) or an HF config."""

from __future__ import annotations

from pathlib import Path

from engine.core.catalog import list_models, load_model
from engine.core.config import DTYPE_BYTES, ModelConfig
from workloads.errors import SpecError


def catalog_models() -> list[str]:
    return list_models()


def model_kv_bytes_per_token(model: str, dtype: str = "bfloat16") -> int:
    """KV cache bytes per token (K and V, all layers) of a catalog model or an HF config path."""
    if dtype not in DTYPE_BYTES:
        raise SpecError("dtype", dtype, f"one of {', '.join(DTYPE_BYTES)}")
    path = Path(model)
    if path.is_dir() or path.name == "config.json":
        return ModelConfig.from_hf(path).kv_bytes_per_token(dtype)
    try:
        return load_model(model).kv_bytes_per_token(dtype)
    except ValueError:
        raise SpecError("model", model, f"one of {', '.join(catalog_models())} "
                        "or a path to an HF config.json") from None
