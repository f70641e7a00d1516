"""run.py: Hydra composition of every group, bad overrides, single runs and sweeps."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from sim.run_config import register

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
register()


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def composed(*overrides: str):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize("group", ["model", "hardware", "engine", "workload"])
def test_every_group_option_composes(group: str) -> None:
    for option in options(group):
        cfg = composed(f"{group}={option}")
        assert cfg[group] is not None


def test_groups_mirror_the_catalog_and_presets() -> None:
    from sim.catalog import list_hardware, list_models
    from workloads import PRESETS

    assert options("model") == sorted(list_models())
    assert options("hardware") == sorted(list_hardware())
    assert options("workload") == sorted(PRESETS)


@pytest.mark.parametrize(("override", "key"), [
    ("engine.block_size=abc", "engine.block_size"),
    ("engine.blocksize=16", "engine.blocksize"),
    ("hardware.peak_bf16_flops=fast", "hardware.peak_bf16_flops"),
    ("model=gpt9", "model"),
])
def test_bad_override_fails_at_composition_naming_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigCompositionException) as err:
        composed(override)
    text = str(err.value) + str(err.value.__cause__)
    assert key in text


def run_py(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    flags = [a for a in args if a.startswith("-")]
    overrides = [a for a in args if not a.startswith("-")]
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *flags, "progress=false",
                           *overrides], cwd=cwd, capture_output=True, text=True, timeout=600)


def summaries(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.rglob("summary.json"))]


def test_single_sim_run_writes_its_folder(tmp_path: Path) -> None:
    result = run_py("workload.params.n=60", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    for name in ("summary.json", "requests.parquet", "steps.parquet"):
        assert (tmp_path / name).is_file()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["real"] is None
    assert summary["sim"]["metrics"]["completed"] > 0
    assert summary["config"]["hardware"] == "h100_80gb"


def test_bad_value_fails_before_running(tmp_path: Path) -> None:
    result = run_py("engine.block_size=24", f"hydra.run.dir={tmp_path}")
    assert result.returncode != 0
    assert "block_size=24 is invalid: must be a power of two from 1 to 256" in result.stderr
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "failed"


def test_forced_unknown_engine_key_is_named(tmp_path: Path) -> None:
    result = run_py("+engine.nonsense=1", f"hydra.run.dir={tmp_path}")
    assert result.returncode != 0 and "nonsense=1 is invalid" in result.stderr


def test_sweep_records_impossible_and_failed_points_and_goes_on(tmp_path: Path) -> None:
    result = run_py("-m", "workload.params.n=40", "engine.block_size=16,32",
                    "engine.gpu_memory_utilization=0.005,0.9", "fail_point=false,true",
                    f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    found = summaries(tmp_path)
    assert len(found) == 8
    statuses = sorted(s["status"] for s in found)
    assert statuses == ["cannot_start"] * 2 + ["failed"] * 4 + ["ok"] * 2
    cannot = [s for s in found if s["status"] == "cannot_start"]
    assert all(s["sim"]["memory"]["num_blocks"] <= 0 for s in cannot)
    assert all("No available memory" in s["error"] for s in cannot)
