"""run.py: mode=real target=http against a running server, and mode=serve itself."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from tests.serve.conftest import call

ROOT = Path(__file__).resolve().parents[2]
TINY = ("model=tiny_qwen3", "hardware=cpu", "engine=cpu_tiny", "progress=false")


def run_py(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *TINY, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_real_mode_over_http_writes_a_run_folder(server, tmp_path: Path) -> None:
    result = run_py("mode=real", "target=http", f"endpoint={server.url}",
                    "workload=poisson_chat", "workload.params.n=6",
                    "workload.params.rate=20", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["real"]["source"] == "http"
    assert summary["real"]["server"] == "kvtwin" and summary["real"]["length_mismatches"] == 0
    reqs = pd.read_parquet(tmp_path / "requests.parquet")
    assert len(reqs) == 6 and set(reqs["source"]) == {"real"}
    metrics = summary["real"]["metrics"]
    assert metrics["completed"] + metrics["rejected"] == 6 and metrics["completed"] > 0


def test_http_target_needs_an_endpoint(tmp_path: Path) -> None:
    result = run_py("mode=real", "target=http", f"hydra.run.dir={tmp_path}")
    assert result.returncode != 0 and "target=http needs endpoint=" in result.stderr


def test_serve_mode_serves_until_ctrl_c_and_keeps_its_records(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen([sys.executable, str(ROOT / "run.py"), *TINY, "mode=serve",
                             f"serve.port={port}", "serve.torch_threads=1",
                             f"hydra.run.dir={tmp_path}"], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc)
        status, body = call(url, "/v1/completions", {"prompt": [5, 6, 7], "max_tokens": 4,
                                                      "ignore_eos": True})
        assert status == 200 and body["model"] == "tiny_qwen3"
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert f"serving tiny_qwen3 on {url}" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["real"]["metrics"]["completed"] == 1
    assert len(pd.read_parquet(tmp_path / "steps.parquet")) >= 4


def _wait_healthy(url: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1]
        try:
            if call(url, "/health")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError("mode=serve did not come up")
