"""The twin at tensor_parallel_size > 1: per-rank memory, capacity of the 70B, the
all-reduce term of the step time, the all-reduce profile format, the sweep pages' TP column."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from engine.core.catalog import load_hardware, load_model
from engine.core.config import ConfigError, EngineConfig
from engine.core.features import StepFeatures, StepRow
from engine.core.parallel import (
    TP_COMM_BYTES,
    RankShapes,
    allreduces_per_step,
    rank_num_parameters,
    rank_weight_bytes,
)
from run import sim_main
from sim.collectives import (
    AllReduceProfile,
    AllReduceRoofline,
    TensorParallelStepTime,
    allreduce_model,
    allreduce_profile_path,
    rank_roofline,
)
from sim.step_time import DecodeRun, ModelWork
from sim.twin import setup_twin

CATALOG = ("qwen3_0_6b", "qwen3_8b", "qwen3_32b", "llama3_1_8b", "llama3_1_70b",
           "mistral_7b_v0_3", "tiny_qwen3", "tiny_llama")


@pytest.mark.parametrize("name", CATALOG)
def test_tp1_arithmetic_is_the_models(name: str) -> None:
    model = load_model(name)
    assert rank_num_parameters(model, 1) == model.num_parameters()
    for quant in ("none", "int8"):
        assert rank_weight_bytes(model, 1, "bfloat16", quant) == \
            model.weight_bytes("bfloat16", quant)
    assert ModelWork.of(model, "bfloat16", tp=1) == ModelWork.of(model, "bfloat16")


def test_catalog_70b_and_32b_match_their_hf_configs() -> None:
    llama, qwen = load_model("Llama-3.1-70B"), load_model("Qwen/Qwen3-32B")
    assert llama.num_parameters() == 70_553_706_496
    assert (qwen.num_hidden_layers, qwen.num_attention_heads, qwen.num_key_value_heads,
            qwen.intermediate_size) == (64, 64, 8, 25600)
    node = load_hardware("h100_80gb_x8")
    assert node.num_gpus == 8 and node.nvlink_bandwidth_bytes_per_s == 900e9


def test_weights_split_over_ranks() -> None:
    model = load_model("llama3_1_70b")
    full = model.weight_bytes("bfloat16")
    for tp in (2, 4, 8):
        shard = rank_weight_bytes(model, tp, "bfloat16")
        assert full / tp < shard < full / tp + 4 * model.hidden_size * 2 * 80  # norms whole


def test_70b_on_four_h100s_at_32k() -> None:
    """Will Llama-3.1-70B start on 4 x H100 with max_model_len 32k, and how many KV blocks
    per rank? Yes at TP=4; at TP=2 the weights leave too little for one 32k request."""
    config = EngineConfig(tensor_parallel_size=4, max_model_len=32768)
    setup = setup_twin("llama3_1_70b", "h100_80gb_x8", config)
    memory = setup.memory
    assert memory.starts
    assert memory.num_blocks == min(memory.rank_num_blocks) == memory.rank_num_blocks[0]
    assert len(memory.rank_num_blocks) == 4
    assert memory.parallel["kv_heads_per_rank"] == 2
    assert memory.terms.non_torch_bytes == setup.hardware.non_torch_bytes_default + \
        TP_COMM_BYTES
    assert memory.block_bytes == 16 * 2 * 80 * 2 * 128 * 2
    tp2 = setup_twin("llama3_1_70b", "h100_80gb_x8",
                     EngineConfig(tensor_parallel_size=2, max_model_len=32768)).memory
    assert not tp2.starts and tp2.error_type == "MaxModelLenTooLargeError"


def test_capacity_cli_answers_per_rank(capsys) -> None:
    code = sim_main(["capacity", "model=llama3_1_70b", "hardware=h100_80gb_x8",
                     "engine.tensor_parallel_size=4", "engine.max_model_len=32768"])
    out = capsys.readouterr().out
    assert code == 0
    assert "tensor_parallel_size=4 (memory and KV blocks per rank)" in out
    assert "KV blocks by rank" in out


def test_tp_needs_the_gpus_and_no_tp1_profile() -> None:
    with pytest.raises(ConfigError, match="num_gpus"):
        setup_twin("qwen3_8b", "h100_80gb", EngineConfig(tensor_parallel_size=2))
    with pytest.raises(FileNotFoundError, match="measured at TP=1"):
        setup_twin("qwen3_0_6b", "h100_80gb_x8", EngineConfig(tensor_parallel_size=2),
                   predictor="calibrated")


def test_tp1_prediction_has_no_rank_fields() -> None:
    memory = setup_twin("qwen3_0_6b", "h100_80gb", EngineConfig()).memory
    assert memory.rank_num_blocks == [] and "parallel" not in memory.to_dict()


def features(rows: list[StepRow]) -> StepFeatures:
    cols = {f: np.array([getattr(r, f) for r in rows]) for f in
            ("prefill_tokens", "prefill_attn", "decode_seqs", "decode_ctx", "num_seqs")}
    return StepFeatures(**cols)


def test_step_time_adds_the_allreduces_bit_for_bit() -> None:
    model, hw = load_model("qwen3_8b"), load_hardware("h100_80gb_x8")
    st = setup_twin("qwen3_8b", "h100_80gb_x8", EngineConfig(tensor_parallel_size=2)).step_time
    assert isinstance(st, TensorParallelStepTime)
    rows = [StepRow(0, 0, n, 300 * n, n) for n in (1, 7, 64)] + [StepRow(512, 90000, 3, 900, 5)]
    predicted = st.predict(features(rows))
    assert list(predicted) == [st.step(r, i) for i, r in enumerate(rows)]
    run = DecodeRun(7, 2100, 5)
    assert list(st.decode_run(run)) == list(st.predict(run.features()))
    compute = rank_roofline(model, hw, EngineConfig(tensor_parallel_size=2))
    comm = predicted - compute.predict(features(rows))
    token_bytes = model.hidden_size * 2
    one = AllReduceRoofline.of(hw, 2).seconds(np.array([64 * token_bytes]))[0]
    assert comm[2] == pytest.approx(allreduces_per_step(model) * one)
    assert np.all(np.diff(comm[:3]) > 0)


def test_rank_roofline_divides_the_work() -> None:
    model = load_model("llama3_1_70b")
    one, four = ModelWork.of(model, "bfloat16"), ModelWork.of(model, "bfloat16", tp=4)
    assert four.attn_unit == one.attn_unit / 4
    assert four.kv_token_bytes == one.kv_token_bytes / 4
    assert one.weight_bytes / 4 < four.weight_bytes < one.weight_bytes / 3.9


def test_allreduce_profile_round_trip_and_lookup(tmp_path: Path) -> None:
    profile = AllReduceProfile(2, (1024.0, 1 << 20, 1 << 24), (10e-6, 20e-6, 100e-6),
                               "h100_80gb_x8", meta={"measured": "test"})
    path = profile.save(allreduce_profile_path("h100_80gb_x8", 2, tmp_path))
    loaded = allreduce_model(load_hardware("h100_80gb_x8"), "h100_80gb_x8", 2, tmp_path)
    assert isinstance(loaded, AllReduceProfile) and loaded == profile
    assert json.loads(path.read_text())["format"] == "kvtwin-allreduce/1"
    got = loaded.seconds(np.array([512.0, 1024.0, (1 << 20) + (1 << 23), 2 << 24]))
    slope = 80e-6 / ((1 << 24) - (1 << 20))
    assert got[:2].tolist() == [10e-6, 10e-6]
    assert got[2] == pytest.approx(20e-6 + slope * (1 << 23))
    assert got[3] == pytest.approx(100e-6 + slope * (1 << 24))
    assert isinstance(allreduce_model(load_hardware("h100_80gb_x8"), "h100_80gb_x8", 4,
                                      tmp_path), AllReduceRoofline)
    with pytest.raises(ValueError, match="strictly increasing"):
        AllReduceProfile(2, (2.0, 1.0), (1.0, 2.0))


def test_twin_at_tp2_simulates(tmp_path: Path) -> None:
    from sim.twin import simulate
    from workloads import make_preset
    from workloads.trace_requests import model_requests

    setup = setup_twin("qwen3_8b", "h200_141gb_x8", EngineConfig(tensor_parallel_size=2))
    trace = make_preset("poisson_chat", n=40)
    run = simulate(setup, model_requests(trace, setup.model.vocab_size))
    assert len(run.requests) == 40 and run.capacity.tensor_parallel_size == 2
    assert RankShapes.of(setup.model, 2).num_kv_heads == 4


def test_sweep_table_shows_the_tp_axis(tmp_path: Path) -> None:
    from reports.aggregate import collect_points

    for tp in (1, 2):
        point = tmp_path / f"tp{tp}"
        point.mkdir()
        summary = {"status": "ok", "mode": "sim",
                   "config": {"model": "qwen3_8b", "hardware": "h100_80gb_x8",
                              "engine": {"tensor_parallel_size": tp, "block_size": 16}},
                   "sim": {"memory": {"num_blocks": 100 * tp}}}
        (point / "summary.json").write_text(json.dumps(summary))
    points = collect_points(tmp_path)
    assert sorted(points["tensor_parallel_size"]) == [1, 2]
