"""Copy what the accuracy gates need out of mode=both sweep folders into a validation set.

    python -m reports.validation.collect tests/data/validation/h100_qwen3_0_6b \\
        multirun/h100_validation/<chunk 1> [multirun/h100_validation/<chunk 2> ...]

The set (a few MB at most) holds:

    index.json        format, when and from where it was collected, and per point: id, the
                      configuration (model, hardware, predictor, engine, resolved workload),
                      its workload label (the Hydra workload choice), its trace file, what the
                      real engine measured (start-up verdict, num_blocks, memory terms, metrics,
                      device, torch, backend) and the sim's prediction at collection time
    points.csv        one row per point: configuration, measured and predicted headline values
    requests.parquet  the real engine's request records, with a `point` column (zstd)
    steps.parquet     the real engine's step records, compact (zstd): per point, in step order,
                      gap_us (start minus the previous step's end, or minus 0 for the first)
                      and duration_us (rounded to microseconds), then the StepRecord counts;
                      `expand_steps` rebuilds step, start_s, end_s, num_batched_tokens and
                      num_blocks_free (start and end to about a microsecond)
    traces/*.parquet  each distinct trace, rebuilt from the workload config and checked
                      against the requests the engine saw

Points that failed (not a start-up error) are listed on stdout and left out. An existing set is
replaced. A source may also be a set collected earlier (a folder with an index.json): its points
join the new set, renumbered, with their records and traces (sweeps collected on the GPU machine,
one command each, become one set here). The printed per-point wall times (start-up included) refine
`python -m reports.validation.plan estimate --startup-s ...`.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from reports.aggregate import collect_points
from reports.run_folder import SUMMARY, RunFolder, find_runs, read_run
from reports.validation.accuracy import INDEX
from workloads import make_preset, read_trace, write_trace

FORMAT = "kvtwin-validation/1"
BLOCKS_PATTERNS = (re.compile(r"num_blocks=(-?\d+)"), re.compile(r"GiB, (-?\d+) blocks of"))


def collect(dest: Path, sweeps: list[Path]) -> dict[str, Any]:
    """Write the set into `dest` (replacing it); returns its index."""
    sets = [s for s in sweeps if (s / INDEX).is_file()]
    runs = [(sweep, path) for sweep in sweeps if sweep not in sets for path in find_runs(sweep)]
    if not runs and not sets:
        raise FileNotFoundError(f"no run folders ({SUMMARY}) under {', '.join(map(str, sweeps))}")
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "traces").mkdir(parents=True)
    points, requests, steps = [], [], []
    for source in sets:
        merge_set(source, tmp, points, requests, steps)
    for sweep, path in runs:
        run = read_run(path)
        if run.status not in ("ok", "cannot_start") or run.summary.get("mode") != "both":
            print(f"left out {path}: status {run.status}, mode {run.summary.get('mode')}: "
                  f"{run.summary.get('error')}")
            continue
        pid = f"p{len(points):03d}"
        points.append(point_entry(pid, sweep, run, tmp))
        reqs, stps = run.side("real")
        requests.append(reqs.assign(point=pid))
        steps.append(compact_steps(stps, pid))
    index = write_set(tmp, points, requests, steps, sweeps)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return index


def merge_set(source: Path, out: Path, points: list[dict[str, Any]],
              requests: list[pd.DataFrame], steps: list[pd.DataFrame]) -> None:
    """Append a collected set's points (renumbered after `points`), records and traces."""
    index = json.loads((source / INDEX).read_text())
    old_requests = pd.read_parquet(source / "requests.parquet")
    old_steps = pd.read_parquet(source / "steps.parquet")
    for point in index["points"]:
        pid = f"p{len(points):03d}"
        if not (out / point["trace"]).is_file():
            shutil.copyfile(source / point["trace"], out / point["trace"])
        requests.append(old_requests[old_requests["point"] == point["id"]].assign(point=pid))
        steps.append(old_steps[old_steps["point"] == point["id"]].assign(point=pid))
        points.append({**point, "id": pid, "source": f"{source.name}/{point['source']}"})


def point_entry(pid: str, sweep: Path, run: RunFolder, out: Path) -> dict[str, Any]:
    summary, config = run.summary, run.summary["config"]
    real = summary.get("real")
    sim = summary.get("sim") or {}
    return {
        "id": pid, "source": f"{sweep.name}/{run.path.relative_to(sweep).as_posix()}",
        "status": run.status, "workload_label": workload_label(config, run.path),
        "model": config["model"], "hardware": config["hardware"],
        "predictor": config["predictor"], "engine": config["engine"],
        "workload": config["workload"], "trace": write_point_trace(run, out),
        "real": real_side(summary, real),
        "sim_at_collection": {"starts": (sim.get("memory") or {}).get("starts"),
                              "num_blocks": (sim.get("memory") or {}).get("num_blocks"),
                              "predictor": sim.get("predictor"),
                              "metrics": sim.get("metrics")},
        "wall_s": point_wall_s(run.path),
    }


def workload_label(config: dict[str, Any], path: Path) -> str:
    """The Hydra workload choice (e.g. validation/h100_chat_p70): from the overrides, else
    from the run's .hydra/hydra.yaml, else the preset name."""
    for override in config.get("overrides") or []:
        key, _, value = override.partition("=")
        if key.lstrip("+~") == "workload":
            return value
    hydra_yaml = path / ".hydra" / "hydra.yaml"
    if hydra_yaml.is_file():
        choices = (yaml.safe_load(hydra_yaml.read_text()) or {}).get("hydra", {}).get(
            "runtime", {}).get("choices", {})
        if choices.get("workload"):
            return str(choices["workload"])
    return str((config.get("workload") or {}).get("name"))


def real_side(summary: dict[str, Any], real: dict[str, Any] | None) -> dict[str, Any]:
    if real is None:  # the engine raised its start-up error
        error = summary.get("error") or ""
        return {"starts": False, "error": error, "error_type": summary.get("error_type"),
                "num_blocks": blocks_in_error(error), "memory": None, "metrics": None}
    memory = real["memory"]
    return {"starts": True, "error": None, "error_type": None,
            "num_blocks": memory["num_blocks"], "memory": memory, "metrics": real["metrics"],
            **{k: real.get(k) for k in ("device", "torch", "attention_backend",
                                        "record_overhead", "wall_s")}}


def blocks_in_error(error: str) -> int | None:
    """num_blocks as the engine's start-up error states it."""
    for pattern in BLOCKS_PATTERNS:
        found = pattern.search(error)
        if found:
            return int(found.group(1))
    return None


def point_wall_s(path: Path) -> float | None:
    """The point's wall time, start-up included: Hydra's config file to summary.json."""
    start, end = path / ".hydra" / "config.yaml", path / SUMMARY
    if not start.is_file():
        return None
    return round(end.stat().st_mtime - start.stat().st_mtime, 2)


# -- traces -------------------------------------------------------------------------------------

def write_point_trace(run: RunFolder, out: Path) -> str:
    """Rebuild the point's trace from its workload config, check it against the requests the
    engine saw, and store it once per distinct workload."""
    workload = run.summary["config"]["workload"]
    key = hashlib.sha1(json.dumps(workload, sort_keys=True).encode()).hexdigest()[:12]
    rel = f"traces/{workload.get('name')}_{key}.parquet"
    if (out / rel).is_file():
        return rel
    trace = read_trace(workload["path"]) if workload.get("path") else \
        make_preset(workload["name"], **workload["params"])
    check_trace(trace.df, run.side("real")[0], run.path)
    write_trace(trace, out / rel)
    return rel


def check_trace(trace: pd.DataFrame, requests: pd.DataFrame, where: Path) -> None:
    if requests.empty:
        return  # the engine did not start: nothing to compare
    a = trace.sort_values("request_id")[["request_id", "arrival_s", "prompt_len"]]
    b = requests.sort_values("request_id")[["request_id", "arrival_s", "prompt_len"]]
    same = len(a) == len(b) and (a["request_id"].to_numpy() == b["request_id"].to_numpy()).all() \
        and np.allclose(a["arrival_s"], b["arrival_s"], rtol=0, atol=1e-9) \
        and (a["prompt_len"].to_numpy() == b["prompt_len"].to_numpy()).all()
    if not same:
        raise ValueError(f"{where}: the trace rebuilt from the workload config differs from "
                         "the requests the engine replayed (a generator changed since the "
                         "sweep ran?)")


# -- writing ------------------------------------------------------------------------------------

def write_set(out: Path, points: list[dict[str, Any]], requests: list[pd.DataFrame],
              steps: list[pd.DataFrame], sweeps: list[Path]) -> dict[str, Any]:
    index = {"format": FORMAT,
             "collected": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
             "command": "python -m reports.validation.collect " + " ".join(
                 [str(out.name.removesuffix(".tmp"))] + [s.name for s in sweeps]),
             "sources": [s.name for s in sweeps], "points": points}
    (out / INDEX).write_text(json.dumps(index, indent=1, default=_jsonable) + "\n")
    points_table(points).to_csv(out / "points.csv", index=False)
    _parquet(requests, out / "requests.parquet")
    _parquet(steps, out / "steps.parquet")
    return index


def points_table(points: list[dict[str, Any]]) -> pd.DataFrame:
    rows = []
    for p in points:
        real, sim = p["real"], p["sim_at_collection"]
        row = {"point": p["id"], "workload": p["workload_label"], "source": p["source"],
               **{k: p["engine"][k] for k in ("block_size", "max_model_len",
                                              "gpu_memory_utilization")},
               "real_starts": real["starts"], "sim_starts": sim["starts"],
               "real_num_blocks": real["num_blocks"], "sim_num_blocks": sim["num_blocks"],
               "wall_s": p["wall_s"]}
        for key in ("ttft_p50_s", "tpot_p50_s", "e2e_p50_s", "ttft_p99_s", "e2e_p99_s",
                    "kv_blocks_used_peak", "total_preemptions"):
            row[f"real_{key}"] = (real["metrics"] or {}).get(key)
            row[f"sim_{key}"] = (sim["metrics"] or {}).get(key)
        rows.append(row)
    return pd.DataFrame(rows)


COUNTS = ("num_prefill_tokens", "num_prefill_seqs", "num_decode_seqs", "num_running",
          "num_waiting", "num_blocks_used", "num_preempted")


def compact_steps(steps: pd.DataFrame, pid: str) -> pd.DataFrame:
    """One point's steps as gaps and durations in microseconds plus the counts."""
    if steps.empty:
        return pd.DataFrame(columns=["point", "gap_us", "duration_us", *COUNTS])
    steps = steps.sort_values("step")
    start, end = steps["start_s"].to_numpy(float), steps["end_s"].to_numpy(float)
    previous = np.concatenate(([0.0], end[:-1]))
    out = pd.DataFrame({"point": pid, "gap_us": np.rint((start - previous) * 1e6),
                        "duration_us": np.rint((end - start) * 1e6)})
    for column in COUNTS:
        out[column] = steps[column].to_numpy()
    return out.astype({c: np.int64 for c in out.columns if c != "point"})


def expand_steps(compact: pd.DataFrame, num_blocks: int) -> pd.DataFrame:
    """One point's compact steps back as StepRecord columns (times to about 1 us)."""
    gap = compact["gap_us"].to_numpy(float) / 1e6
    duration = compact["duration_us"].to_numpy(float) / 1e6
    end = np.cumsum(gap + duration)
    out = pd.DataFrame({"step": np.arange(len(compact)), "start_s": end - duration,
                        "end_s": end})
    out["num_batched_tokens"] = compact["num_prefill_tokens"].to_numpy() + \
        compact["num_decode_seqs"].to_numpy()
    for column in COUNTS:
        out[column] = compact[column].to_numpy()
    out["num_blocks_free"] = num_blocks - out["num_blocks_used"]
    return out


def _parquet(frames: list[pd.DataFrame], path: Path) -> None:
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    for column in frame.columns:
        if pd.api.types.is_integer_dtype(frame[column]) and not frame[column].empty \
                and frame[column].abs().max() < 2**31:
            frame[column] = frame[column].astype(np.int32)
    frame.to_parquet(path, index=False, compression="zstd", compression_level=19)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def print_report(index: dict[str, Any], dest: Path) -> None:
    points = index["points"]
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    print(f"{dest}: {len(points)} points, {size / 1e6:.2f} MB")
    walls = [(p["wall_s"], p["real"].get("wall_s") or 0.0, p["real"]["starts"]) for p in points
             if p["wall_s"] is not None]
    started = [w - r for w, r, s in walls if s]
    failed = [w for w, _, s in walls if not s]
    if started:
        print(f"per-point overhead besides the replay (start-up, sim, records, page): median "
              f"{np.median(started):.1f} s, max {max(started):.1f} s over {len(started)} points")
    if failed:
        print(f"points that cannot start: median {np.median(failed):.1f} s each")


def sweep_points(source: Path) -> pd.DataFrame:
    """A sweep's aggregated points table, or the one a collected set kept."""
    kept = source / "sweep_points.csv"
    return pd.read_csv(kept) if (source / INDEX).is_file() and kept.is_file() \
        else collect_points(source)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m reports.validation.collect",
                                description=__doc__.split("\n")[0])
    p.add_argument("dest", type=Path, help="e.g. tests/data/validation/h100_qwen3_0_6b")
    p.add_argument("sweeps", type=Path, nargs="+",
                   help="mode=both sweep folders, or sets collected earlier")
    p.add_argument("--points-csv", action="store_true",
                   help="also write the sweeps' aggregated points table (sweep_points.csv)")
    args = p.parse_args(argv)
    index = collect(args.dest, args.sweeps)
    if args.points_csv:
        pd.concat([sweep_points(s) for s in args.sweeps], ignore_index=True).to_csv(
            args.dest / "sweep_points.csv", index=False)
    print_report(index, args.dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
