"""Prediction bands: seeded replicates in parallel, a band per metric, and the pages that
draw them (summary table "point [p5–p95]", shaded CDFs, error bars on the sweep parity)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from engine.core.config import EngineConfig
from reports.aggregate import collect_points
from reports.band_format import contains, format_band
from reports.bands import BAND_METRICS, CDF_COLUMNS, Z95, band, predict_bands, sim_bands
from reports.metrics import twin_metrics
from reports.run_page import write_run_page
from reports.sweep_page import write_sweep_report
from reports.sweep_plots import points_parity
from sim.twin import setup_twin, simulate
from tests.reports.conftest import CHAT, QWEN, write_point
from workloads import make_preset
from workloads.trace_requests import model_requests


@pytest.fixture(scope="module")
def tiny():
    setup = setup_twin("tiny_qwen3", "cpu", EngineConfig(max_model_len=2048, dtype="float32"),
                       "calibrated")
    requests = model_requests(make_preset("poisson_chat", n=60, rate=20.0),
                              setup.model.vocab_size)
    return setup, requests


@pytest.fixture(scope="module")
def bands(tiny) -> dict:
    return predict_bands(*tiny, replicates=4, seed=3, workers=2)


def test_bands_hold_every_latency_percentile_and_the_preemptions(tiny, bands) -> None:
    point = twin_metrics(simulate(*tiny))
    assert set(bands["metrics"]) == set(BAND_METRICS)
    for key, b in bands["metrics"].items():
        assert b["p5"] <= b["p50"] <= b["p95"], key
    for key in ("ttft_p50_s", "tpot_p50_s", "e2e_p50_s"):
        b = bands["metrics"][key]
        assert b["p5"] < point[key] < b["p95"] and b["p5"] < b["p95"]
    assert set(bands["cdf"]) == set(CDF_COLUMNS)
    cdf = bands["cdf"]["e2e_s"]
    assert len(cdf["q"]) == len(cdf["lo"]) == len(cdf["hi"]) == 50
    assert all(lo <= hi for lo, hi in zip(cdf["lo"], cdf["hi"], strict=True))
    assert bands["sources"]["machine_log_sd"] > 0 and len(bands["scales"]) == 4
    json.dumps(bands)  # summary.json-ready


def test_bands_are_seeded_and_the_same_in_one_process_or_several(tiny, bands) -> None:
    again = predict_bands(*tiny, replicates=4, seed=3, workers=1)
    assert again["metrics"] == bands["metrics"] and again["cdf"] == bands["cdf"]
    other = predict_bands(*tiny, replicates=4, seed=4, workers=1)
    assert other["metrics"] != bands["metrics"]


def test_band_is_a_normal_fit_to_the_logs_or_the_counts() -> None:
    values = [1.0, 2.0, 4.0]
    b = band(values)
    logs = np.log(values)
    assert b["p50"] == pytest.approx(2.0)
    assert b["p95"] == pytest.approx(math.exp(logs.mean() + Z95 * logs.std(ddof=1)))
    counts = band([0, 0, 3], count=True)
    assert counts["p5"] == 0.0 and counts["p50"] == 1.0
    assert band([1.0]) is None and band([None, 2.0]) is None
    assert band([2.0, 2.0]) == {"p5": 2.0, "p50": 2.0, "p95": 2.0}
    assert contains({"p5": 0.2, "p95": 1.4}, 2, count=True)
    assert not contains({"p5": 0.2, "p95": 1.4}, 1.5) and not contains(None, 1.0)
    assert format_band(1.0, {"p5": 0.5, "p95": 2.0}, lambda v: f"{v:g}") == "1 [0.5–2]"


def test_run_py_hook_is_off_at_zero_and_skips_what_has_no_profile(tiny) -> None:
    setup, requests = tiny
    assert sim_bands(setup, requests, 0) is None
    wide = sim_bands(setup, requests, 2, machine_log_sd=0.3, workers=1)
    assert wide["sources"]["machine_log_sd"] == 0.3
    roofline = setup_twin("tiny_qwen3", "cpu", EngineConfig(max_model_len=2048), "roofline")
    assert "calibration profile" in sim_bands(roofline, requests, 2)["skipped"]
    small = setup_twin(*QWEN, EngineConfig(gpu_memory_utilization=0.01))
    assert sim_bands(small, requests, 2) is None  # cannot start
    with pytest.raises(ValueError, match="replicates"):
        predict_bands(setup, requests, 1)


def with_bands(path: Path, bands: dict) -> Path:
    summary = json.loads((path / "summary.json").read_text())
    summary["sim"]["bands"] = bands
    (path / "summary.json").write_text(json.dumps(summary))
    return path


def qwen_bands() -> dict:
    """Bands in the shape predict_bands gives, around a run's own metrics (pages only)."""
    setup = setup_twin(*QWEN, EngineConfig(block_size=16, max_model_len=4096))
    requests = model_requests(make_preset(CHAT["name"], **CHAT["params"]),
                              setup.model.vocab_size)
    return predict_bands(setup, requests, replicates=2, seed=0, workers=1)


def test_pages_draw_the_bands(tmp_path: Path) -> None:
    bands = qwen_bands()
    engine = EngineConfig(block_size=16, max_model_len=4096)
    run = with_bands(write_point(tmp_path / "both", *QWEN, engine, CHAT, mode="both"), bands)
    html = write_run_page(run).read_text()
    assert "in band" in html and "predicted 5-95 % band" in html
    assert "point [p5–p95]" in html and " [" in html
    sweep = tmp_path / "sweep"
    for i, gmu in enumerate((0.5, 0.9)):
        point = write_point(sweep / str(i), *QWEN, EngineConfig(
            block_size=16, max_model_len=4096, gpu_memory_utilization=gmu), CHAT, mode="both")
        with_bands(point, bands)
    page = write_sweep_report(sweep).read_text()
    assert "predicted p99 TTFT (95 % band)" in page
    points = collect_points(sweep)
    p99 = bands["metrics"]["ttft_p99_s"]
    assert (points["sim_ttft_p99_s_p5"] == p99["p5"]).all()
    fig = points_parity(points)
    bars = [t.error_x for t in fig.data if t.error_x is not None and t.error_x.array is not None]
    assert bars and all(np.all(np.asarray(b.arrayminus) >= 0) for b in bars)
