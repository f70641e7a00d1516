"""The twin's side of a run folder, as run.py writes it: the requests simulated, the step
records streamed to the folder and into their metrics as they are made (a run of any length
holds one chunk of them), the request records at the end."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pandas as pd

from engine.core.request import RequestTable
from reports.metrics import StepStats, twin_metrics
from reports.run_folder import StepsWriter
from sim.twin import TwinSetup, simulate


@dataclass
class TwinSide:
    summary: dict[str, Any]         # summary["sim"]
    requests: pd.DataFrame | None   # None: the configuration cannot start
    stopped: dict[str, float] | None = None  # where a run asked to stop did


def run_twin(setup: TwinSetup, requests: RequestTable, steps: StepsWriter, *,
             skip: bool = True, on_progress: Callable[[int], None] | None = None,
             should_stop: Callable[[], bool] | None = None,
             slo: dict[str, float | None] | None = None) -> TwinSide:
    stats = StepStats()

    def on_steps(chunk: pd.DataFrame) -> None:
        stats.add(chunk)
        steps.add(chunk, "sim")

    run = simulate(setup, requests, skip=skip, on_progress=on_progress, on_steps=on_steps,
                   should_stop=should_stop)
    limits = {f"slo_{k}": v for k, v in (slo or {}).items()}
    summary = run.summary(twin_metrics(run, stats, **limits))
    if run.stopped is not None:
        summary["stopped"] = run.stopped
    records = run.requests if setup.memory.starts else None
    return TwinSide(summary, records, run.stopped)
