"""A GPU shared with another process: vLLM V1's start-up check (free memory must cover
utilization x total) in core, the same verdict from the engine and the twin, and num_blocks
untouched by the other process's memory.

On the CPU the numbers are simulated (mem_get_info is patched); on a GPU a child process
really holds the memory.
"""

from __future__ import annotations

import dataclasses
import gc
import subprocess
import sys

import pytest
import torch

from engine.core.catalog import Hardware, load_hardware, load_model
from engine.core.config import EngineConfig, GiB
from engine.core.memory import FreeMemoryError, check_free_memory
from engine.runtime import llm as llm_module
from sim.memory_model import CUDA_CONTEXT_BYTES, predict_memory
from sim.profile import Profile, ProfileKey

CUDA = torch.cuda.is_available()


def test_free_memory_error_is_worded_like_vllm() -> None:
    """The message of vLLM V1's GPU worker, both numbers in GiB to two decimals."""
    with pytest.raises(FreeMemoryError) as err:
        check_free_memory(int(3.25 * GiB), int(23.43 * GiB), 0.96)
    assert str(err.value) == (
        "Free memory on device cuda:0 (3.25/23.43 GiB) on startup is less than desired GPU "
        "memory utilization (0.96, 22.49 GiB). Decrease GPU memory utilization or reduce GPU "
        "memory used by other processes.")
    check_free_memory(int(0.5 * GiB), GiB, 0.5)  # exactly the request: starts
    with pytest.raises(FreeMemoryError, match=r"device cuda:3 \(0\.5/1\.0 GiB\)"):
        check_free_memory(int(0.5 * GiB) - 1, GiB, 0.5, device="cuda:3")


def l4_with_others(gib: float) -> Hardware:
    return dataclasses.replace(load_hardware("l4_24gb"), used_by_others_gib=gib)


def test_twin_refuses_to_start_when_others_leave_too_little() -> None:
    """An L4 (22.03 GiB) at utilization 0.7 asks for 15.42 GiB: another process may hold up
    to 22.03 - 15.42 - the engine's CUDA context; past that, vLLM's error word for word."""
    config = EngineConfig(gpu_memory_utilization=0.7, max_model_len=2048)
    model = load_model("mistral_7b_v0_3")
    alone = predict_memory(model, l4_with_others(0.0), config)
    total = alone.terms.total_bytes
    room = (total * 0.3 - CUDA_CONTEXT_BYTES) / GiB
    fits = predict_memory(model, l4_with_others(room - 0.01), config)
    refused = predict_memory(model, l4_with_others(room + 0.01), config)
    assert alone.starts and fits.starts and not refused.starts
    assert fits.num_blocks == refused.num_blocks == alone.num_blocks  # not in the budget
    assert refused.error_type == "FreeMemoryError"
    free = total - int((room + 0.01) * GiB) - CUDA_CONTEXT_BYTES
    assert refused.error == (
        f"Free memory on device cuda:0 ({round(free / GiB, 2)}/{round(total / GiB, 2)} GiB) on "
        f"startup is less than desired GPU memory utilization (0.7, "
        f"{round(total * 0.7 / GiB, 2)} GiB). Decrease GPU memory utilization or reduce GPU "
        "memory used by other processes.")
    assert refused.to_dict()["used_at_start_bytes"] == total - free
    assert refused.sources["used_at_start"].startswith("catalog: used_by_others_gib")


def test_engine_check_uses_the_measured_free_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine's side on CUDA, numbers simulated: the twin's error for the same numbers,
    and the memory in use at start handed back for the memory report."""
    total, free = 80 * GiB, 50 * GiB
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, total))
    device = torch.device("cuda:0")
    assert llm_module.check_shared_device(device, free, 0.6) == 30 * GiB
    with pytest.raises(FreeMemoryError) as err:
        llm_module.check_shared_device(device, free, 0.7)
    with pytest.raises(FreeMemoryError) as twin:
        check_free_memory(free, total, 0.7)
    assert str(err.value) == str(twin.value)
    assert llm_module.check_shared_device(torch.device("cpu"), 0, 0.99) == 0


def test_used_by_others_is_validated() -> None:
    entry = dataclasses.asdict(load_hardware("h100_80gb"))
    assert Hardware.from_dict({**entry, "used_by_others_gib": 4}).used_by_others_gib == 4
    for bad in (-1.0, 80.0, "4"):
        with pytest.raises(ValueError, match=r"used_by_others_gib=.* is invalid: must be a "
                                             r"number >= 0 below the total memory"):
            Hardware.from_dict({**entry, "used_by_others_gib": bad})
    del entry["used_by_others_gib"]
    assert Hardware.from_dict(entry).used_by_others_gib == 0.0  # optional in the YAML files


# -- on a GPU: another process really holds the memory -------------------------------------------

HOLDER = ("import sys, torch; x = torch.empty({n}, dtype=torch.uint8, device='cuda'); "
          "torch.cuda.synchronize(); print('ready', flush=True); sys.stdin.read()")


def hold_memory(num_bytes: int) -> subprocess.Popen:
    """A child process holding `num_bytes` of the GPU until its stdin closes."""
    child = subprocess.Popen([sys.executable, "-c", HOLDER.format(n=num_bytes)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    if child.stdout.readline().strip() != "ready":
        child.kill()
        raise RuntimeError("the memory-holding process did not start")
    return child


def release(child: subprocess.Popen) -> None:
    child.stdin.close()
    try:
        child.wait(timeout=60)
    except subprocess.TimeoutExpired:
        child.kill()


def measured_profile(report: dict, config: EngineConfig) -> Profile:
    """The engine's own measured terms as the twin's calibration (one activation point)."""
    memory = {"total_bytes": report["total_bytes"], "non_torch_bytes": report["non_torch_bytes"],
              "cuda_graph_bytes": report["cuda_graph_bytes"],
              "cuda_graph_tokens": config.cudagraph_token_limit,
              "activation": [[config.max_num_batched_tokens, report["activation_peak_bytes"]]]}
    key = ProfileKey("gpu", MODEL, config.dtype, report["attention_backend"])
    return Profile(key, {"seconds": []}, memory=memory)


MODEL = "qwen3_0_6b"  # random weights; a tiny model would get tens of millions of blocks


def start(config: EngineConfig) -> dict:
    """Start an engine, keep its memory report, give its memory back."""
    from engine.runtime.llm import LLMEngine

    engine = LLMEngine(load_model(MODEL), config)
    report = engine.memory_report()
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return report


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_engine_and_twin_agree_next_to_a_process_holding_memory() -> None:
    """A child holds 40 % of the GPU. At utilization 0.5 the engine starts with the
    num_blocks it had alone, which the twin predicts (from the terms measured alone); at
    0.7 both refuse with FreeMemoryError."""
    def config(util: float) -> EngineConfig:
        return EngineConfig(dtype="bfloat16", max_model_len=2048, max_num_batched_tokens=2048,
                            max_num_seqs=64, gpu_memory_utilization=util, enforce_eager=True)

    torch.cuda.empty_cache()
    alone = start(config(0.5))
    profile = measured_profile(alone, config(0.5))
    free_before, total = torch.cuda.mem_get_info()
    child = hold_memory(int(0.4 * total))
    try:
        others = free_before - torch.cuda.mem_get_info()[0]  # the child's context included
        gpu = dataclasses.replace(load_hardware("h200_141gb"), total_memory_bytes=total,
                                  used_by_others_gib=others / GiB)
        shared = start(config(0.5))
        predicted = predict_memory(load_model(MODEL), gpu, config(0.5), profile)
        assert predicted.starts
        tolerance = max(2, alone["num_blocks"] // 500)  # non-torch memory varies by a few MB
        assert abs(shared["num_blocks"] - alone["num_blocks"]) <= tolerance
        assert abs(predicted.num_blocks - shared["num_blocks"]) <= tolerance
        print(f"in use at start: alone {alone['used_at_start_bytes'] / GiB:.2f} GiB, shared "
              f"{shared['used_at_start_bytes'] / GiB:.2f} GiB; the child holds "
              f"{others / GiB:.2f} GiB; twin's context estimate "
              f"{CUDA_CONTEXT_BYTES / GiB:.2f} GiB")
        with pytest.raises(FreeMemoryError) as refused:
            start(config(0.7))
        twin = predict_memory(load_model(MODEL), gpu, config(0.7), profile)
        assert twin.error_type == "FreeMemoryError"
        assert str(refused.value).startswith("Free memory on device cuda:")
    finally:
        release(child)
