"""python -m workloads describe / generate / presets."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from workloads.cli import main
from workloads.trace_io import read_trace

REPO = Path(__file__).resolve().parents[2]


def test_describe_azure_csv(azure_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["describe", str(azure_path), "--model", "qwen3-0.6b"]) == 0
    out = capsys.readouterr().out
    assert "requests        19,366 over 3,501.7 s" in out
    assert "  prompt             1,020" in out
    assert "qwen3-0.6b bfloat16, 114,688 B/token" in out


def test_describe_json_with_window(azure_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["describe", str(azure_path), "--json", "--kv-bytes-per-token", "100",
            "--start-s", "0", "--duration-s", "60", "--block-size", "32"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["duration_s"] < 60 and summary["block_size"] == 32
    assert summary["kv_bytes_per_token"] == 100


def test_generate_then_describe(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sp.jsonl"
    assert main(["generate", "shared_prefix", "-o", str(out), "--set", "n=64",
                 "--set", "prefix_len=48"]) == 0
    assert "wrote 64 requests" in capsys.readouterr().out
    trace = read_trace(out)
    assert len(trace) == 64 and trace.meta["preset"]["params"]["prefix_len"] == 48
    assert main(["describe", str(out)]) == 0
    assert "prefix cache    block 16:" in capsys.readouterr().out


def test_errors_exit_2_with_a_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "ramp", "-o", str(tmp_path / "r.parquet"), "--set", "rat=2"]) == 2
    assert "ramp.rat=2 is invalid" in capsys.readouterr().err
    assert main(["describe", str(tmp_path / "missing.parquet")]) == 2
    assert "trace not found" in capsys.readouterr().err


def test_module_entry_point() -> None:
    result = subprocess.run([sys.executable, "-m", "workloads", "presets"], cwd=REPO,
                            capture_output=True, text=True, check=True)
    assert result.stdout.splitlines()[0].startswith("nanovllm_bench")


def test_workloads_never_imports_torch() -> None:
    code = ("import sys, workloads; from workloads.models import model_kv_bytes_per_token; "
            "model_kv_bytes_per_token('qwen3-0.6b'); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, check=True)
    assert result.stdout.strip() == "[]"
