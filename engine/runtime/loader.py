"""Build a model: seeded random weights, or weights from a local HF-format folder; then, with
`quantization="int8"`, its linear weights quantized (engine/layers/quantization.py)."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from engine.core.config import ModelConfig
from engine.layers.linear import Linear, VocabEmbedding
from engine.layers.norm import RMSNorm
from engine.layers.quantization import quantize_linears
from engine.models import get_model_class
from engine.models.weights import load_hf_weights

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
INIT_STD = 0.02


def to_torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is invalid: must be one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def create_model(model_config: ModelConfig, dtype: str | torch.dtype,
                 device: torch.device | str) -> nn.Module:
    """The model with allocated but unset weights, directly in `dtype` on `device`."""
    cls = get_model_class(model_config)
    with _default_dtype(to_torch_dtype(dtype)), torch.device(device):
        model = cls(model_config)
    return model.requires_grad_(False).eval()


def build_model(model_config: ModelConfig, dtype: str | torch.dtype = "bfloat16",
                device: torch.device | str = "cpu", seed: int = 0,
                quantization: str = "none") -> nn.Module:
    """Random weights, identical for the same (config, dtype, device, seed)."""
    model = create_model(model_config, dtype, device)
    init_weights(model, seed)
    return quantize(model, quantization)


def quantize(model: nn.Module, quantization: str) -> nn.Module:
    """The loaded model with its linear weights in int8 ("int8") or as they are ("none")."""
    if quantization == "int8":
        quantize_linears(model)
    elif quantization != "none":
        raise ValueError(f"quantization={quantization!r} is invalid: must be one of none, int8")
    return model


@torch.no_grad()
def init_weights(model: nn.Module, seed: int) -> None:
    """normal(0, 0.02) for linear and embedding weights, zero biases, ones for norms. A
    tensor-parallel shard draws its full tensor and keeps its part, so every TP size builds
    the same model from the same seed."""
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(seed)
    done: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in done:
                continue  # a tied lm_head keeps the embedding's values
            done.add(id(param))
            if isinstance(module, RMSNorm):
                param.fill_(1.0)
            elif name == "bias":
                param.zero_()
            elif isinstance(module, Linear | VocabEmbedding):
                _init_normal(module, name, param, generator)
            else:
                raise TypeError(f"no init rule for {type(module).__name__}.{name}")


def _init_normal(module: nn.Module, name: str, param: torch.Tensor,
                 generator: torch.Generator) -> None:
    full_shape = module.full_shape(name) if hasattr(module, "full_shape") else param.shape
    if tuple(full_shape) == tuple(param.shape):
        param.normal_(0.0, INIT_STD, generator=generator)
        return
    full = torch.empty(full_shape, dtype=param.dtype, device=param.device)
    param.copy_(module.shard_full(name, full.normal_(0.0, INIT_STD, generator=generator)))


def load_model(path: str | Path, dtype: str | torch.dtype = "bfloat16",
               device: torch.device | str = "cpu",
               model_config: ModelConfig | None = None,
               quantization: str = "none") -> nn.Module:
    """The model of a local HF folder (config.json + *.safetensors, sharded or not)."""
    path = Path(path)
    folder_config = read_model_config(path)
    if model_config is not None:
        check_same_shape(model_config, folder_config, path)
    model = create_model(model_config or folder_config, dtype, device)
    load_hf_weights(model, iter_safetensors(path), source=str(path))
    return quantize(model, quantization)


def check_same_shape(given: ModelConfig, folder: ModelConfig, path: Path) -> None:
    """Refuse to load weights under a config that computes differently from the folder's."""
    ignored = {"name", "torch_dtype", "eos_token_id"}
    diffs = [f"{f.name}: given {getattr(given, f.name)!r}, {path} has "
             f"{getattr(folder, f.name)!r}" for f in fields(ModelConfig)
             if f.name not in ignored and getattr(given, f.name) != getattr(folder, f.name)]
    if diffs:
        raise ValueError("model_config does not match the checkpoint's config.json: "
                         + "; ".join(diffs))


def read_model_config(path: str | Path) -> ModelConfig:
    """ModelConfig.from_hf, warning about what the engine does not model (sliding windows)."""
    hf = json.loads((Path(path) / "config.json").read_text())
    config = ModelConfig.from_hf(hf)
    window = hf.get("sliding_window")
    if window and hf.get("use_sliding_window", True) and window < config.max_position_embeddings:
        warnings.warn(f"{path}: sliding_window={window} is not implemented; attention is full, "
                      f"so sequences longer than {window} tokens differ from the reference",
                      stacklevel=2)
    return config


def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [path / name for name in shards]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {path}")
    absent = [str(f) for f in files if not f.is_file()]
    if absent:
        raise FileNotFoundError(f"weight shards listed in {index} are missing: {absent}")
    return files


def iter_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield name, f.get_tensor(name)
