"""Accuracy gates: the twin re-predicts every committed validation point, on the CPU.

Each set under tests/data/validation/<set>/ was collected from mode=both sweeps by
`python -m reports.validation.collect`: per point the configuration, the trace and what the
real engine measured. The twin re-runs each point from those files with the committed profile
in sim/profiles/, and every quantity must stay within its gate in
`reports.validation.accuracy.GATES`
(start / no-start and num_blocks exact; peak KV blocks, preemptions and TTFT / TPOT / E2E at
p50 / p90 / p99 within their percent limits). A regression in the simulator, the scheduler,
the memory model or a profile fails here.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd
import pytest

from reports.validation.accuracy import (
    BAND_QUANTITIES,
    GATES,
    INDEX,
    ROOT,
    SET_SCORES,
    TARGETS,
    VALIDATION_DIR,
    coverage_frame,
    coverage_table,
    error_table,
    errors_frame,
    find_sets,
    gates_for,
    load_set,
    markdown,
    median_table,
    point_errors,
    repeat_frame,
    repredict,
    sensitivity_frame,
    set_scores,
    violations,
)
from reports.validation.collect import blocks_in_error, expand_steps

SETS = find_sets()
POINTS = [pytest.param(vset, point, id=f"{vset.name}-{point['id']}-{point['workload_label']}")
          for vset in SETS for point in vset.points]
H100 = VALIDATION_DIR / "h100_qwen3_0_6b"
H100_EAGER = VALIDATION_DIR / "h100_qwen3_0_6b_eager"
H200 = VALIDATION_DIR / "h200_qwen3_0_6b"


def describe(point: dict) -> str:
    e = point["engine"]
    return (f"{point['id']} ({point['workload_label']}, block_size={e['block_size']}, "
            f"max_model_len={e['max_model_len']}, "
            f"gpu_memory_utilization={e['gpu_memory_utilization']})")


@pytest.mark.skipif(not POINTS, reason="no validation data committed under "
                                       "tests/data/validation/")
@pytest.mark.parametrize(("vset", "point"), POINTS)
def test_point_is_within_its_gates(vset, point) -> None:
    predicted = repredict(vset, point)
    problems = violations(point_errors(point, predicted), gates_for(vset.name))
    assert not problems, f"{vset.name} {describe(point)}:\n  " + "\n  ".join(problems)


@pytest.mark.parametrize("vset", SETS, ids=[s.name for s in SETS])
def test_the_set_is_predicted_with_its_own_profile(vset) -> None:
    """Every started point was measured with the attention backend its profile is keyed by."""
    for point in vset.points:
        predicted = repredict(vset, point)
        assert predicted["predictor"]["kind"] == "calibrated", describe(point)
        backend = point["real"].get("attention_backend")
        if backend:
            assert predicted["profile"].endswith(f"__{backend}"), \
                f"{describe(point)}: measured with {backend}, predicted with {predicted['profile']}"


@pytest.mark.parametrize(("path", "configs"), [(H100_EAGER, 36), (H100, 34), (H200, 36)])
def test_gpu_validation_set(path: Path, configs: int) -> None:
    """The eager-engine set and the shipped engine's H200 set have the whole grid; the
    piecewise engine's lost block 128 / 32768 at 0.5 and 0.9 to its command's time limit."""
    if not (path / INDEX).is_file():
        pytest.skip("no H100 validation data committed yet: run the GPU sweep, then "
                    "python -m reports.validation.collect tests/data/validation/h100_qwen3_0_6b "
                    "<sweep folders> (see README, 'How accurate is kvtwin')")
    vset = next(s for s in SETS if s.path == path)
    grid = {(p["engine"]["block_size"], p["engine"]["max_model_len"],
             p["engine"]["gpu_memory_utilization"]) for p in vset.points}
    assert len(grid) >= configs, f"{len(grid)} of the 36 engine configurations are committed"


def test_an_older_engines_set_keeps_its_own_profile() -> None:
    """The eager set predates graphs of mixed steps: it is re-predicted with the profile of
    its own engine (its profiles/), every mixed step eager; the piecewise engine's set with
    its own too; the shipped engine's set with sim/profiles."""
    eager, shipped = load_set(H100_EAGER), load_set(H200)
    assert eager.profile_dir == H100_EAGER / "profiles" and shipped.profile_dir is None
    assert load_set(H100).profile_dir == H100 / "profiles"
    point = eager.points[-1]
    assert "max_cudagraph_tokens" not in point["engine"]
    own = repredict(eager, point)
    assert own["num_blocks"] == point["real"]["num_blocks"]
    other = repredict(eager, point, ROOT / "sim" / "profiles")
    assert other["num_blocks"] != point["real"]["num_blocks"]


def test_every_gate_table_is_complete() -> None:
    for name, gates in GATES.items():
        assert set(gates) == set(TARGETS), name
        for quantity, gate in gates.items():
            assert gate.limit >= 0 and gate.target == TARGETS[quantity].target, (name, quantity)
            assert gate.floor == TARGETS[quantity].floor, (name, quantity)
            looser = gate.limit < gate.target if gate.floor else gate.limit > gate.target
            assert not looser or gate.note, \
                f"{name}.{quantity}: a gate looser than its target must say why in its note"


# Coverage needs BAND_REPLICATES more simulations of every point: the sets of the shipped
# engine and of the CPU engine always, the older engines' H100 sets with KVTWIN_FULL_GATES=1
# (python -m reports.validation.accuracy <set> --bands prints them all).
COVERED = {"cpu_tiny_qwen3", "h200_qwen3_0_6b"}


@pytest.mark.parametrize("vset", SETS, ids=[s.name for s in SETS])
def test_set_scores_are_within_their_gates(vset) -> None:
    """The set's median |error| and per-metric bias, and (where run) the share of its
    measurements inside the predicted 90 % bands, each within its gate."""
    frame = errors_frame(vset)
    full = os.environ.get("KVTWIN_FULL_GATES") == "1"
    coverage = coverage_frame(vset) if vset.name in COVERED or full else None
    scores = set_scores(frame, coverage)
    assert set(scores) == set(SET_SCORES) - ({"coverage"} if coverage is None else set())
    problems = violations(scores, gates_for(vset.name))
    assert not problems, f"{vset.name}:\n  " + "\n  ".join(problems)


def test_coverage_counts_measurements_inside_their_bands() -> None:
    cpu = next(s for s in SETS if s.name == "cpu_tiny_qwen3")
    frame = coverage_frame(cpu)
    started = [p for p in cpu.points if p["real"]["starts"]]
    assert set(frame["point"]) == {p["id"] for p in started}
    assert set(frame["quantity"]) == set(BAND_QUANTITIES)
    assert (frame["p5"] <= frame["p95"]).all()
    inside = (frame["measured"] >= frame["p5"]) & (frame["measured"] <= frame["p95"])
    latency = frame["quantity"] != "total_preemptions"
    assert (frame.loc[latency, "inside"] == inside[latency]).all()
    table = coverage_table(frame)
    assert table.iloc[-1]["pairs"] == len(frame)
    assert table.iloc[-1]["coverage"] == pytest.approx(100 * frame["inside"].mean())


def test_set_scores_are_medians_of_the_point_errors() -> None:
    frame = pd.DataFrame({"starts": [True, True, False],
                          **{f"err_{m}_{p}": [1.0, -3.0, 50.0] for m in ("ttft", "tpot", "e2e")
                             for p in ("p50", "p90", "p99")}})
    frame["err_ttft_p99"] = [5.0, 7.0, 50.0]
    coverage = pd.DataFrame({"inside": [True, True, False, True]})
    scores = set_scores(frame, coverage)
    assert scores["coverage"] == 75.0
    assert scores["bias_tpot"] == -1.0 and scores["bias_ttft"] == 1.0
    assert scores["median_abs_error"] == 3.0
    floor = TARGETS["coverage"]
    assert floor.floor and violations({"coverage": 75.0}, {"coverage": floor}) == [
        "coverage: 75.0 % is below the gate 90 %"]


def test_cpu_set_exercises_every_gate() -> None:
    """The CPU set is collected like the H100 one; it must hold points that cannot start
    (both start-up errors), points that preempt, and several load levels."""
    vset = next((s for s in SETS if s.name == "cpu_tiny_qwen3"), None)
    assert vset is not None, "tests/data/validation/cpu_tiny_qwen3 is missing"
    real = [p["real"] for p in vset.points]
    assert {r["error_type"] for r in real if not r["starts"]} == {
        "NoCacheMemoryError", "MaxModelLenTooLargeError"}
    assert any((r["metrics"] or {}).get("total_preemptions", 0) > 0 for r in real)
    labels = {p["workload_label"] for p in vset.points if p["real"]["starts"]}
    assert len(labels) >= 5, labels


def test_error_table_covers_every_load_level() -> None:
    vset = next((s for s in SETS if s.name == "cpu_tiny_qwen3"), None)
    if vset is None:
        pytest.skip("no CPU validation set")
    frame = errors_frame(vset)
    table = error_table(frame)
    assert table["workload"].iloc[-1] == "all"
    assert set(table["workload"]) - {"all"} == set(frame.loc[frame["starts"], "workload"])
    assert table.iloc[-1]["points"] == int(frame["starts"].sum())
    text = markdown(table)
    assert text.count("\n") == len(table) + 1 and "ttft p50" in text
    medians = median_table(frame).iloc[0]
    assert medians["points"] == table.iloc[-1]["points"]
    for column in table.columns[2:]:
        assert medians[column] <= table.iloc[-1][column]
        assert medians[column] == frame.loc[frame["starts"], f"err_{column}"].abs().median()


def test_committed_steps_expand_to_step_records() -> None:
    for vset in SETS:
        steps = pd.read_parquet(vset.path / "steps.parquet")
        for point in vset.points:
            compact = steps[steps["point"] == point["id"]].reset_index(drop=True)
            if compact.empty:
                assert not point["real"]["starts"]
                continue
            frame = expand_steps(compact, point["real"]["num_blocks"])
            assert len(frame) == point["real"]["metrics"]["num_steps"]
            assert frame["num_blocks_used"].max() == \
                point["real"]["metrics"]["kv_blocks_used_peak"]
            assert (frame["end_s"] >= frame["start_s"]).all()


def test_start_up_errors_give_num_blocks() -> None:
    assert blocks_in_error("No available memory for the cache blocks (num_blocks=-77). "
                           "Try increasing") == -77
    assert blocks_in_error("... KV cache memory (0.00 GiB, 87 blocks of 16 tokens) ...") == 87
    assert blocks_in_error("CUDA out of memory") is None


def test_errors_are_signed_and_skip_what_does_not_apply() -> None:
    point = {"real": {"starts": True, "num_blocks": 100,
                      "metrics": {"ttft_p50_s": 2.0, "total_preemptions": 0,
                                  "kv_blocks_used_peak": 50}}}
    predicted = {"starts": True, "num_blocks": 100,
                 "metrics": {"ttft_p50_s": 2.1, "total_preemptions": 1,
                             "kv_blocks_used_peak": 50}}
    errors = point_errors(point, predicted)
    assert errors["ttft_p50"] == pytest.approx(5.0) and errors["num_blocks"] == 0
    assert errors["total_preemptions"] == 100.0  # a count: divided by max(measured, 1)
    assert math.isnan(errors["tpot_p90"])  # not measured: not gated
    assert violations(errors, TARGETS) == [
        "total_preemptions: error +100.00 % exceeds the gate 5 %",
        "ttft_p50: error +5.00 % exceeds the gate 3 %"]


@pytest.mark.parametrize("vset", SETS, ids=[s.name for s in SETS])
def test_a_set_measured_against_itself_has_no_error(vset) -> None:
    frame = repeat_frame(vset, vset)
    assert len(frame) == len(vset.points)
    errors = frame.filter(like="err_").abs()
    assert (errors.fillna(0.0) == 0.0).all().all()


MACHINE_A = ROOT / "tests" / "data" / "repeats" / "h100_machine_a"


def test_one_machine_measured_the_points_twice_alike_in_memory() -> None:
    """The H100 points measured twice, back to back on one machine (README, 'Run to run'):
    start verdicts and num_blocks agree exactly (the start-up arithmetic is deterministic);
    latencies differ by run-to-run noise, the floor of the twin's error."""
    first, again = load_set(MACHINE_A / "run1"), load_set(MACHINE_A / "run2")
    frame = repeat_frame(first, again)
    assert len(frame) == len(first.points) == len(again.points) >= 40
    assert (frame["err_starts"] == 0).all() and (frame["err_num_blocks"].fillna(0) == 0).all()
    started = frame[frame["starts"]]
    assert started["err_ttft_p50"].notna().all() and started["err_e2e_p99"].notna().all()
    assert (started["err_tpot_p50"].abs() > 0).any()  # two real runs, not one run twice


@pytest.mark.parametrize(("first", "again", "points"), [
    (H100, ROOT / "tests" / "data" / "repeats" / "h100_qwen3_0_6b_run2", 10),
    (H200, ROOT / "tests" / "data" / "repeats" / "h200_qwen3_0_6b_run2", 46)])
def test_an_engine_measured_the_points_twice_alike_in_memory(first: Path, again: Path,
                                                             points: int) -> None:
    """Points replayed again right after on the same machine: the load points of the
    piecewise engine's H100 set, every point of the shipped engine's H200 set."""
    second = load_set(again)
    frame = repeat_frame(load_set(first), second)
    assert len(frame) == len(second.points) == points
    assert (frame["err_starts"] == 0).all() and (frame["err_num_blocks"].fillna(0) == 0).all()
    started = frame[frame["starts"]]
    assert (started["err_ttft_p50"].abs() > 0).all()


def test_a_set_is_repredicted_with_its_own_machines_profiles() -> None:
    run = load_set(MACHINE_A / "run1")
    point = next(p for p in run.points if p["workload_label"].endswith("chat_p30")
                 and p["engine"]["gpu_memory_utilization"] == 0.9)
    own = repredict(run, point, MACHINE_A / "profiles")
    shipped = repredict(run, point)
    assert own["starts"] and own["metrics"]["tpot_p50_s"] != shipped["metrics"]["tpot_p50_s"]
    with pytest.raises(FileNotFoundError, match="no calibration profile"):
        repredict(run, point, MACHINE_A)  # no profiles there


def test_sensitivity_is_how_far_the_twin_moves_with_its_step_times() -> None:
    """Every step 2 % longer or shorter: the CPU set's points move, each by at least the
    order of the scaling in TPOT (steps are what a token waits for); 0 % moves nothing."""
    cpu = next(s for s in SETS if s.name == "cpu_tiny_qwen3")
    still = sensitivity_frame(cpu, 0.0)
    assert (still.filter(like="err_").fillna(0.0) == 0.0).all().all()
    moved = sensitivity_frame(cpu, 2.0)
    started = moved[moved["starts"]]
    assert (started["err_num_blocks"] == 0).all() and (started["err_starts"] == 0).all()
    assert (started["err_tpot_p50"] > 1.0).all()
    assert started["err_e2e_p50"].median() > 1.0


def test_collected_sets_merge_into_one(tmp_path: Path) -> None:
    """Sets collected one GPU command each become one set: points renumbered in order, their
    records and traces with them, and each point re-predicts exactly as in its own set."""
    from reports.validation.collect import collect

    cpu = next(s for s in SETS if s.name == "cpu_tiny_qwen3")
    index = collect(tmp_path / "merged", [cpu.path, cpu.path])
    merged = load_set(tmp_path / "merged")
    n = len(cpu.points)
    assert [p["id"] for p in merged.points] == [f"p{i:03d}" for i in range(2 * n)]
    assert index["sources"] == ["cpu_tiny_qwen3", "cpu_tiny_qwen3"]
    old = pd.read_parquet(cpu.path / "requests.parquet")
    new = pd.read_parquet(merged.path / "requests.parquet")
    assert len(new) == 2 * len(old)
    first, twin = cpu.points[-1], merged.points[2 * n - 1]
    assert twin["source"] == f"cpu_tiny_qwen3/{first['source']}"
    moved = new[new["point"] == twin["id"]].drop(columns="point").reset_index(drop=True)
    kept = old[old["point"] == first["id"]].drop(columns="point").reset_index(drop=True)
    pd.testing.assert_frame_equal(moved, kept)
    assert repredict(merged, twin)["metrics"] == repredict(cpu, first)["metrics"]
