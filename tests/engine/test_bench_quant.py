"""engine.tools.bench_quant as a CPU smoke run: the tiny model in its three variants, the
JSON it writes and the table it prints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.tools import bench_quant

SMOKE = ["--device", "cpu", "--models", "tiny_qwen3", "--dtype", "float32", "--batches", "1",
         "4", "--context", "32", "--num-requests", "2", "--max-input-len", "100",
         "--max-output-len", "100"]


def test_cpu_smoke_run_writes_every_variant(tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "quant.json"
    bench_quant.main([*SMOKE, "--out", str(out)])
    result = json.loads(out.read_text())
    runs = result["models"]["tiny_qwen3"]
    assert list(runs) == ["baseline", "int8_weights", "fp8_kv"]
    for name, run in runs.items():
        assert [row["batch"] for row in run["decode"]] == [1, 4]
        assert all(row["forward_ms"] > 0 and row["execute_ms"] > 0 for row in run["decode"])
        assert run["throughput"]["num_requests"] == 2 and run["throughput"]["output_tokens"] > 0
        terms = run["memory"]["terms"]
        for term in ("weights_bytes", "bytes_per_block", "num_blocks", "budget_bytes"):
            assert terms[term]["predicted"] == terms[term]["measured"], (name, term)
    weights = {n: r["memory"]["terms"]["weights_bytes"]["measured"] for n, r in runs.items()}
    assert weights["int8_weights"] < weights["baseline"] == weights["fp8_kv"]
    block = {n: r["memory"]["terms"]["bytes_per_block"]["measured"] for n, r in runs.items()}
    assert block["fp8_kv"] * 4 == block["baseline"]  # float32 -> float8
    assert runs["int8_weights"]["config"]["quantization"] == "int8"
    printed = capsys.readouterr().out
    assert "int8_weights" in printed and "KV blocks" in printed and str(out) in printed


def test_an_exhausted_budget_skips_the_remaining_engines(tmp_path: Path) -> None:
    result = bench_quant.main([*SMOKE, "--budget-s", "0", "--variants", "int8_weights",
                               "--out", str(tmp_path / "q.json")])
    assert result["models"]["tiny_qwen3"] == {"int8_weights": {"skipped": "past the 0 s budget"}}
    assert "skipped: past the 0 s budget" in bench_quant.format_table(result)


def test_gpu_names_map_to_catalog_hardware(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = torch.device("cuda")
    for name, key in (("NVIDIA H200", "h200_141gb"), ("NVIDIA H100 80GB HBM3", "h100_80gb"),
                      ("NVIDIA A100-SXM4-80GB", "a100_80gb"), ("NVIDIA L4", "l4_24gb")):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, n=name: n)
        assert bench_quant.detect_hardware("auto", cuda) == key
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA L40S")
    with pytest.raises(SystemExit, match="pass --hardware"):
        bench_quant.detect_hardware("auto", cuda)
    assert bench_quant.detect_hardware("h100_80gb", cuda) == "h100_80gb"
    assert bench_quant.detect_hardware("auto", torch.device("cpu")) == "cpu"


def test_default_models_are_qwen3_0_6b_and_the_largest_that_fits() -> None:
    """By the twin's prediction for the bench's own configuration (256 x 1024-token decodes)."""
    args, cuda = bench_quant.parse_args([]), torch.device("cuda")
    assert bench_quant.pick_models(args, "h200_141gb", cuda) == ["qwen3_0_6b", "qwen3_8b"]
    assert bench_quant.pick_models(args, "l4_24gb", cuda) == ["qwen3_0_6b"]


def test_a_failing_engine_is_recorded_and_the_others_still_run(tmp_path: Path) -> None:
    """tiny_qwen3's 2048 positions cannot hold --context 4096: that engine's error is kept."""
    result = bench_quant.main([*SMOKE, "--context", "4096", "--variants", "baseline",
                               "--out", str(tmp_path / "q.json")])
    error = result["models"]["tiny_qwen3"]["baseline"]["error"]
    assert error.startswith("ConfigError: max_model_len=4097 is invalid")
    assert "error: ConfigError" in bench_quant.format_table(result)
