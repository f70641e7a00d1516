"""The model and hardware catalog: the YAML files of `conf/model/` and `conf/hardware/`.

The same files are Hydra config groups for `run.py`; this module reads them without Hydra, so
the simulator and the tests can load `h100_80gb` or `Qwen3-0.6B` directly. Names are matched
loosely: case and separators do not matter (`H100-80GB`, `h100_80gb` and `h100 80gb` are one),
and an entry's display name works as well as its file name. Pure Python (no torch).
"""

from __future__ import annotations

import re
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from engine.core.config import GiB, ModelConfig

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
HARDWARE_KINDS = ("gpu", "cpu")


@dataclass
class Hardware:
    """One accelerator, or a node of `num_gpus` of them: per-GPU memory as CUDA sees it and
    roofline peaks, and (multi-GPU nodes) the interconnect tensor parallelism all-reduces
    over."""

    name: str
    kind: str  # "gpu" or "cpu"
    total_memory_bytes: int  # what torch.cuda.mem_get_info()[1] reports
    driver_reserved_bytes: int  # nvidia-smi's memory.total minus total_memory_bytes
    peak_bf16_flops: float  # dense, no sparsity
    hbm_bandwidth_bytes_per_s: float
    non_torch_bytes_default: int  # CUDA context etc. when no calibration profile exists
    # Memory other processes hold on this GPU when the engine starts (0: the GPU is ours).
    # The twin runs the engine's free-memory check with it (engine.core.memory).
    used_by_others_gib: float = 0.0
    # A node of num_gpus identical GPUs (engine.tensor_parallel_size <= num_gpus); every
    # memory and peak figure above is per GPU.
    num_gpus: int = 1
    # The GPU's NVLink bandwidth, both directions together (datasheet; 0: no NVLink).
    nvlink_bandwidth_bytes_per_s: float = 0.0
    # NCCL all-reduce bus bandwidth (nccl-tests' busbw) and small-message latency between the
    # node's GPUs: the all-reduce roofline's two terms (sim/collectives.py).
    allreduce_bus_bandwidth_bytes_per_s: float = 0.0
    allreduce_latency_s: float = 0.0

    @property
    def physical_memory_bytes(self) -> int:
        return self.total_memory_bytes + self.driver_reserved_bytes

    @property
    def ridge_flops_per_byte(self) -> float:
        """Arithmetic intensity above which a kernel is compute-bound on this hardware."""
        return self.peak_bf16_flops / self.hbm_bandwidth_bytes_per_s

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "hardware") -> Hardware:
        """Build and check one entry (a dict, or the DictConfig Hydra composed); errors name
        the source, the field and what is allowed."""
        data = _as_dict(data)
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(f"{source}: unknown field {unknown[0]!r}; allowed: {names}")
        missing = [f.name for f in fields(cls)
                   if f.name not in data and f.default is MISSING]
        if missing:
            raise ValueError(f"{source}: missing field {missing[0]!r}; required: {names}")
        if data["kind"] not in HARDWARE_KINDS:
            raise ValueError(f"{source}: kind={data['kind']!r} is invalid: must be one of "
                             f"{', '.join(HARDWARE_KINDS)}")
        hw = cls(**data)
        _check_numbers(hw, source)
        return hw


def _check_numbers(hw: Hardware, source: str) -> None:
    for name in ("total_memory_bytes", "driver_reserved_bytes", "non_torch_bytes_default"):
        value = getattr(hw, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{source}: {name}={value!r} is invalid: must be an integer >= 0")
    if hw.total_memory_bytes == 0:
        raise ValueError(f"{source}: total_memory_bytes=0 is invalid: must be an integer > 0")
    for name in ("peak_bf16_flops", "hbm_bandwidth_bytes_per_s"):
        value = getattr(hw, name)
        if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
            raise ValueError(f"{source}: {name}={value!r} is invalid: must be a number > 0")
    if not isinstance(hw.num_gpus, int) or isinstance(hw.num_gpus, bool) or hw.num_gpus < 1:
        raise ValueError(f"{source}: num_gpus={hw.num_gpus!r} is invalid: must be an "
                         "integer >= 1")
    for name in ("nvlink_bandwidth_bytes_per_s", "allreduce_bus_bandwidth_bytes_per_s",
                 "allreduce_latency_s"):
        value = getattr(hw, name)
        if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{source}: {name}={value!r} is invalid: must be a number >= 0")
    others = hw.used_by_others_gib
    if not (isinstance(others, int | float) and not isinstance(others, bool)
            and 0 <= others * GiB < hw.total_memory_bytes):
        raise ValueError(f"{source}: used_by_others_gib={others!r} is invalid: must be a "
                         "number >= 0 below the total memory in GiB")


def _as_dict(data: Any) -> dict[str, Any]:
    if OmegaConf.is_config(data):
        data = OmegaConf.to_container(data, resolve=True)
    return dict(data)


# -- names and files ----------------------------------------------------------------------------

def _key(name: str) -> str:
    """Case and separators do not matter: 'Qwen3-0.6B' and 'qwen3_0_6b' give 'qwen306b'."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _read_yaml(path: Path) -> dict[str, Any]:
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _entries(group: str) -> dict[str, Path]:
    """File stem -> path for every YAML file of a config group, sorted by stem."""
    return {p.stem: p for p in sorted((CONF_DIR / group).glob("*.yaml"))}


def _aliases(group: str) -> dict[str, Path]:
    """Every accepted spelling (file stem, display name, HF repo id; as keys) -> path."""
    table: dict[str, Path] = {}
    for stem, path in _entries(group).items():
        table[_key(stem)] = path
        data = _read_yaml(path)
        for alias in (data.get("name"), data.get("hf_repo")):
            if isinstance(alias, str):
                table.setdefault(_key(alias), path)
    return table


def _resolve(group: str, name_or_path: str | Path) -> Path:
    """A YAML file (by its .yaml/.yml path), or a catalog name in any of its accepted spellings."""
    text = str(name_or_path)
    if text.endswith((".yaml", ".yml")):
        if not Path(text).is_file():
            raise FileNotFoundError(f"{group} file not found: {text}")
        return Path(text)
    path = _aliases(group).get(_key(text))
    if path is None:
        available = ", ".join(_entries(group)) or "(none)"
        raise ValueError(f"unknown {group} {text!r}: available {group} entries are {available}")
    return path


# -- public API ---------------------------------------------------------------------------------

def list_hardware() -> list[str]:
    return list(_entries("hardware"))


def list_models() -> list[str]:
    return list(_entries("model"))


def load_hardware(name_or_path: str | Path) -> Hardware:
    path = _resolve("hardware", name_or_path)
    return Hardware.from_dict(_read_yaml(path), source=str(path))


def load_model(name_or_path: str | Path) -> ModelConfig:
    path = _resolve("model", name_or_path)
    return model_from_dict(_read_yaml(path), source=str(path))


def model_from_dict(data: dict[str, Any], source: str = "model") -> ModelConfig:
    """A catalog entry ({name, hf_config, ...}; a dict or a DictConfig) -> ModelConfig named
    by its display name."""
    data = _as_dict(data)
    hf = data.get("hf_config")
    if not isinstance(hf, dict):
        raise ValueError(f"{source}: hf_config={hf!r} is invalid: must be a mapping holding "
                         "the model's HF config.json values")
    try:
        model = ModelConfig.from_hf(dict(hf))
    except KeyError as err:
        raise ValueError(f"{source}: hf_config is missing required field {err.args[0]!r}") \
            from None
    model.name = str(data.get("name") or model.name or Path(source).stem)
    return model


def catalog_key(group: str, name_or_path: str | Path) -> str:
    """The catalog file stem an entry resolves to ('H100-80GB' -> 'h100_80gb')."""
    return _resolve(group, name_or_path).stem
