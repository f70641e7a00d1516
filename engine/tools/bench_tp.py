"""Tensor parallelism on real devices: all-reduce calibration, memory per rank predicted beside
measured, nano-vllm's throughput bench, and a short replay beside the twin at three loads.

    python -m engine.tools.bench_tp --out outputs/bench/tp2_h100.json --write-profile  # 2 GPUs
    python -m engine.tools.bench_tp --device cpu --model tiny_qwen3 --dtype float32 \\
        --num-requests 8 --max-input-len 64 --max-output-len 16 --loads 2 4 8 --requests 12 \\
        --sizes 1024 65536 1048576 --out /tmp/tp_cpu.json                           # smoke

1. all-reduce: `--tp` processes (NCCL on GPUs, gloo on the CPU) time `dist.all_reduce` of
   model-dtype buffers of `--sizes` bytes, eagerly and (CUDA) replayed in a CUDA graph as the
   engine's decode graphs run them; the graph times (eager on the CPU) become an all-reduce
   profile (sim/collectives.py, "kvtwin-allreduce/1"); `--write-profile` stores it under
   sim/profiles/allreduce/<hardware>__tp<n>.json, where the twin then finds it.
2. memory: the engine at tensor_parallel_size=`--tp` (seeded random weights); every rank's
   measured terms and num_blocks beside the twin's per-rank prediction.
3. throughput: nano-vllm's bench (prompts of 100 to --max-input-len tokens, outputs of 100 to
   --max-output-len, temperature 0.6, EOS ignored), --num-requests all submitted at once.
4. validation: a Poisson chat trace of `--requests` requests at each of `--loads` rates
   (req/s) replayed on a fresh engine, and simulated by the twin (one rank's roofline + the
   all-reduces, from the profile of step 1): TTFT / TPOT / E2E p50 and p90 and throughput,
   predicted beside measured.
One JSON file (--out) holds everything; a summary prints at the end.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from engine.core.catalog import catalog_key, list_hardware, load_hardware, load_model
from engine.core.config import EngineConfig
from engine.runtime.distributed import close_tp, free_port, init_tp, rank_device
from engine.runtime.llm import LLM, LLMEngine
from engine.runtime.replay import records_frames, replay
from engine.tools import bench
from engine.tools.bench_quant import detect_hardware, resolve_device, synchronize
from reports.metrics import summarize, twin_metrics
from sim.collectives import AllReduceProfile, allreduce_profile_path
from sim.twin import resolve_entries, setup_tensor_parallel, simulate
from workloads import make_preset
from workloads.trace_requests import model_requests

TEMPERATURE = bench.NANOVLLM_TEMPERATURE
DEFAULT_SIZES = [1 << k for k in range(10, 27, 2)]  # 1 KiB .. 64 MiB
METRICS = ("ttft_p50_s", "ttft_p90_s", "tpot_p50_s", "tpot_p90_s", "e2e_p50_s", "e2e_p90_s",
           "output_throughput_tok_s", "request_throughput_req_s")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m engine.tools.bench_tp", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen3_8b")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--hardware", default="auto",
                   help="catalog node entry (auto: <gpu>_x8 by GPU name, or cpu)")
    p.add_argument("--dtype", default="bfloat16", choices=tuple(DTYPES))
    p.add_argument("--sizes", type=int, nargs="+", default=DEFAULT_SIZES,
                   help="all-reduce buffer sizes in bytes")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--max-input-len", type=int, default=1024)
    p.add_argument("--max-output-len", type=int, default=1024)
    p.add_argument("--loads", type=float, nargs="+", default=[2.0, 8.0, 16.0],
                   help="validation arrival rates (req/s)")
    p.add_argument("--requests", type=int, default=200, help="requests per validation load")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--cpu-memory-gib", type=float, default=0.25)
    p.add_argument("--write-profile", action="store_true",
                   help="store the all-reduce profile under sim/profiles/allreduce/")
    p.add_argument("--out", type=Path, default=Path("outputs/bench/tp.json"))
    return p.parse_args(argv)


def node_hardware(name: str, device: torch.device) -> str:
    """The multi-GPU catalog entry of this machine (h100_80gb -> h100_80gb_x8), or cpu."""
    key = detect_hardware(name, device)
    if device.type == "cpu" or name != "auto":
        return key
    node = f"{key}_x8"
    return node if node in list_hardware() else key


# -- 1. all-reduce ----------------------------------------------------------------------------

def measure_allreduce(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Every rank times the same all-reduces; rank 0's times come back."""
    ctx = torch.multiprocessing.get_context("spawn")
    results, port = ctx.SimpleQueue(), free_port()
    procs = [ctx.Process(target=_allreduce_rank, args=(rank, args.tp, port, device.type,
                                                       args.dtype, args.sizes, args.iters,
                                                       results))
             for rank in range(args.tp)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    if any(proc.exitcode for proc in procs):
        raise RuntimeError(f"all-reduce ranks exited with {[p.exitcode for p in procs]}")
    return results.get()


def _allreduce_rank(rank: int, size: int, port: int, device_type: str, dtype: str,
                    sizes: list[int], iters: int, results: Any) -> None:
    device = rank_device(torch.device(device_type), rank)
    group = init_tp(rank, size, port, device)
    rows = []
    for nbytes in sizes:
        x = torch.ones(max(1, nbytes // DTYPES[dtype].itemsize), dtype=DTYPES[dtype],
                       device=device)
        row = {"bytes": x.numel() * x.element_size(),
               "eager_s": _time_eager(x, group, iters, device)}
        if device.type == "cuda":
            row["graph_s"] = _time_graph(x, group, iters, device)
        rows.append(row)
    if rank == 0:
        results.put({"tp": size, "device": device_type, "dtype": dtype, "rows": rows})
    close_tp()


def _time_eager(x: torch.Tensor, group: Any, iters: int, device: torch.device) -> float:
    for _ in range(5):
        dist.all_reduce(x, group=group.device_group)
    synchronize(device)
    dist.barrier(group=group.cpu_group)
    start = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(x, group=group.device_group)
    synchronize(device)
    return (time.perf_counter() - start) / iters


def _time_graph(x: torch.Tensor, group: Any, iters: int, device: torch.device) -> float:
    """All-reduces captured in one CUDA graph (as in the engine's decode graphs)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            dist.all_reduce(x, group=group.device_group)
    graph.replay()
    synchronize(device)
    dist.barrier(group=group.cpu_group)
    start = time.perf_counter()
    graph.replay()
    synchronize(device)
    return (time.perf_counter() - start) / iters


def allreduce_profile(measured: dict[str, Any], hardware: str) -> Any:
    key = "graph_s" if measured["device"] == "cuda" else "eager_s"
    rows = measured["rows"]
    return AllReduceProfile(measured["tp"], tuple(float(r["bytes"]) for r in rows),
                            tuple(r[key] for r in rows), hardware, measured["dtype"],
                            {"measured": datetime.now(UTC).isoformat(timespec="seconds"),
                             "timing": key, "tool": "engine.tools.bench_tp"})


# -- 2-4. the engine --------------------------------------------------------------------------

def engine_config(args: argparse.Namespace, device: torch.device) -> EngineConfig:
    return EngineConfig(dtype=args.dtype, device=device.type, tensor_parallel_size=args.tp,
                        max_model_len=args.max_input_len + args.max_output_len,
                        gpu_memory_utilization=args.gpu_memory_utilization,
                        cpu_memory_gib=args.cpu_memory_gib).validate(load_model(args.model))


def twin_setup(args: argparse.Namespace, hardware: str, config: EngineConfig,
               profile_dir: Path) -> Any:
    model, hw, keys = resolve_entries(args.model, hardware)
    return setup_tensor_parallel(model, hw, config, "auto", keys, profile_dir)


def memory_by_rank(llm: Any, predicted: Any) -> dict[str, Any]:
    ranks = llm.memory_report().get("rank_memory", [])
    terms = ("weights_bytes", "activation_peak_bytes", "non_torch_bytes", "cuda_graph_bytes",
             "kv_cache_bytes", "bytes_per_block", "num_blocks")
    twin = predicted.to_dict()
    return {"num_blocks": {"predicted": predicted.num_blocks, "measured": llm.num_blocks},
            "rank_num_blocks": {"predicted": predicted.rank_num_blocks,
                                "measured": [r["num_blocks"] for r in ranks]},
            "ranks": [{t: {"predicted": twin.get(t) if i == predicted.parallel["min_rank"]
                           else None, "measured": r.get(t)} for t in terms} for i, r in
                      enumerate(ranks)],
            "sources": predicted.sources, "parallel": predicted.parallel}


def validation_load(args: argparse.Namespace, config: EngineConfig, setup: Any,
                    rate: float) -> dict[str, Any]:
    """One load: the same trace replayed on the engine and simulated by the twin."""
    trace = make_preset("poisson_chat", n=args.requests, rate=rate)
    requests = model_requests(trace, setup.model.vocab_size)
    predicted = twin_metrics(simulate(setup, requests))
    with LLMEngine(load_model(args.model), config) as engine:
        result = replay(engine, list(requests))
        num_blocks = engine.num_blocks
    measured = summarize(*records_frames(result), num_blocks=num_blocks)
    return {"rate_req_s": rate, "requests": args.requests,
            "metrics": {m: {"predicted": predicted.get(m), "measured": measured.get(m)}
                        for m in METRICS}}


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(args.device)
    hardware = node_hardware(args.hardware, device)
    key = catalog_key("hardware", hardware)
    result: dict[str, Any] = {"model": args.model, "tp": args.tp, "hardware": key,
                              "device": device.type, "dtype": args.dtype,
                              "started": datetime.now(UTC).isoformat(timespec="seconds")}
    measured = measure_allreduce(args, device)
    profile = allreduce_profile(measured, key)
    result["allreduce"] = {"measured": measured, "profile": profile.to_dict()}
    profile_dir = args.out.parent / "allreduce"
    profile.save(allreduce_profile_path(key, args.tp, profile_dir))
    if args.write_profile:
        result["allreduce"]["written"] = str(profile.save(allreduce_profile_path(key, args.tp)))
    config = engine_config(args, device)
    setup = twin_setup(args, hardware, config, profile_dir)
    start = time.perf_counter()
    with LLM(load_model(args.model), config) as llm:
        result["startup_s"] = time.perf_counter() - start
        result["memory"] = memory_by_rank(llm, setup.memory)
        result["throughput"] = bench.nanovllm_throughput(
            llm, args.num_requests, args.max_input_len, args.max_output_len)
    result["predictor"] = setup.predictor
    result["validation"] = [validation_load(args, config, setup, rate) for rate in args.loads]
    result["hardware_catalog"] = load_hardware(hardware).name
    return result


def format_summary(result: dict[str, Any]) -> str:
    mem = result["memory"]
    lines = [f"{result['model']} at TP={result['tp']} on {result['hardware']}",
             f"  num_blocks   predicted {mem['num_blocks']['predicted']:,} measured "
             f"{mem['num_blocks']['measured']:,}; by rank predicted "
             f"{mem['rank_num_blocks']['predicted']} measured {mem['rank_num_blocks']['measured']}",
             f"  throughput   {result['throughput']['output_tok_s']:,.0f} output tok/s"]
    rows = result["allreduce"]["profile"]
    lines.append("  all-reduce   " + ", ".join(
        f"{int(b):,} B {s * 1e6:.1f} us" for b, s in zip(rows["sizes_bytes"], rows["seconds"],
                                                         strict=True)))
    for load in result["validation"]:
        m = load["metrics"]
        lines.append(f"  {load['rate_req_s']:g} req/s  " + "  ".join(
            f"{k} {_fmt(v['predicted'])}/{_fmt(v['measured'])}" for k, v in m.items()
            if k.endswith("p50_s")))
    return "\n".join(lines)


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v * 1e3:.1f}ms"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(format_summary(result))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
