"""The structured schema of run.py's Hydra config. Overrides are type-checked against it.

The engine group is EngineConfig itself and the hardware group the catalog's Hardware, so a
wrong type or an unknown key fails at composition, before anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional  # noqa: UP035  (OmegaConf reads these annotations)

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from engine.core.catalog import Hardware
from engine.core.config import EngineConfig

MODES = ("sim", "real", "both", "calibrate", "serve")
TARGETS = ("engine", "http")  # mode=real|both: the in-process engine, or a server over HTTP


@dataclass
class ModelEntry:
    name: str = MISSING
    hf_repo: Optional[str] = None  # noqa: UP045
    hf_config: Dict[str, Any] = field(default_factory=dict)  # noqa: UP006
    # A local HF folder (config.json + safetensors) for mode=real; random weights otherwise.
    path: Optional[str] = None  # noqa: UP045


@dataclass
class WorkloadConfig:
    name: str = "poisson_chat"  # a preset of workloads.PRESETS
    path: Optional[str] = None  # noqa: UP045  (a trace file instead of a preset)
    # path's reader: auto (an Azure CSV is recognised by its columns) | kvtwin | azure
    format: str = "auto"
    # path's requests longer than engine.max_model_len: keep (the engine rejects them, and
    # they are recorded) | error | cap | drop; None: keep (a kvtwin trace), cap (Azure)
    too_long: Optional[str] = None  # noqa: UP045
    params: Dict[str, Any] = field(default_factory=dict)  # noqa: UP006


@dataclass
class SloConfig:
    ttft_s: Optional[float] = None  # noqa: UP045
    tpot_s: Optional[float] = None  # noqa: UP045
    e2e_s: Optional[float] = None  # noqa: UP045


@dataclass
class ServeConfig:
    """mode=serve: engine.runtime.serve's options (ServeOptions), e.g. serve.port=8001."""

    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: Optional[str] = None  # noqa: UP045
    max_queue: Optional[int] = None  # noqa: UP045  (503 once this many requests wait)
    log_level: str = "warning"
    torch_threads: Optional[int] = None  # noqa: UP045


@dataclass
class RunConfig:
    mode: str = "sim"
    predictor: str = "auto"  # auto | calibrated | roofline
    skip: bool = True        # event skipping in the simulator
    progress: bool = True
    fail_point: bool = False  # testing: make this run fail on purpose (sweep robustness)
    model: ModelEntry = field(default_factory=ModelEntry)
    hardware: Hardware = MISSING
    engine: EngineConfig = field(default_factory=EngineConfig)
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    slo: SloConfig = field(default_factory=SloConfig)
    target: str = "engine"  # mode=real|both: engine | http (replay against `endpoint`)
    endpoint: Optional[str] = None  # noqa: UP045  (target=http: e.g. http://127.0.0.1:8000)
    served_model: Optional[str] = None  # noqa: UP045  (target=http; None: the server's first)
    serve: ServeConfig = field(default_factory=ServeConfig)


def register() -> None:
    ConfigStore.instance().store(name="base_config", node=RunConfig)
