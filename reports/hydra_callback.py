"""Hydra callback: after a sweep, write the aggregated report into the sweep folder."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class SweepReport(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            from reports.sweep_page import write_sweep_report

            print(f"sweep report: {write_sweep_report(sweep_dir)}")
        except Exception as err:  # the points are on disk; `python -m reports` rebuilds
            print(f"sweep report not written ({err}); rebuild it with "
                  f"python -m reports {sweep_dir}", file=sys.stderr)
