"""The fidelity campaign: one GPU command, bounded in time (docs/validation.md).

    python -m engine.tools.fidelity_campaign --out DIR [--time-budget 540] [--dry-run]

1. `calibrate --quick --update sim/profiles/<H200 profile>` (~90 s): this machine's quick
   profile (DIR/profiles/quick/) and the committed full profile rescaled to it
   (DIR/profiles/);
2. the validation points, measured twice (run 1, then run 2), each a `run.py -m` sweep
   (mode=both, fresh process per point):
   - NEW prefill-heavy points: long prompts (lognormal, median 3,000 / p99 7,000 tokens),
     4-32 output tokens, Poisson arrivals at 1x / 4x / 10x of 0.8x the twin's saturation
     rate (mixed steps past the graphs' token limit: eager);
   - NEW a burst of chat requests (all at t = 0) on a KV cache sized (num_gpu_blocks_override)
     where the twin predicts preemption to begin (a few preemptions);
   - the H200 load levels at utilization 0.9 (`+sweep=h200_validation_loads`);
   - while the budget lasts: the loads at 0.06, then the grid's block_size 16 points;
   a command that would not fit in what is left of `--time-budget` is skipped, and a
   running one is stopped at the deadline (its finished points are kept);
3. the runs collected as validation sets (DIR/sets/h200_fidelity and .._run2: copy the
   first to tests/data/validation/); then, on any machine, `--report-only` (or `--report`
   here, if the budget allows) writes DIR/report.md: accuracy with the committed, quick and
   rescaled profiles, run 2 against run 1, coverage and bias of the bands, bias per step
   class, and the serving overhead fit on one run and checked on the other
   (DIR/profiles_serving*; the one fit on run 2 goes into the run-1 set's profiles/).

The traces and workload configs it replays are made here, on the CPU, before anything runs
(DIR/traces, DIR/conf: `--config-dir`), with the rates and the KV size the twin chooses.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from engine.core.config import EngineConfig
from engine.tools.fidelity_report import report
from reports.aggregate import collect_points
from reports.metrics import twin_metrics
from reports.run_folder import find_runs
from reports.validation.collect import collect
from sim.profile import PROFILE_DIR, ProfileKey
from sim.twin import setup_twin, simulate
from workloads import LogNormal, Offline, Poisson, Uniform, build_trace, write_trace
from workloads.presets import CHAT_OUTPUT, CHAT_PROMPT
from workloads.schema import Trace
from workloads.trace_requests import model_requests

ROOT = Path(__file__).resolve().parents[2]
MODEL, HARDWARE = "qwen3_0_6b", "h200_141gb"
ENGINE = ["engine.max_model_len=8192", "engine.max_cudagraph_tokens=4096"]  # as the loads
PREFILL_MULTIPLES = (1, 4, 10)
NEAR_SATURATION = 0.8
PREFILL_ARRIVALS_S = 4.0
BURST_REQUESTS = 256
ONSET_PREEMPTIONS = (2, 12)  # the burst's KV cache: the twin predicts this many
CALIBRATE_S = 95.0
COMMAND_S = 12.0  # a sweep command's own start-up (Hydra, the forkserver's imports)
POINT_S = 9.0  # a point's overhead besides its replay (fresh engine, graphs, records)
REPORT_S = 90.0
SET = "h200_fidelity"


@dataclass
class Command:
    label: str
    argv: list[str]
    estimate_s: float
    sweep: str | None = None  # the sweep folder it writes (relative to DIR)
    run: int = 0
    outcome: dict[str, Any] = field(default_factory=dict)


# -- planning (CPU) ---------------------------------------------------------------------------

def _setup(overrides: dict[str, Any] | None = None):
    config = EngineConfig(max_model_len=8192, max_cudagraph_tokens=4096, **(overrides or {}))
    return setup_twin(MODEL, HARDWARE, config, "calibrated")


def _simulate(trace: Any, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    setup = _setup(overrides)
    return twin_metrics(simulate(setup, model_requests(trace, setup.model.vocab_size)))


def prefill_trace(rate: float, n: int, seed: int = 0) -> Any:
    return build_trace(n=n, arrivals=Poisson(rate), seed=seed, name="prefill_heavy",
                       prompt_lens=LogNormal(3000, 7000, max_len=8000),
                       output_lens=Uniform(4, 32))


def burst_trace(n: int = BURST_REQUESTS, seed: int = 0) -> Any:
    return build_trace(n=n, arrivals=Offline(), prompt_lens=CHAT_PROMPT, seed=seed,
                       output_lens=CHAT_OUTPUT, name="chat_burst")


def saturation(trace: Any) -> float:
    """The twin's request throughput with every request arriving at once."""
    offline = Trace(trace.df.assign(arrival_s=0.0), trace.meta)
    return float(_simulate(offline)["request_throughput_req_s"])


def onset_blocks(trace: Any, lo: int = 600, hi: int = 100_000) -> tuple[int, int]:
    """The largest KV cache (blocks) at which the twin predicts at least the fewest
    ONSET_PREEMPTIONS (bisection on num_gpu_blocks_override), and its preemptions."""
    def preemptions(blocks: int) -> int:
        return int(_simulate(trace, {"num_gpu_blocks_override": blocks})["total_preemptions"])
    while hi - lo > 16:
        mid = (lo + hi) // 2
        if preemptions(mid) >= ONSET_PREEMPTIONS[0]:
            lo = mid
        else:
            hi = mid
    return lo, preemptions(lo)


def write_workload(out: Path, stem: str, trace: Any, note: str) -> str:
    """The trace as DIR/traces/<stem>.parquet and a workload config naming it, for
    `--config-dir DIR/conf workload=fidelity/<stem>`."""
    (out / "traces").mkdir(parents=True, exist_ok=True)
    path = write_trace(trace, out / "traces" / f"{stem}.parquet")
    conf = out / "conf" / "workload" / "fidelity" / f"{stem}.yaml"
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text(f"# {note}\nname: poisson_chat\npath: {path.resolve()}\nparams: {{}}\n")
    return f"fidelity/{stem}"


def plan(out: Path, python: str = sys.executable) -> tuple[list[Command], dict[str, Any]]:
    """The commands in priority order, with their estimates, and what was chosen."""
    probe = prefill_trace(1.0, 256)
    base = NEAR_SATURATION * saturation(probe)
    n = max(16, round(PREFILL_ARRIVALS_S * base))
    prefill = {}
    for k in PREFILL_MULTIPLES:
        trace = prefill_trace(k * base, n)
        prefill[write_workload(out, f"h200_prefill_x{k}", trace,
                               f"prefill-heavy at {k} x {base:.2f} req/s")] = \
            _simulate(trace)["duration_s"]
    burst = burst_trace()
    blocks, predicted = onset_blocks(burst)
    burst_label = write_workload(out, "h200_burst", burst,
                                 f"{BURST_REQUESTS} chat requests at t = 0")
    burst_s = _simulate(burst, {"num_gpu_blocks_override": blocks})["duration_s"]
    chosen = {"prefill_base_rate": base, "prefill_requests": n, "burst_blocks": blocks,
              "burst_predicted_preemptions": predicted}
    commands = [calibrate_command(out, python)]
    for r in (1, 2):
        commands += [
            sweep(out, r, "prefill", python, [*ENGINE, f"workload={','.join(prefill)}"],
                  sum(prefill.values()) + POINT_S * len(prefill)),
            sweep(out, r, "burst", python, [*ENGINE, f"workload={burst_label}",
                                            f"engine.num_gpu_blocks_override={blocks}"],
                  burst_s + POINT_S),
            sweep(out, r, "loads_0.9", python, ["+sweep=h200_validation_loads",
                                                "engine.gpu_memory_utilization=0.9"],
                  5 * (10 + POINT_S))]
    for name, overrides, seconds in (
            ("loads_0.06", ["+sweep=h200_validation_loads",
                            "engine.gpu_memory_utilization=0.06"], 5 * (10 + POINT_S)),
            ("grid_bs16", ["+sweep=h200_validation", "engine.block_size=16"],
             12 * (4 + POINT_S))):
        commands += [sweep(out, r, name, python, overrides, seconds) for r in (1, 2)]
    return commands, chosen


def calibrate_command(out: Path, python: str) -> Command:
    full = PROFILE_DIR / ProfileKey(HARDWARE, MODEL, "bfloat16", "torch").filename
    return Command("calibrate --quick --update", [
        python, "-m", "engine.tools.calibrate", "--model", MODEL, "--hardware", HARDWARE,
        "--max-cudagraph-tokens", "4096", "--quick", "--update", str(full),
        "--out", str(out / "profiles")], CALIBRATE_S)


def sweep(out: Path, run: int, name: str, python: str, overrides: list[str],
          replay_s: float) -> Command:
    where = f"runs/run{run}/{name}"
    return Command(f"run{run}/{name}", [
        python, str(ROOT / "run.py"), "-m", "--config-dir", str((out / "conf").resolve()),
        f"model={MODEL}", f"hardware={HARDWARE}", "mode=both", "predictor=calibrated",
        "progress=false", *overrides, f"hydra.sweep.dir={(out / where).resolve()}"],
        COMMAND_S + replay_s, where, run)


# -- running (GPU) ----------------------------------------------------------------------------

def run_commands(commands: list[Command], budget_s: float, log_dir: Path,
                 reserve_s: float = 0.0) -> None:
    """In order; a command whose estimate does not fit in what is left is skipped, a
    running one is stopped at the deadline (its finished points stay)."""
    t0 = time.monotonic()
    deadline = t0 + budget_s - reserve_s
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "KVTWIN_START_METHOD": "forkserver"}
    for c in commands:
        left = deadline - time.monotonic()
        if c.estimate_s > left:
            c.outcome = {"status": "skipped", "left_s": round(left, 1)}
            _say(f"skip {c.label}: ~{c.estimate_s:.0f} s, {left:.0f} s left")
            continue
        _say(f"run {c.label} (~{c.estimate_s:.0f} s, {left:.0f} s left)")
        c.outcome = _run(c, env, left, log_dir)
        _say(f"  {c.outcome['status']} in {c.outcome['wall_s']:.0f} s")


def _run(c: Command, env: dict[str, str], limit_s: float, log_dir: Path) -> dict[str, Any]:
    log = log_dir / f"{c.label.replace('/', '_').replace(' ', '_')}.log"
    t = time.monotonic()
    with log.open("w") as f:
        proc = subprocess.Popen(c.argv, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=max(1.0, limit_s))
            status = "ok" if rc == 0 else f"exit {rc}"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            status = "stopped at the deadline"
    return {"status": status, "wall_s": round(time.monotonic() - t, 1), "log": log.name}


def collect_runs(out: Path, commands: list[Command]) -> dict[int, Path]:
    """Each run's sweeps (those with a finished point) as one validation set."""
    sets = {}
    for run in (1, 2):
        sweeps = [out / c.sweep for c in commands if c.run == run and c.sweep
                  and (out / c.sweep).is_dir() and find_runs(out / c.sweep)]
        if not sweeps:
            continue
        dest = out / "sets" / (SET if run == 1 else f"{SET}_run2")
        collect(dest, sweeps)

        pd.concat([collect_points(s) for s in sweeps], ignore_index=True).to_csv(
            dest / "sweep_points.csv", index=False)
        sets[run] = dest
    for js in (out / "runs").rglob("plotly.min.js"):  # 4.8 MB a sweep: the sets are the data
        js.unlink()
    return sets


def _say(message: str) -> None:
    print(f"[campaign {time.strftime('%H:%M:%S')}] {message}", flush=True)


# -- main ---------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m engine.tools.fidelity_campaign",
                                description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--time-budget", type=float, default=540.0,
                   help="seconds for everything (default 540: one 10-minute GPU command)")
    p.add_argument("--dry-run", action="store_true",
                   help="plan (traces, rates, KV size) and print the commands; run nothing")
    p.add_argument("--report-only", action="store_true",
                   help="collect DIR's runs and write DIR/report.md (no GPU)")
    p.add_argument("--report", action="store_true",
                   help="write DIR/report.md here at the end if the budget allows (~90 s; "
                        "default: later, with --report-only on any machine)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    out = args.out
    state = out / "campaign.json"
    if args.report_only:
        sets = {r: p for r, p in ((1, out / "sets" / SET), (2, out / "sets" / f"{SET}_run2"))
                if (p / "index.json").is_file()}
        if not sets:
            commands = [Command(**c) for c in json.loads(state.read_text())["commands"]]
            sets = collect_runs(out, commands)
        write_report(out, sets)
        return 0
    if not args.dry_run:
        _require_h200()
    commands, chosen = plan(out)
    for c in commands:
        _say(f"planned {c.label}: ~{c.estimate_s:.0f} s")
    reserve = REPORT_S if args.report else 0.0
    if not args.dry_run:
        run_commands(commands, args.time_budget - (time.monotonic() - started),
                     out / "logs", reserve)
    record = {"chosen": chosen, "budget_s": args.time_budget,
              "commands": [asdict(c) for c in commands]}
    state.write_text(json.dumps(record, indent=1))
    if args.dry_run:
        total = sum(c.estimate_s for c in commands)
        _say(f"{len(commands)} commands, ~{total:.0f} s if all ran; chosen: {chosen}")
        return 0
    sets = collect_runs(out, commands)
    if args.report and time.monotonic() - started < args.time_budget - 30:
        write_report(out, sets)
    _say(f"done in {time.monotonic() - started:.0f} s; sets: "
         f"{', '.join(str(p) for p in sets.values())}")
    return 0


def _require_h200() -> None:
    """The twin, the profile it updates and the set names are the H200's: stop on other GPUs."""
    # torch is an extra: planning a campaign (--dry-run) needs no GPU stack
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA GPU"
    if "H200" not in gpu.upper():
        raise SystemExit(f"the fidelity campaign measures {HARDWARE} but this machine has "
                         f"{gpu}: run it on an H200 (device kind nvidia-h200, needs_h200)")


def write_report(out: Path, sets: dict[int, Path], replicates: int | None = None) -> Path:
    path = out / "report.md"
    path.write_text(report(out, sets) if replicates is None else report(out, sets, replicates))
    _say(f"wrote {path}")
    if (out / "profiles_serving").is_dir() and 1 in sets:
        shutil.copytree(out / "profiles_serving", sets[1] / "profiles", dirs_exist_ok=True)
    return path


if __name__ == "__main__":
    sys.exit(main())
