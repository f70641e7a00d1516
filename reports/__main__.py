"""python -m reports DIR: (re)write the report of a run folder or of a sweep directory.

A run folder (DIR/summary.json exists) gets its report.html (plotly.js embedded). A sweep
directory (run folders below it, e.g. a Hydra multirun folder, finished or not) gets sweep.html,
points.csv, one plotly.min.js, and a report.html for each point that has none, then prints the
sweep's status line (ok / cannot start / failed / interrupted counts).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from reports.console import sweep_status_line
from reports.run_folder import SUMMARY, find_runs
from reports.run_page import write_run_page
from reports.sweep_page import build_sweep_report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m reports", description=__doc__.split(
        "\n")[0].split(": ", 1)[1])
    parser.add_argument("dir", type=Path, help="a run folder or a sweep directory")
    parser.add_argument("--rewrite-points", action="store_true",
                        help="in a sweep, rewrite every point's report.html, not only "
                             "the missing ones")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    target: Path = args.dir
    if not target.is_dir():
        print(f"error: {target} is not a directory", file=sys.stderr)
        return 2
    if (target / SUMMARY).is_file():
        print(write_run_page(target))
        return 0
    if not find_runs(target):
        print(f"error: no runs under {target}: neither it nor any folder below it holds a "
              f"{SUMMARY} (is this a kvtwin run or sweep directory?)", file=sys.stderr)
        return 2
    report = build_sweep_report(target, rewrite_points=args.rewrite_points)
    for path in report.written:
        print(path)
    for point, why in report.page_errors.items():
        print(f"warning: no run page for point {point}: {why}", file=sys.stderr)
    print(sweep_status_line(target)[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
