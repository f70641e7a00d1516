"""What serving over HTTP costs: one trace three ways, in-process replay, HTTP replay against
kvtwin's own server (a separate process on this machine), and the twin.

    python -m engine.tools.bench_http --model /models/Qwen3-0.6B --hardware h200_141gb \\
        --out bench_http.json                                  # a CUDA machine
    python -m engine.tools.bench_http --model tiny_qwen3 --hardware cpu --cpu-smoke

Two loads: `light`, requests spaced far apart (no queueing), for the TTFT the HTTP path adds
(p50, HTTP minus in-process); `heavy`, `--streams` requests at once (that many concurrent
streams), for the output throughput HTTP keeps (HTTP / in-process). The in-process replays run
in a child process, each on a fresh engine, so the server has the GPU to itself afterwards.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

from engine.core.config import EngineConfig
from engine.core.request import Request
from engine.runtime.llm import LLMEngine, pick_device, resolve_model
from engine.runtime.replay import device_name, records_frames, replay
from engine.tools.config import compose_engine, model_source
from reports.http import replay_http
from reports.metrics import summarize, twin_metrics
from sim.twin import setup_twin, simulate

KEYS = ("completed", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "itl_p50_s", "e2e_p50_s",
        "output_throughput_tok_s", "duration_s")
CPU_SMOKE = ["dtype=float32", "device=cpu", "attention_backend=sdpa", "max_model_len=512",
             "max_num_seqs=16", "max_num_batched_tokens=512", "num_gpu_blocks_override=256"]


def traces(args: argparse.Namespace, vocab: int) -> dict[str, list[Request]]:
    def prompt(i: int) -> list[int]:
        return [(7919 * i + 104729 * j) % (vocab - 3) + 3 for j in range(args.prompt_len)]

    light = [Request(i, i * args.light_gap_s, prompt(i), args.output_len)
             for i in range(args.light_n)]
    heavy = [Request(i, 0.0, prompt(10_000 + i), args.output_len) for i in range(args.streams)]
    return {"light": light, "heavy": heavy}


# -- the three ways ----------------------------------------------------------------------------


def in_process(model: Any, config: EngineConfig, runs: dict[str, list[Request]],
               threads: int | None) -> dict[str, dict[str, Any]]:
    """Each trace replayed on a fresh engine in this process (run it in a child)."""


    if threads:
        torch.set_num_threads(threads)
    out = {}
    for name, requests in runs.items():
        engine = LLMEngine(model, config)
        result = replay(engine, requests)
        reqs, steps = records_frames(result)
        out[name] = summarize(reqs, steps, num_blocks=engine.num_blocks)
        del engine, result
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return out


def over_http(args: argparse.Namespace, runs: dict[str, list[Request]]) -> dict[str, Any]:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    folder = Path(tempfile.mkdtemp(prefix="kvtwin-serve-"))
    server = subprocess.Popen(_server_command(args, port, folder), env=_env(args))
    try:
        _wait_healthy(url, server)
        replay_http(url, runs["light"][:4])  # warm the connection path and the server
        out = {}
        for name, requests in runs.items():
            result = replay_http(url, requests)
            out[name] = result.metrics() | {"length_mismatches": result.length_mismatches}
        return out
    finally:
        server.terminate()
        server.wait(60)


def twin(args: argparse.Namespace, config: EngineConfig,
         runs: dict[str, list[Request]]) -> dict[str, Any]:
    setup = setup_twin(_twin_model(args.model), args.hardware, config)
    return {name: twin_metrics(simulate(setup, requests)) | {"predictor": setup.predictor}
            for name, requests in runs.items()}


def _twin_model(model: str) -> Any:
    if Path(model).is_dir():
        hf = json.loads((Path(model) / "config.json").read_text())
        return {"name": Path(model).name, "hf_config": hf}
    return model


def _server_command(args: argparse.Namespace, port: int, folder: Path) -> list[str]:
    """`python run.py mode=serve` on this bench's model and engine settings."""
    model = [f"model.path={args.model}"] if Path(args.model).is_dir() else \
        [f"model={args.model}"]
    command = [sys.executable, "-m", "engine.runtime.serve", *model, f"serve.port={port}",
               "serve.log_level=error", "progress=false", f"hydra.run.dir={folder}",
               *(o if o.startswith("engine") else f"engine.{o}" for o in args.set)]
    if args.torch_threads:
        command.append(f"serve.torch_threads={args.torch_threads}")
    return command


def _env(args: argparse.Namespace) -> dict[str, str]:
    root = str(Path(__file__).resolve().parents[2])
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, path) if p)}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_healthy(url: str, server: subprocess.Popen, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode} before serving")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"the server at {url} did not come up in {timeout_s:.0f} s")


# -- report ------------------------------------------------------------------------------------


def compare(measured: dict[str, dict[str, Any]]) -> dict[str, Any]:
    local, http = measured["in_process"], measured["http"]
    ttft = _diff(http["light"]["ttft_p50_s"], local["light"]["ttft_p50_s"])
    ratio = _ratio(http["heavy"]["output_throughput_tok_s"],
                   local["heavy"]["output_throughput_tok_s"])
    return {"light_ttft_p50_http_minus_in_process_s": ttft,
            "heavy_output_throughput_http_over_in_process": ratio}


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if not a or not b else a / b


def format_report(result: dict[str, Any]) -> str:
    lines = [f"bench_http  {result['model']} on {result['device']}, "
             f"light: {result['light_n']} requests {result['light_gap_s']} s apart, heavy: "
             f"{result['streams']} concurrent streams; {result['prompt_len']} prompt + "
             f"{result['output_len']} output tokens each"]
    for load in ("light", "heavy"):
        for way in ("in_process", "http", "twin"):
            m = result[way][load]
            lines.append(f"  {load:<5} {way:<10} " + "  ".join(
                f"{k} {_fmt(m.get(k))}" for k in ("completed", "ttft_p50_s", "tpot_p50_s",
                                                  "output_throughput_tok_s")))
    c = result["comparison"]
    lines += [f"  TTFT p50 at light load, HTTP - in-process: "
              f"{_fmt(c['light_ttft_p50_http_minus_in_process_s'], 1000, ' ms')}",
              f"  output throughput at {result['streams']} streams, HTTP / in-process: "
              f"{_fmt(c['heavy_output_throughput_http_over_in_process'])}"]
    return "\n".join(lines)


def _fmt(value: Any, scale: float = 1.0, unit: str = "") -> str:
    if value is None:
        return "n/a"
    return f"{value * scale:,.4g}{unit}" if isinstance(value, float) else str(value)


# -- command line ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.tools.bench_http", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen3_0_6b", help="a model folder or a catalog model")
    p.add_argument("--hardware", default="h200_141gb", help="the twin's catalog hardware")
    p.add_argument("--set", action="append", default=[], metavar="K=V",
                   help="an EngineConfig field, for the engine, the server and the twin")
    p.add_argument("--light-n", type=int, default=64)
    p.add_argument("--light-gap-s", type=float, default=0.25)
    p.add_argument("--streams", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--torch-threads", type=int)
    p.add_argument("--cpu-smoke", action="store_true",
                   help="a seconds-long CPU run (the tiny model's engine settings, small loads)")
    p.add_argument("--out", type=Path, default=Path("bench_http.json"))
    return p


def smoke(args: argparse.Namespace) -> None:
    args.set = [*CPU_SMOKE, *args.set]
    args.light_n, args.light_gap_s, args.streams = 6, 0.05, 16
    args.prompt_len, args.output_len, args.torch_threads = 32, 8, args.torch_threads or 1


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.cpu_smoke:
        smoke(args)
    model, _ = model_source(args.model)
    config = compose_engine(args.set)
    vocab = _vocab(model)
    runs = traces(args, vocab)
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        local = pool.submit(in_process, model, config, runs, args.torch_threads).result()
    measured = {"in_process": local, "http": over_http(args, runs),
                "twin": twin(args, config, runs)}
    keep = {way: {load: {k: m.get(k) for k in (*KEYS, "length_mismatches", "predictor")
                         if k in m} for load, m in loads.items()}
            for way, loads in measured.items()}
    return {"date": datetime.now(UTC).isoformat(timespec="seconds"), "model": args.model,
            "device": _device(config), "engine": config.to_dict(), "hardware": args.hardware,
            "light_n": args.light_n, "light_gap_s": args.light_gap_s, "streams": args.streams,
            "prompt_len": args.prompt_len, "output_len": args.output_len,
            "command": "python -m engine.tools.bench_http " + " ".join(args.argv),
            **keep, "comparison": compare(measured)}


def _vocab(model: Any) -> int:
    return resolve_model(model)[0].vocab_size


def _device(config: EngineConfig) -> str:
    return device_name(pick_device(config.device))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(format_report(result))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
