"""A small, fast calibration of the tiny model on the CPU gives a Profile the sim can use."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from engine.core.catalog import load_hardware, load_model
from engine.core.config import EngineConfig
from engine.core.features import EXTRA_FEATURES, FEATURES, StepFeatures
from engine.core.memory import estimate_activation_bytes
from engine.core.request import Request
from engine.runtime.llm import LLMEngine
from engine.tools.calibrate import (
    CalibrationGrid,
    EngineWorkload,
    StepShape,
    StepTap,
    calibrate,
    catalog_stem,
    config_from_args,
    engine_workloads,
    graph_info,
    parse_args,
    run_requests,
)
from sim.memory_model import predict_memory
from sim.profile import (
    FORMAT,
    FORMAT_V1,
    LOSS,
    PROFILE_DIR,
    Profile,
    ProfileKey,
    find_profile,
)
from sim.simulator import Simulator
from sim.step_terms import DECODE_TERMS, MIXED_TERMS, design_matrix
from sim.step_time import LinearTerms, fit_nonnegative

MODEL = load_model("tiny_qwen3")
CONFIG = EngineConfig(dtype="float32", device="cpu", attention_backend="sdpa",
                      max_model_len=256, block_size=16, max_num_seqs=32,
                      max_num_batched_tokens=256, num_gpu_blocks_override=512)
GRID = CalibrationGrid(prefill_chunks=(8, 32, 96), prefill_contexts=(0, 64),
                       prefill_seqs=(1, 2), decode_batches=(1, 4, 8, 16),
                       decode_contexts=(16, 128), mixed_decodes=(2, 8), mixed_chunks=(16, 64),
                       repeats=2, passes=2, warmup=2)
WORKLOADS = [EngineWorkload("batch", 64, (8, 64), (2, 24)),
             EngineWorkload("chat", 48, (48, 200), (2, 16), "lognormal", 200),
             EngineWorkload("shared", 16, (40, 120), (2, 12), prefix_groups=2, prefix_len=32)]


def true_times(f: StepFeatures) -> tuple[np.ndarray, np.ndarray]:
    """Known (device, host) seconds of every step: linear in its composition."""
    device = (2e-4 + 2e-6 * f.prefill_tokens + 1e-9 * f.prefill_attn + 5e-6 * f.decode_seqs
              + 2e-8 * f.decode_ctx)
    return device, 5e-5 + 2e-6 * f.num_seqs


def synthetic_timer(f: StepFeatures, slower: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """`true_times` times `slower`, each step with 3 % seeded noise: what a test may fit
    (live CPU timings move with the machine's load)."""
    device, host = true_times(f)
    noise = np.random.default_rng(0).lognormal(0.0, 0.03, (2, len(f)))
    return slower * device * noise[0], slower * host * noise[1]


@pytest.fixture(scope="module")
def profile() -> Profile:
    return calibrate("tiny_qwen3", CONFIG, hardware="cpu", samples=GRID, time_budget_s=60,
                     workloads=WORKLOADS, engine_passes=1, timer=synthetic_timer,
                     verbose=False)


def expected_features(shape: StepShape) -> tuple[int, ...]:
    prefill_tokens = sum(q for _, q in shape.prefills)
    prefill_attn = sum(q * c + q * (q + 1) // 2 for c, q in shape.prefills)
    return (prefill_tokens, prefill_attn, len(shape.decodes), sum(shape.decodes),
            shape.num_seqs)


def rows(profile: Profile, source: str) -> np.ndarray:
    return profile.source == source


def test_profile_key_and_samples(profile: Profile) -> None:
    assert profile.key == ProfileKey("cpu", "tiny_qwen3", "float32", "sdpa")
    assert profile.key.filename == "cpu__tiny_qwen3__float32__sdpa.json"
    shapes = GRID.runnable(CONFIG, 512)
    synthetic = rows(profile, "synthetic")
    assert len(shapes) == 12 + 8 + 8 and synthetic.sum() == len(shapes)
    measured = sorted(zip(*(np.asarray(profile.samples[f])[synthetic] for f in FEATURES),
                          strict=True))
    assert measured == sorted(expected_features(s) for s in shapes)
    assert (profile.seconds > 0).all() and profile.buckets is None


def test_engine_steps_are_timed_as_a_replay_times_them(profile: Profile) -> None:
    """Engine rows: one per LLMEngine.step, the whole step (>= its execute_model), both
    decode-only and mixed steps, each workload's requests all served."""
    engine = rows(profile, "engine")
    assert engine.sum() > 50
    assert (profile.seconds[engine] >= profile.exec_seconds[engine]).all()
    assert (profile.seconds[~engine] == profile.exec_seconds[~engine]).all()
    decode = profile.features().is_decode_only
    assert (engine & decode).any() and (engine & ~decode).any()
    assert profile.meta["engine_steps"] == engine.sum()
    assert [w["name"] for w in profile.meta["engine_workloads"]] == [w.name for w in WORKLOADS]


def test_fit_predicts_its_own_samples(profile: Profile) -> None:
    """Synthetic step times (the sample-collection seam): the fit finds the known times
    to within their 3 % noise; the live-timing check is tests/benchmarks'."""
    from sim.profile import heldout_predictions

    f = profile.features()
    predicted = heldout_predictions(profile.step_time(), profile.fit_data())
    device, host = true_times(f)
    truth = np.where(profile.source == "engine", device + host, device)
    rel = np.abs(predicted - profile.seconds) / profile.seconds
    assert np.median(rel) < 0.05, f"median relative error {np.median(rel):.3f}"
    assert np.median(np.abs(predicted / truth - 1)) < 0.03
    assert profile.meta["timer"] == "synthetic_timer"
    holdout = profile.fit["holdout"]
    assert holdout["n"] > 0 and holdout["median_abs_pct_err"] >= 0
    assert set(holdout["by_source"]) == {"synthetic", "engine"}
    assert set(holdout["by_kind"]) == {"decode", "mixed"}
    assert profile.meta["decode_batch_basis"] == "knots"
    assert profile.fit["decode"]["terms"][0].startswith("batch_knot(")
    assert "num_tokens" in profile.fit["mixed"]["terms"]
    assert profile.fit["host_decode"] is not None and profile.fit["host_mixed"] is not None


def test_host_overhead_is_added_to_the_device_time(profile: Profile) -> None:
    model = profile.step_time()
    one = StepFeatures.from_columns(dict(prefill_tokens=[0], prefill_attn=[0],
                                         decode_seqs=[8], decode_ctx=[800], num_seqs=[8]))
    host = model.host_decode.predict(one)[0]
    assert host > 0
    from sim.profile import _device_only
    assert model.predict(one)[0] == pytest.approx(_device_only(model).predict(one)[0] + host)


def test_slower_steps_take_longer(profile: Profile) -> None:
    """The fit is not flat: 96-token prefills after a 64-token prefix, two at a time,
    cost more than one 8-token prefill."""
    model = profile.step_time()
    big = StepFeatures.from_columns(dict(
        prefill_tokens=[192], prefill_attn=[2 * (96 * 64 + 96 * 97 // 2)], decode_seqs=[0],
        decode_ctx=[0], num_seqs=[2]))
    small = StepFeatures.from_columns(dict(
        prefill_tokens=[8], prefill_attn=[36], decode_seqs=[0], decode_ctx=[0], num_seqs=[1]))
    assert model.predict(big)[0] > model.predict(small)[0]


def test_memory_terms_and_meta(profile: Profile) -> None:
    memory = profile.memory
    assert [n for n, _ in memory["activation"]] == [64, 128, 256]
    for n, act in memory["activation"]:
        assert act == estimate_activation_bytes(MODEL, n, min(32, n), "float32")
    assert memory["total_bytes"] == int(CONFIG.cpu_memory_gib * (1 << 30))
    assert memory["non_torch_bytes"] == 0 and memory["cuda_graph_bytes"] == 0
    meta = profile.meta
    for key in ("device", "torch_version", "date", "command", "dtype", "backend",
                "attention_backend", "load_average"):
        assert meta[key], key
    assert meta["attention_backend"] == "sdpa" and meta["cuda_graphs_enabled"] is False
    assert "formula" in meta["activation"]
    assert meta["points_measured"] == meta["points_planned"] == rows(profile, "synthetic").sum()


def test_round_trip_and_use_in_the_sim(profile: Profile, tmp_path) -> None:
    path = profile.save(tmp_path)
    assert path.name == "cpu__tiny_qwen3__float32__sdpa.json"
    assert json.loads(path.read_text())["format"] == FORMAT == "kvtwin-profile/3"
    loaded = Profile.load(path)
    assert loaded.to_dict() == profile.to_dict()
    features = profile.features()
    assert np.array_equal(loaded.step_time().predict(features),
                          profile.step_time().predict(features))
    trace = [Request(i, 0.002 * i, list(range(3, 40 + 5 * i)), 5) for i in range(6)]
    result = Simulator(CONFIG, 512, loaded.step_time()).run(trace)
    assert (result.requests["output_len"] == 5).all()
    assert result.steps.to_frame().end_s.iloc[-1] > 0


def test_version_1_profiles_load_and_predict_as_before(profile: Profile, tmp_path) -> None:
    """A kvtwin-profile/1 file: synthetic rows only, decode_coef / mixed_coef over the fixed
    terms, no host overhead; it predicts exactly the version-1 formula."""
    synthetic = rows(profile, "synthetic")
    samples = {k: list(np.asarray(profile.samples[k])[synthetic]) for k in (*FEATURES, "seconds")}
    samples = {k: [float(x) if k == "seconds" else int(x) for x in v] for k, v in samples.items()}
    decode, mixed = [1e-3, 2e-5, 1e-7], [1e-3, 4e-6, 2e-8, 0.0, 1e-7, 2e-5]
    v1 = {"format": FORMAT_V1, "key": vars(profile.key), "meta": {}, "buckets": [1, 2, 4, 8],
          "memory": profile.memory, "samples": samples,
          "fit": {"decode_coef": decode, "mixed_coef": mixed, "holdout": {"n": 0}}}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(v1))
    old = Profile.load(path)
    f = old.features()
    dec = design_matrix(f, DECODE_TERMS, [1, 2, 4, 8]) @ np.array(decode)
    mix = design_matrix(f, MIXED_TERMS, None) @ np.array(mixed)
    expected = np.where(f.is_decode_only, dec, mix)
    assert np.allclose(old.step_time().predict(f), expected, rtol=1e-12, atol=0)
    assert old.meta["upgraded_from"] == FORMAT_V1 and (old.source == "synthetic").all()
    assert Profile.load(old.save(tmp_path / "v2")).to_dict() == old.to_dict()


def test_version_3_measures_the_extra_features_and_fits_them(profile: Profile) -> None:
    """Every row has the longest decode's context and the gathered prefill keys; the fit
    has terms over them and is unbiased in seconds."""
    assert all(len(profile.samples[f]) == len(profile.seconds) for f in EXTRA_FEATURES)
    f = profile.features()
    assert (f.decode_max_ctx * np.maximum(f.decode_seqs, 1) >= f.decode_ctx).all()
    assert "decode_max_ctx" in profile.fit["decode"]["terms"]
    assert (f.decode_shared > 0).any()  # the shared-prefix workload's decodes
    assert "decode_unique_ctx" in profile.fit["decode"]["terms"]
    assert {"decode_max_ctx", "prefill_gather"} <= set(profile.fit["mixed"]["terms"])
    assert profile.fit["loss"] == LOSS
    assert "total_time_pct_err" in profile.fit["holdout"]


def test_a_splitting_decode_kernel_fits_the_longest_share(profile: Profile,
                                                          tmp_path: Path) -> None:
    """The sdpa backend records no split rule (the longest context itself is the term); a
    profile of the Triton kernel's rule fits the longest sequence's share of its splits."""
    from engine.core.shapes import DecodeSplit
    from sim.step_terms import split_term

    assert profile.meta["decode_split"] is None and profile.decode_split is None
    rule = DecodeSplit(num_kv_heads=2, target_programs=64, min_share=16, block_n=8)
    split = Profile(profile.key, profile.samples, profile.buckets, profile.memory,
                    {**profile.meta, "decode_split": dataclasses.asdict(rule)})
    model = split.fit_step_time()
    assert split_term(rule) in model.decode_terms
    assert "decode_max_ctx" not in model.decode_terms
    share = model.decode_coef[model.decode_terms.index(split_term(rule))]
    assert model.reads_longest == bool(share)
    reloaded = Profile.load(split.save(tmp_path)).step_time()
    assert reloaded.decode_terms == model.decode_terms
    assert np.array_equal(reloaded.predict(split.features()), model.predict(split.features()))


def test_version_2_profiles_load_and_predict_as_before() -> None:
    """The committed CPU profile (kvtwin-profile/2, no extra columns): its stored fit
    predicts term by term, and a refit with version 2's loss gives back the same fit."""
    key = ProfileKey("cpu", "tiny_qwen3", "float32", "sdpa")
    committed = find_profile(key)
    assert committed is not None
    assert json.loads((PROFILE_DIR / key.filename).read_text())["format"] == "kvtwin-profile/2"
    f, fit = committed.features(), committed.fit
    assert f.decode_max_ctx is None and f.prefill_gather is None
    dec = LinearTerms.from_dict(fit["decode"], "d", committed.buckets).predict(f)
    mix = LinearTerms.from_dict(fit["mixed"], "m").predict(f)
    hosts = [LinearTerms.from_dict(fit[k], k).predict(f)
             for k in ("host_decode", "host_mixed")]
    expected = np.where(f.is_decode_only, dec + hosts[0], mix + hosts[1])
    assert np.array_equal(committed.step_time().predict(f), expected)
    refit = committed.fit_step_time(iterations=0)
    assert refit.decode_terms == tuple(fit["decode"]["terms"])
    assert np.allclose(refit.predict(f), expected, rtol=1e-9, atol=0)


def test_fit_is_unbiased_in_seconds() -> None:
    """Multiplicative noise: weighting rows by 1 / measured fits low; by 1 / fitted, the
    summed time comes out right."""
    rng = np.random.default_rng(0)
    x = np.stack([np.ones(4000), rng.integers(1, 100, 4000)], axis=1).astype(float)
    truth = x @ np.array([1e-3, 5e-5])
    seconds = truth * rng.lognormal(0.0, 0.3, len(truth)) / np.exp(0.3**2 / 2)
    old = x @ fit_nonnegative(x, seconds, iterations=0)
    new = x @ fit_nonnegative(x, seconds)
    assert old.sum() / seconds.sum() - 1 < -0.05
    assert abs(new.sum() / seconds.sum() - 1) < 0.01


def test_grid_leaves_out_steps_the_config_cannot_run() -> None:
    small = EngineConfig(max_model_len=100, max_num_seqs=6, max_num_batched_tokens=64)
    shapes = GRID.runnable(small, num_blocks=40)
    assert shapes and all(s.max_len <= 100 and s.num_seqs <= 6 and s.num_tokens <= 64
                          and s.blocks(16) <= 40 for s in shapes)
    assert len(shapes) < len(GRID.shapes())


def test_default_grid_scales_with_the_config() -> None:
    gpu = CalibrationGrid.for_config(EngineConfig(max_model_len=32768))
    assert gpu.decode_contexts[-1] == 32768 and gpu.decode_batches[-1] == 256
    assert gpu.prefill_chunks[-1] == 8192 and 96 in gpu.decode_batches  # off-bucket sizes
    cpu = CalibrationGrid.for_config(EngineConfig(max_model_len=2048, max_num_seqs=16,
                                                  max_num_batched_tokens=2048), passes=5)
    assert cpu.decode_contexts[-1] == 2048 and cpu.decode_batches[-1] == 16
    assert cpu.passes == 5 and max(cpu.prefill_contexts) < 2048
    skewed = [s for s in gpu.shapes() if len(set(s.decodes)) > 1]
    assert skewed and all(s.decodes[0] > s.decodes[-1] for s in skewed)
    assert all(long <= 2048 for _, long in cpu.skewed_contexts)


def test_engine_workloads_fit_the_config() -> None:
    config = EngineConfig(max_model_len=32768, max_num_seqs=256)
    workloads = engine_workloads(config, num_blocks=40_000)
    assert workloads[0].num_requests > config.max_num_seqs  # the batch fills up
    for w in workloads:
        lens = w.prompt_lens(np.random.default_rng(0))
        assert lens.min() >= 1 and lens.max() + w.output[1] <= config.max_model_len
        assert w.num_requests * w.mean_prompt <= 64 * config.max_num_batched_tokens
    shared = next(w for w in workloads if w.prefix_groups)
    assert [w.arrive_every for w in workloads if w.arrive_every] == [2, 6]
    prompts = shared.requests(np.random.default_rng(0), 1000)
    heads = {tuple(p[:shared.prefix_len]) for p, _ in prompts}
    assert shared.prefix_groups == len(heads) == 4
    tiny = engine_workloads(EngineConfig(max_model_len=256, max_num_seqs=4,
                                         max_num_batched_tokens=256), num_blocks=20)
    assert all(w.num_requests >= 1 for w in tiny)


def test_step_tap_records_every_step_and_restores_the_engine() -> None:
    engine = LLMEngine(MODEL, CONFIG)
    schedule, execute = engine.scheduler.schedule, engine.model_runner.execute_model
    tap = StepTap(engine)
    engine.add_request(list(range(3, 40)))
    while engine.has_unfinished():
        engine.step()
    tap.close()
    assert len(tap.outs) == len(tap.exec_s) == len(engine.step_durations) > 1
    assert all(e <= d for e, d in zip(tap.exec_s, engine.step_durations, strict=True))
    assert engine.scheduler.schedule == schedule
    assert engine.model_runner.execute_model == execute
    assert graph_info(engine) == (False, None, "none (eager; buckets null)")


def test_requests_arriving_every_few_steps_keep_the_batch_moderate() -> None:
    """One request every 3 steps, each 9 steps long: about 3 decode at a time, and most
    prefills share their step with decodes (online serving); all at once, the batch holds
    every request."""
    def decode_batches(arrive_every: int) -> tuple[list[int], int]:
        engine = LLMEngine(MODEL, CONFIG)
        tap = StepTap(engine)
        requests = [(list(range(3, 3 + 20 + i)), 9) for i in range(12)]
        run_requests(engine, requests, arrive_every)
        tap.close()
        assert not engine.has_unfinished()
        mixed = sum(1 for o in tap.outs if any(i.is_decode for i in o.scheduled)
                    and not all(i.is_decode for i in o.scheduled))
        return [sum(i.is_decode for i in o.scheduled) for o in tap.outs], mixed

    staggered, mixed = decode_batches(3)
    assert max(staggered) <= 4 and mixed >= 8
    assert max(decode_batches(0)[0]) == 12


def test_memory_model_uses_the_profile(profile: Profile) -> None:
    config = EngineConfig(dtype="float32", max_model_len=256, max_num_batched_tokens=192)
    prediction = predict_memory(MODEL, load_hardware("l4_24gb"), config, profile)
    assert prediction.terms.activation_peak_bytes == profile.activation_bytes(192)
    assert prediction.sources["activation"] == f"profile {profile.name}"


def test_time_budget_too_small_for_a_fit() -> None:
    with pytest.raises(ValueError, match="measure more steps"):
        calibrate("tiny_qwen3", CONFIG, hardware="cpu", samples=GRID, time_budget_s=0.0,
                  workloads=WORKLOADS, verbose=False)


def test_a_short_budget_trims_the_grid_and_still_fits(capsys) -> None:
    grid = CalibrationGrid.for_config(CONFIG, repeats=1, passes=10_000, warmup=1)
    profile = calibrate("tiny_qwen3", CONFIG, hardware="cpu", samples=grid, time_budget_s=1.5,
                        workloads=WORKLOADS[:1], engine_passes=1)
    meta = profile.meta
    assert meta["calibration_wall_s"] < 1.5 + 1.5  # the last shape and the fit may overrun
    assert meta["points_measured"] == meta["points_planned"]  # every shape, fewer passes
    out = capsys.readouterr().out
    assert "[calibrate" in out and "time budget reached in pass" in out
    assert "held-out step-time error" in out


def test_shipped_cpu_profile() -> None:
    shipped = find_profile(ProfileKey("cpu", "tiny_qwen3", "float32", "sdpa"))
    assert shipped is not None, "sim/profiles/cpu__tiny_qwen3__float32__sdpa.json is missing"
    assert shipped.fit["holdout"]["n"] >= 50
    assert shipped.fit["holdout"]["median_abs_pct_err"] < 25
    assert shipped.fit["holdout"]["by_source"]["engine"]["n"] >= 50
    assert len(shipped.memory["activation"]) >= 3
    assert shipped.meta["attention_backend"] == "sdpa"
    assert shipped.meta["cuda_graphs_enabled"] is False
    assert (shipped.step_time().predict(shipped.features()) > 0).all()


def test_catalog_stem_and_cli_config() -> None:
    assert catalog_stem("Tiny-Qwen3") == "tiny_qwen3"
    assert catalog_stem("no-such-model") is None
    args = parse_args(["--model", "tiny_qwen3", "--hardware", "cpu", "--dtype", "float32",
                       "--device", "cpu", "--cpu-memory-gib", "0.25"])
    config = config_from_args(args, MODEL)
    assert config.max_model_len == 2048 and config.dtype == "float32"
    assert config.enforce_eager is False and config.cpu_memory_gib == 0.25
    config.validate(MODEL)
    gpu = config_from_args(parse_args(["--model", "qwen3_0_6b", "--hardware", "h100_80gb"]),
                           load_model("qwen3_0_6b"))
    assert gpu.max_model_len == 32768 and gpu.attention_backend == "auto"


def test_a_failing_engine_phase_or_step_does_not_sink_the_calibration(monkeypatch,
                                                                     capsys) -> None:
    """One GPU command is all a calibration gets: an engine workload that raises leaves a
    synthetic-only profile, and a synthetic step that raises is left out."""
    import engine.tools.calibrate as cal

    def broken_workload(engine, requests, arrive_every=0):
        engine.add_request(requests[0][0])
        engine.step()
        raise RuntimeError("kernel failed")

    real_time_step = cal.time_step

    def flaky_time_step(engine, out, repeats):
        if len(out.scheduled) == 2:
            raise RuntimeError("no kernel for two sequences")
        return real_time_step(engine, out, repeats)

    monkeypatch.setattr(cal, "run_requests", broken_workload)
    monkeypatch.setattr(cal, "time_step", flaky_time_step)
    profile = calibrate("tiny_qwen3", CONFIG, hardware="cpu", samples=GRID, time_budget_s=30,
                        workloads=WORKLOADS, engine_passes=1)
    assert (profile.source == "synthetic").all()
    assert profile.fit["host_decode"] is None and profile.fit["host_mixed"] is None
    assert not (profile.features().num_seqs == 2).any()
    assert profile.meta["points_measured"] < profile.meta["points_planned"]
    out = capsys.readouterr().out
    assert "engine steps not measured (RuntimeError: kernel failed)" in out
    assert "left out a step of 2 sequences" in out
