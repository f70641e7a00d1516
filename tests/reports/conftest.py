"""Run folders and sweeps for the page tests, built with the real simulator (small workloads).

The "measured" side of a `both` run is SYNTHETIC: the simulator's own records with every latency
stretched and jittered and the memory terms perturbed. It exercises the comparison layout only;
it says nothing about prediction accuracy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from engine.core.config import EngineConfig
from engine.core.memory import max_concurrency
from reports.metrics import summarize, twin_metrics
from reports.run_folder import write_run
from sim.twin import TwinRun, setup_twin, simulate
from workloads import make_preset
from workloads.trace_requests import model_requests

FAILED_ERROR = "RuntimeError: CUDA error: an illegal memory access (synthetic test failure)"
SWEEP_GRID = [(mml, bs, gmu) for mml in (2048, 4096) for bs in (16, 32) for gmu in (0.5, 0.7, 0.9)]


def simulate_point(model: str, hardware: str, engine: EngineConfig,
                   workload: dict[str, Any]) -> TwinRun:
    setup = setup_twin(model, hardware, engine)
    trace = make_preset(workload["name"], **workload["params"])
    return simulate(setup, model_requests(trace, setup.model.vocab_size))


def synthetic_real(run: TwinRun, slowdown: float = 1.2,
                   seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """SYNTHETIC measured records and summary (see the module docstring)."""
    rng = np.random.default_rng(seed)
    reqs, steps = run.requests.copy(), run.steps.copy()
    arrival = pd.to_numeric(reqs["arrival_s"])
    stretch = slowdown * rng.uniform(0.85, 1.15, len(reqs))
    for column in ("first_scheduled_s", "first_token_s", "finish_s"):
        reqs[column] = arrival + (pd.to_numeric(reqs[column]) - arrival) * stretch
    steps["start_s"] = steps["start_s"] * slowdown
    steps["end_s"] = steps["end_s"] * slowdown
    memory = synthetic_memory(run.setup.memory.to_dict(), run.setup.config)
    metrics = summarize(reqs, steps, num_blocks=memory["num_blocks"])
    real = {"memory": memory, "metrics": metrics,
            "device": {"name": "fake GPU (synthetic test data)"}}
    return reqs, steps, real


def synthetic_memory(predicted: dict[str, Any], config: EngineConfig) -> dict[str, Any]:
    mem = {**predicted, "source": "measured (synthetic)"}
    mem["activation_peak_bytes"] = int(predicted["activation_peak_bytes"] * 1.1)
    mem["non_torch_bytes"] = int(predicted["non_torch_bytes"] * 0.7)
    used = sum(mem[k] for k in ("weights_bytes", "activation_peak_bytes", "non_torch_bytes",
                                "cuda_graph_bytes"))
    mem["kv_cache_bytes"] = mem["budget_bytes"] - used
    mem["num_blocks"] = mem["kv_cache_bytes"] // mem["bytes_per_block"]
    mem["kv_cache_tokens"] = mem["num_blocks"] * config.block_size
    mem["max_concurrency"] = max_concurrency(mem["num_blocks"], config.block_size,
                                             config.max_model_len)
    for key in ("sources", "starts", "error", "error_type"):
        mem.pop(key, None)
    return mem


def config_of(model: str, hardware: str, engine: EngineConfig,
              workload: dict[str, Any]) -> dict[str, Any]:
    return {"model": model, "hardware": hardware, "predictor": "auto",
            "engine": engine.to_dict(), "workload": workload}


def write_point(path: Path, model: str, hardware: str, engine: EngineConfig,
                workload: dict[str, Any], mode: str = "sim") -> Path:
    """A sim, real (synthetic) or both run folder, as run.py writes one."""
    run = simulate_point(model, hardware, engine, workload)
    starts = run.setup.memory.starts
    summary = {"status": "ok" if starts else "cannot_start", "mode": mode,
               "error": run.setup.memory.error, "error_type": run.setup.memory.error_type,
               "config": config_of(model, hardware, engine, workload),
               "sim": run.summary(twin_metrics(run)) if mode != "real" else None, "real": None}
    records = {"sim": (run.requests, run.steps)} if starts and mode != "real" else {}
    if starts and mode in ("real", "both"):
        reqs, steps, summary["real"] = synthetic_real(run)
        records["real"] = (reqs, steps)
    return write_run(path, summary, records or None)


def write_failed(path: Path, model: str, hardware: str, engine: EngineConfig,
                 workload: dict[str, Any]) -> Path:
    summary = {"status": "failed", "mode": "sim", "error": FAILED_ERROR,
               "error_type": "RuntimeError", "config": config_of(model, hardware, engine,
                                                                 workload),
               "sim": None, "real": None, "traceback": "Traceback (synthetic)\n  ...\n"}
    return write_run(path, summary)


CHAT = {"name": "poisson_chat", "params": {"n": 100}}
L4_CHAT = {"name": "poisson_chat", "params": {"n": 60, "rate": 8.0}}
QWEN = ("qwen3_0_6b", "h100_80gb")
MISTRAL_L4 = ("mistral_7b_v0_3", "l4_24gb")


@pytest.fixture(scope="session")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One run folder per kind: sim, both, real, cannot_start, failed."""
    root = tmp_path_factory.mktemp("runs")
    engine = EngineConfig(block_size=16, max_model_len=4096)
    return {
        "sim": write_point(root / "sim", *QWEN, engine, CHAT),
        "both": write_point(root / "both", *QWEN, engine, CHAT, mode="both"),
        "real": write_point(root / "real", *QWEN, engine, CHAT, mode="real"),
        "cannot_start": write_point(root / "cannot_start", *QWEN,
                                    EngineConfig(gpu_memory_utilization=0.01), CHAT),
        "failed": write_failed(root / "failed", *QWEN, engine, CHAT),
    }


def write_sweep(root: Path, mode: str, grid: list[tuple[int, int, float]]) -> Path:
    """Hydra-like layout root/<job number>/; the last point failed."""
    for num, (mml, bs, gmu) in enumerate(grid):
        engine = EngineConfig(block_size=bs, max_model_len=mml, gpu_memory_utilization=gmu)
        write_point(root / str(num), *MISTRAL_L4, engine, L4_CHAT, mode=mode)
    engine = EngineConfig(block_size=8, max_model_len=2048, gpu_memory_utilization=0.9)
    write_failed(root / str(len(grid)), *MISTRAL_L4, engine, L4_CHAT)
    return root


@pytest.fixture(scope="session")
def sim_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 sim points (Mistral-7B on an L4: some cannot start) and one failed point."""
    return write_sweep(tmp_path_factory.mktemp("sim_sweep"), "sim", SWEEP_GRID)


@pytest.fixture(scope="session")
def both_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 `both` points (synthetic measured side), one that cannot start, one failed."""
    grid = [(2048, 16, 0.5), (2048, 16, 0.7), (2048, 16, 0.9), (2048, 32, 0.7),
            (2048, 32, 0.9)]
    return write_sweep(tmp_path_factory.mktemp("both_sweep"), "both", grid)
