"""Run pages, sweep aggregation and sweep pages, from run folders the simulator really wrote
(see conftest.py; the measured side of `both` runs there is synthetic)."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from reports.__main__ import main
from reports.aggregate import collect_points
from reports.formatting import fmt, fmt_error, pct_error
from reports.html import PLOTLY_JS, ensure_plotly_js, plotly_script
from reports.plots import cdf_points, log_ticks, one_two_five, thin_timeline
from reports.run_folder import REPORT, SUMMARY, write_run
from reports.run_page import write_run_page
from reports.sweep_page import POINTS_CSV, SWEEP_PAGE, write_sweep_report
from reports.sweep_plots import feasibility_map, metric_heatmap
from tests.engine.test_torch_free import BLOCK_TORCH, ROOT
from tests.reports.conftest import FAILED_ERROR

RUN_PLOTS = {
    "sim": {"plot-latency-cdf", "plot-kv-timeline", "plot-memory"},
    "both": {"plot-latency-cdf", "plot-kv-timeline", "plot-parity", "plot-memory"},
    "real": {"plot-latency-cdf", "plot-kv-timeline", "plot-memory"},
    "cannot_start": {"plot-memory"},
    "failed": set(),
}
SIM_HEATMAPS = {f"plot-heatmap-{m}" for m in ("num_blocks", "max_concurrency", "peak_running",
                                               "throughput_tok_s", "ttft_p99_s", "e2e_p99_s",
                                               "preemptions")}
ERROR_MAPS = {f"plot-error-{m}" for m in ("num_blocks", "max_concurrency", "throughput_tok_s",
                                           "ttft_p99_s", "e2e_p99_s")}
NETWORK_SOURCE = re.compile(r"<(?:script|link|img|iframe|source)\b[^>]*\b(?:src|href)\s*=\s*"
                            r"[\"']?(?:https?:)?//", re.IGNORECASE)


def plot_ids(page: str) -> set[str]:
    return set(re.findall(r'<div id="(plot-[a-z0-9_-]+)" class="plotly-graph-div"', page))


def headers(page: str) -> list[str]:
    return [html.unescape(h) for h in re.findall(r"<th[^>]*>(.*?)</th>", page)]


def table_rows(page: str, table_id: str) -> list[list[str]]:
    """Cell texts (tags stripped) of each body row of one table."""
    body = re.search(rf'id="{table_id}">.*?<tbody>(.*?)</tbody>', page, re.S).group(1)
    return [[html.unescape(re.sub(r"<[^>]+>", "", c)) for c in re.findall(r"<td[^>]*>(.*?)</td>",
                                                                        row, re.S)]
            for row in re.findall(r"<tr[^>]*>(.*?)</tr>", body, re.S)]


def summary_of(run_dir: Path) -> dict:
    return json.loads((run_dir / SUMMARY).read_text())


@pytest.fixture(scope="module")
def pages(runs: dict[str, Path]) -> dict[str, str]:
    return {kind: write_run_page(path).read_text() for kind, path in runs.items()}


@pytest.fixture(scope="module")
def sim_report(sim_sweep: Path) -> str:
    return write_sweep_report(sim_sweep).read_text()


@pytest.fixture(scope="module")
def both_report(both_sweep: Path) -> str:
    return write_sweep_report(both_sweep).read_text()


# -- run pages ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(RUN_PLOTS))
def test_run_page_has_the_plots_its_data_allow(kind: str, pages: dict[str, str],
                                               runs: dict[str, Path]) -> None:
    assert (runs[kind] / REPORT).is_file()
    assert plot_ids(pages[kind]) == RUN_PLOTS[kind]


def test_sim_only_page_shows_predicted_values_alone(pages: dict[str, str]) -> None:
    th = headers(pages["sim"])
    assert "predicted (sim)" in th
    assert not [h for h in th if "measured" in h or h == "error"]
    assert "measured (real)" not in pages["sim"]  # no empty measured trace in any plot


def test_real_only_page_shows_measured_values_alone(pages: dict[str, str]) -> None:
    th = headers(pages["real"])
    assert "measured (real)" in th
    assert not [h for h in th if "predicted" in h or h == "error"]


def test_summary_table_prints_the_recorded_metrics(pages: dict[str, str],
                                                   runs: dict[str, Path]) -> None:
    sim = summary_of(runs["sim"])["sim"]["metrics"]
    rows = {r[0]: r[1:] for r in table_rows(pages["sim"], "summary-table")}
    assert rows["TTFT p99"] == [fmt(sim["ttft_p99_s"], "time")]
    assert rows["E2E p50"] == [fmt(sim["e2e_p50_s"], "time")]
    assert rows["KV blocks (num_blocks)"] == [f"{sim['num_blocks']:,}"]
    assert rows["max concurrency (running)"] == [str(sim["max_concurrency"])]


def test_both_page_puts_predicted_beside_measured_with_the_error(
        pages: dict[str, str], runs: dict[str, Path]) -> None:
    summary = summary_of(runs["both"])
    sim, real = summary["sim"]["metrics"], summary["real"]["metrics"]
    assert sim["e2e_p99_s"] != real["e2e_p99_s"]  # the synthetic side really differs
    rows = {r[0]: r[1:] for r in table_rows(pages["both"], "summary-table")}
    err = pct_error(sim["e2e_p99_s"], real["e2e_p99_s"])
    assert rows["E2E p99"] == [fmt(sim["e2e_p99_s"], "time"), fmt(real["e2e_p99_s"], "time"),
                               fmt_error(err)]
    memory = {r[0]: r[1:] for r in table_rows(pages["both"], "memory-table")}
    sim_act = summary["sim"]["memory"]["activation_peak_bytes"]
    real_act = summary["real"]["memory"]["activation_peak_bytes"]
    assert memory["activation peak (GiB)"][2] == fmt_error(pct_error(sim_act, real_act))


@pytest.mark.parametrize("kind", ["failed", "cannot_start"])
def test_error_pages_show_status_and_message(kind: str, pages: dict[str, str],
                                             runs: dict[str, Path]) -> None:
    summary = summary_of(runs[kind])
    assert summary["error"]
    page = pages[kind]
    alert = re.search(r'<div class="alert[^"]*" id="run-error">(.*?)</div>', page, re.S)
    assert alert and html.escape(summary["error"]) in alert.group(1)
    assert f"st-{kind}" in page
    assert "summary-table" not in page  # nothing was served: no empty metrics table


def test_cannot_start_page_keeps_the_memory_terms(pages: dict[str, str]) -> None:
    memory = {r[0]: r[1:] for r in table_rows(pages["cannot_start"], "memory-table")}
    assert memory["KV cache (GiB)"][0].startswith("-")
    assert "no room for the KV cache" in pages["cannot_start"]


def test_capacity_plan_and_predictor_are_shown(pages: dict[str, str],
                                               runs: dict[str, Path]) -> None:
    summary = summary_of(runs["sim"])["sim"]
    rows = {r[0]: r[1:] for r in table_rows(pages["sim"], "capacity-table")}
    assert rows["largest max_model_len that fits"] == [
        f"{summary['capacity']['largest_max_model_len']:,}"]
    assert html.escape(summary["predictor"]["source"]) in pages["sim"]


def test_standalone_page_embeds_plotly_and_fetches_nothing(pages: dict[str, str]) -> None:
    for page in pages.values():
        assert "src=" not in re.sub(r"<script type=\"text/javascript\">.*?</script>", "",
                                    page, flags=re.S)
        assert not NETWORK_SOURCE.search(page)


def test_plotly_script_refuses_urls_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="offline"):
        plotly_script("https://cdn.plot.ly/plotly.min.js", tmp_path)
    with pytest.raises(FileNotFoundError):
        plotly_script(tmp_path / PLOTLY_JS, tmp_path)
    js = ensure_plotly_js(tmp_path)
    (tmp_path / "run").mkdir()
    assert plotly_script(js, tmp_path / "run").endswith('src="../plotly.min.js"></script>')


# -- aggregation --------------------------------------------------------------------------------

def test_collect_points_has_one_row_per_run_folder(sim_sweep: Path) -> None:
    points = collect_points(sim_sweep)
    folders = sorted(p.parent.name for p in sim_sweep.rglob(SUMMARY))
    assert sorted(points["point"]) == folders and len(points) == 13
    by_point = points.set_index("point")
    for name in folders:
        assert by_point.loc[name, "status"] == summary_of(sim_sweep / name)["status"]
    assert by_point.loc["12", "status"] == "failed"
    assert by_point.loc["12", "error"] == FAILED_ERROR
    # 13.5 GiB of Mistral-7B weights exceed half of an L4's 22 GiB: never starts at 0.5
    half = points[points["gpu_memory_utilization"] == 0.5]
    assert set(half["status"]) == {"cannot_start"}
    assert half["error"].str.contains("No available memory").all()
    ok = points[points["status"] == "ok"]
    assert len(ok) >= 4 and (ok["sim_num_blocks"] > 0).all()
    assert (ok["sim_throughput_tok_s"] > 0).all()


def test_sim_sweep_columns(sim_sweep: Path) -> None:
    columns = list(collect_points(sim_sweep).columns)
    for required in ("point", "status", "error", "model", "hardware", "block_size",
                     "max_model_len", "gpu_memory_utilization", "sim_num_blocks",
                     "sim_max_concurrency", "sim_throughput_tok_s", "sim_ttft_p99_s",
                     "sim_e2e_p99_s"):
        assert required in columns
    assert not [c for c in columns if c.startswith(("real_", "err_"))]
    assert "dtype" not in columns  # constant engine fields are left out


def test_both_sweep_has_measured_values_and_errors(both_sweep: Path) -> None:
    points = collect_points(both_sweep).set_index("point")
    real = summary_of(both_sweep / "0")
    assert real["status"] == "cannot_start" and real["real"] is None
    ok = points[points["status"] == "ok"]
    for name, row in ok.iterrows():
        summary = summary_of(both_sweep / str(name))
        assert row["real_num_blocks"] == summary["real"]["memory"]["num_blocks"]
        expected = pct_error(summary["sim"]["metrics"]["e2e_p99_s"],
                             summary["real"]["metrics"]["e2e_p99_s"])
        assert row["err_e2e_p99_s_pct"] == pytest.approx(expected)
    assert points.loc["0", ["real_num_blocks", "err_e2e_p99_s_pct"]].isna().all()


def test_varying_engine_fields_become_columns(tmp_path: Path, runs: dict[str, Path]) -> None:
    for num, seqs in enumerate((64, 128)):
        summary = summary_of(runs["sim"])
        summary["config"]["engine"]["max_num_seqs"] = seqs
        write_run(tmp_path / str(num), summary)
    points = collect_points(tmp_path)
    assert list(points["max_num_seqs"]) == [64, 128]
    assert "enable_prefix_caching" not in points.columns


def test_partial_and_unreadable_points_are_still_aggregated(tmp_path: Path,
                                                           sim_sweep: Path) -> None:
    sweep = tmp_path / "partial"
    shutil.copytree(sim_sweep, sweep)
    shutil.rmtree(sweep / "11")  # not written yet
    (sweep / "10" / SUMMARY).write_text('{"status": "ok", "conf')  # being written
    (sweep / "10" / REPORT).unlink(missing_ok=True)
    points = collect_points(sweep).set_index("point")
    assert len(points) == 12 and "11" not in points.index
    assert points.loc["10", "status"] == "unreadable"
    page = write_sweep_report(sweep).read_text()
    assert len(table_rows(page, "points-table")) == 12
    assert "unreadable" in page and not (sweep / "10" / REPORT).exists()


def test_sweep_of_points_without_configuration_gets_a_table_only(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / SUMMARY).write_text('{"status": "ok", "con')
    write_run(tmp_path / "b", {"status": "failed", "error": "boom", "config": {}})
    page = write_sweep_report(tmp_path).read_text()
    assert [r[1] for r in table_rows(page, "points-table")] == ["unreadable", "failed"]
    assert plot_ids(page) == set() and "boom" in page


# -- sweep pages --------------------------------------------------------------------------------

def test_sweep_report_files_and_one_shared_plotly(sim_sweep: Path, sim_report: str) -> None:
    assert (sim_sweep / SWEEP_PAGE).is_file() and (sim_sweep / POINTS_CSV).is_file()
    assert [p.relative_to(sim_sweep) for p in sim_sweep.rglob("*plotly*.js")] == [
        Path(PLOTLY_JS)]
    assert '<script type="text/javascript" src="plotly.min.js"></script>' in sim_report
    assert len(sim_report) < 1_000_000  # plotly.js is not inside
    for summary in sim_sweep.rglob(SUMMARY):
        point_page = (summary.parent / REPORT).read_text()
        assert '<script type="text/javascript" src="../plotly.min.js"></script>' in point_page
        assert len(point_page) < 1_000_000


def test_points_csv_matches_the_points(sim_sweep: Path, sim_report: str) -> None:
    csv = pd.read_csv(sim_sweep / POINTS_CSV, dtype={"point": str})
    points = collect_points(sim_sweep)
    assert list(csv.columns) == list(points.columns)
    assert list(csv["point"]) == list(points["point"])
    np.testing.assert_allclose(csv["sim_num_blocks"], points["sim_num_blocks"])


def test_sweep_table_rows_statuses_links_and_messages(sim_sweep: Path, sim_report: str) -> None:
    points = collect_points(sim_sweep)
    rows = table_rows(sim_report, "points-table")
    assert [r[0] for r in rows] == list(points["point"])
    assert [r[1] for r in rows] == [s.replace("_", " ") + (f", {w}" if isinstance(w, str) else "")
                                    for s, w in zip(points["status"], points["warning"],
                                                    strict=True)]
    for point in points["point"]:
        assert f'<a href="{point}/report.html">{point}</a>' in sim_report
    failed = re.search(r'<tr class="row-failed">(.*?)</tr>', sim_report, re.S).group(1)
    assert html.escape(FAILED_ERROR) in failed
    assert sim_report.count('<tr class="row-cannot_start">') == int(
        (points["status"] == "cannot_start").sum())


def test_sim_sweep_page_has_no_measured_panels(sim_report: str) -> None:
    assert plot_ids(sim_report) == {"plot-feasibility", *SIM_HEATMAPS}
    assert not [h for h in headers(sim_report) if "measured" in h or h.startswith("error")]


def test_both_sweep_page_has_error_maps_and_parity(both_report: str) -> None:
    assert plot_ids(both_report) == {"plot-feasibility", *SIM_HEATMAPS, *ERROR_MAPS,
                                     "plot-parity-points"}
    assert "measured p99 E2E" in headers(both_report)


def test_no_page_loads_anything_from_the_network(sim_sweep: Path, both_sweep: Path,
                                                 sim_report: str, both_report: str) -> None:
    pages = [*sim_sweep.rglob("*.html"), *both_sweep.rglob("*.html")]
    assert len(pages) == 13 + 6 + 2
    for page in pages:
        assert not NETWORK_SOURCE.search(page.read_text()), page


def test_existing_point_pages_are_kept_unless_asked(tmp_path: Path, sim_sweep: Path) -> None:
    sweep = tmp_path / "sweep"
    shutil.copytree(sim_sweep, sweep)
    (sweep / "3" / REPORT).write_text("kept")
    (sweep / "4" / REPORT).unlink()
    write_sweep_report(sweep)
    assert (sweep / "3" / REPORT).read_text() == "kept"
    assert "plot-latency-cdf" in (sweep / "4" / REPORT).read_text()
    write_sweep_report(sweep, rewrite_points=True)
    assert "plot-memory" in (sweep / "3" / REPORT).read_text()


def test_heatmap_cells_sit_at_their_point(sim_sweep: Path) -> None:
    points = collect_points(sim_sweep)
    fig = metric_heatmap(points, "sim_num_blocks", "int")
    first = fig.data[0]  # facet max_model_len=2048
    assert list(first.x) == ["8", "16", "32"] and list(first.y) == ["0.5", "0.7", "0.9"]
    for _, p in points[(points["max_model_len"] == 2048) & points["sim_num_blocks"].notna()
                       ].iterrows():
        i = list(first.y).index(f"{p['gpu_memory_utilization']:g}")
        j = list(first.x).index(str(p["block_size"]))
        assert first.z[i][j] == p["sim_num_blocks"]
    feasible = feasibility_map(points).data[0]
    assert feasible.text[2][0] == "failed"  # block_size 8, 0.9: the failed point
    assert feasible.text[0][1] == "cannot start"


# -- CLI ----------------------------------------------------------------------------------------

def test_cli_on_a_run_folder(tmp_path: Path, runs: dict[str, Path],
                             capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    shutil.copytree(runs["sim"], run)
    (run / REPORT).unlink()
    assert main([str(run)]) == 0
    assert capsys.readouterr().out.strip() == str(run / REPORT)
    assert "plot-kv-timeline" in (run / REPORT).read_text()


def test_cli_on_a_sweep_prints_what_it_wrote(tmp_path: Path, both_sweep: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    sweep = tmp_path / "sweep"
    shutil.copytree(both_sweep, sweep)
    for page in sweep.rglob(REPORT):
        page.unlink()
    assert main([str(sweep)]) == 0
    printed = capsys.readouterr().out.split()
    assert str(sweep / SWEEP_PAGE) in printed and str(sweep / POINTS_CSV) in printed
    assert len([p for p in printed if p.endswith(REPORT)]) == 6


def test_cli_rejects_a_folder_without_runs(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    assert main([str(tmp_path / "empty")]) == 2
    assert "no runs under" in capsys.readouterr().err
    assert main([str(tmp_path / "missing")]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_python_dash_m_reports_runs(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "reports", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "no runs under" in result.stderr


def test_report_modules_import_without_torch() -> None:
    modules = ["reports.run_page", "reports.sweep_page", "reports.aggregate",
               "reports.__main__"]
    result = subprocess.run([sys.executable, "-c", BLOCK_TORCH, *modules], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# -- helpers ------------------------------------------------------------------------------------

def test_thin_timeline_keeps_the_peak() -> None:
    n = 10_000
    tl = pd.DataFrame({"time_s": np.arange(n) * 0.01, "blocks_used": np.ones(n, int),
                       "running": np.ones(n, int), "waiting": np.zeros(n, int)})
    tl.loc[4321, ["blocks_used", "waiting"]] = (999, 7)
    thin = thin_timeline(tl, max_points=500)
    assert len(thin) <= 500
    assert thin["blocks_used"].max() == 999 and thin["waiting"].max() == 7
    assert thin["time_s"].is_monotonic_increasing


def test_cdf_points_end_at_one_and_are_capped() -> None:
    x, y = cdf_points(pd.Series(np.linspace(0.001, 1, 5000)), max_points=100)
    assert len(x) <= 100 and y[-1] == 1.0 and x[-1] == 1.0
    assert np.all(np.diff(x) >= 0) and np.all(np.diff(y) > 0)


def test_log_axis_ticks_stay_sparse() -> None:
    assert one_two_five(np.array([5.5, 48.0])) == [5.0, 10.0, 20.0, 50.0]
    assert log_ticks(np.array([0.06, 14.0]))["dtick"] == 1  # over two decades: decades only
    assert "tickvals" not in log_ticks(np.array([60.0, 140.0]))  # narrow: plotly's own


@pytest.mark.parametrize(("value", "unit", "text"), [
    (0.0123, "time", "12.3 ms"), (123.4, "time", "123 s"), (None, "time", "–"),
    (float("nan"), "int", "–"), (40266, "int", "40,266"), (0.0093, "pct", "0.93%"),
    (True, "int", "yes"), (1.62, "x", "1.62x"),
])
def test_fmt(value: object, unit: str, text: str) -> None:
    assert fmt(value, unit) == text


def test_pct_error() -> None:
    assert pct_error(110, 100) == pytest.approx(10.0)
    assert pct_error(90, 100) == pytest.approx(-10.0)
    assert pct_error(1, 0) is None and pct_error(None, 1) is None
