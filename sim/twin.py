"""One simulated run: catalog entries + engine config + requests -> memory, capacity and the
request and step records (their metrics are `reports.metrics`'). The entry point of run.py
and every front end that simulates."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from engine.core.catalog import Hardware, catalog_key, load_hardware, load_model, model_from_dict
from engine.core.config import ConfigError, EngineConfig, ModelConfig
from engine.core.request import Request, RequestTable, as_table
from sim.capacity import CapacityPlan, plan_capacity
from sim.collectives import ALLREDUCE_DIR, tensor_parallel_step_time
from sim.memory_model import MemoryPrediction, predict_memory
from sim.profile import PROFILE_DIR, Profile, ProfileKey, find_profile, slug
from sim.request_log import RequestLog
from sim.simulator import Simulator, gc_paused
from sim.step_log import ChunkFn, StepLog
from sim.step_time import RooflineStepTime, StepTimeModel

PREDICTORS = ("auto", "calibrated", "roofline")


@dataclass
class TwinSetup:
    """What a prediction stands on: the model, the hardware, and where each number comes from."""

    model: ModelConfig
    model_key: str
    hardware: Hardware
    hardware_key: str
    config: EngineConfig
    profile: Profile | None
    step_time: StepTimeModel
    memory: MemoryPrediction

    @property
    def predictor(self) -> dict[str, str]:
        return {"kind": self.step_time.kind, "source": self.step_time.source}


@dataclass
class TwinRun:
    """The records of a simulated run: `steps` is None when they were streamed (on_steps);
    `stopped` says where a run asked to stop (should_stop) did."""

    setup: TwinSetup
    capacity: CapacityPlan
    requests: pd.DataFrame
    steps: pd.DataFrame | None
    stats: dict[str, int] = field(default_factory=dict)
    stopped: dict[str, float] | None = None

    @property
    def num_blocks(self) -> int:
        """The KV blocks the run had (0: it could not start)."""
        return self.setup.memory.num_blocks if self.setup.memory.starts else 0

    def summary(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """Deterministic (no wall time): the same config and seed give the same JSON."""
        return {"predictor": self.setup.predictor, "memory": self.setup.memory.to_dict(),
                "capacity": self.capacity.to_dict(), "metrics": metrics,
                "sim_stats": self.stats}


def attention_backend(hardware: Hardware, config: EngineConfig) -> str:
    if config.attention_backend != "auto":
        return config.attention_backend
    return "sdpa" if hardware.kind == "cpu" else "torch"


Entry = str | dict[str, Any]


def resolve_entries(model: Entry, hardware: Entry, keys: tuple[str | None, str | None] = (
        None, None)) -> tuple[ModelConfig, Hardware, tuple[str, str]]:
    """Catalog names, or entries already loaded (Hydra's composed groups) with their keys."""
    if isinstance(model, str):
        model_cfg, model_key = load_model(model), catalog_key("model", model)
    else:
        model_cfg, model_key = model_from_dict(model), keys[0] or slug(model["name"])
    if isinstance(hardware, str):
        hw, hw_key = load_hardware(hardware), catalog_key("hardware", hardware)
    else:
        hw, hw_key = Hardware.from_dict(hardware), keys[1] or slug(hardware["name"])
    return model_cfg, hw, (model_key, hw_key)


def profile_step_time(profile: Profile, config: EngineConfig) -> StepTimeModel:
    """The profile's fit, its mixed-step graph terms at this configuration's token limit."""
    model = profile.step_time()
    if model.token_limit is None:
        return model
    return model.with_token_limit(config.cudagraph_token_limit, config.max_num_batched_tokens)


def setup_twin(model: Entry, hardware: Entry, config: EngineConfig, predictor: str = "auto",
               keys: tuple[str | None, str | None] = (None, None),
               profile_dir: Path = PROFILE_DIR) -> TwinSetup:
    """Everything the twin needs for one configuration; the profile comes from
    `profile_dir` (sim/profiles, or another machine's calibration)."""
    if predictor not in PREDICTORS:
        raise ValueError(f"predictor={predictor!r} is invalid: must be one of "
                         f"{', '.join(PREDICTORS)}")
    model_cfg, hw, keys = resolve_entries(model, hardware, keys)
    config.validate(model_cfg)
    if config.tensor_parallel_size > 1:
        return setup_tensor_parallel(model_cfg, hw, config, predictor, keys)
    key = ProfileKey(keys[1], keys[0], config.dtype, attention_backend(hw, config),
                     config.quantization, config.kv_cache_dtype)
    profile = find_profile(key, profile_dir) if predictor != "roofline" else None
    if predictor == "calibrated" and profile is None:
        raise FileNotFoundError(f"no calibration profile {key.filename} in {profile_dir}: "
                                "run mode=calibrate on that hardware, or use "
                                "predictor=roofline")
    step_time = profile_step_time(profile, config) if profile else RooflineStepTime(
        model_cfg, config.dtype, hw.peak_bf16_flops, hw.hbm_bandwidth_bytes_per_s,
        source=f"roofline of {hw.name} (catalog peaks, documented efficiencies)",
        quantization=config.quantization, kv_dtype=config.kv_dtype)
    memory = predict_memory(model_cfg, hw, config, profile or memory_profile(key, predictor,
                                                                              profile_dir))
    return TwinSetup(model_cfg, keys[0], hw, keys[1], config, profile, step_time, memory)


def memory_profile(key: ProfileKey, predictor: str, profile_dir: Path) -> Profile | None:
    """An int8 / fp8 engine without a profile of its own starts up as the plain engine does
    (the same activation peak, non-torch memory and graph pool): the plain profile's memory."""
    if predictor == "roofline" or (key.quantization, key.kv_cache_dtype) == ("none", "auto"):
        return None
    return find_profile(replace(key, quantization="none", kv_cache_dtype="auto"), profile_dir)


def check_gpus(hardware: Hardware, config: EngineConfig) -> None:
    """tensor_parallel_size GPUs of the node (a CPU runs its ranks as processes)."""
    tp = config.tensor_parallel_size
    if hardware.kind == "gpu" and tp > hardware.num_gpus:
        raise ConfigError("tensor_parallel_size", tp, f"at most the num_gpus ({hardware.num_gpus})"
                          f" of {hardware.name}: pick a multi-GPU entry, e.g. h100_80gb_x8")


def setup_tensor_parallel(model: ModelConfig, hardware: Hardware, config: EngineConfig,
                          predictor: str, keys: tuple[str, str],
                          allreduce_dir: Path = ALLREDUCE_DIR) -> TwinSetup:
    """TP > 1: calibration profiles are measured at TP=1 (their key has no TP), so the step
    time is one rank's roofline plus the all-reduces (sim.collectives) and memory comes from
    the per-rank formulas (sim.memory_model.predict_rank_memory)."""
    check_gpus(hardware, config)
    tp = config.tensor_parallel_size
    if predictor == "calibrated":
        raise FileNotFoundError(f"no calibration profile at tensor_parallel_size={tp}: "
                                "profiles are measured at TP=1; use predictor=roofline or auto")
    step_time = tensor_parallel_step_time(model, hardware, keys[1], config,
                                          allreduce_dir)
    memory = predict_memory(model, hardware, config)
    return TwinSetup(model, keys[0], hardware, keys[1], config, None, step_time, memory)


def simulate(setup: TwinSetup, requests: RequestTable | Iterable[Request], skip: bool = True,
             on_progress: Callable[[int], None] | None = None,
             on_steps: ChunkFn | None = None,
             should_stop: Callable[[], bool] | None = None) -> TwinRun:
    """Simulate `requests`; a configuration that cannot start gives a run with no records.
    With `on_steps`, the step records stream to it in chunks (a run of any length holds one
    chunk of them at most) and the run's `steps` is None. `should_stop` is asked between
    steps: once it says so, the run ends there with the records made so far."""
    cfg, memory = setup.config, setup.memory
    requests = as_table(requests)
    capacity = plan_capacity(setup.model, setup.hardware, cfg, setup.profile,
                             requests.mean_len(), memory)
    if not memory.starts:
        empty = RequestLog([], np.zeros(0), np.zeros(0, dtype=np.int64)).to_frame()
        return TwinRun(setup, capacity, empty, None if on_steps else StepLog().to_frame())
    sim = Simulator(cfg, memory.num_blocks, setup.step_time, setup.model.eos_token_ids(),
                    skip=skip, on_progress=on_progress, on_steps=on_steps,
                    should_stop=should_stop)
    with gc_paused():  # a full collection would walk every live prompt token
        result = sim.run(requests)
        steps = None if on_steps else result.steps.to_frame()
    return TwinRun(setup, capacity, result.requests, steps, result.stats, result.stopped)
