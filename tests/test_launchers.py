"""Sweeps through Hydra's other launchers: submitit_local (the code path of SLURM's
submitit_slurm) and joblib (parallel points). Every point's page shares the sweep's one
plotly.min.js instead of embedding it."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCHERS = {"submitit_local": "hydra_plugins.hydra_submitit_launcher",
             "joblib": "hydra_plugins.hydra_joblib_launcher"}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_a_sweep_runs_through_the_launcher(tmp_path: Path, launcher: str) -> None:
    if importlib.util.find_spec(LAUNCHERS[launcher]) is None:
        pytest.skip(f"the {launcher} launcher is not installed")
    result = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), "-m", f"hydra/launcher={launcher}",
         "workload=poisson_chat", "workload.params.n=40", "engine.block_size=16,32",
         "progress=false", f"hydra.sweep.dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    points = pd.read_csv(tmp_path / "points.csv")
    assert sorted(points["block_size"]) == [16, 32] and (points["status"] == "ok").all()
    shared = (tmp_path / "plotly.min.js").stat().st_size
    for page in tmp_path.glob("*/report.html"):
        assert 'src="../plotly.min.js"' in page.read_text()
        assert page.stat().st_size < shared / 10  # not embedded
