"""run.py: Hydra composition of every group, bad overrides, single runs and sweeps."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from conf.schema import register

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
    from engine.core.catalog import list_hardware, list_models
    from workloads import PRESETS

    assert options("model") == sorted(list_models())
    assert options("hardware") == sorted(list_hardware())
    # every preset, and the default: a window of the Azure trace committed in the repo
    assert options("workload") == sorted([*PRESETS, "azure_window"])


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
    """run.py without prediction bands unless asked (they multiply the twin's time)."""
    flags = [a for a in args if a.startswith("-")]
    overrides = [a for a in args if not a.startswith("-")]
    if not any(a.startswith("bands.") for a in overrides):
        overrides.append("bands.replicates=0")
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *flags, "progress=false",
                           *overrides], cwd=cwd, capture_output=True, text=True, timeout=600)


def summaries(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.rglob("summary.json"))]


def test_single_sim_run_writes_its_folder(tmp_path: Path) -> None:
    result = run_py("workload=poisson_chat", "workload.params.n=60", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    for name in ("summary.json", "requests.parquet", "steps.parquet"):
        assert (tmp_path / name).is_file()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["real"] is None
    assert summary["sim"]["metrics"]["completed"] > 0
    assert summary["config"]["hardware"] == "h100_80gb"


def test_bad_value_fails_before_running(tmp_path: Path) -> None:
    result = run_py("engine.block_size=24", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 2
    assert result.stderr.strip() == \
        "error: block_size=24 is invalid: must be a power of two from 1 to 256"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and "Traceback" in summary["traceback"]
    assert not (tmp_path / "report.html").exists()  # no heavy page for a config error
    debug = run_py("--debug", "engine.block_size=24", f"hydra.run.dir={tmp_path}")
    assert debug.returncode == 2 and "Traceback" in debug.stderr


def test_forced_unknown_engine_key_is_named(tmp_path: Path) -> None:
    result = run_py("+engine.nonsense=1", f"hydra.run.dir={tmp_path}")
    assert result.returncode != 0 and "nonsense=1 is invalid" in result.stderr


def test_sweep_records_impossible_and_failed_points_and_goes_on(tmp_path: Path) -> None:
    result = run_py("-m", "workload=poisson_chat", "workload.params.n=40",
                    "engine.block_size=16,32", "engine.gpu_memory_utilization=0.005,0.9",
                    "fail_point=false,true",
                    f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 1  # every point ran; the failed ones make the exit non-zero
    assert "8 points: 2 ok, 2 cannot start, 4 failed, 0 interrupted" in result.stderr
    found = summaries(tmp_path)
    assert len(found) == 8
    statuses = sorted(s["status"] for s in found)
    assert statuses == ["cannot_start"] * 2 + ["failed"] * 4 + ["ok"] * 2
    cannot = [s for s in found if s["status"] == "cannot_start"]
    assert all(s["sim"]["memory"]["num_blocks"] <= 0 for s in cannot)
    assert all("No available memory" in s["error"] for s in cannot)
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 8  # one folder per point
    points = (tmp_path / "points.csv").read_text().splitlines()
    assert len(points) == 9 and (tmp_path / "sweep.html").is_file()
    assert "fail_point=true: this point fails on purpose" in (tmp_path / "sweep.html").read_text()


def test_both_mode_on_the_cpu_compares_sim_with_the_real_engine(tmp_path: Path) -> None:
    import pandas as pd

    result = run_py("mode=both", "model=tiny_qwen3", "hardware=cpu", "engine=cpu_tiny",
                    "workload=shared_prefix", "workload.params.n=12",
                    "workload.params.prefix_len=256", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "ok"
    real, sim = summary["real"], summary["sim"]
    assert real["memory"]["source"].startswith("cpu") and real["device"]["name"]
    assert sim["predictor"]["kind"] == "calibrated"  # the shipped CPU profile
    assert sim["memory"]["num_blocks"] == real["memory"]["num_blocks"]
    assert real["metrics"]["completed"] == sim["metrics"]["completed"] == 12
    requests = pd.read_parquet(tmp_path / "requests.parquet")
    assert sorted(requests["source"].unique()) == ["real", "sim"]
    assert real["metrics"]["prefix_cache_hit_rate"] > 0  # the engine really shared prefixes
    page = (tmp_path / "report.html").read_text()
    assert "measured (real)" in page


def test_real_side_runs_in_a_fresh_process() -> None:
    """The path GPU points take (spawned process), exercised here on the CPU."""
    import run
    from engine.core.catalog import load_model
    from engine.core.config import EngineConfig
    from engine.core.request import Request
    from engine.runtime.replay import replay_run

    requests = [Request(i, 0.01 * i, list(range(5 + i, 40 + i)), 4) for i in range(3)]
    config = EngineConfig(dtype="float32", device="cpu", max_model_len=256,
                          cpu_memory_gib=0.05)
    reqs, steps, info = run._fresh_process(replay_run, load_model("tiny_qwen3"), config,
                                           requests, None, False)
    assert len(reqs) == 3 and (reqs["output_len"] == 4).all() and len(steps) > 0
    assert info["memory"]["num_blocks"] > 0


def test_real_mode_refuses_a_large_model_on_the_cpu(tmp_path: Path) -> None:
    result = run_py("mode=real", "engine.device=cpu", "hardware=cpu", "engine.dtype=float32",
                    f"hydra.run.dir={tmp_path}")
    assert result.returncode != 0
    assert "the CPU engine is for the tiny models" in result.stderr


def test_bench_mode_prints_the_table_and_writes_bench_json(tmp_path: Path) -> None:
    result = run_py("mode=bench", "model=tiny_qwen3", "engine=cpu_tiny", "workload=nanovllm_bench",
                    "workload.params.n=4", "workload.params.max_input_len=120",
                    "workload.params.max_output_len=100", "+bench.hf_requests=2",
                    "+bench.peers=generate", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    assert "kvtwin / peer = output tok/s" in result.stdout
    bench = json.loads((tmp_path / "bench.json").read_text())
    assert bench["command"].startswith("python run.py progress=false mode=bench")
    assert bench["workload"]["params"] == {"n": 4, "max_input_len": 120, "max_output_len": 100,
                                           "seed": 0}
    assert bench["kvtwin"]["output_tokens"] == bench["workload"]["output_tokens"]
    assert list(bench["peers"]) == ["generate"] and bench["peers"]["generate"]["num_requests"] == 2
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["mode"] == "bench"
    assert summary["bench"]["ratios"]["generate"] > 0


def test_bench_mode_names_an_unknown_bench_option(tmp_path: Path) -> None:
    result = run_py("mode=bench", "model=tiny_qwen3", "engine=cpu_tiny", "+bench.peer=generate",
                    f"hydra.run.dir={tmp_path}")
    assert result.returncode != 0 and "bench.peer='generate' is invalid" in result.stderr


@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
def test_a_signal_keeps_what_was_simulated_and_says_where(tmp_path: Path, signum: str) -> None:
    import signal
    import time

    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "run.py"), "progress=false", "workload=azure_conv",
         "workload.params.duration_s=3600", "engine.max_model_len=16384", "skip=false",
         f"hydra.run.dir={tmp_path}"], cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "summary.json").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(3.0)  # inside the hour-long simulation by now (single-stepped: tens of seconds)
    proc.send_signal(getattr(signal, signum))
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "interrupted" and signum in summary["error"]
    stopped = summary["sim"]["stopped"]
    assert 0 < stopped["arrived"] < stopped["requests"] and "at simulated" in out
    requests = pd.read_parquet(tmp_path / "requests.parquet")
    assert len(requests) == stopped["arrived"] and requests["finish_s"].notna().any()
    assert len(pd.read_parquet(tmp_path / "steps.parquet")) > 0
    assert not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob(".*.tmp"))


def test_a_run_records_its_prediction_bands(tmp_path: Path) -> None:
    result = run_py("workload=poisson_chat", "workload.params.n=80", "bands.replicates=4",
                    "bands.workers=2", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    sim = json.loads((tmp_path / "summary.json").read_text())["sim"]
    bands = sim["bands"]
    assert bands["replicates"] == 4 and len(bands["replicate_wall_s"]) == 4
    for key in ("ttft_p50_s", "tpot_p90_s", "e2e_p99_s"):
        b = bands["metrics"][key]
        assert 0 < b["p5"] < b["p95"] and b["p5"] < sim["metrics"][key] * 1.5
    assert "[" in result.stdout.splitlines()[-2]  # the console shows "point [p5–p95]"


def test_bands_are_skipped_past_max_requests_and_for_the_roofline(tmp_path: Path) -> None:
    big = run_py("workload=poisson_chat", "workload.params.n=80", "bands.max_requests=50",
                 f"hydra.run.dir={tmp_path / 'big'}")
    roof = run_py("workload=poisson_chat", "workload.params.n=80", "predictor=roofline",
                  "bands.replicates=2", f"hydra.run.dir={tmp_path / 'roof'}")
    assert big.returncode == 0 and roof.returncode == 0, big.stderr + roof.stderr
    big_bands, roof_bands = (json.loads((tmp_path / d / "summary.json").read_text())["sim"][
        "bands"] for d in ("big", "roof"))
    assert "80 requests is more than bands.max_requests (50)" in big_bands["skipped"]
    assert "need a calibration profile" in roof_bands["skipped"]


def test_a_signal_while_drawing_bands_keeps_the_prediction(tmp_path: Path) -> None:
    import signal

    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "run.py"), "progress=false", "workload=poisson_chat",
         "workload.params.n=3000", "bands.replicates=8", "bands.workers=2",
         f"hydra.run.dir={tmp_path}"], cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # the point prediction is done when the bands start
        if line.startswith("bands:"):
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "interrupted" and "prediction bands" in summary["error"]
    assert summary["sim"]["bands"] == {"skipped": "stopped by a signal"}
    assert summary["sim"]["metrics"]["num_requests"] == 3000
    assert len(pd.read_parquet(tmp_path / "requests.parquet")) == 3000


def test_calibrate_mode_quick_writes_a_profile(tmp_path: Path) -> None:
    result = run_py("mode=calibrate", "model=tiny_qwen3", "hardware=cpu", "engine=cpu_tiny",
                    "calibrate.quick=true", "calibrate.time_budget_s=4",
                    f"calibrate.out={tmp_path / 'profiles'}", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr
    [profile] = (tmp_path / "profiles").glob("cpu__tiny_qwen3__*.json")
    assert json.loads(profile.read_text())["meta"]["quick"] is True
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["calibration"]["profile"] == str(profile)
    assert f"[ok] calibration profile: {profile}" in result.stdout
    update = run_py("mode=calibrate", "model=tiny_qwen3", "hardware=cpu", "engine=cpu_tiny",
                    f"calibrate.update={profile}", f"hydra.run.dir={tmp_path / 'bad'}")
    assert update.returncode == 2 and "needs calibrate.quick" in update.stderr
