"""A small, fast calibration of the tiny model on the CPU gives a Profile the sim can use."""

from __future__ import annotations

import numpy as np
import pytest

from engine.calibrate import (
    CalibrationGrid,
    StepShape,
    calibrate,
    catalog_stem,
    config_from_args,
    parse_args,
)
from engine.config import EngineConfig
from engine.memory import estimate_activation_bytes
from sim.catalog import load_hardware, load_model
from sim.features import StepFeatures
from sim.memory_model import predict_memory
from sim.profile import Profile, ProfileKey, find_profile
from sim.simulator import Simulator
from workloads.trace_requests import TraceRequest

MODEL = load_model("tiny_qwen3")
CONFIG = EngineConfig(dtype="float32", device="cpu", attention_backend="sdpa",
                      max_model_len=256, block_size=16, max_num_seqs=32,
                      max_num_batched_tokens=256, num_gpu_blocks_override=512)
GRID = CalibrationGrid(prefill_chunks=(8, 32, 96), prefill_contexts=(0, 64),
                       prefill_seqs=(1, 2), decode_batches=(1, 4, 8, 16),
                       decode_contexts=(16, 128), mixed_decodes=(2, 8), mixed_chunks=(16, 64),
                       repeats=2, passes=2, warmup=2)


@pytest.fixture(scope="module")
def profile() -> Profile:
    return calibrate("tiny_qwen3", CONFIG, hardware="cpu", samples=GRID, time_budget_s=60)


def expected_features(shape: StepShape) -> tuple[int, ...]:
    prefill_tokens = sum(q for _, q in shape.prefills)
    prefill_attn = sum(q * c + q * (q + 1) // 2 for c, q in shape.prefills)
    return (prefill_tokens, prefill_attn, len(shape.decodes), sum(shape.decodes),
            shape.num_seqs)


def test_profile_key_and_samples(profile: Profile) -> None:
    assert profile.key == ProfileKey("cpu", "tiny_qwen3", "float32", "sdpa")
    assert profile.key.filename == "cpu__tiny_qwen3__float32__sdpa.json"
    shapes = GRID.runnable(CONFIG, 512)
    assert len(shapes) == 12 + 8 + 8 and len(profile.seconds) == len(shapes)
    measured = sorted(zip(*(profile.samples[f] for f in (
        "prefill_tokens", "prefill_attn", "decode_seqs", "decode_ctx", "num_seqs")),
        strict=True))
    assert measured == sorted(expected_features(s) for s in shapes)
    assert (profile.seconds > 0).all() and profile.buckets is None


def test_grid_leaves_out_steps_the_config_cannot_run() -> None:
    small = EngineConfig(max_model_len=100, max_num_seqs=6, max_num_batched_tokens=64)
    shapes = GRID.runnable(small, num_blocks=40)
    assert shapes and all(s.max_len <= 100 and s.num_seqs <= 6 and s.num_tokens <= 64
                          and s.blocks(16) <= 40 for s in shapes)
    assert len(shapes) < len(GRID.shapes())


def test_fit_predicts_its_own_samples(profile: Profile) -> None:
    predicted = profile.step_time().predict(profile.features())
    rel = np.abs(predicted - profile.seconds) / profile.seconds
    assert np.median(rel) < 0.25, f"median relative error {np.median(rel):.2f}"
    holdout = profile.fit["holdout"]
    assert holdout["n"] > 0 and holdout["median_abs_pct_err"] >= 0
    assert len(profile.fit["decode_coef"]) == 3 and len(profile.fit["mixed_coef"]) == 6


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
    for key in ("device", "torch_version", "date", "command", "dtype", "backend"):
        assert meta[key], key
    assert "formula" in meta["activation"]
    assert meta["points_measured"] == meta["points_planned"] == len(profile.seconds)


def test_round_trip_and_use_in_the_sim(profile: Profile, tmp_path) -> None:
    path = profile.save(tmp_path)
    assert path.name == "cpu__tiny_qwen3__float32__sdpa.json"
    loaded = Profile.load(path)
    assert loaded.to_dict() == profile.to_dict()
    features = profile.features()
    assert np.array_equal(loaded.step_time().predict(features),
                          profile.step_time().predict(features))
    trace = [TraceRequest(i, 0.002 * i, list(range(3, 40 + 5 * i)), 5) for i in range(6)]
    result = Simulator(CONFIG, 512, loaded.step_time()).run(trace)
    assert all(r.output_len == 5 for r in result.requests)
    assert result.steps.to_frame().end_s.iloc[-1] > 0


def test_memory_model_uses_the_profile(profile: Profile) -> None:
    config = EngineConfig(dtype="float32", max_model_len=256, max_num_batched_tokens=192)
    prediction = predict_memory(MODEL, load_hardware("l4_24gb"), config, profile)
    assert prediction.terms.activation_peak_bytes == profile.activation_bytes(192)
    assert prediction.sources["activation"] == f"profile {profile.name}"


def test_time_budget_too_small_for_a_fit() -> None:
    with pytest.raises(ValueError, match="measure more steps"):
        calibrate("tiny_qwen3", CONFIG, hardware="cpu", samples=GRID, time_budget_s=0.0)


def test_shipped_cpu_profile() -> None:
    shipped = find_profile(ProfileKey("cpu", "tiny_qwen3", "float32", "sdpa"))
    assert shipped is not None, "sim/profiles/cpu__tiny_qwen3__float32__sdpa.json is missing"
    assert shipped.fit["holdout"]["n"] >= 50
    assert shipped.fit["holdout"]["median_abs_pct_err"] < 25
    assert len(shipped.memory["activation"]) >= 3
    assert (shipped.step_time().predict(shipped.features()) > 0).all()


def test_catalog_stem_and_cli_config() -> None:
    assert catalog_stem("Tiny-Qwen3") == "tiny_qwen3"
    assert catalog_stem("no-such-model") is None
    args = parse_args(["--model", "tiny_qwen3", "--hardware", "cpu", "--dtype", "float32",
                       "--device", "cpu"])
    config = config_from_args(args, MODEL)
    assert config.max_model_len == 2048 and config.dtype == "float32"
    config.validate(MODEL)
