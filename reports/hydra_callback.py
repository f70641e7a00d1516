"""Hydra callback: after a sweep, write the aggregated report into the sweep folder and print
the sweep's status line; `sweep_exit_code()` is the code the process should exit with."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from reports.console import sweep_status_line
from reports.sweep_page import write_sweep_report

_LAST: dict[str, int] = {"exit_code": 0}


class SweepReport(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            print(f"sweep report: {write_sweep_report(sweep_dir)}")
        except Exception as err:  # the points are on disk; `python -m reports` rebuilds
            print(f"sweep report not written ({err}); rebuild it with "
                  f"python -m reports {sweep_dir}", file=sys.stderr)
        line, _LAST["exit_code"] = sweep_status_line(sweep_dir)
        print(line, file=sys.stderr if _LAST["exit_code"] else sys.stdout)


def sweep_exit_code() -> int:
    """The exit code of the last sweep this process ran (0 when none): 130 when a point was
    interrupted, 1 when one failed, else 0."""
    return _LAST["exit_code"]
