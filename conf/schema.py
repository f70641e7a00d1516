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
class CalibrateConfig:
    """mode=calibrate: engine.tools.calibrate.CalibrationOptions."""

    quick: bool = False  # the grid's shapes that carry the fit: ~90 s on a GPU
    update: Optional[str] = None  # noqa: UP045  (with quick: rescale this full profile)
    time_budget_s: Optional[float] = None  # noqa: UP045  (None: 300 s, 75 s when quick)
    out: Optional[str] = None  # noqa: UP045  (None: sim/profiles)


@dataclass
class BandsConfig:
    """Prediction bands (reports.bands): seeded replicates of the twin with step-time noise
    and the machine spread; each replicate costs one simulation, spread over `workers`."""

    replicates: int = 8  # 0: no bands
    seed: int = 0
    workers: Optional[int] = None  # noqa: UP045  (None: this machine's cores; 1 under joblib)
    machine_log_sd: Optional[float] = None  # noqa: UP045  (None: the profile's spread)
    max_requests: int = 200_000  # larger traces get no bands (recorded as skipped)


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
    bands: BandsConfig = field(default_factory=BandsConfig)
    calibrate: CalibrateConfig = field(default_factory=CalibrateConfig)
    target: str = "engine"  # mode=real|both: engine | http (replay against `endpoint`)
    endpoint: Optional[str] = None  # noqa: UP045  (target=http: e.g. http://127.0.0.1:8000)
    served_model: Optional[str] = None  # noqa: UP045  (target=http; None: the server's first)
    serve: ServeConfig = field(default_factory=ServeConfig)


def register() -> None:
    ConfigStore.instance().store(name="base_config", node=RunConfig)
