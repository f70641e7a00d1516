"""engine.tools.bench_http: the CPU smoke run (seconds), and the real one on a GPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.tools.bench_http import main


def check(path: Path, streams: int) -> dict:
    result = json.loads(path.read_text())
    for way in ("in_process", "http", "twin"):
        assert result[way]["heavy"]["completed"] == streams, way
        assert result[way]["light"]["ttft_p50_s"] > 0, way
    assert result["http"]["heavy"]["length_mismatches"] == 0
    comparison = result["comparison"]
    assert comparison["heavy_output_throughput_http_over_in_process"] > 0
    assert comparison["light_ttft_p50_http_minus_in_process_s"] is not None
    return result


def test_cpu_smoke(tmp_path: Path, capsys) -> None:
    out = tmp_path / "bench_http.json"
    assert main(["--model", "tiny_qwen3", "--hardware", "cpu", "--cpu-smoke",
                 "--out", str(out)]) == 0
    result = check(out, streams=16)
    assert result["engine"]["device"] == "cpu"
    printed = capsys.readouterr().out
    assert "TTFT p50 at light load, HTTP - in-process" in printed
    assert "output throughput at 16 streams, HTTP / in-process" in printed


@pytest.mark.gpu
def test_on_the_gpu(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    out = tmp_path / "bench_http.json"
    assert main(["--model", "qwen3_0_6b", "--hardware", "h200_141gb", "--light-n", "16",
                 "--streams", "64", "--output-len", "32", "--out", str(out)]) == 0
    check(out, streams=64)
