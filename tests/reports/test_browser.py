"""The pages in a real browser: Debian's chromium, headless, driven by Playwright, from file://.

Every plot renders (a .js-plotly-plot with its .main-svg), nothing is logged as an error, and no
request leaves file:// (plotly.js embedded or loaded from the sweep's own plotly.min.js).
Screenshots go to outputs/screenshots/. Skipped without playwright or /usr/bin/chromium.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from reports.run_page import write_run_page
from reports.sweep_page import write_sweep_report

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
SCREENSHOTS = Path(__file__).resolve().parents[2] / "outputs" / "screenshots"


@dataclass
class Visit:
    plots: int
    with_svg: int
    console_errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api", exc_type=ImportError,
                                   reason="playwright not installed (pip install playwright)")
    if not CHROMIUM.is_file():
        pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_api.sync_playwright() as pw:
        try:
            chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        except Exception as err:  # a broken browser install is an environment problem
            pytest.skip(f"chromium did not start: {err}")
        yield chromium
        chromium.close()


def visit(browser: Any, page_path: Path, shot: str) -> Visit:
    """Open `page_path`, wait for plotly, count plots, screenshot the whole page."""
    page = browser.new_page(viewport={"width": 1300, "height": 900})
    seen = Visit(0, 0)
    page.on("console", lambda m: seen.console_errors.append(m.text) if m.type == "error"
            else None)
    page.on("pageerror", lambda err: seen.console_errors.append(str(err)))
    page.on("request", lambda r: seen.requests.append(r.url))
    page.goto(page_path.resolve().as_uri(), wait_until="load")
    expected = len(re.findall(r'class="plotly-graph-div"', page_path.read_text()))
    page.wait_for_function(f"document.querySelectorAll('.js-plotly-plot .main-svg').length "
                           f">= {expected}", timeout=20_000)
    seen.plots = page.locator(".js-plotly-plot").count()
    seen.with_svg = page.locator(".js-plotly-plot:has(.main-svg)").count()
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{shot}.png"), full_page=True)
    page.close()
    return seen


def check(seen: Visit, plots: int) -> None:
    assert seen.plots == plots and seen.with_svg == plots
    assert seen.console_errors == []
    assert seen.requests and all(url.startswith("file://") for url in seen.requests), \
        seen.requests


def test_run_page_renders_offline(browser: Any, runs: dict[str, Path]) -> None:
    check(visit(browser, write_run_page(runs["both"]), "run_page_both"), plots=4)
    check(visit(browser, write_run_page(runs["sim"]), "run_page_sim"), plots=3)


def test_error_pages_render(browser: Any, runs: dict[str, Path]) -> None:
    check(visit(browser, write_run_page(runs["cannot_start"]), "run_page_cannot_start"),
          plots=1)
    check(visit(browser, write_run_page(runs["failed"]), "run_page_failed"), plots=0)


def test_sweep_page_and_its_point_pages_render(browser: Any, tmp_path: Path,
                                               both_sweep: Path, sim_sweep: Path) -> None:
    sweep = tmp_path / "sweep"
    shutil.copytree(both_sweep, sweep)
    page = write_sweep_report(sweep, rewrite_points=True)
    seen = visit(browser, page, "sweep_page_both")
    check(seen, plots=14)  # feasibility, 7 heatmaps, 5 error maps, parity
    assert any(url.endswith("/plotly.min.js") for url in seen.requests)
    point = visit(browser, sweep / "2" / "report.html", "sweep_point_page")
    check(point, plots=4)
    assert any(url.endswith("/sweep/plotly.min.js") for url in point.requests)
    check(visit(browser, write_sweep_report(sim_sweep), "sweep_page_sim"), plots=8)


def test_points_table_sorts_on_header_click(browser: Any, sim_sweep: Path) -> None:
    page = browser.new_page()
    page.goto(write_sweep_report(sim_sweep).resolve().as_uri())
    header = page.locator("#points-table th", has_text="predicted KV blocks")
    column = page.locator("#points-table th").all_inner_texts().index(header.inner_text())

    def blocks() -> list[str]:
        return page.locator(f"#points-table tbody td:nth-child({column + 1})").evaluate_all(
            "cells => cells.map(c => c.dataset.sort)")

    header.click()
    ascending = [float(v) for v in blocks() if v]
    assert ascending == sorted(ascending) and blocks()[-1] == ""  # the failed point: last
    header.click()
    descending = [float(v) for v in blocks() if v]
    assert descending == sorted(descending, reverse=True) and blocks()[-1] == ""
    page.close()
