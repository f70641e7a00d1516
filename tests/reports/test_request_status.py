"""Rejected and unfinished requests are visible: points.csv counts and a warning column, a flagged
row and a status line on the sweep page, a banner on the run page; the console lines and the
sweep's exit code."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from omegaconf import OmegaConf

from engine.core.config import EngineConfig
from reports.aggregate import collect_points, request_warning
from reports.console import console_summary, sweep_status_line
from reports.hydra_callback import SweepReport, sweep_exit_code
from reports.run_folder import SUMMARY, read_run, write_run
from reports.run_page import rejection_reasons, render_run_page
from reports.sweep_page import build_sweep_report
from tests.reports.conftest import QWEN, config_of, write_failed, write_point

CHAT40 = {"name": "poisson_chat", "params": {"n": 40}}
SHORT = EngineConfig(max_model_len=1024)  # rejects the chat prompts over 1,024 tokens
TINY = EngineConfig(max_model_len=64)  # rejects every request: nothing is served


def interrupted_summary() -> dict[str, Any]:
    metrics = {"num_requests": 40, "completed": 25, "rejected": 0, "unfinished": 15,
               "num_steps": 300, "ttft_p50_s": 0.012, "ttft_p99_s": 0.05, "tpot_p50_s": 0.002,
               "tpot_p99_s": 0.004, "e2e_p99_s": 1.5, "output_throughput_tok_s": 812.0}
    return {"status": "interrupted", "error": "interrupted (Ctrl-C)", "mode": "real",
            "config": config_of(*QWEN, EngineConfig(), CHAT40), "sim": None,
            "real": {"metrics": metrics}}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """0 clean, 1 some rejected, 2 all rejected, 3 cannot start, 4 failed, 5 interrupted."""
    root = tmp_path_factory.mktemp("visibility")
    write_point(root / "0", *QWEN, EngineConfig(), CHAT40)
    write_point(root / "1", *QWEN, SHORT, CHAT40)
    write_point(root / "2", *QWEN, TINY, CHAT40)
    write_point(root / "3", *QWEN, EngineConfig(gpu_memory_utilization=0.01), CHAT40)
    write_failed(root / "4", *QWEN, EngineConfig(), CHAT40)
    write_run(root / "5", interrupted_summary())
    return root


def summary_of(path: Path) -> dict[str, Any]:
    return json.loads((path / SUMMARY).read_text())


def test_points_count_completed_rejected_and_unfinished(sweep: Path) -> None:
    points = collect_points(sweep).set_index("point")
    some = summary_of(sweep / "1")["sim"]["metrics"]
    assert 0 < some["rejected"] < 40
    assert points.loc["1", ["sim_completed", "sim_rejected", "sim_unfinished"]].tolist() == [
        some["completed"], some["rejected"], 0]
    assert points.loc["0", "sim_rejected"] == 0 and pd.isna(points.loc["0", "warning"])
    # nothing served: no latency, yet the rejections are counted
    assert points.loc["2", "sim_rejected"] == 40 and pd.isna(points.loc["2", "sim_ttft_p99_s"])
    assert points.loc["5", "real_unfinished"] == 15
    assert pd.isna(points.loc["3", "sim_rejected"])  # cannot start: no request came in
    assert list(points["status"]) == ["ok", "ok", "ok", "cannot_start", "failed",
                                      "interrupted"]


def test_warning_text_per_point(sweep: Path) -> None:
    points = collect_points(sweep).set_index("point")
    rejected = summary_of(sweep / "1")["sim"]["metrics"]["rejected"]
    assert points.loc["1", "warning"] == f"{rejected * 100 / 40:.0f}% rejected ({rejected} of 40)"
    assert points.loc["2", "warning"] == "100% rejected (40 of 40)"
    assert points.loc["5", "warning"] == "15 unfinished"
    both = {"sim": {"metrics": {"num_requests": 2000, "rejected": 1, "unfinished": 0}},
            "real": {"metrics": {"num_requests": 2000, "rejected": 0, "unfinished": 3}}}
    assert request_warning(both) == "sim: <0.1% rejected (1 of 2,000); real: 3 unfinished"


def test_points_csv_and_sweep_page_flag_the_points(sweep: Path) -> None:
    report = build_sweep_report(sweep)
    csv = pd.read_csv(report.csv)
    assert list(csv.columns[:3]) == ["point", "status", "warning"]
    assert {"sim_rejected", "sim_unfinished", "sim_completed", "real_unfinished"} <= set(
        csv.columns)
    html = report.page.read_text()
    status = re.search(r"<p class='meta' id='sweep-status'>(.*?)</p>", html).group(1)
    assert status == ("6 points: 3 ok (2 with rejected or unfinished requests), 1 cannot start, "
                      "1 failed, 1 interrupted")
    assert html.count('<tr class="row-ok row-warn">') == 2
    assert html.count('<tr class="row-interrupted row-warn">') == 1
    assert '<span class="warn">, 100% rejected (40 of 40)</span>' in html
    # the feasibility map marks it (⚠, JSON-escaped unless plotly serialises with orjson)
    assert "\\u26a0 100% rejected" in html or "⚠ 100% rejected" in html


def test_run_page_banner_counts_and_top_reasons(sweep: Path) -> None:
    run = read_run(sweep / "2")
    reasons = rejection_reasons(run, "sim")
    assert reasons == [("rejected: prompt of N tokens is longer than max_model_len=64", 40)]
    html = render_run_page(run, "")
    banner = re.search(r'<div class="alert warn" id="requests-warning">(.*?)</div>', html,
                       re.S).group(1)
    assert "100% rejected (40 of 40)" in banner
    assert "40 &times; rejected: prompt of N tokens is longer than max_model_len=64" in banner
    assert 'id="requests-warning"' not in render_run_page(read_run(sweep / "0"), "")


def test_run_page_of_an_interrupted_run(sweep: Path) -> None:
    html = render_run_page(read_run(sweep / "5"), "")
    assert "Interrupted: what was finished is kept" in html
    assert "15 unfinished" in html and 'class="badge st-interrupted"' in html


def test_console_summary_lines(sweep: Path) -> None:
    clean = console_summary(summary_of(sweep / "0")).splitlines()
    assert clean[0] == "[ok] sim: 40 of 40 completed, 0 rejected, 0 unfinished"
    assert clean[1].startswith("sim: TTFT p50 ") and "output tok/s" in clean[1]
    rejected = console_summary(summary_of(sweep / "2"))
    assert rejected == "[ok] sim: 0 of 40 completed, 40 rejected (100%), 0 unfinished"
    cannot = console_summary(summary_of(sweep / "3"))
    assert cannot.startswith("[cannot_start] No available memory") and "\n" not in cannot
    failed = console_summary(summary_of(sweep / "4"))
    assert failed == "[failed] RuntimeError: CUDA error: an illegal memory access (synthetic " \
                     "test failure)"
    lines = console_summary(interrupted_summary()).splitlines()
    assert lines[0] == ("[interrupted] real: 25 of 40 completed, 0 rejected, 15 unfinished | "
                        "interrupted (Ctrl-C)")
    assert lines[1] == ("real: TTFT p50 12.0 ms / p99 50.0 ms, TPOT p50 2.00 ms / p99 4.00 ms, "
                        "E2E p99 1,500 ms, 812 output tok/s")


def test_sweep_status_line_and_exit_codes(sweep: Path, tmp_path: Path) -> None:
    line, code = sweep_status_line(sweep)
    assert line.startswith(f"sweep {sweep}: 6 points: 3 ok") and code == 130
    for name in ("0", "1", "3"):
        (tmp_path / "ok" / name).mkdir(parents=True)
        (tmp_path / "ok" / name / SUMMARY).write_text((sweep / name / SUMMARY).read_text())
    assert sweep_status_line(tmp_path / "ok")[1] == 0  # cannot start is a result
    (tmp_path / "ok" / "9").mkdir()
    (tmp_path / "ok" / "9" / SUMMARY).write_text((sweep / "4" / SUMMARY).read_text())
    assert sweep_status_line(tmp_path / "ok")[1] == 1
    (tmp_path / "ok" / "9" / SUMMARY).write_text('{"status": "ok", "con')  # being written
    line, code = sweep_status_line(tmp_path / "ok")
    assert code == 1 and line.endswith("1 unreadable")
    assert sweep_status_line(tmp_path / "empty") == (
        f"sweep {tmp_path / 'empty'}: no points (no summary.json under it)", 1)


def test_hydra_callback_prints_the_line_and_keeps_the_code(
        sweep: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}})
    SweepReport().on_multirun_end(config)
    out = capsys.readouterr()
    assert "sweep report: " in out.out and "6 points: 3 ok" in out.err
    assert sweep_exit_code() == 130


def test_odd_counts_in_a_summary_never_break_a_page(tmp_path: Path) -> None:
    odd = {"status": "ok", "mode": "sim", "config": {}, "real": None,
           "sim": {"metrics": {"num_requests": "many", "rejected": None, "unfinished": "x"}}}
    write_run(tmp_path / "0", odd)
    write_run(tmp_path / "1", {**interrupted_summary(), "trace": {"kind": "file",
                                                                   "sha256": "ab12"}})
    assert console_summary(odd) == "[ok] no request ran"
    report = build_sweep_report(tmp_path)
    assert "2 points: 1 ok, 0 cannot start, 0 failed, 1 interrupted" in report.page.read_text()
    assert "trace source" in render_run_page(read_run(tmp_path / "1"), "")
