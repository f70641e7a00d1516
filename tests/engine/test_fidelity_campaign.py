"""The GPU campaign's plan (made on the CPU: traces, rates, KV size, commands, time) and its
report, here on the committed CPU set (no GPU, nothing run)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from engine.tools.fidelity_campaign import (
    ONSET_PREEMPTIONS,
    PREFILL_MULTIPLES,
    SET,
    main,
    write_report,
)
from reports.validation.accuracy import VALIDATION_DIR
from workloads import read_trace


@pytest.fixture(scope="module")
def planned(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("campaign")
    assert main(["--out", str(out), "--dry-run"]) == 0
    return out


def test_the_plan_fits_one_gpu_command_in_priority_order(planned: Path) -> None:
    state = json.loads((planned / "campaign.json").read_text())
    commands = state["commands"]
    labels = [c["label"] for c in commands]
    assert labels[:7] == ["calibrate --quick --update", "run1/prefill", "run1/burst",
                          "run1/loads_0.9", "run2/prefill", "run2/burst", "run2/loads_0.9"]
    assert sum(c["estimate_s"] for c in commands[:7]) <= state["budget_s"] == 540.0
    calibrate = commands[0]["argv"]
    assert "--quick" in calibrate and calibrate[calibrate.index("--update") + 1].endswith(
        "h200_141gb__qwen3_0_6b__bfloat16__torch.json")
    prefill = commands[1]["argv"]
    assert "mode=both" in prefill and "--config-dir" in prefill
    assert any(a.startswith("hydra.sweep.dir=") and a.endswith("runs/run1/prefill")
               for a in prefill)
    assert all(c["outcome"] == {} for c in commands)  # a dry run runs nothing


def test_the_new_points_are_prefill_heavy_and_near_preemption_onset(planned: Path) -> None:
    chosen = json.loads((planned / "campaign.json").read_text())["chosen"]
    traces = {k: read_trace(planned / "traces" / f"h200_prefill_x{k}.parquet").df
              for k in PREFILL_MULTIPLES}
    one = traces[1]
    assert one["output_len"].max() <= 32 and one["prompt_len"].median() > 2000
    span = {k: t["arrival_s"].max() for k, t in traces.items()}
    assert span[1] > 2.5 * span[4] and span[4] > 1.5 * span[10]  # the same requests, faster
    assert ONSET_PREEMPTIONS[0] <= chosen["burst_predicted_preemptions"]
    burst = read_trace(planned / "traces" / "h200_burst.parquet").df
    assert (burst["arrival_s"] == 0).all()
    conf = (planned / "conf" / "workload" / "fidelity" / "h200_burst.yaml").read_text()
    assert "h200_burst.parquet" in conf


def small_set(dest: Path, points: int = 3) -> Path:
    """The committed CPU set cut to its first started points (records shared)."""
    cpu = VALIDATION_DIR / "cpu_tiny_qwen3"
    shutil.copytree(cpu, dest)
    index = json.loads((cpu / "index.json").read_text())
    index["points"] = [p for p in index["points"] if p["real"]["starts"]][:points]
    (dest / "index.json").write_text(json.dumps(index))
    return dest


def test_the_report_compares_profiles_runs_and_steps(tmp_path: Path) -> None:
    sets = {1: small_set(tmp_path / "sets" / SET), 2: small_set(tmp_path / "run2")}
    text = write_report(tmp_path, sets, replicates=2).read_text()
    for heading in ("## Run 1", "coverage", "## Signed error per step class",
                    "## Run 2 against run 1", "## Serving overhead"):
        assert heading in text, heading
    assert any((tmp_path / "profiles_serving").glob("*.json"))
    assert any((sets[1] / "profiles").glob("*.json"))  # the run-1 set keeps its profile


def test_the_campaign_runs_only_on_an_h200(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Its twin, the profile it updates and its set names are the H200's: on another GPU (an
    H100 once recalibrated the H200 profile from its own timings) it stops before running."""
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    with pytest.raises(SystemExit, match="NVIDIA H100 80GB HBM3: run it on an H200"):
        main(["--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())
