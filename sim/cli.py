"""`python -m sim`: simulate a workload and print its metrics and capacity plan.

    python -m sim --workload poisson_chat --model qwen3_0_6b --hardware h100_80gb
    python -m sim --set block_size=32 --set max_model_len=8192 --out outputs/sim1
    python -m sim capacity --model mistral_7b_v0_3 --hardware l4_24gb \\
        --set gpu_memory_utilization=0.7 --set max_model_len=2048
    python -m sim capacity --vllm-log server.log --model qwen3_0_6b --hardware h100_80gb \\
        --set gpu_memory_utilization=0.5      # what-ifs on the terms a vLLM server measured
"""

from __future__ import annotations

import argparse
import json
import time
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any

from engine.core.catalog import list_hardware, list_models
from engine.core.config import ConfigError, EngineConfig
from reports.metrics import twin_metrics
from sim.capacity import format_plan, plan_capacity
from sim.twin import PREDICTORS, TwinRun, setup_twin, simulate
from workloads import PRESETS, make_preset, read_trace
from workloads.trace_requests import model_requests


def parse_engine_overrides(pairs: list[str]) -> EngineConfig:
    """`key=value` pairs typed by EngineConfig's fields; unknown keys name the field."""
    hints = typing.get_type_hints(EngineConfig)
    values: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise ConfigError("--set", pair, "key=value")
        if key not in hints:
            names = ", ".join(f.name for f in fields(EngineConfig))
            raise ConfigError(key, raw, f"an EngineConfig field: {names}")
        values[key] = _typed(key, raw, hints[key])
    return EngineConfig(**values)


def _typed(key: str, raw: str, hint: Any) -> Any:
    if raw.lower() in ("none", "null") and type(None) in typing.get_args(hint):
        return None
    base = next((t for t in (bool, int, float, str) if t is hint or t in typing.get_args(hint)),
                str)
    try:
        if base is bool:
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return raw.lower() in ("true", "1")
        return base(raw)
    except ValueError:
        raise ConfigError(key, raw, f"a {base.__name__}") from None


def load_workload(name: str, overrides: list[str]):
    if Path(name).is_file():
        return read_trace(name)
    if name not in PRESETS:
        raise ValueError(f"workload={name!r} is invalid: must be a trace file or one of "
                         f"{', '.join(PRESETS)}")
    params = {k: _literal(v) for k, v in (p.split("=", 1) for p in overrides)}
    return make_preset(name, **params)


def _literal(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sim", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", default="simulate",
                        choices=["simulate", "capacity"])
    parser.add_argument("--workload", default="poisson_chat",
                        help=f"a trace file or a preset: {', '.join(PRESETS)}")
    parser.add_argument("--workload-set", action="append", default=[], metavar="K=V",
                        help="preset parameter override, e.g. n=500")
    parser.add_argument("--model", default="qwen3_0_6b", help=", ".join(list_models()))
    parser.add_argument("--hardware", default="h100_80gb", help=", ".join(list_hardware()))
    parser.add_argument("--set", action="append", default=[], metavar="K=V",
                        help="EngineConfig field, e.g. block_size=32")
    parser.add_argument("--predictor", default="auto", choices=PREDICTORS)
    parser.add_argument("--no-skip", action="store_true", help="single-step every step")
    parser.add_argument("--mean-len", type=float, help="capacity: mean request length")
    parser.add_argument("--vllm-log", type=Path,
                        help="capacity: a vLLM server's start-up log; its measured memory "
                        "terms replace the predicted ones (docs/http.md)")
    parser.add_argument("--out", type=Path, help="write requests/steps parquet + summary.json")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = parse_engine_overrides(args.set)
        setup = setup_twin(args.model, args.hardware, config, args.predictor)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}")
        return 2
    if args.command == "capacity" and args.vllm_log:
        return _capacity_from_log(args, setup)
    if args.command == "capacity":
        plan = plan_capacity(setup.model, setup.hardware, config, setup.profile, args.mean_len,
                             setup.memory)
        print(json.dumps(plan.to_dict(), indent=1) if args.json else
              format_plan(plan, setup.memory))
        return 0 if plan.starts else 1
    return _simulate(args, setup)


def _capacity_from_log(args: argparse.Namespace, setup) -> int:
    from sim.vllm_log import format_log_terms, log_config, parse_vllm_log, vllm_what_if

    log = parse_vllm_log(args.vllm_log.read_text(errors="replace"))
    given = {pair.partition("=")[0] for pair in args.set}
    own = log_config(log, setup.config, set())  # the settings the server ran with
    try:
        config = log_config(log, setup.config, given).validate(setup.model)
        memory = vllm_what_if(log, setup.model, setup.hardware, config)
        reproduced = vllm_what_if(log, setup.model, setup.hardware, own).num_blocks
    except ValueError as err:
        print(f"error: {err}")
        return 2
    plan = plan_capacity(setup.model, setup.hardware, config, None, args.mean_len, memory)
    if args.json:
        print(json.dumps({"log": log.to_dict(), "memory": memory.to_dict(),
                          "plan": plan.to_dict()}, indent=1))
    else:
        logged = "-" if log.kv_cache_tokens is None else f"{log.kv_cache_tokens:,}"
        print(format_log_terms(log))
        print(f"  kvtwin on these terms at the log's own settings: "
              f"{reproduced * own.block_size:,} KV tokens (the log: {logged})")
        print(format_plan(plan, memory))
    return 0 if plan.starts else 1


def _simulate(args: argparse.Namespace, setup) -> int:
    trace = load_workload(args.workload, args.workload_set)
    requests = model_requests(trace, setup.model.vocab_size)
    start = time.perf_counter()
    run = simulate(setup, requests, skip=not args.no_skip)
    wall = time.perf_counter() - start
    metrics = twin_metrics(run)
    if args.out:
        write_records(run, metrics, args.out)
    if args.json:
        print(json.dumps(run.summary(metrics), indent=1))
        return 0
    print(format_plan(run.capacity, setup.memory))
    print(format_metrics(run, metrics, wall))
    return 0


def write_records(run: TwinRun, metrics: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    run.requests.to_parquet(out / "requests.parquet", index=False)
    run.steps.to_parquet(out / "steps.parquet", index=False)
    (out / "summary.json").write_text(json.dumps(run.summary(metrics), indent=1) + "\n")


def format_metrics(run: TwinRun, m: dict[str, Any], wall_s: float) -> str:
    simulated = float(run.steps["end_s"].max()) if len(run.steps) else 0.0
    lines = [f"predictor      {run.setup.predictor['kind']}: {run.setup.predictor['source']}",
             f"requests       {m['completed']} completed, {m['rejected']} rejected, "
             f"{m['total_preemptions']} preemptions"]
    for name in ("ttft", "tpot", "itl", "e2e"):
        vals = [m.get(f"{name}_{p}_s") for p in ("p50", "p90", "p99")]
        lines.append(f"{name.upper():<14} " + "  ".join(
            f"{p} {_ms(v)}" for p, v in zip(("p50", "p90", "p99"), vals, strict=True)))
    lines += [
        f"throughput     {_num(m.get('request_throughput_req_s'))} req/s, "
        f"{_num(m.get('output_throughput_tok_s'))} output tok/s",
        f"KV usage       peak {_num(m.get('kv_usage_peak'), 3)}, max concurrency "
        f"{m.get('max_concurrency')}, prefix hit rate {_num(m.get('prefix_cache_hit_rate'), 3)}",
        f"simulated      {simulated:,.1f} s in {wall_s:,.2f} s wall "
        f"({simulated / wall_s if wall_s else 0:,.0f}x real time), {len(run.steps):,} steps",
    ]
    return "\n".join(lines)


def _ms(v: float | None) -> str:
    return "n/a" if v is None else f"{1000 * v:,.1f} ms"


def _num(v: float | None, digits: int = 2) -> str:
    return "n/a" if v is None else f"{v:,.{digits}f}"
