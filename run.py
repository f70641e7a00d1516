"""kvtwin: predict (mode=sim), measure (mode=real), compare (mode=both), calibrate, bench.

    python run.py                                   # simulate the default workload, write a report
    python run.py engine.block_size=32 workload=shared_prefix
    python run.py -m engine.block_size=8,16,32 engine.gpu_memory_utilization=0.5,0.7,0.9
    python run.py mode=both model=tiny_qwen3 hardware=cpu engine=cpu_tiny
    python run.py mode=bench workload=nanovllm_bench +bench.hf_requests=64
    python run.py mode=serve model=tiny_qwen3 engine=cpu_tiny serve.port=8000
    python run.py mode=real target=http endpoint=http://127.0.0.1:8000 workload=poisson_chat

mode=bench is `python -m engine.tools.bench` on the composed model, engine and workload (offline,
every request at t=0) against HF transformers in the same process; it prints the table and
writes bench.json. Its own knobs are BenchOptions fields, given as +bench.<field>=<value>
(peers, hf_requests, hf_batch_size, temperature, warmup, hf_num_blocks, hf_max_batch_tokens).

Each run writes summary.json, requests.parquet, steps.parquet and report.html into Hydra's
output folder. A run that cannot start is a recorded result; a run that fails is recorded as
failed (and, in a sweep, the sweep goes on); Ctrl-C keeps what was finished.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from conf.schema import MODES, TARGETS, register
from engine.core.config import EngineConfig
from engine.core.memory import StartupError
from reports.run_folder import StepsWriter, write_run

register()

Records = dict[str, tuple[Any, Any]]
RUN_MODES = (*MODES, "bench")  # mode=bench is handled here, before the schema's modes
BENCH_FILE = "bench.json"


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    out = Path(HydraConfig.get().runtime.output_dir)
    base = {"mode": cfg.mode, "config": _config_summary(cfg), "sim": None, "real": None,
            "error": None, "error_type": None}
    steps = StepsWriter(out)  # step records stream here as they come
    try:
        summary, records = run_mode(cfg, steps)
    except KeyboardInterrupt:
        _record(out, {**base, "status": "interrupted", "error": "interrupted (Ctrl-C)"}, {},
                steps)
        where = Path(HydraConfig.get().sweep.dir) if _in_sweep() else out
        print(f"interrupted: what was finished is in {where}"
              + (f"; rebuild the sweep report with python -m reports {where}"
                 if _in_sweep() else ""), file=sys.stderr)
        raise
    except Exception as err:  # recorded, never lost; a sweep goes on
        _record(out, _failed(base, err), {}, steps)
        if not _in_sweep():
            raise
        return
    _record(out, {**base, **summary}, records, steps)


def run_mode(cfg: DictConfig, steps: StepsWriter) -> tuple[dict[str, Any], Records]:
    if cfg.mode not in RUN_MODES:
        raise ValueError(f"mode={cfg.mode!r} is invalid: must be one of {', '.join(RUN_MODES)}")
    if cfg.fail_point:
        raise RuntimeError("fail_point=true: this point fails on purpose")
    if cfg.mode == "calibrate":
        return _calibrate(cfg), {}
    if cfg.mode == "bench":
        return _bench(cfg), {}
    if cfg.mode == "serve":
        return _serve(cfg)
    requests_and_setup = _prepare(cfg)
    summary: dict[str, Any] = {"status": "ok"}
    records: Records = {}
    if cfg.mode in ("sim", "both"):
        _run_sim(cfg, requests_and_setup, summary, records, steps)
    if cfg.mode in ("real", "both"):
        run_real = _run_http if _target(cfg) == "http" else _run_real
        run_real(cfg, requests_and_setup, summary, records)
    return summary, records


def _prepare(cfg: DictConfig) -> tuple[Any, list[Any]]:
    from sim.twin import setup_twin
    from workloads.trace_requests import model_requests

    setup = setup_twin(_entry(cfg.model), _entry(cfg.hardware), engine_config(cfg),
                       cfg.predictor, keys=(_choice("model"), _choice("hardware")))
    trace = load_workload(cfg)
    return setup, model_requests(trace, setup.model.vocab_size)


def _run_sim(cfg: DictConfig, prepared: tuple[Any, list[Any]], summary: dict[str, Any],
             records: Records, writer: StepsWriter) -> None:
    """The twin's steps stream to the run folder as they are made, and into their
    metrics; the requests come at the end."""
    from reports.metrics import StepStats, twin_metrics
    from sim.twin import simulate

    setup, requests = prepared
    stats = StepStats()

    def on_steps(chunk: Any) -> None:
        stats.add(chunk)
        writer.add(chunk, "sim")

    with _progress(cfg, len(requests), "simulate") as bar:
        run = simulate(setup, requests, skip=cfg.skip, on_steps=on_steps,
                       on_progress=lambda n: bar.update(n - bar.n))
    summary["sim"] = run.summary(twin_metrics(run, stats))
    if not setup.memory.starts:
        summary.update(status="cannot_start", error=setup.memory.error,
                       error_type=setup.memory.error_type)
        return
    records["sim"] = (run.requests, None)


def _run_real(cfg: DictConfig, prepared: tuple[Any, list[Any]], summary: dict[str, Any],
              records: Records) -> None:
    from reports.metrics import summarize

    setup, requests = prepared
    config = engine_config(cfg)
    check_real_engine(setup, config)
    run = _fresh_process if _on_cuda(config) else _same_process
    try:
        reqs, steps, info = run(replay_side, setup.model, config, requests, cfg.model.path,
                                cfg.progress)
    except StartupError as err:
        summary.update(status="cannot_start", error=str(err), error_type=type(err).__name__)
        return
    metrics = summarize(reqs, steps, num_blocks=info["memory"]["num_blocks"])
    summary["real"] = {**info, "metrics": metrics}
    records["real"] = (reqs, steps)


def _target(cfg: DictConfig) -> str:
    if cfg.target not in TARGETS:
        raise ValueError(f"target={cfg.target!r} is invalid: must be one of {', '.join(TARGETS)}")
    if cfg.target == "http" and not cfg.endpoint:
        raise ValueError("target=http needs endpoint=http://host:port")
    return cfg.target


def _run_http(cfg: DictConfig, prepared: tuple[Any, list[Any]], summary: dict[str, Any],
              records: Records) -> None:
    """The trace replayed over HTTP against cfg.endpoint (any OpenAI-compatible server)."""
    from reports.http.side import http_side

    info, result = http_side(cfg.endpoint, prepared[1], model=cfg.served_model,
                             progress=cfg.progress, slo=_entry(cfg.slo))
    summary["real"] = info
    records["real"] = (result.requests, result.steps)
    if result.interrupted:
        summary.update(status="interrupted", error="interrupted (Ctrl-C)")


def _serve(cfg: DictConfig) -> tuple[dict[str, Any], Records]:
    """Serve the composed model and engine over HTTP until Ctrl-C; records what it served."""
    from engine.core.catalog import model_from_dict
    from engine.runtime.serve import ServeOptions, serve
    from reports.metrics import requests_frame, steps_frame, summarize

    model = cfg.model.path or model_from_dict(_entry(cfg.model))
    got = serve(model, engine_config(cfg), ServeOptions(**_entry(cfg.serve)),
                name=_choice("model"))
    reqs, steps = requests_frame(got["requests"]), steps_frame(got["steps"])
    metrics = summarize(reqs, steps, num_blocks=got["num_blocks"])
    real = {"source": "serve", "memory": got["memory"], "metrics": metrics}
    return {"status": "ok", "real": real}, {"real": (reqs, steps)}


def replay_side(model: Any, config: EngineConfig, requests: list[Any], path: str | None,
                progress: bool) -> tuple[Any, Any, dict[str, Any]]:
    """Build the engine and replay the trace on the wall clock (torch lives only here)."""
    from tqdm.auto import tqdm

    from engine.runtime.llm import LLMEngine
    from engine.runtime.replay import records_frames, replay

    engine = LLMEngine(path or model, config)
    with tqdm(total=len(requests), desc="replay", unit="req", disable=not progress) as bar:
        result = replay(engine, requests, on_progress=lambda done, _: bar.update(done - bar.n))
    reqs, steps = records_frames(result)
    info = {"memory": result.memory, "device": {"name": result.device},
            "torch": result.torch_version, "attention_backend": result.attention_backend,
            "record_overhead": result.record_overhead, "wall_s": result.wall_s}
    return reqs, steps, info


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
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

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


def _calibrate(cfg: DictConfig) -> dict[str, Any]:
    from engine.tools.calibrate import calibrate

    command = "python run.py mode=calibrate " + " ".join(HydraConfig.get().overrides.task)
    source = cfg.model.path or _choice("model") or _entry(cfg.model)["name"]
    profile = calibrate(source, engine_config(cfg), hardware=_choice("hardware"),
                        command=command)
    path = profile.save()
    print(f"calibration profile: {path}; held-out error {profile.fit['holdout']}")
    return {"status": "ok", "calibration": {"profile": str(path), "steps": len(profile.seconds),
                                            "holdout": profile.fit["holdout"],
                                            "wall_s": profile.meta.get("calibration_wall_s")}}


def _bench(cfg: DictConfig) -> dict[str, Any]:
    """engine.tools.bench on this run's model, engine and workload; bench.json in the run folder."""
    from engine.tools import bench

    model = _bench_model(cfg)
    config = engine_config(cfg).validate(model.config)
    options = bench.bench_options(_entry(cfg.bench) if "bench" in cfg else None)
    trace = load_workload(cfg)
    source = {"path": cfg.workload.path} if cfg.workload.path else \
        {"preset": cfg.workload.name, "params": trace.meta["preset"]["params"]}
    workload = bench.workload_from_trace(trace, model.config.vocab_size, None, source)
    command = "python run.py " + " ".join(HydraConfig.get().overrides.task)
    result = bench.run_bench(model, config, workload, options, command=command)
    path = bench.save_result(result, Path(HydraConfig.get().runtime.output_dir) / BENCH_FILE)
    print(bench.format_report(result))
    return {"status": "ok", "bench": {"path": str(path), "kvtwin": _bench_numbers(result),
                                      "ratios": result["ratios"]}}


def _bench_model(cfg: DictConfig) -> Any:
    from engine.core.catalog import model_from_dict
    from engine.tools.bench import BenchModel, resolve_model

    if cfg.model.path:
        return resolve_model(cfg.model.path)
    return BenchModel(model_from_dict(_entry(cfg.model)), None, _choice("model") or "model")


def _bench_numbers(result: dict[str, Any]) -> dict[str, Any]:
    ours = result["kvtwin"]
    return {k: ours[k] for k in ("output_tok_s", "total_tok_s", "wall_s", "startup_s",
                                 "num_steps", "attention_backend", "cuda_graphs")}


def engine_config(cfg: DictConfig) -> EngineConfig:
    return EngineConfig.from_kwargs(**OmegaConf.to_container(cfg.engine, resolve=True))


def load_workload(cfg: DictConfig):
    from workloads import make_preset, read_trace

    w = cfg.workload
    if w.path:
        return read_trace(w.path)
    return make_preset(w.name, **OmegaConf.to_container(w.params, resolve=True))


def _entry(node: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(node, resolve=True)


def _choice(group: str) -> str | None:
    return HydraConfig.get().runtime.choices.get(group)


def _in_sweep() -> bool:
    return HydraConfig.get().mode == RunMode.MULTIRUN


def _config_summary(cfg: DictConfig) -> dict[str, Any]:
    return {"model": _choice("model"), "hardware": _choice("hardware"),
            "predictor": cfg.predictor, "engine": _entry(cfg.engine),
            "workload": _entry(cfg.workload), "overrides": list(HydraConfig.get().overrides.task)}


def _failed(base: dict[str, Any], err: BaseException) -> dict[str, Any]:
    return {**base, "status": "failed", "error": f"{type(err).__name__}: {err}",
            "error_type": type(err).__name__, "traceback": traceback.format_exc()}


def _record(out: Path, summary: dict[str, Any], records: Records,
            steps: StepsWriter | None = None) -> None:
    write_run(out, summary, records or None, steps)
    try:
        from reports.html import EMBED, ensure_plotly_js
        from reports.run_page import write_run_page

        js = ensure_plotly_js(Path(HydraConfig.get().sweep.dir)) if _in_sweep() else EMBED
        page = write_run_page(out, js)
    except Exception as err:  # the records matter more than the page
        print(f"report page not written: {err}", file=sys.stderr)
        page = out
    print(f"[{summary['status']}] {page}")


def _progress(cfg: DictConfig, total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="req", disable=not cfg.progress, leave=False)


if __name__ == "__main__":
    main()
