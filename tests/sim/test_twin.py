"""The twin end to end: determinism, memory predictions equal to the engine's, capacity."""

from __future__ import annotations

import json

import pytest

from engine.core.config import EngineConfig
from engine.core.memory import MaxModelLenTooLargeError, NoCacheMemoryError
from reports.metrics import twin_metrics
from run import sim_main
from sim.twin import setup_twin, simulate
from workloads import make_preset
from workloads.trace_requests import model_requests


def run_once(**engine):
    setup = setup_twin("qwen3_0_6b", "h100_80gb", EngineConfig(**engine), "roofline")
    requests = model_requests(make_preset("shared_prefix", n=300, rate=20.0),
                              setup.model.vocab_size)
    return simulate(setup, requests)


def test_same_config_and_seed_give_identical_records(tmp_path) -> None:
    a, b = run_once(max_num_seqs=32), run_once(max_num_seqs=32)
    for name, x, y in (("requests", a.requests, b.requests), ("steps", a.steps, b.steps)):
        x.to_parquet(tmp_path / f"a_{name}.parquet")
        y.to_parquet(tmp_path / f"b_{name}.parquet")
        assert (tmp_path / f"a_{name}.parquet").read_bytes() == \
            (tmp_path / f"b_{name}.parquet").read_bytes()
    assert json.dumps(a.summary(twin_metrics(a))) == json.dumps(b.summary(twin_metrics(b)))
    assert twin_metrics(a)["prefix_cache_hit_rate"] > 0.3  # the shared prefixes really hit


def test_prediction_states_its_sources() -> None:
    run = run_once()
    assert run.setup.predictor["kind"] == "roofline"
    assert run.setup.memory.sources["weights"] == "exact"
    assert run.summary({})["memory"]["num_blocks"] == run.capacity.num_blocks > 0


def test_cpu_prediction_equals_the_cpu_engine_exactly() -> None:
    from engine.core.catalog import load_model
    from engine.runtime.llm import LLMEngine

    config = EngineConfig(dtype="float32", device="cpu", max_model_len=512, block_size=16,
                          cpu_memory_gib=0.05, max_num_batched_tokens=1024)
    engine = LLMEngine(load_model("tiny_qwen3"), EngineConfig(**config.to_dict()))
    setup = setup_twin("tiny_qwen3", "cpu", EngineConfig(**config.to_dict()))
    report = engine.memory_report()
    for term in ("total_bytes", "budget_bytes", "weights_bytes", "activation_peak_bytes",
                 "non_torch_bytes", "cuda_graph_bytes", "kv_cache_bytes"):
        assert getattr(setup.memory.terms, term) == report[term], term
    assert setup.memory.num_blocks == engine.num_blocks


@pytest.mark.parametrize(("memory_gib", "error"), [
    (0.001, NoCacheMemoryError), (0.0025, MaxModelLenTooLargeError)])
def test_cpu_startup_errors_match_the_engine_word_for_word(memory_gib, error) -> None:
    from engine.core.catalog import load_model
    from engine.runtime.llm import LLMEngine

    kwargs = dict(dtype="float32", device="cpu", max_model_len=2048, cpu_memory_gib=memory_gib,
                  max_num_batched_tokens=512, max_num_seqs=16)
    with pytest.raises(error) as raised:
        LLMEngine(load_model("tiny_qwen3"), EngineConfig(**kwargs))
    setup = setup_twin("tiny_qwen3", "cpu", EngineConfig(**kwargs))
    assert setup.memory.error == str(raised.value)
    assert setup.memory.error_type == error.__name__


def test_l4_mistral_motivating_case() -> None:
    def memory(util: float, max_len: int):
        config = EngineConfig(gpu_memory_utilization=util, max_model_len=max_len)
        return setup_twin("mistral_7b_v0_3", "l4_24gb", config).memory

    low = memory(0.5, 2048)
    assert not low.starts and low.error_type == "NoCacheMemoryError"
    assert low.error.startswith("No available memory for the cache blocks")
    ok = memory(0.7, 2048)
    assert ok.starts and ok.num_blocks * 16 >= 2048
    too_long = memory(0.7, 32768)
    assert too_long.error_type == "MaxModelLenTooLargeError"
    assert f"estimated maximum model length is {too_long.num_blocks * 16}" in too_long.error
    # the mixed-step graphs' block tables grow with max_model_len: 2 MB here, one block
    assert 0 < ok.num_blocks - too_long.num_blocks <= 1


def test_cannot_start_run_has_no_steps_and_a_verdict() -> None:
    run = run_once(gpu_memory_utilization=0.01)
    assert not run.capacity.starts and run.steps.empty and twin_metrics(run)["completed"] == 0


def test_unknown_catalog_names_list_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown hardware 'B200'.*h100_80gb"):
        setup_twin("qwen3_0_6b", "B200", EngineConfig())
    with pytest.raises(ValueError, match="unknown model 'gpt-5'.*qwen3_0_6b"):
        setup_twin("gpt-5", "h100_80gb", EngineConfig())


def test_request_that_cannot_fit_is_rejected_and_recorded() -> None:
    setup = setup_twin("qwen3_0_6b", "h100_80gb", EngineConfig(max_model_len=1024))
    requests = model_requests(make_preset("poisson_chat", n=200), setup.model.vocab_size)
    run = simulate(setup, requests)
    too_long = [r for r in requests if len(r.prompt_token_ids) > 1024]
    rejected = run.requests[run.requests["rejected"]]
    assert len(too_long) > 0 and len(rejected) == len(too_long)
    assert rejected["finish_reason"].str.contains("longer than max_model_len=1024").all()
    assert (run.requests.loc[~run.requests["rejected"], "finish_reason"] == "length").all()


def test_cli_simulate_and_capacity(capsys, tmp_path) -> None:
    assert sim_main(["workload=poisson_chat", "workload.params.n=50",
                     "engine.block_size=32"]) == 0
    printed = capsys.readouterr().out
    assert "KV blocks" in printed and "TTFT" in printed and "x real time" in printed
    assert "50 completed" in printed
    assert sim_main(["capacity", "model=mistral_7b_v0_3", "hardware=l4_24gb",
                     "engine.gpu_memory_utilization=0.5"]) == 1
    assert "No available memory" in capsys.readouterr().out
    assert sim_main(["engine.block_size=24"]) == 2
    assert "block_size=24 is invalid: must be a power of two" in capsys.readouterr().err
