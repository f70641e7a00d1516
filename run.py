"""kvtwin's front door: predict (mode=sim), measure (mode=real), compare (mode=both), serve,
calibrate, bench.

    python run.py                                   # simulate the default workload, write a report
    python run.py engine.block_size=32 workload=shared_prefix
    python run.py -m engine.block_size=8,16,32 engine.gpu_memory_utilization=0.5,0.7,0.9
    python run.py mode=both model=tiny_qwen3 hardware=cpu engine=cpu_tiny
    python run.py mode=serve model=tiny_qwen3 engine=cpu_tiny serve.port=8000
    python run.py mode=real target=http endpoint=http://127.0.0.1:8000 workload=poisson_chat
    python run.py mode=bench workload=nanovllm_bench +bench.hf_requests=64
    python run.py mode=calibrate model=tiny_qwen3 hardware=cpu engine=cpu_tiny

Each run writes summary.json, requests.parquet, steps.parquet and report.html into Hydra's
output folder. A run that cannot start is a recorded result. An expected error (a bad value,
a bad trace, a missing file) prints one line naming it and exits with 2 (the traceback with
--debug or HYDRA_FULL_ERROR=1); any other failure is recorded with its traceback, and in a
sweep the sweep goes on. SIGINT and SIGTERM keep what was done, marked interrupted; a second
signal exits at once. `+resume=true` in a sweep keeps the points that finished.

The module front ends (`python -m sim`, `python -m engine.tools.*`) compose their
configuration through Hydra too (`conf.compose`), so an EngineConfig is built one way.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import sys
import time
import traceback
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig
from tqdm.auto import tqdm

from conf.compose import compose_config, container, engine_config, load_workload
from conf.schema import MODES, TARGETS, register
from engine.core.catalog import model_from_dict
from engine.core.config import EngineConfig
from engine.core.memory import StartupError
from reports.bands import SimBands, start_bands
from reports.console import console_summary, format_metrics
from reports.html import EMBED, ensure_plotly_js
from reports.hydra_callback import sweep_exit_code
from reports.metrics import requests_frame, steps_frame, summarize, twin_metrics
from reports.run_folder import SUMMARY, StepsWriter, write_run, write_summary
from reports.run_page import write_run_page
from reports.timeline import KvTimelines
from reports.twin_run import run_twin
from sim.capacity import format_plan, plan_capacity
from sim.twin import setup_twin, simulate
from sim.vllm_log import format_log_terms, log_config, parse_vllm_log, vllm_what_if
from workloads import trace_source
from workloads.trace_requests import model_requests

register()

Records = dict[str, tuple[Any, Any]]
EXPECTED = (ValueError, OSError)  # bad values, bad traces, missing files: one line, exit 2
FINAL = ("ok", "cannot_start")    # a point that ended with one of these is kept on resume
BENCH_FILE = "bench.json"


# -- signals ------------------------------------------------------------------------------------

class Signals:
    """SIGINT and SIGTERM alike. The first asks the run to stop: a phase that polls
    (`polling`) stops between two steps and keeps its records; any other phase gets a
    KeyboardInterrupt. A second signal exits at once; the folder stays consistent (files are
    whole or named .partial / .tmp)."""

    def __init__(self) -> None:
        self.received: str | None = None
        self.polling = False

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:
            os._exit(128 + signum)
        self.received = signal.Signals(signum).name
        if not self.polling:
            raise KeyboardInterrupt(self.received)

    def stop_requested(self) -> bool:
        return self.received is not None

    @contextmanager
    def installed(self) -> Iterator[Signals]:
        old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)

    @contextmanager
    def poll(self) -> Iterator[None]:
        self.polling = True
        try:
            yield
        finally:
            self.polling = False


# -- one run (one sweep point) ---------------------------------------------------------------

@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    code = run_point(cfg)
    if code == 130 and _in_sweep():  # a signal stops the sweep, not only its point
        where = HydraConfig.get().sweep.dir
        print(f"interrupted: the finished points are in {where}; resume with the same "
              f"command and hydra.sweep.dir={where} +resume=true, or rebuild its report "
              f"with python -m reports {where}", file=sys.stderr)
    if code and (code == 130 or not _in_sweep()):  # a failed point: the sweep goes on
        sys.exit(code)


def run_point(cfg: DictConfig) -> int:
    out = Path(HydraConfig.get().runtime.output_dir)
    if cfg.get("resume") and _finished(out):
        print(f"[kept] {out}")
        return 0
    base = {"mode": cfg.mode, "config": _config_summary(cfg), "sim": None, "real": None,
            "error": None, "error_type": None}
    write_summary(out, {**base, "status": "running"})
    timelines = KvTimelines()  # the page's, drawn as the steps are written
    steps, signals = StepsWriter(out, observe=timelines.add), Signals()
    with signals.installed():
        try:
            summary, records = run_mode(cfg, steps, signals)
        except KeyboardInterrupt:
            summary, records = _interrupted(signals.received or "SIGINT"), {}
        except Exception as err:
            return _failure(cfg, out, base, err, steps)
    _record(out, {**base, **summary}, records, steps, timelines)
    return 130 if summary["status"] == "interrupted" else 0


def _failure(cfg: DictConfig, out: Path, base: dict[str, Any], err: Exception,
             steps: StepsWriter) -> int:
    """Recorded (a small summary, no page) and said in one line; the traceback is in
    summary.json, and printed with --debug."""
    expected = isinstance(err, EXPECTED)
    write_run(out, _failed(base, err, expected), None, steps)
    print(f"error: {err}" if expected else f"failed: {type(err).__name__}: {err} "
          f"(traceback in {out / SUMMARY})", file=sys.stderr)
    if _debug():
        traceback.print_exception(err)
    return 2 if expected else 1


def _interrupted(name: str) -> dict[str, Any]:
    return {"status": "interrupted", "error": f"interrupted ({name})",
            "error_type": "Interrupted"}


def run_mode(cfg: DictConfig, steps: StepsWriter,
             signals: Signals) -> tuple[dict[str, Any], Records]:
    if cfg.mode not in (*MODES, "bench"):
        raise ValueError(f"mode={cfg.mode!r} is invalid: must be one of "
                         f"{', '.join((*MODES, 'bench'))}")
    if cfg.fail_point:
        raise RuntimeError("fail_point=true: this point fails on purpose")
    if cfg.mode in MODE_RUNNERS:
        return MODE_RUNNERS[cfg.mode](cfg)
    setup, requests, source = prepare(cfg)
    summary: dict[str, Any] = {"status": "ok", "trace": source}
    records: Records = {}
    if cfg.mode in ("sim", "both"):
        _run_sim(cfg, setup, requests, summary, records, steps, signals)
    if cfg.mode in ("real", "both") and summary["status"] == "ok":
        run_real = _run_http if _target(cfg) == "http" else _run_real
        run_real(cfg, setup, requests, summary, records)
    return summary, records


def prepare(cfg: DictConfig) -> tuple[Any, Any, dict[str, Any]]:
    """The twin's setup (model, hardware, engine config, predictor), the requests, and where
    the trace came from (path and checksum, or preset and parameters)."""
    setup = _setup(cfg)
    trace = load_workload(cfg)
    return setup, model_requests(trace, setup.model.vocab_size), trace_source(trace)


def _run_sim(cfg: DictConfig, setup: Any, requests: Any, summary: dict[str, Any],
             records: Records, steps: StepsWriter, signals: Signals) -> None:
    bands = _start_bands(cfg, setup, requests)  # their workers run beside the prediction
    try:
        with _progress(cfg, len(requests), "simulate") as bar, signals.poll():
            side = run_twin(setup, requests, steps, skip=cfg.skip, slo=container(cfg.slo),
                            on_progress=lambda n: bar.update(n - bar.n),
                            should_stop=signals.stop_requested)
        summary["sim"] = side.summary
        if side.requests is None:
            summary.update(status="cannot_start", error=setup.memory.error,
                           error_type=setup.memory.error_type)
            return
        records["sim"] = (side.requests, None)
        if side.stopped is not None:
            where = side.stopped
            summary.update(_interrupted(signals.received or "stop"))
            summary["error"] += (f" at simulated {where['sim_time_s']:.1f} s, "
                                 f"{where['arrived']} of {where['requests']} requests arrived")
            return
        summary["sim"]["bands"] = _finish_bands(cfg, bands, signals)
    finally:
        bands.cancel()
    if signals.stop_requested():
        summary.update(_interrupted(signals.received or "stop"))
        summary["error"] += " while drawing the prediction bands (the prediction is complete)"


def _start_bands(cfg: DictConfig, setup: Any, requests: Any) -> SimBands:
    options = container(cfg.bands)
    if options["workers"] is None and _joblib_sweep():
        options["workers"] = 1  # the sweep's points already fill the cores
    return start_bands(setup, requests, **options)


def _finish_bands(cfg: DictConfig, bands: SimBands, signals: Signals) -> Any:
    with signals.poll():  # before the line: a signal once it is out keeps the prediction
        if bands.run is not None:
            print(f"bands: {cfg.bands.replicates} replicates of the twin ...", flush=True)
        return bands.finish(should_stop=signals.stop_requested,
                            log=lambda line: print(line, flush=True))


def _run_real(cfg: DictConfig, setup: Any, requests: Any, summary: dict[str, Any],
              records: Records) -> None:
    # torch is an extra: a sim-only install never imports the engine runtime
    from engine.runtime.replay import replay_run

    config = engine_config(cfg)
    check_real_engine(setup, config)
    run = _fresh_process if _on_cuda(config) else _same_process
    try:
        reqs, steps, info = run(replay_run, setup.model, config, list(requests),
                                cfg.model.path, cfg.progress)
    except StartupError as err:
        summary.update(status="cannot_start", error=str(err), error_type=type(err).__name__)
        return
    limits = {f"slo_{k}": v for k, v in container(cfg.slo).items()}
    metrics = summarize(reqs, steps, num_blocks=info["memory"]["num_blocks"], **limits)
    summary["real"] = {**info, "metrics": metrics}
    records["real"] = (reqs, steps)


def _target(cfg: DictConfig) -> str:
    if cfg.target not in TARGETS:
        raise ValueError(f"target={cfg.target!r} is invalid: must be one of {', '.join(TARGETS)}")
    if cfg.target == "http" and not cfg.endpoint:
        raise ValueError("target=http needs endpoint=http://host:port")
    return cfg.target


def _run_http(cfg: DictConfig, setup: Any, requests: Any, summary: dict[str, Any],
              records: Records) -> None:
    """The trace replayed over HTTP against cfg.endpoint (any OpenAI-compatible server)."""
    # aiohttp takes ~0.13 s to import: only target=http replays over HTTP
    from reports.http.side import http_side

    info, result = http_side(cfg.endpoint, list(requests), model=cfg.served_model,
                             progress=cfg.progress, slo=container(cfg.slo))
    summary["real"] = info
    records["real"] = (result.requests, result.steps)
    if result.interrupted:
        summary.update(_interrupted("SIGINT"))


def check_real_engine(setup: Any, config: EngineConfig) -> None:
    """The CPU engine serves tiny models; say so before building a large one on the CPU."""
    if _on_cuda(config):
        return
    if setup.hardware.kind != "cpu":
        raise ValueError(f"hardware={setup.hardware_key} but the real engine runs on this "
                         "machine's CPU (no GPU): use hardware=cpu so the sim predicts the "
                         "same device, e.g. model=tiny_qwen3 hardware=cpu engine=cpu_tiny")
    budget = config.cpu_memory_gib * config.gpu_memory_utilization * 2**30
    weights = setup.model.weight_bytes(config.dtype, config.quantization)
    if weights > budget:
        raise ValueError(f"model {setup.model.name} needs {weights / 2**30:.2f} GiB of "
                         f"{config.dtype} weights, more than the CPU engine's budget "
                         f"(cpu_memory_gib={config.cpu_memory_gib} x gpu_memory_utilization="
                         f"{config.gpu_memory_utilization}): the CPU engine is for the tiny "
                         "models (model=tiny_qwen3 engine=cpu_tiny); run larger ones on a GPU")


def _on_cuda(config: EngineConfig) -> bool:
    if config.device == "cpu":
        return False
    # torch is an extra: a sim-only install never imports the engine runtime
    import torch

    return config.device == "cuda" or torch.cuda.is_available()


def _same_process(fn: Any, *args: Any) -> Any:
    return fn(*args)


# -- the fresh process of a GPU point (start method: issue 7, validation sweep time) ----------
# spawn (default): a new interpreter per point, which imports torch and the engine again.
# KVTWIN_START_METHOD=forkserver: each point forks from a server that imported them once
# (measured on the 2-core CPU box: 3.8 s -> 0.18 s per point after the first); the server
# never touches CUDA, so a forked child starts CUDA as fresh as a spawned one. If CUDA
# cannot start in a forked child, this and every later point fall back to spawn.
_START = {"method": os.environ.get("KVTWIN_START_METHOD", "spawn")}
_PRELOAD = ["engine.runtime.llm", "engine.runtime.replay"]


def _fresh_process(fn: Any, *args: Any) -> Any:
    """GPU points run one at a time, each in a new process, so memory readings are clean."""
    try:
        return _in_child(_START["method"], fn, args)
    except Exception as err:
        if _START["method"] == "spawn" or not _cuda_fork_error(err):
            raise
        print(f"CUDA failed in a forked child ({err}); using spawn from now on",
              file=sys.stderr)
        _START["method"] = "spawn"
        return _in_child("spawn", fn, args)


def _in_child(method: str, fn: Any, args: tuple[Any, ...]) -> Any:
    ctx = multiprocessing.get_context(method)
    if method == "forkserver":  # the server imports with PYTHONPATH, not this sys.path
        root, path = str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH", "")
        if root not in path.split(os.pathsep):
            os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, path) if p)
        ctx.set_forkserver_preload(_PRELOAD)
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(fn, *args).result()


def _cuda_fork_error(err: BaseException) -> bool:
    text = str(err)
    return "forked subprocess" in text or "CUDA error: initialization error" in text
# -- end of the start-method block ---------------------------------------------------------


# -- the other modes ------------------------------------------------------------------------

def _serve(cfg: DictConfig) -> tuple[dict[str, Any], Records]:
    """Serve the composed model and engine over HTTP until Ctrl-C; records what it served."""
    # torch is an extra: a sim-only install never imports the engine runtime
    from engine.runtime.serve import ServeOptions, serve

    model = cfg.model.path or model_from_dict(container(cfg.model))
    got = serve(model, engine_config(cfg), ServeOptions(**container(cfg.serve)),
                name=_choices(cfg).get("model"))
    reqs, steps = requests_frame(got["requests"]), steps_frame(got["steps"])
    metrics = summarize(reqs, steps, num_blocks=got["num_blocks"])
    real = {"source": "serve", "memory": got["memory"], "metrics": metrics}
    return {"status": "ok", "real": real}, {"real": (reqs, steps)}


def _calibrate(cfg: DictConfig) -> tuple[dict[str, Any], Records]:
    # torch is an extra: a sim-only install never imports the engine runtime
    from engine.tools.calibrate import CalibrationOptions, run_calibration

    choices, c = _choices(cfg), cfg.calibrate
    command = "python run.py mode=calibrate " + " ".join(_overrides(cfg))
    source = cfg.model.path or choices.get("model") or container(cfg.model)["name"]
    update = c["update"]  # c.update is DictConfig's own method
    options = CalibrationOptions(quick=c.quick, update=update and Path(update),
                                 time_budget_s=c.time_budget_s, seed=cfg.engine.seed,
                                 **({"out": Path(c.out)} if c.out else {}))
    path, profile = run_calibration(source, engine_config(cfg), choices.get("hardware"),
                                    options, command)
    return {"status": "ok", "calibration": {
        "profile": str(path), "steps": len(profile.seconds), "quick": c.quick,
        "holdout": profile.fit["holdout"],
        "wall_s": profile.meta.get("calibration_wall_s")}}, {}


def _bench(cfg: DictConfig) -> tuple[dict[str, Any], Records]:
    """engine.tools.bench on this run's model, engine and workload; bench.json in the run
    folder."""
    # torch is an extra: a sim-only install never imports the engine runtime
    from engine.tools import bench

    model = _bench_model(cfg)
    config = engine_config(cfg).validate(model.config)
    options = bench.bench_options(container(cfg.bench) if "bench" in cfg else None)
    trace = load_workload(cfg)
    source = {"path": cfg.workload.path} if cfg.workload.path else \
        {"preset": cfg.workload.name, "params": trace.meta["preset"]["params"]}
    workload = bench.workload_from_trace(trace, model.config.vocab_size, None, source)
    command = "python run.py " + " ".join(_overrides(cfg))
    result = bench.run_bench(model, config, workload, options, command=command)
    path = bench.save_result(result, Path(HydraConfig.get().runtime.output_dir) / BENCH_FILE)
    print(bench.format_report(result))
    return {"status": "ok", "bench": {"path": str(path), "kvtwin": _bench_numbers(result),
                                      "ratios": result["ratios"]}}, {}


def _bench_model(cfg: DictConfig) -> Any:
    # torch is an extra: a sim-only install never imports the engine runtime
    from engine.tools.bench import BenchModel, resolve_model

    if cfg.model.path:
        return resolve_model(cfg.model.path)
    return BenchModel(model_from_dict(container(cfg.model)), None,
                      _choices(cfg).get("model") or "model")


def _bench_numbers(result: dict[str, Any]) -> dict[str, Any]:
    ours = result["kvtwin"]
    return {k: ours[k] for k in ("output_tok_s", "total_tok_s", "wall_s", "startup_s",
                                 "num_steps", "attention_backend", "cuda_graphs")}


MODE_RUNNERS = {"serve": _serve, "calibrate": _calibrate, "bench": _bench}


# -- configuration ---------------------------------------------------------------------------

def _choices(cfg: DictConfig) -> dict[str, str]:
    """Which file of each config group was chosen (model, hardware, ...)."""
    if HydraConfig.initialized():
        return dict(HydraConfig.get().runtime.choices)
    return dict(cfg.hydra.runtime.choices) if "hydra" in cfg else {}


def _overrides(cfg: DictConfig) -> list[str]:
    if HydraConfig.initialized():
        return list(HydraConfig.get().overrides.task)
    return list(cfg.hydra.overrides.task) if "hydra" in cfg else []


def _joblib_sweep() -> bool:
    return _in_sweep() and "joblib" in str(HydraConfig.get().launcher.get("_target_", ""))


def _in_sweep() -> bool:
    return HydraConfig.get().mode == RunMode.MULTIRUN


def _debug() -> bool:
    """--debug (or Hydra's HYDRA_FULL_ERROR=1): print tracebacks."""
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


# -- the module front ends ----------------------------------------------------------------------

def sim_main(argv: list[str] | None = None) -> int:
    """`python -m sim [simulate | capacity] [--json] [--vllm-log FILE] [OVERRIDE ...]`: the
    twin in the terminal, configured by run.py's Hydra overrides; no run folder."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in ("simulate", "capacity") else "simulate"
    parser = argparse.ArgumentParser(prog="python -m sim", description=sim_main.__doc__)
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--vllm-log", type=Path, help="capacity: a vLLM server's start-up "
                        "log, its measured memory terms for the what-if")
    parser.add_argument("--mean-len", type=float, help="capacity: mean request length")
    args, overrides = parser.parse_known_args(argv)
    args.command = command
    try:
        cfg = compose_config(overrides)
        return _sim_command(args, cfg)
    except Exception as err:  # composition errors, bad values, missing files
        print("error: " + "; ".join(str(err).splitlines()), file=sys.stderr)
        if _debug():
            traceback.print_exception(err)
        return 2


def _config_summary(cfg: DictConfig) -> dict[str, Any]:
    choices = _choices(cfg)
    return {"model": choices.get("model"), "hardware": choices.get("hardware"),
            "used_by_others_gib": cfg.hardware.get("used_by_others_gib", 0.0),
            "predictor": cfg.predictor, "engine": container(cfg.engine),
            "workload": container(cfg.workload), "overrides": _overrides(cfg)}


def _failed(base: dict[str, Any], err: BaseException, expected: bool) -> dict[str, Any]:
    return {**base, "status": "failed", "error": str(err) if expected else
            f"{type(err).__name__}: {err}", "error_type": type(err).__name__,
            "traceback": "".join(traceback.format_exception(err))}


def _finished(out: Path) -> bool:
    try:
        return json.loads((out / SUMMARY).read_text()).get("status") in FINAL
    except (OSError, ValueError):
        return False


def _sim_command(args: Any, cfg: DictConfig) -> int:


    if args.command == "capacity" and args.vllm_log:
        return _capacity_from_log(args, cfg)
    if args.command == "capacity":
        setup = _setup(cfg)
        plan = plan_capacity(setup.model, setup.hardware, setup.config, setup.profile,
                             args.mean_len, setup.memory)
        print(json.dumps(plan.to_dict(), indent=1) if args.json else
              format_plan(plan, setup.memory))
        return 0 if plan.starts else 1
    return _simulate_here(args, cfg)


def _simulate_here(args: Any, cfg: DictConfig) -> int:


    setup, requests, _ = prepare(cfg)
    start = time.perf_counter()
    run = simulate(setup, requests, skip=cfg.skip)
    wall = time.perf_counter() - start
    metrics = twin_metrics(run)
    if args.json:
        print(json.dumps(run.summary(metrics), indent=1))
        return 0
    simulated = float(run.steps["end_s"].max()) if len(run.steps) else 0.0
    print(format_plan(run.capacity, setup.memory))
    print(format_metrics(metrics, setup.predictor, simulated, wall))
    return 0


def _capacity_from_log(args: Any, cfg: DictConfig) -> int:
    """The what-if from a vLLM server's start-up log: its measured terms, this config's
    settings where the overrides give them, the log's settings elsewhere."""


    setup = _setup(cfg)
    log = parse_vllm_log(args.vllm_log.read_text(errors="replace"))
    given = {o.split("=")[0].removeprefix("engine.") for o in _overrides(cfg)
             if o.startswith("engine.")}
    own = log_config(log, setup.config, set())  # the settings the server ran with
    config = log_config(log, setup.config, given).validate(setup.model)
    memory = vllm_what_if(log, setup.model, setup.hardware, config)
    reproduced = vllm_what_if(log, setup.model, setup.hardware, own).num_blocks
    plan = plan_capacity(setup.model, setup.hardware, config, None, args.mean_len, memory)
    if args.json:
        print(json.dumps({"log": log.to_dict(), "memory": memory.to_dict(),
                          "plan": plan.to_dict()}, indent=1))
        return 0 if plan.starts else 1
    logged = "-" if log.kv_cache_tokens is None else f"{log.kv_cache_tokens:,}"
    print(format_log_terms(log))
    print(f"  kvtwin on these terms at the log's own settings: "
          f"{reproduced * own.block_size:,} KV tokens (the log: {logged})")
    print(format_plan(plan, memory))
    return 0 if plan.starts else 1


def _setup(cfg: DictConfig) -> Any:
    choices = _choices(cfg)
    return setup_twin(container(cfg.model), container(cfg.hardware), engine_config(cfg),
                      cfg.predictor, keys=(choices.get("model"), choices.get("hardware")))


# -- writing the folder -----------------------------------------------------------------------

def _record(out: Path, summary: dict[str, Any], records: Records,
            steps: StepsWriter | None = None, timelines: KvTimelines | None = None) -> None:
    write_run(out, summary, records or None, steps)
    try:

        js = ensure_plotly_js(Path(HydraConfig.get().sweep.dir)) if _in_sweep() else EMBED
        page = write_run_page(out, js, timelines)
    except Exception as err:  # the records matter more than the page
        print(f"report page not written: {err}", file=sys.stderr)
        page = out

    print(console_summary(summary))
    print(f"  report: {page}")


def _progress(cfg: DictConfig, total: int, desc: str) -> Any:
    return tqdm(total=total, desc=desc, unit="req", disable=not cfg.progress, leave=False)


if __name__ == "__main__":
    if "--debug" in sys.argv:  # Hydra's own flag for a full traceback, under kvtwin's name
        sys.argv.remove("--debug")
        os.environ["HYDRA_FULL_ERROR"] = "1"
    main()

    sys.exit(sweep_exit_code())  # a sweep with a failed or interrupted point: non-zero
