"""Plan a validation sweep before it takes GPU time: saturation, load rates, wall time.

    python -m reports.validation.plan estimate +sweep=h100_validation [overrides ...]
    python -m reports.validation.plan saturation model=qwen3_0_6b hardware=h100_80gb \\
        workload=validation/h100_chat_p70
    python -m reports.validation.plan set-rates --prefix h100 --saturation 42.0 \\
        [--sim-saturation] model=qwen3_0_6b hardware=h100_80gb

- `estimate` lists every point of a sweep (the sweep's `hydra.sweeper.params` with the
  command line's overrides replacing a swept key, as Hydra's basic sweeper does), simulates
  each one with the twin (no torch) and prints the estimated wall time of each point:
  start-up + the predicted replay time (first arrival to last finish) + the sim and report
  overhead; a point that cannot start costs only a failed start-up. Then the total, and a
  split into chunks that each fit one GPU command.
- `saturation` predicts a workload's saturation rate: the request throughput of the same
  trace offline (every arrival at t = 0), simulated.
- `set-rates` rewrites the validation workload files `conf/workload/validation/<prefix>_*.yaml`
  so each runs at its load fraction (`LOADS`) of its saturation rate, with about
  `--arrivals-s` seconds of arrivals. `--saturation` is the measured saturation rate of the
  chat workload (requests/s); the other workloads' saturation rates are the sim's scaled by
  measured / simulated for chat.

The per-point start-up times are estimates (a GPU point starts a fresh process: Python +
torch import, model build, memory profiling, CUDA-graph capture); pass what a first chunk
measured (`python -m reports.validation.collect` prints it) to refine them.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from conf.compose import compose_config, container, engine_config, load_workload
from engine.core.catalog import Hardware, model_from_dict
from engine.core.config import EngineConfig
from reports.metrics import twin_metrics
from sim.memory_model import predict_memory
from sim.twin import setup_twin, simulate
from workloads.schema import Trace
from workloads.trace_requests import model_requests

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
WORKLOAD_DIR = CONF / "workload" / "validation"
AZURE_WINDOW = "conf/workload/validation/azure_llm_2023_conv_first600s.csv"
CHUNK_S = 540.0  # one GPU command is 10 minutes: leave room for installs and the tarball


@dataclass(frozen=True)
class Load:
    """A validation workload file: which preset, and at what fraction of its saturation."""

    stem: str
    preset: str
    fraction: float
    what: str
    arrivals_share: float = 1.0  # of --arrivals-s


LOADS = (
    Load("chat_p30", "poisson_chat", 0.3, "chat at 30 % of saturation"),
    Load("chat_p70", "poisson_chat", 0.7, "chat at 70 % of saturation"),
    Load("chat_p90", "poisson_chat", 0.9, "chat at 90 % of saturation"),
    Load("shared_prefix", "shared_prefix", 0.7, "shared system prompts at 70 % of saturation"),
    Load("azure", "azure_conv", 0.7, "an Azure conversation window at 70 % of saturation"),
    Load("grid", "poisson_chat", 0.9, "chat at 90 % of saturation, short (the memory grid)",
         1 / 3),
)


@dataclass(frozen=True)
class Overheads:
    """Seconds per point besides the replay itself (estimates unless measured)."""

    startup_s: float
    fail_s: float
    post_s: float

    @classmethod
    def default(cls, gpu: bool) -> Overheads:
        # GPU: fresh process (Python + torch/CUDA import ~5 s), model build and memory
        # profiling (~3 s), CUDA-graph capture (~5-10 s). CPU (same process): measured on the
        # 2-core dev machine, tiny_qwen3: ~1.5 s start-up, ~1 s sim + records + page.
        return cls(20.0, 12.0, 3.0) if gpu else cls(1.5, 1.0, 1.5)


# -- sweep points ---------------------------------------------------------------------------

def split_override(text: str) -> tuple[str, list[str]]:
    if "=" not in text:
        raise ValueError(f"override {text!r} is invalid: must be key=value[,value...]")
    key, value = text.split("=", 1)
    return key, [v.strip() for v in value.split(",")]


def sweep_points(overrides: list[str]) -> list[list[str]]:
    """Every point of the sweep selected by `overrides` (`+sweep=...` among them), as the
    override list that composes it: swept keys from the sweep file, replaced by the command
    line's value list for the same key."""
    base = [o for o in overrides if o.startswith("+sweep=")]
    cfg = compose_config(base)
    params = {str(k): [v.strip() for v in str(v).split(",")]
              for k, v in (cfg.hydra.sweeper.params or {}).items()}
    fixed = []
    for text in overrides:
        if text in base:
            continue
        key, values = split_override(text)
        if key in params or len(values) > 1:
            params[key] = values
        else:
            fixed.append(text)
    grid = [[f"{k}={v}" for v in vals] for k, vals in params.items()]
    return [base + fixed + list(point) for point in itertools.product(*grid)]


# -- simulation -----------------------------------------------------------------------------

def simulate_point(cfg: DictConfig, offline: bool = False) -> dict[str, Any]:
    """The twin's prediction for one composed config (roofline when no profile exists yet)."""
    config = engine_config(cfg)
    keys = (cfg.hydra.runtime.choices.get("model"), cfg.hydra.runtime.choices.get("hardware")) \
        if "hydra" in cfg else (None, None)
    try:
        setup = setup_twin(container(cfg.model), container(cfg.hardware), config,
                           cfg.predictor, keys=keys)
    except FileNotFoundError:
        setup = setup_twin(container(cfg.model), container(cfg.hardware), config,
                           "roofline", keys=keys)
    trace = load_workload(cfg)
    if offline:
        trace = offline_trace(trace)
    run = simulate(setup, model_requests(trace, setup.model.vocab_size))
    return {"starts": setup.memory.starts, "predictor": setup.predictor,
            "metrics": twin_metrics(run), "gpu": setup.hardware.kind != "cpu",
            "arrival_span_s": float(trace.df["arrival_s"].max()) if len(trace.df) else 0.0}


def offline_trace(trace: Trace) -> Trace:
    return Trace(trace.df.assign(arrival_s=0.0), trace.meta)


def saturation(overrides: list[str]) -> tuple[float, str]:
    """Predicted saturation (requests/s): the workload's trace offline, simulated; and the
    step-time model that predicted it."""
    sim = simulate_point(compose_config(overrides), offline=True)
    return float(sim["metrics"].get("request_throughput_req_s") or 0.0), sim["predictor"]["kind"]


# -- wall time ------------------------------------------------------------------------------

@dataclass
class PointEstimate:
    overrides: list[str]
    starts: bool
    replay_s: float
    seconds: float
    predictor: str
    preemptions: int = 0


def estimate_point(overrides: list[str], overheads: Overheads | None) -> PointEstimate:
    cfg = compose_config(overrides)
    sim = simulate_point(cfg)
    o = overheads or Overheads.default(sim["gpu"])
    replay = float(sim["metrics"].get("duration_s") or 0.0)
    seconds = o.startup_s + replay + o.post_s if sim["starts"] else o.fail_s + o.post_s
    return PointEstimate(overrides, sim["starts"], replay, seconds, sim["predictor"]["kind"],
                         int(sim["metrics"].get("total_preemptions") or 0))


def print_estimate(estimates: list[PointEstimate], limit_s: float) -> None:
    swept = _varying(estimates)
    for i, e in enumerate(estimates):
        point = " ".join(o for o in e.overrides if o.split("=")[0] in swept)
        verdict = f"replay {e.replay_s:6.1f} s" if e.starts else "cannot start"
        print(f"{i:4d}  {point:<72}  {verdict:<18} {e.preemptions:6d} preempt.  "
              f"~{e.seconds:5.0f} s  ({e.predictor})")
    total = sum(e.seconds for e in estimates)
    print(f"total: {len(estimates)} points, ~{total:.0f} s = {total / 60:.1f} min "
          f"({sum(not e.starts for e in estimates)} cannot start)")
    for key in sorted(swept):
        commands = split_by(estimates, key, limit_s)
        if commands:
            print(f"split by {key} into {len(commands)} command(s) under {limit_s:.0f} s: "
                  + " | ".join(f"{key}={values} (~{secs:.0f} s)" for values, secs in commands))


def split_by(estimates: list[PointEstimate], key: str,
             limit_s: float) -> list[tuple[str, float]] | None:
    """Values of `key` packed greedily into commands whose estimates stay under `limit_s`
    (None if one value alone is over it)."""
    totals: dict[str, float] = {}
    for e in estimates:
        value = next(o.partition("=")[2] for o in e.overrides if o.partition("=")[0] == key)
        totals[value] = totals.get(value, 0.0) + e.seconds
    if max(totals.values()) > limit_s:
        return None
    commands: list[tuple[list[str], float]] = []
    for value, secs in totals.items():
        if commands and commands[-1][1] + secs <= limit_s:
            commands[-1] = (commands[-1][0] + [value], commands[-1][1] + secs)
        else:
            commands.append(([value], secs))
    return [(",".join(values), secs) for values, secs in commands]


def _varying(estimates: list[PointEstimate]) -> set[str]:
    values: dict[str, set[str]] = {}
    for e in estimates:
        for o in e.overrides:
            key, _, value = o.partition("=")
            values.setdefault(key, set()).add(value)
    return {k for k, v in values.items() if len(v) > 1}


def arrival_span(workload: DictConfig) -> float | None:
    params = workload.params or {}
    if workload.path:
        return None
    if workload.name == "azure_conv":
        return float(params.get("duration_s", 600.0)) / float(params.get("rate_scale", 1.0))
    if "n" in params and "rate" in params:
        return float(params["n"]) / float(params["rate"])
    return None


class SweepEstimate(Callback):
    """At the start of a multirun: a quick wall-time estimate of every point (start-up +
    arrival span x 1.3 + post; a point whose memory cannot start: a failed start-up), so
    that a sweep that cannot finish in one GPU command is visible before it runs."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            points = multirun_points(config)
            gpu = container(config.hardware).get("kind") != "cpu"
            total = sum(quick_point_seconds(config, p, gpu) for p in points)
            print(f"sweep estimate: {len(points)} points, ~{total:.0f} s = {total / 60:.1f} "
                  f"min (start-up {Overheads.default(gpu).startup_s:g} s per point assumed; "
                  "python -m reports.validation.plan estimate ... simulates each point)",
                  flush=True)
        except Exception as err:  # an estimate must never stop a sweep
            print(f"sweep estimate unavailable: {err}", file=sys.stderr, flush=True)


def multirun_points(config: DictConfig) -> list[dict[str, str]]:
    """The points of a running multirun: its sweeper params, command-line lists winning."""
    params = {str(k): [v.strip() for v in str(v).split(",")]
              for k, v in (config.hydra.sweeper.params or {}).items()}
    for text in config.hydra.overrides.task:
        key, values = split_override(text)
        if key in params or len(values) > 1:
            params[key] = values
    keys = list(params)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*params.values())]


def quick_point_seconds(config: DictConfig, point: dict[str, str], gpu: bool) -> float:
    o = Overheads.default(gpu)
    if not point_starts(config, point):
        return o.fail_s + o.post_s
    choice = point.get("workload")
    workload = OmegaConf.load(CONF / "workload" / f"{choice}.yaml") if choice else \
        config.workload
    span = arrival_span(workload)
    return o.startup_s + (span * 1.3 if span is not None else 60.0) + o.post_s


def point_starts(config: DictConfig, point: dict[str, str]) -> bool:
    """The memory model's verdict for the point's engine settings (no step-time model)."""
    engine = container(config.engine)
    for key, value in point.items():
        if key.startswith("engine."):
            engine[key.removeprefix("engine.")] = _yaml_value(value)
    memory = predict_memory(model_from_dict(container(config.model)),
                            Hardware.from_dict(container(config.hardware)),
                            EngineConfig.from_kwargs(**engine))
    return memory.starts


def _yaml_value(text: str) -> Any:
    return yaml.safe_load(text) if text else text


# -- load rates -----------------------------------------------------------------------------

def workload_file(prefix: str, load: Load) -> Path:
    return WORKLOAD_DIR / f"{prefix}_{load.stem}.yaml"


def render_workload(load: Load, rate: float, saturation_rate: float, arrivals_s: float,
                    note: str) -> str:
    """The YAML of one validation workload at `rate` requests/s."""
    head = [f"# Validation workload: {load.what}.",
            f"# rate = {load.fraction} x saturation ({saturation_rate:.3f} req/s: {note});",
            f"# about {arrivals_s:g} s of arrivals. Rewritten by",
            "#   python -m reports.validation.plan set-rates (see its --help).",
            f"name: {load.preset}", "path: null", "params:"]
    if load.preset == "azure_conv":
        scale = rate / azure_native_rate()
        body = [f"  path: {AZURE_WINDOW}", "  start_s: 0.0",
                f"  duration_s: {arrivals_s * scale:.1f}", f"  rate_scale: {scale:.4f}",
                "  max_model_len: ${engine.max_model_len}  # cap to the point's length",
                "  too_long: cap", "  seed: 0"]
    else:
        body = [f"  'n': {max(1, round(rate * arrivals_s))}", f"  rate: {rate:.4f}"]
        if load.preset == "shared_prefix":
            body += ["  num_groups: 16", "  prefix_len: 1024", "  zipf_s: 1.1"]
        body.append("  seed: 0")
    return "\n".join(head + body) + "\n"


def azure_native_rate() -> float:
    """Requests per second of the committed Azure window (its own time axis)."""
    t = pd.to_datetime(pd.read_csv(ROOT / AZURE_WINDOW, usecols=["TIMESTAMP"])["TIMESTAMP"])
    return len(t) / max((t.max() - t.min()).total_seconds(), 1e-9)


SATURATION_SAMPLE = {"poisson_chat": ["workload.params.n=400"],
                     "shared_prefix": ["workload.params.n=400"],
                     "azure_conv": ["workload.params.duration_s=600",
                                    "workload.params.rate_scale=1.0"]}


def workload_saturation(prefix: str, load: Load, base: list[str]) -> tuple[float, str]:
    """Predicted saturation of a validation workload, on enough requests to be steady."""
    return saturation(base + [f"workload=validation/{prefix}_{load.stem}",
                              *SATURATION_SAMPLE[load.preset]])


def set_rates(prefix: str, saturation_rate: float | None, arrivals_s: float,
              base: list[str]) -> list[Path]:
    """Rewrite `<prefix>_*.yaml` at each load's fraction of its saturation rate."""
    chat = next(load for load in LOADS if load.preset == "poisson_chat")
    chat_sim, kind = workload_saturation(prefix, chat, base)
    measured = saturation_rate or chat_sim
    source = "measured" if saturation_rate else f"predicted by the sim ({kind})"
    written = []
    for load in LOADS:
        if load.preset == "poisson_chat":
            sat, note = measured, source
        else:
            sat = workload_saturation(prefix, load, base)[0] * measured / chat_sim
            note = source if not saturation_rate else \
                f"the sim's x {measured / chat_sim:.3f} (chat measured / chat simulated)"
        path = workload_file(prefix, load)
        path.write_text(render_workload(load, load.fraction * sat, sat,
                                        arrivals_s * load.arrivals_share, note))
        written.append(path)
    return written


# -- command line ---------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m reports.validation.plan",
                                description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    est = sub.add_parser("estimate", help="wall time of every point of a sweep")
    est.add_argument("--startup-s", type=float, default=None)
    est.add_argument("--fail-s", type=float, default=None)
    est.add_argument("--post-s", type=float, default=None)
    est.add_argument("--chunk-s", type=float, default=CHUNK_S)
    sat = sub.add_parser("saturation", help="predicted saturation rate of a workload")
    rates = sub.add_parser("set-rates", help="rewrite the validation workload files")
    rates.add_argument("--prefix", required=True, help="h100 or cpu")
    rates.add_argument("--saturation", type=float, default=None,
                       help="measured chat saturation (req/s); default: the sim's")
    rates.add_argument("--arrivals-s", type=float, default=15.0)
    for parser in (est, sat, rates):
        parser.add_argument("overrides", nargs="*", help="Hydra overrides")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "saturation":
        rate, kind = saturation(args.overrides)
        print(f"{rate:.3f} requests/s (predicted offline, {kind} step times)")
    elif args.command == "set-rates":
        for path in set_rates(args.prefix, args.saturation, args.arrivals_s, args.overrides):
            print(path)
    else:
        over = None if args.startup_s is None else Overheads(
            args.startup_s, args.fail_s or args.startup_s / 2, args.post_s or 3.0)
        points = sweep_points(args.overrides)
        print(f"{len(points)} points; simulating each ...", flush=True)
        print_estimate([estimate_point(p, over) for p in points], args.chunk_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
