"""pytest-benchmark: simulator speed on the Azure 2023 conversation trace (1 h, native rate).

    python -m pytest tests/benchmarks/test_bench_sim.py --benchmark-enable

The ratio printed is simulated seconds per wall second (issue target: >= 1000x on one core,
Qwen3-0.6B / H100 roofline). Without --benchmark-enable it runs once, as a correctness test.
"""

from __future__ import annotations

import pytest

from engine.core.config import EngineConfig
from reports.metrics import twin_metrics
from sim.twin import setup_twin, simulate
from workloads import make_preset
from workloads.presets import TRACE_DIR
from workloads.trace_requests import model_requests

AZURE = TRACE_DIR / "azure_llm_2023_conv.csv"


@pytest.fixture(scope="module")
def azure_hour():
    if not AZURE.is_file():
        pytest.skip(f"{AZURE} not found (set KVTWIN_TRACE_DIR)")
    setup = setup_twin("qwen3_0_6b", "h100_80gb", EngineConfig(max_model_len=16384),
                       "roofline")
    trace = make_preset("azure_conv", duration_s=3600.0)
    return setup, model_requests(trace, setup.model.vocab_size)


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_sim_azure_hour_native_rate(benchmark, azure_hour, prefix_caching: bool) -> None:
    setup, requests = azure_hour
    setup.config.enable_prefix_caching = prefix_caching
    run = benchmark.pedantic(simulate, args=(setup, requests), rounds=1, iterations=1)
    simulated = float(run.steps["end_s"].max())
    benchmark.extra_info["simulated_s"] = simulated
    benchmark.extra_info["steps"] = len(run.steps)
    if benchmark.stats:  # only when benchmarking is enabled
        benchmark.extra_info["x_real_time"] = simulated / benchmark.stats.stats.min
    metrics = twin_metrics(run)
    assert metrics["completed"] == len(requests) - metrics["rejected"]
    assert simulated > 3400
