"""What a user waits for: the whole `python run.py` process on the default calibrated path
(prediction bands included, as by default), at native rate and saturated, the same without the
bands, and the peak memory of a million-request trace.

    python -m pytest tests/benchmarks/test_bench_run.py --benchmark-enable

Each benchmark runs the process three times (pytest-benchmark keeps min / median / max); the
simulated time and x real time (simulated / median wall) go to `extra_info`. These run only
with --benchmark-enable: a million requests take minutes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
AZURE_HOUR = ("workload=azure_conv", "workload.params.duration_s=3600")
MILLION_RSS_BYTES = int(1.5 * 2**30)  # the target: a million requests within 1.5 GB


@pytest.fixture(autouse=True)
def _enabled(request: pytest.FixtureRequest) -> None:
    options = request.config.getoption
    if options("benchmark_disable") and not options("benchmark_enable"):
        pytest.skip("whole-process benchmarks run with --benchmark-enable")


def run_py(folder: Path, *overrides: str) -> dict[str, Any]:
    result = subprocess.run([sys.executable, str(ROOT / "run.py"), "progress=false",
                             *overrides, f"hydra.run.dir={folder}"], cwd=ROOT,
                            capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads((folder / "summary.json").read_text())


def record(benchmark: Any, summary: dict[str, Any]) -> None:
    metrics = summary["sim"]["metrics"]
    simulated = metrics["duration_s"]
    benchmark.extra_info.update(simulated_s=simulated, num_steps=metrics["num_steps"],
                                requests=metrics["num_requests"])
    if benchmark.stats:
        benchmark.extra_info["x_real_time"] = simulated / benchmark.stats.stats.median


@pytest.mark.parametrize("hardware", ["h100_80gb", "h200_141gb"])
@pytest.mark.parametrize("rate_scale", [1, 10], ids=["native", "saturated"])
def test_run_azure_hour(benchmark: Any, tmp_path: Path, hardware: str, rate_scale: int) -> None:
    """The Azure conversation hour, calibrated profile (predictor=auto picks it)."""
    summary = benchmark.pedantic(run_py, args=(tmp_path, *AZURE_HOUR, f"hardware={hardware}",
                                               f"workload.params.rate_scale={rate_scale}"),
                                 rounds=3, iterations=1)
    assert summary["sim"]["predictor"]["kind"] == "calibrated"
    record(benchmark, summary)


@pytest.mark.parametrize("rate_scale", [1, 10], ids=["native", "saturated"])
def test_run_azure_hour_point_only(benchmark: Any, tmp_path: Path, rate_scale: int) -> None:
    """The point prediction alone (bands.replicates=0), H100 profile."""
    summary = benchmark.pedantic(run_py, args=(tmp_path, *AZURE_HOUR, "bands.replicates=0",
                                               f"workload.params.rate_scale={rate_scale}"),
                                 rounds=3, iterations=1)
    assert summary["sim"]["bands"] is None
    record(benchmark, summary)


def test_run_default(benchmark: Any, tmp_path: Path) -> None:
    """`python run.py` with no overrides: the README's first command."""
    summary = benchmark.pedantic(run_py, args=(tmp_path,), rounds=3, iterations=1)
    assert "p5" in json.dumps(summary["sim"]["bands"])
    record(benchmark, summary)


def test_run_azure_hour_roofline(benchmark: Any, tmp_path: Path) -> None:
    summary = benchmark.pedantic(run_py, args=(tmp_path, *AZURE_HOUR, "predictor=roofline"),
                                 rounds=3, iterations=1)
    record(benchmark, summary)


def test_run_chat_80k_saturated(benchmark: Any, tmp_path: Path) -> None:
    summary = benchmark.pedantic(run_py, args=(tmp_path, "workload=poisson_chat",
                                               "workload.params.n=80000",
                                               "workload.params.rate=21.5"),
                                 rounds=3, iterations=1)
    record(benchmark, summary)


PEAK_RSS = """import resource, subprocess, sys
code = subprocess.run(sys.argv[1:]).returncode
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
sys.exit(code)"""


def run_py_peak(folder: Path, *overrides: str) -> tuple[dict[str, Any], int]:
    """run_py, and the peak RSS of that process alone (its parent has no other child)."""
    result = subprocess.run([sys.executable, "-c", PEAK_RSS, sys.executable,
                             str(ROOT / "run.py"), "progress=false", *overrides,
                             f"hydra.run.dir={folder}"], cwd=ROOT, capture_output=True,
                            text=True, timeout=3600)
    assert result.returncode == 0, result.stderr[-2000:]
    peak = int(result.stdout.strip().splitlines()[-1])
    return json.loads((folder / "summary.json").read_text()), peak


def test_run_a_million_requests_in_bounded_memory(benchmark: Any, tmp_path: Path) -> None:
    """Peak RSS of the whole process (records streamed, prompts made on arrival)."""
    summary, peak = benchmark.pedantic(
        run_py_peak, args=(tmp_path, "workload=poisson_chat", "workload.params.n=1000000",
                           "workload.params.rate=21.5"), rounds=1, iterations=1)
    record(benchmark, summary)
    benchmark.extra_info["peak_rss_bytes"] = peak
    metrics = summary["sim"]["metrics"]
    assert metrics["completed"] + metrics["rejected"] == 1_000_000  # none lost
    assert peak <= MILLION_RSS_BYTES, f"peak RSS {peak / 2**30:.2f} GiB"
