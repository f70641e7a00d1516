"""A sweep killed mid-point (SIGKILL: nothing can be saved) resumes with `+resume=true`: the
finished points are kept, the rest re-run, and its points equal an uninterrupted sweep's."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ["-m", "engine.block_size=16,32", "engine.max_model_len=2048,4096", "workload=poisson_chat",
         "workload.params.n=300", "progress=false"]
PATHS = ("point", "report")  # where each point's files are: differs between sweep folders


def sweep(folder: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "run.py"), *SWEEP,
                             f"hydra.sweep.dir={folder}", *extra], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def status(point: Path) -> str | None:
    try:
        return json.loads((point / "summary.json").read_text())["status"]
    except (OSError, ValueError, KeyError):
        return None


def kill_inside_the_second_point(proc: subprocess.Popen, folder: Path) -> None:
    deadline = time.time() + 180
    while not (status(folder / "0") == "ok" and status(folder / "1") == "running"):
        assert time.time() < deadline and proc.poll() is None, "the sweep never got there"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def points(folder: Path) -> pd.DataFrame:
    return pd.read_csv(folder / "points.csv").drop(columns=list(PATHS), errors="ignore")


def test_a_killed_sweep_resumes_to_the_points_of_an_uninterrupted_one(tmp_path) -> None:
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert sweep(whole).wait(timeout=600) == 0
    kill_inside_the_second_point(sweep(killed), killed)
    first_done = (killed / "0" / "summary.json").stat().st_mtime_ns
    resumed = sweep(killed, "+resume=true")
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert "[kept]" in out
    assert (killed / "0" / "summary.json").stat().st_mtime_ns == first_done  # not re-run
    pd.testing.assert_frame_equal(points(killed), points(whole))
