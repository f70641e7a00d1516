"""engine.tools.bench on the CPU: the JSON it writes, its numbers, HF peers on the same weights."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from engine.core.config import ConfigError
from engine.tools import bench
from tests.engine.hf_tiny import hf_model, save_hf
from workloads import make_preset

SMALL = {"max_input_len": 150, "max_output_len": 100}
SMALL_ARGS = ["--workload-param", "max_input_len=150", "--workload-param", "max_output_len=100"]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny HF Qwen3 (randomised norms, so greedy outputs are varied) saved as safetensors."""
    return save_hf(hf_model("qwen3"), tmp_path_factory.mktemp("tiny_qwen3_hf"))


def test_cli_writes_the_json_under_results_bench(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    argv = ["--model", "tiny_qwen3", "--engine", "cpu_tiny", "--num-requests", "6",
            *SMALL_ARGS, "--hf-requests", "3", "--hf-batch-size", "2"]
    assert bench.main(argv) == 0
    [path] = (tmp_path / "outputs" / "bench").glob("cpu__tiny_qwen3__sdpa__*.json")
    result = json.loads(path.read_text())
    printed = capsys.readouterr().out
    assert "kvtwin / peer = output tok/s: kvtwin on all requests, the peer on the first 3 of 6" \
        in printed
    assert "HF generate_batch" in printed and "HF generate (static, batch 2)" in printed
    check_environment(result)
    check_kvtwin(result, make_preset("nanovllm_bench", n=6, **SMALL))
    check_peers(result, make_preset("nanovllm_bench", n=6, **SMALL), 3)
    assert result["command"] == "python -m engine.tools.bench " + " ".join(argv)
    assert result["engine_config"]["dtype"] == "float32"
    assert result["engine_config"]["max_num_seqs"] == 16  # from conf/engine/cpu_tiny.yaml
    assert result["sampling"]["temperature"] == 0.6 and "greedy_match" not in result


def check_environment(result: dict) -> None:
    env = result["environment"]
    assert env["device"] == "cpu" and env["device_name"]
    assert env["driver_version"] is None  # a CPU run, even on a GPU host
    assert env["torch"] == torch.__version__ and env["transformers"]
    assert "triton" in env
    assert result["attention_backend"] == "sdpa" and result["cuda_graphs"] is False
    assert result["date"] and result["model"]["name"] == "tiny_qwen3"


def check_kvtwin(result: dict, trace) -> None:
    prompt, output = int(trace.df["prompt_len"].sum()), int(trace.df["output_len"].sum())
    workload, ours = result["workload"], result["kvtwin"]
    assert (workload["prompt_tokens"], workload["output_tokens"]) == (prompt, output)
    assert (ours["prompt_tokens"], ours["output_tokens"]) == (prompt, output)
    assert workload["preset"] == "nanovllm_bench" and workload["num_requests"] == len(trace)
    assert ours["prefill_s"] + ours["decode_s"] <= ours["wall_s"]
    assert ours["num_steps"] == ours["prefill_steps"] + ours["decode_steps"]
    assert ours["prefill_steps"] >= 1 and ours["decode_steps"] >= 1
    assert ours["output_tok_s"] == pytest.approx(output / ours["wall_s"])
    assert ours["total_tok_s"] == pytest.approx((prompt + output) / ours["wall_s"])
    assert ours["startup_s"] > 0 and ours["memory"]["num_blocks"] > 0 and ours["rejected"] == 0


def check_peers(result: dict, trace, n: int) -> None:
    head = trace.df.head(n)
    for name in ("generate_batch", "generate"):
        peer = result["peers"][name]
        assert peer["num_requests"] == n
        assert peer["prompt_tokens"] == int(head["prompt_len"].sum())
        assert peer["output_tokens"] == int(head["output_len"].sum())
        ratio = result["kvtwin"]["output_tok_s"] / peer["output_tok_s"]
        assert result["ratios"][name] == pytest.approx(ratio)
    assert result["peers"]["generate"]["batch_size"] == 2


def test_greedy_outputs_equal_both_hf_peers_on_the_same_weights(hf_folder: Path) -> None:
    """The peers run the weights the engine ran: greedy tokens agree, request by request."""
    model = bench.resolve_model(str(hf_folder))
    assert model.path == str(hf_folder)
    config = bench.engine_config("cpu_tiny", max_model_len=512)
    workload = bench.build_workload("nanovllm_bench", model.config.vocab_size, 5, SMALL)
    assert workload.description["token_ids_folded"]  # nano-vllm ids reach 10,000; vocab 512
    options = bench.BenchOptions(temperature=0.0, hf_batch_size=3)
    result = bench.run_bench(model, config, workload, options)
    for name in ("generate_batch", "generate"):
        match = result["greedy_match"][name]
        assert (match["requests"], match["identical"], match["first_mismatch"]) == (5, 5, None)
        assert match["min_common_prefix"] == 100  # every output token (max_output_len=100)
    assert result["ratios"]["basis"].endswith("the peer on all of them")
    assert result["peers"]["generate"]["padding_tokens"] >= 0


def test_only_the_chosen_peer_runs() -> None:
    model = bench.resolve_model("tiny_qwen3")
    workload = bench.build_workload("poisson_chat", model.config.vocab_size, 3)
    config = bench.engine_config("cpu_tiny", max_model_len=2048)
    result = bench.run_bench(model, config, workload,
                             bench.bench_options({"peers": "generate", "hf_requests": 1}))
    assert list(result["peers"]) == ["generate"]
    assert result["peers"]["generate"]["num_requests"] == 1
    assert result["workload"]["preset"] == "poisson_chat"
    assert result["kvtwin"]["output_tokens"] == result["workload"]["output_tokens"]
    no_peer = bench.run_bench(model, config, workload, bench.BenchOptions(peers=()))
    assert no_peer["peers"] == {} and bench.format_report(no_peer)


@pytest.mark.parametrize(("argv", "message"), [
    (["--model", "gpt9"], "unknown model 'gpt9': available model entries are"),
    (["--set", "nonsense=1"], "Could not override 'engine.nonsense'"),
    (["--block-size", "24"], "block_size=24 is invalid: must be a power of two from 1 to 256"),
    (["--gpu-memory-utilization", "1.5"], "gpu_memory_utilization=1.5 is invalid"),
    (["--engine", "nope"], "Could not find 'engine/nope'"),
    (["--peers", "vllm"], "peers='vllm' is invalid: must be a subset of generate_batch, generate"),
    (["--hf-requests", "0"], "hf_requests=0 is invalid: must be an integer >= 1"),
    (["--workload", "nope"], "preset='nope' is invalid"),
    (["--workload-param", "rate=2"], "nanovllm_bench.rate=2 is invalid"),
])
def test_bad_arguments_fail_before_running_naming_the_field(
        argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    base = ["--model", "tiny_qwen3", "--engine", "cpu_tiny"]
    with pytest.raises(SystemExit) as exit_info:
        bench.main(base + argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_bench_options_name_an_unknown_field() -> None:
    with pytest.raises(ConfigError, match="bench.hf_request=4 is invalid"):
        bench.bench_options({"hf_request": 4})
    assert bench.bench_options({"peers": ["generate"]}).peers == ("generate",)


def test_phase_times_split_steps_by_prefill_tokens() -> None:
    records = [SimpleNamespace(num_prefill_tokens=n) for n in (100, 0, 3, 0, 0)]
    times = bench.phase_times(records, [0.5, 0.1, 0.25, 0.125, 0.125])
    assert times == {"num_steps": 5, "step_time_s": 1.1, "prefill_steps": 2, "prefill_s": 0.75,
                     "decode_steps": 3, "decode_s": 0.35}


def test_compare_outputs_counts_agreeing_leading_tokens() -> None:
    match = bench.compare_outputs([[1, 2, 3], [4, 5, 6], [7, 8]], [[1, 2, 3], [4, 9, 6]])
    assert match == {"requests": 2, "identical": 1, "first_mismatch": 1,
                     "min_common_prefix": 1, "mean_common_prefix": 2.0}


def test_default_out_path_names_gpu_model_backend_and_time() -> None:
    result = {"environment": {"device": "cuda", "device_name": "NVIDIA H100 80GB HBM3"},
              "model": {"name": "qwen3_0_6b"}, "attention_backend": "torch"}
    path = bench.default_out_path(result)
    assert path.parent == Path("outputs/bench")
    assert path.name.startswith("nvidia_h100_80gb_hbm3__qwen3_0_6b__torch__")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bench_on_cuda_records_the_gpu(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    assert bench.main(["--model", "tiny_qwen3", "--device", "cuda", "--dtype", "bfloat16",
                       "--num-requests", "8", *SMALL_ARGS, "--hf-requests", "4",
                       "--max-model-len", "2048", "--gpu-memory-utilization", "0.5",
                       "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    env = result["environment"]
    assert env["device"] == "cuda" and env["driver_version"] and env["cuda_version"]
    assert result["kvtwin"]["output_tokens"] == result["workload"]["output_tokens"]
    assert result["device_memory_before_peers"]["allocated_bytes"] < 2**30
    for peer in result["peers"].values():
        assert peer["output_tokens"] > 0
