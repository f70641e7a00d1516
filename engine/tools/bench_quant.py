"""Int8 weights and the fp8 KV cache against the plain engine: decode-step time, offline
throughput, and the start-up memory terms the twin predicts beside those the engine measured.

    python -m engine.tools.bench_quant --out outputs/bench/quant_h200.json       # a GPU
    python -m engine.tools.bench_quant --device cpu --models tiny_qwen3 --dtype float32 \\
        --batches 1 4 --context 32 --num-requests 3 --max-input-len 64 --max-output-len 16

Models: Qwen3-0.6B and the largest catalog model (conf/model) whose plain engine the twin
predicts to start here with room for the largest decode batch. Variants, one engine each
(seeded random weights): `baseline` (the model dtype throughout), `int8_weights`
(quantization=int8), `fp8_kv` (kv_cache_dtype=fp8). Per engine:
- decode: `batch` sequences of `--context` tokens, one new token each, timed like
  engine.tools.bench_decode (the forward pass and logits, then the whole execute_model),
  beside the HBM bound (weights + KV read once at the measured copy bandwidth);
- throughput: nano-vllm's bench (prompts of 100 to --max-input-len tokens, outputs of 100 to
  --max-output-len, temperature 0.6, EOS ignored), its first --num-requests requests all
  submitted at once, after an untimed warm-up;
- memory: `LLMEngine.memory_report()` and `sim.twin.setup_twin(...).memory`, term by term.
Engines still to run once --budget-s seconds have passed are recorded as skipped (an 8B engine
takes about a minute: start-up with CUDA graphs and Triton compilation, then the runs). The
result is one JSON file (--out), a line per engine as it finishes, and a table at the end.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from engine.core.catalog import list_models, load_model
from engine.core.config import EngineConfig
from engine.runtime.llm import LLM
from engine.tools import bench
from engine.tools.bench_decode import copy_bandwidth, decode_plan
from sim.twin import setup_twin

VARIANTS: dict[str, dict[str, str]] = {
    "baseline": {}, "int8_weights": {"quantization": "int8"}, "fp8_kv": {"kv_cache_dtype": "fp8"}}
GPU_HARDWARE = {"H200": "h200_141gb", "H100": "h100_80gb", "A100": "a100_80gb", "L4": "l4_24gb"}
MEMORY_TERMS = ("total_bytes", "budget_bytes", "weights_bytes", "activation_peak_bytes",
                "non_torch_bytes", "cuda_graph_bytes", "kv_cache_bytes", "bytes_per_block",
                "num_blocks", "used_at_start_bytes")
TEMPERATURE = bench.NANOVLLM_TEMPERATURE
PAIR = ("predicted", "measured")
BASE_MODEL = "qwen3_0_6b"
MiB = 1 << 20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m engine.tools.bench_quant", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=None,
                   help="catalog models (default: qwen3_0_6b and the largest that fits)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--hardware", default="auto", help="catalog hardware (auto: by GPU name)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 256])
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--max-input-len", type=int, default=1024)
    p.add_argument("--max-output-len", type=int, default=1024)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--cpu-memory-gib", type=float, default=0.25)
    p.add_argument("--budget-s", type=float, default=240.0,
                   help="start no new engine after this many seconds")
    p.add_argument("--out", type=Path, default=Path("outputs/bench/quant.json"))
    return p.parse_args(argv)


# -- setup -------------------------------------------------------------------------------------

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def detect_hardware(name: str, device: torch.device) -> str:
    """The catalog entry of this machine: `cpu`, or the GPU's by its name."""
    if name != "auto":
        return name
    if device.type == "cpu":
        return "cpu"
    gpu = torch.cuda.get_device_name(device)
    tokens = set(re.split(r"[\s_-]+", gpu.upper()))  # "NVIDIA L40S" is no L4
    for token, key in GPU_HARDWARE.items():
        if token in tokens:
            return key
    raise SystemExit(f"no catalog hardware for {gpu!r}: pass --hardware <conf/hardware entry>")


def engine_config(args: argparse.Namespace, variant: str, device: torch.device) -> EngineConfig:
    return EngineConfig(
        dtype=args.dtype, device=device.type, max_num_seqs=max(args.batches),
        max_model_len=max(args.max_input_len + args.max_output_len, args.context + 1),
        gpu_memory_utilization=args.gpu_memory_utilization, cpu_memory_gib=args.cpu_memory_gib,
        **VARIANTS[variant]).validate()


def decode_blocks(args: argparse.Namespace, block_size: int = 16) -> int:
    return max(args.batches) * -(-args.context // block_size)


def pick_models(args: argparse.Namespace, hardware: str, device: torch.device) -> list[str]:
    """--models, else Qwen3-0.6B and the largest catalog model that the twin predicts to
    start here with blocks for the largest decode batch (none larger: Qwen3-0.6B alone)."""
    if args.models:
        return list(args.models)

    config = engine_config(args, "baseline", device)
    size = {m: load_model(m).num_parameters() for m in list_models()}
    larger = sorted((m for m in size if size[m] > size[BASE_MODEL]), key=size.get, reverse=True)
    for name in larger:
        memory = setup_twin(name, hardware, config).memory
        if memory.starts and memory.num_blocks >= decode_blocks(args):
            return [BASE_MODEL, name]
    return [BASE_MODEL]


# -- measurements ------------------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Mean seconds of fn after 3 warm-up calls, the device synchronised around the loop."""
    for _ in range(3):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / repeats


def decode_row(llm: Any, batch: int, context: int, bandwidth: float | None) -> dict[str, Any]:
    runner, device = llm.model_runner, llm.device
    needed = batch * -(-context // llm.config.block_size)
    if needed > llm.num_blocks:
        return {"batch": batch, "context": context,
                "skipped": f"needs {needed} KV blocks, the engine has {llm.num_blocks}"}
    plan = decode_plan(batch, context, llm.config.block_size, TEMPERATURE)
    step = runner.prepare_inputs(plan.scheduled)
    repeats = 20 if device.type == "cuda" else 3
    forward = timed(lambda: runner.compute_step_logits(step), device, repeats)
    execute = timed(lambda: runner.execute_model(plan), device, repeats)
    row = {"batch": batch, "context": context, "forward_ms": forward * 1e3,
           "execute_ms": execute * 1e3}
    if bandwidth:
        kv = batch * context * llm.model_config.kv_bytes_per_token(llm.config.kv_dtype)
        row["hbm_bound_ms"] = (runner.weight_bytes + kv) / bandwidth * 1e3
    return row


def memory_pairs(measured: dict[str, Any], predicted: Any) -> dict[str, Any]:
    """Every start-up term: predicted (the twin), measured (the engine), and their sources."""
    twin = predicted.to_dict()
    terms = {t: {"predicted": twin.get(t), "measured": measured.get(t)} for t in MEMORY_TERMS}
    return {"terms": terms, "predicted_starts": predicted.starts,
            "predicted_error": predicted.error, "sources": predicted.sources}


def run_engine(model: str, hardware: str, variant: str, args: argparse.Namespace,
               device: torch.device, bandwidth: float | None) -> dict[str, Any]:
    config = engine_config(args, variant, device)
    predicted = setup_twin(model, hardware, config).memory
    start = time.perf_counter()
    llm = LLM(load_model(model), config)
    result = {"config": {k: getattr(config, k) for k in (
                  "dtype", "quantization", "kv_cache_dtype", "max_num_seqs", "max_model_len",
                  "gpu_memory_utilization")},
              "startup_s": time.perf_counter() - start,
              "attention_backend": llm.model_runner.attention_backend,
              "cuda_graphs": llm.model_runner.cuda_graphs_enabled,
              "memory": memory_pairs(llm.memory_report(), predicted),
              "decode": [decode_row(llm, b, args.context, bandwidth) for b in args.batches]}
    result["throughput"] = bench.nanovllm_throughput(
        llm, args.num_requests, args.max_input_len, args.max_output_len)
    del llm
    result["in_use_after_release_bytes"] = release(device)
    return result


def guarded(run: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """One engine's result, or its error: a failure must not lose the other engines' results
    (its memory is given back before the next one starts)."""
    try:
        return run(*args)
    except Exception as err:  # noqa: BLE001 (recorded in the result and printed)
        release(args[-2])
        return {"error": f"{type(err).__name__}: {err}"}


def release(device: torch.device) -> int | None:
    """Free the last engine's memory before the next one starts (its free-memory check
    counts whatever this process still holds); returns the device memory still in use."""
    gc.collect()
    if device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    return total - free


# -- report ------------------------------------------------------------------------------------

def format_table(result: dict[str, Any]) -> str:
    batches = result["batches"]
    head = (f"{'model':<14}{'variant':<14}" + "".join(f"{f'b={b} ms':>10}" for b in batches)
            + f"{'out tok/s':>11}{'weights MiB':>20}{'KV blocks':>20}")
    lines = [f"{result['gpu']} ({result['hardware']}), decode at context {result['context']}: "
             "forward ms (execute_model ms in the JSON); memory predicted / measured", head]
    for model, variants in result["models"].items():
        for variant, r in variants.items():
            lines.append(f"{model:<14}{variant:<14}" + _row(r, batches))
    return "\n".join(lines)


def _row(r: dict[str, Any], batches: list[int]) -> str:
    if "skipped" in r or "error" in r:
        return f"skipped: {r['skipped']}" if "skipped" in r else f"error: {r['error']}"
    ms = {d["batch"]: d.get("forward_ms") for d in r["decode"]}
    cells = "".join(f"{ms[b]:>10.3f}" if ms.get(b) is not None else f"{'-':>10}"
                    for b in batches)
    terms = r["memory"]["terms"]
    weights = "/".join(f"{terms['weights_bytes'][k] / MiB:.1f}" for k in PAIR)
    blocks = "/".join(str(terms["num_blocks"][k]) for k in PAIR)
    return f"{cells}{r['throughput']['output_tok_s']:>11.0f}{weights:>20}{blocks:>20}"


def progress(model: str, variant: str, run: dict[str, Any], elapsed: float) -> str:
    if "error" in run:
        return f"[{elapsed:5.0f} s] {model} {variant}: {run['error']}"
    rates = run["throughput"]["output_tok_s"]
    return (f"[{elapsed:5.0f} s] {model} {variant}: started in {run['startup_s']:.1f} s, "
            f"{rates:.0f} output tok/s")


def environment(device: torch.device, hardware: str, args: argparse.Namespace) -> dict:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"date": datetime.now(UTC).isoformat(timespec="seconds"), "gpu": gpu,
            "hardware": hardware, "torch": torch.__version__, "context": args.context,
            "batches": list(args.batches), "num_requests": args.num_requests,
            "max_input_len": args.max_input_len, "max_output_len": args.max_output_len}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    t0 = time.perf_counter()
    device = resolve_device(args.device)
    hardware = detect_hardware(args.hardware, device)
    bandwidth = copy_bandwidth() if device.type == "cuda" else None
    result = {**environment(device, hardware, args),
              "copy_bandwidth_GBps": bandwidth / 1e9 if bandwidth else None, "models": {}}
    for model in pick_models(args, hardware, device):
        runs = result["models"].setdefault(model, {})
        for variant in args.variants:
            if time.perf_counter() - t0 > args.budget_s:
                runs[variant] = {"skipped": f"past the {args.budget_s:.0f} s budget"}
                continue
            runs[variant] = guarded(run_engine, model, hardware, variant, args, device,
                                    bandwidth)
            print(progress(model, variant, runs[variant], time.perf_counter() - t0), flush=True)
    result["total_s"] = time.perf_counter() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(format_table(result))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
