"""HF tensor names <-> this engine's parameters (fused qkv_proj / gate_up_proj shards)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from engine.layers.linear import MergedLinear


class WeightLoadError(ValueError):
    """A checkpoint that does not match the model: names every missing/unexpected tensor."""

    def __init__(self, missing: list[str], unexpected: list[str], mismatched: list[str],
                 source: str = "checkpoint"):
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        parts = [f"{label} ({len(names)}): {', '.join(names)}" for label, names in
                 (("missing tensors", missing), ("unexpected tensors", unexpected),
                  ("shape mismatches", mismatched)) if names]
        super().__init__(f"{source} does not match the model; " + "; ".join(parts))


def param_location(model: nn.Module, hf_name: str) -> tuple[str, int | None]:
    """HF tensor name -> (our parameter name, shard index or None)."""
    for hf_part, (fused, shard) in model.packed_modules.items():
        token = f".{hf_part}."
        if token in hf_name:
            return hf_name.replace(token, f".{fused}."), shard
    return hf_name, None


def hf_names(model: nn.Module, param_name: str) -> list[tuple[str, int | None]]:
    """Our parameter name -> the HF tensor names (and shard indices) it holds, in order."""
    names = [(param_name.replace(f".{fused}.", f".{hf_part}."), shard)
             for hf_part, (fused, shard) in model.packed_modules.items()
             if f".{fused}." in param_name]
    return sorted(names, key=lambda item: item[1]) or [(param_name, None)]


def expected_hf_names(model: nn.Module) -> list[str]:
    """Every tensor name an HF checkpoint of this model must provide."""
    return [hf for name, _ in model.named_parameters()
            for hf, _ in hf_names(model, name)]


def load_hf_weights(model: nn.Module, tensors: Iterable[tuple[str, torch.Tensor]],
                    source: str = "checkpoint") -> None:
    """Copy HF-named tensors into the model; raise WeightLoadError unless it matches exactly."""
    params = dict(model.named_parameters())
    seen: set[str] = set()
    unexpected, mismatched = [], []
    with torch.no_grad():
        for hf_name, tensor in tensors:
            if model.ignores_checkpoint_tensor(hf_name):
                continue
            name, shard = param_location(model, hf_name)
            if name not in params:
                unexpected.append(hf_name)
            elif _copy(model, name, params[name], tensor, shard):
                seen.add(hf_name)
            else:
                mismatched.append(f"{hf_name} {tuple(tensor.shape)}")
    missing = [n for n in expected_hf_names(model) if n not in seen]
    if missing or unexpected or mismatched:
        raise WeightLoadError(missing, sorted(unexpected), mismatched, source)


def _copy(model: nn.Module, name: str, param: torch.Tensor, tensor: torch.Tensor,
          shard: int | None) -> bool:
    target = param if shard is None else _merged(model, name).shard(param, shard)
    tensor = _rank_piece(model, name, tensor, shard)
    if tensor is None or target.shape != tensor.shape:
        return False
    target.copy_(tensor)
    return True


def _rank_piece(model: nn.Module, name: str, tensor: torch.Tensor,
                shard: int | None) -> torch.Tensor | None:
    """This rank's part of a full checkpoint tensor (the tensor itself at TP=1; None when
    its shape cannot be the full tensor)."""
    owner, _, attr = name.rpartition(".")
    module = model.get_submodule(owner)
    if not hasattr(module, "shard_full"):
        return tensor
    expected = module.full_shape(attr)
    if shard is not None:
        size = module.segments[shard][0]
        if tensor.shape[0] != size or tensor.shape[1:] != expected[1:]:
            return None
        return module.shard_part(tensor, shard)
    if tuple(tensor.shape) != tuple(expected):
        return None
    return module.shard_full(attr, tensor)


def _merged(model: nn.Module, param_name: str) -> MergedLinear:
    module = model.get_submodule(param_name.rsplit(".", 1)[0])
    if not isinstance(module, MergedLinear):
        raise TypeError(f"{param_name} is not a fused projection")
    return module


def export_hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our parameters under HF names (fused ones split); a tied lm_head is left out, as HF saves."""
    state = {}
    for name, param in model.named_parameters():
        for hf_name, shard in hf_names(model, name):
            tensor = param if shard is None else _merged(model, name).shard(param, shard)
            state[hf_name] = tensor.detach().clone()
    return state
