"""Offline throughput bench: kvtwin's engine against HF transformers, in one process.

    python -m engine.tools.bench                                  # nano-vllm's bench on Qwen3-0.6B
    python -m engine.tools.bench --workload poisson_chat --num-requests 64 --hf-requests 16
    python -m engine.tools.bench --model tiny_qwen3 --engine cpu_tiny --num-requests 8

Every request of the workload is submitted at t=0 (arrival times are ignored) with its own
output length forced (EOS ignored), sampled at nano-vllm's temperature 0.6 under the engine's
seed. The HF peers run the same requests (or the first --hf-requests of them) on the very
weights the engine ran, exported after its run: continuous batching (`paged|sdpa`, the manager
behind `generate_batch`) and static `generate` in left-padded batches. The ratio is kvtwin's
output tok/s over the peer's. The result is printed as a table and saved as JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from engine.core.catalog import catalog_key, load_model
from engine.core.config import ConfigError, EngineConfig, ModelConfig
from engine.core.request import Request
from engine.core.sequence import SamplingParams
from engine.models.weights import export_hf_state_dict
from engine.runtime.llm import LLM
from engine.runtime.llm import resolve_model as engine_resolve
from engine.runtime.loader import to_torch_dtype
from engine.runtime.replay import device_name
from engine.tools.config import compose_engine
from workloads import make_preset, read_trace
from workloads.presets import preset_params
from workloads.tokens import TokenSpec
from workloads.trace_requests import request_table

PEERS = ("generate_batch", "generate")
PEER_LABELS = {"generate_batch": "HF generate_batch (continuous, paged|sdpa)",
               "generate": "HF generate (static, batch {batch})"}
PEER_NOTES = {
    "generate_batch": "the continuous batching manager generate_batch drives, each request with "
                      "its own max_new_tokens; startup = HF model build + manager start "
                      "(cache, CUDA graph warmup)",
    "generate": "model.generate on left-padded batches in workload order; each row generates "
                "its batch's longest output, only the requested tokens count (padding_tokens: "
                "the rest); startup = HF model build"}
NANOVLLM_TEMPERATURE = 0.6
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
RESULTS_DIR = Path("outputs") / "bench"
ENGINE_FLAGS = ("dtype", "device", "block_size", "max_num_seqs", "max_num_batched_tokens",
                "max_model_len", "gpu_memory_utilization", "attention_backend", "seed")
CB_FIELDS = ("block_size", "page_size", "num_blocks", "max_batch_tokens", "max_memory_percent",
             "max_requests_per_batch", "use_cuda_graph", "use_async_batching", "seed")


# -- inputs ------------------------------------------------------------------------------------

@dataclass
class BenchModel:
    """The model to bench: its shape, a local HF folder (or None: seeded random weights)."""
    config: ModelConfig
    path: str | None
    label: str

    @property
    def weights(self) -> str:
        return f"loaded from {self.path}" if self.path else "seeded random"


@dataclass
class BenchWorkload:
    requests: list[Request]
    description: dict[str, Any]

    @property
    def prompt_tokens(self) -> int:
        return sum(len(r.prompt_token_ids) for r in self.requests)

    @property
    def output_tokens(self) -> int:
        return sum(output_len(r) for r in self.requests)


@dataclass
class BenchOptions:
    peers: tuple[str, ...] = PEERS
    hf_requests: int | None = None  # None: every request
    hf_batch_size: int = 64
    temperature: float = NANOVLLM_TEMPERATURE
    warmup: bool = True
    # HF continuous batching's KV cache; None lets HF size it from free GPU memory (on the
    # CPU, where that probe is slow and meaningless, the bench sizes it for the requests).
    hf_num_blocks: int | None = None
    hf_max_batch_tokens: int | None = None

    def validate(self) -> BenchOptions:
        unknown = [p for p in self.peers if p not in PEERS]
        if unknown:
            raise ConfigError("peers", ",".join(self.peers), f"a subset of {', '.join(PEERS)}")
        for name in ("hf_requests", "hf_num_blocks", "hf_max_batch_tokens"):
            _check_positive(name, getattr(self, name), allow_none=True)
        _check_positive("hf_batch_size", self.hf_batch_size)
        if not (isinstance(self.temperature, int | float) and self.temperature >= 0):
            raise ConfigError("temperature", self.temperature, "a number >= 0")
        return self


def bench_options(values: dict[str, Any] | None) -> BenchOptions:
    """BenchOptions from a mapping (run.py's `+bench.<field>=...`); peers may be a list or a
    comma-separated string; an unknown field raises ConfigError naming it."""
    values = dict(values or {})
    known = [f.name for f in fields(BenchOptions)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"bench.{unknown[0]}", values[unknown[0]], f"one of {known}")
    peers = values.get("peers", PEERS)
    if isinstance(peers, str):
        peers = [p for p in peers.split(",") if p]
    values["peers"] = tuple(peers or ())
    return BenchOptions(**values).validate()


def _check_positive(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        raise ConfigError(name, value, "an integer >= 1" + (" (or unset)" if allow_none else ""))


def output_len(request: Request) -> int:
    return max(1, int(request.output_len))


def resolve_model(name_or_path: str) -> BenchModel:
    """A local HF folder (config.json, + safetensors if any) or a catalog name (conf/model)."""
    path = Path(name_or_path)
    if path.is_dir():
        config, weights = engine_resolve(path)
        return BenchModel(config, weights, config.name or path.name)
    return BenchModel(load_model(name_or_path), None, catalog_key("model", name_or_path))


def build_workload(name: str, vocab_size: int, num_requests: int | None = None,
                   params: dict[str, Any] | None = None) -> BenchWorkload:
    """A preset of workloads.PRESETS with parameter overrides, or a trace file."""
    if Path(name).is_file():
        return workload_from_trace(read_trace(name), vocab_size, num_requests, {"path": name})
    params = dict(params or {})
    if num_requests is not None and "n" in preset_params(name):
        params["n"] = num_requests
    trace = make_preset(name, **params)
    source = {"preset": name, "params": trace.meta["preset"]["params"]}
    return workload_from_trace(trace, vocab_size, num_requests, source)


def workload_from_trace(trace: Any, vocab_size: int, num_requests: int | None,
                        source: dict[str, Any]) -> BenchWorkload:
    """The first num_requests requests (all if None), replayed offline, with token ids inside
    the model's vocabulary (explicit ids above it are folded: id % vocab_size)."""
    spec = TokenSpec(vocab_size=vocab_size, low=min(1000, vocab_size // 8))
    table = request_table(trace, spec)
    requests = [table[i] for i in range(min(len(table), num_requests or len(table)))]
    requests, folded = _fold_tokens(requests, vocab_size)
    return BenchWorkload(requests, {**source, "num_requests": len(requests),
                                    "arrivals": "ignored: every request submitted at t=0",
                                    "token_ids_folded": folded})


def _fold_tokens(requests: list[Request],
                 vocab_size: int) -> tuple[list[Request], bool]:
    if all(max(r.prompt_token_ids) < vocab_size for r in requests):
        return requests, False
    return [Request(r.request_id, r.arrival_s, [t % vocab_size for t in r.prompt_token_ids],
                    r.output_len) for r in requests], True


def engine_config(preset: str | None = None, **overrides: Any) -> EngineConfig:
    """EngineConfig from a conf/engine preset (or the defaults) with field overrides,
    composed by run.py's Hydra config; an unknown field or a bad value names it."""
    return compose_engine(preset=preset, **overrides)


# -- timing ------------------------------------------------------------------------------------

def clock(device: torch.device) -> float:
    """perf_counter after the device has finished all queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def throughput(prompt_tokens: int, output_tokens: int, wall_s: float) -> dict[str, float]:
    return {"output_tok_s": output_tokens / wall_s if wall_s > 0 else 0.0,
            "total_tok_s": (prompt_tokens + output_tokens) / wall_s if wall_s > 0 else 0.0}


def nanovllm_throughput(llm: Any, num_requests: int, max_input_len: int,
                        max_output_len: int) -> dict[str, Any]:
    """nano-vllm's bench on its first `num_requests` requests, after a warm-up: the offline
    throughput the quantization and tensor-parallel benches report."""
    params = {"max_input_len": max_input_len, "max_output_len": max_output_len}
    workload = build_workload("nanovllm_bench", llm.model_config.vocab_size, num_requests,
                              params)
    warm_up_kvtwin(llm, workload.requests, NANOVLLM_TEMPERATURE)
    sampling = [sampling_params(r, NANOVLLM_TEMPERATURE) for r in workload.requests]
    start = clock(llm.device)
    outputs = llm.generate([r.prompt_token_ids for r in workload.requests], sampling)
    wall = clock(llm.device) - start
    output_tokens = sum(len(o.output_token_ids) for o in outputs)
    return {"num_requests": len(outputs), "prompt_tokens": workload.prompt_tokens,
            "output_tokens": output_tokens, "wall_s": wall,
            **throughput(workload.prompt_tokens, output_tokens, wall)}


# -- kvtwin ------------------------------------------------------------------------------------

@dataclass
class KvtwinRun:
    result: dict[str, Any]
    outputs: list[list[int]]
    hf_state: dict[str, torch.Tensor] | None = field(default=None, repr=False)


def sampling_params(request: Request, temperature: float) -> SamplingParams:
    return SamplingParams(temperature=temperature, max_tokens=output_len(request),
                          ignore_eos=True)


def run_kvtwin(model: BenchModel, config: EngineConfig, workload: BenchWorkload,
               options: BenchOptions, export_weights: bool) -> KvtwinRun:
    """Start the engine (timed), warm it up, then generate every request at once (timed)."""
    t0 = time.perf_counter()
    llm = LLM(model.path or model.config, config)
    startup = clock(llm.device) - t0
    if options.warmup:
        warm_up_kvtwin(llm, workload.requests, options.temperature)
    first = len(llm.step_records)
    params = [sampling_params(r, options.temperature) for r in workload.requests]
    t0 = clock(llm.device)
    outs = llm.generate([r.prompt_token_ids for r in workload.requests], params)
    wall = clock(llm.device) - t0
    outputs = [o.output_token_ids for o in outs]
    result = kvtwin_result(llm, first, startup, wall, workload, outputs)
    result["rejected"] = sum(bool(o.metrics.rejected) for o in outs)  # prompt > max_model_len
    state = export_hf_state_dict(llm.model_runner.model) if export_weights else None
    return KvtwinRun(result, outputs, state)


WARMUP_REQUESTS = 96
WARMUP_TOKENS = 8


def warm_up_kvtwin(llm: Any, requests: list[Request], temperature: float) -> None:
    """An untimed run shaped like the timed one: the first WARMUP_REQUESTS prompt lengths,
    WARMUP_TOKENS outputs each, at the bench's temperature. It goes through mixed and
    decode-only steps at many batch sizes, so Triton's JIT compilation and CUDA's lazy
    kernel loading happen here. Its token ids are fresh random ones (a separate seed), so
    the timed prompts cannot hit the blocks it leaves in the prefix cache."""
    vocab = llm.model_config.vocab_size
    gen = torch.Generator().manual_seed(0x5EED)
    prompts = [torch.randint(vocab, (len(r.prompt_token_ids),), generator=gen).tolist()
               for r in requests[:WARMUP_REQUESTS]]
    params = SamplingParams(temperature=temperature, max_tokens=WARMUP_TOKENS, ignore_eos=True)
    llm.generate(prompts, params)


def kvtwin_result(llm: Any, first_step: int, startup: float, wall: float,
                  workload: BenchWorkload, outputs: list[list[int]]) -> dict[str, Any]:
    output_tokens = sum(len(o) for o in outputs)
    runner = llm.model_runner
    return {"num_requests": len(outputs), "prompt_tokens": workload.prompt_tokens,
            "output_tokens": output_tokens, "startup_s": startup, "wall_s": wall,
            **throughput(workload.prompt_tokens, output_tokens, wall),
            **phase_times(llm.step_records[first_step:], llm.step_durations[first_step:]),
            "attention_backend": runner.attention_backend,
            "cuda_graphs": bool(getattr(runner, "cuda_graphs_enabled", False)),
            "memory": llm.memory_report()}


def phase_times(records: list[Any], durations: list[float]) -> dict[str, Any]:
    """Step time split: steps holding any prefill tokens (mixed ones included) vs decode-only."""
    prefill = [d for r, d in zip(records, durations, strict=True) if r.num_prefill_tokens > 0]
    decode = [d for r, d in zip(records, durations, strict=True) if r.num_prefill_tokens == 0]
    return {"num_steps": len(durations), "step_time_s": sum(durations),
            "prefill_steps": len(prefill), "prefill_s": sum(prefill),
            "decode_steps": len(decode), "decode_s": sum(decode)}


# -- HF transformers peers ---------------------------------------------------------------------
# transformers is imported where a peer runs: the import alone takes seconds.

def hf_config(model: BenchModel) -> Any:
    """The transformers config of the benched model (its folder's, or built from the shape)."""
    # transformers takes seconds to import: only the HF side of the bench needs it
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if model.path:
        return AutoConfig.from_pretrained(model.path)
    model_type = {v: k for k, v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()}.get(
        model.config.architecture)
    if model_type is None:
        raise ValueError(f"architecture={model.config.architecture!r} has no transformers "
                         "causal-LM class: the HF peers cannot run it (use --no-hf)")
    shape = {k: v for k, v in asdict(model.config).items()
             if k not in ("architecture", "name", "torch_dtype")}
    return AutoConfig.for_model(model_type, architectures=[model.config.architecture], **shape)


def build_hf_model(model: BenchModel, state: dict[str, torch.Tensor], dtype: str,
                   device: torch.device) -> Any:
    """An HF model holding exactly `state` (the engine's weights under HF names); EOS off."""
    # transformers takes seconds to import: only the HF side of the bench needs it
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(hf_config(model), dtype=to_torch_dtype(dtype),
                                              attn_implementation="sdpa")
    loaded = hf.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if hf.get_output_embeddings().weight is \
        hf.get_input_embeddings().weight else set()
    missing = sorted(set(loaded.missing_keys) - tied)
    if missing or loaded.unexpected_keys:
        raise ValueError(f"the engine's weights do not fit the HF model: missing {missing}, "
                         f"unexpected {sorted(loaded.unexpected_keys)}")
    hf.generation_config.eos_token_id = None  # else generate() falls back to it and stops
    return hf.eval()


def generation_config(temperature: float, **extra: Any) -> Any:
    """nano-vllm's sampling: temperature only (no top-k / top-p); greedy at temperature 0."""
    # transformers takes seconds to import: only the HF side of the bench needs it
    from transformers import GenerationConfig

    sampling = {"do_sample": False} if temperature == 0 else \
        {"do_sample": True, "temperature": float(temperature), "top_k": 0, "top_p": 1.0}
    return GenerationConfig(pad_token_id=0, **sampling, **extra)


def peer_result(requests: list[Request], outputs: list[list[int]], startup: float,
                wall: float, **extra: Any) -> dict[str, Any]:
    prompt = sum(len(r.prompt_token_ids) for r in requests)
    output = sum(len(o) for o in outputs)
    return {"num_requests": len(requests), "prompt_tokens": prompt, "output_tokens": output,
            "startup_s": startup, "wall_s": wall, **throughput(prompt, output, wall), **extra}


def paged_sdpa() -> str:
    """'paged|sdpa' where transformers registers it (5.17); later versions page plain 'sdpa'."""
    # transformers takes seconds to import: only the HF side of the bench needs it
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return "paged|sdpa" if "paged|sdpa" in ALL_ATTENTION_FUNCTIONS else "sdpa"


def cb_config(options: BenchOptions, requests: list[Request], device: torch.device,
              seed: int) -> Any:
    """HF's ContinuousBatchingConfig: HF's own sizing on CUDA unless given; no flash switch.
    On the CPU (where HF's memory probe is slow and meaningless) the cache holds every request
    at once and a step takes up to 2,048 tokens, unless given."""
    # transformers takes seconds to import: only the HF side of the bench needs it
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    names = {f.name for f in fields(ContinuousBatchingConfig)}
    values: dict[str, Any] = {"seed": seed, "num_blocks": options.hf_num_blocks,
                              "max_batch_tokens": options.hf_max_batch_tokens}
    if device.type != "cuda":
        defaults = ContinuousBatchingConfig()
        page = getattr(defaults, "page_size", None) or defaults.block_size
        need = sum(-(-(len(r.prompt_token_ids) + output_len(r)) // page) for r in requests)
        values["num_blocks"] = values["num_blocks"] or need + 8
        values["max_batch_tokens"] = values["max_batch_tokens"] or 2048
    if "auto_switch_to_flash" in names:
        values["auto_switch_to_flash"] = False
    return ContinuousBatchingConfig(**{k: v for k, v in values.items() if k in names})


def run_hf_continuous(hf: Any, requests: list[Request], options: BenchOptions,
                      device: torch.device, seed: int) -> tuple[dict[str, Any], list[list[int]]]:
    """The manager `generate_batch` drives, fed each request's own max_new_tokens (the
    `generate_batch` call takes one for all). Its start (init, CUDA graph warmup) is startup."""
    previous = hf.config._attn_implementation
    hf.set_attn_implementation(paged_sdpa())
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    manager_cm = hf.continuous_batching_context_manager(
        generation_config=generation_config(options.temperature, eos_token_id=-1),
        continuous_batching_config=cb_config(options, requests, device, seed),
        block=True, timeout=60)
    try:
        with manager_cm as manager:
            outputs, startup, wall = _drive_manager(manager, requests, device, t0)
            extra = {"attn_implementation": hf.config._attn_implementation,
                     "continuous_batching_config": _cb_summary(manager)}
    finally:
        hf.set_attn_implementation(previous)
    return peer_result(requests, outputs, startup, wall, **extra), outputs


def _drive_manager(manager: Any, requests: list[Request], device: torch.device,
                   t_enter: float) -> tuple[list[list[int]], float, float]:
    t0 = clock(device)
    ids = [manager.add_request(r.prompt_token_ids, request_id=f"req_{i}",
                               max_new_tokens=output_len(r), eos_token_id=-1)
           for i, r in enumerate(requests)]
    results = _collect(manager, ids)
    wall = clock(device) - t0
    return [list(results[i].generated_tokens) for i in ids], t0 - t_enter, wall


def _collect(manager: Any, ids: list[str]) -> dict[str, Any]:
    pending, results = set(ids), {}
    while pending:
        result = manager.get_result(timeout=1)
        if result is None:
            if not manager.is_running():
                raise RuntimeError(f"HF continuous batching stopped with {len(pending)} "
                                   "requests unfinished")
            continue
        if result.is_finished():
            if getattr(result, "error", None):
                raise RuntimeError(f"HF request {result.request_id} failed: {result.error}")
            results[result.request_id] = result
            pending.discard(result.request_id)
    return results


def _cb_summary(manager: Any) -> dict[str, Any]:
    cfg = manager.continuous_batching_config
    return {name: _plain(getattr(cfg, name)) for name in CB_FIELDS if hasattr(cfg, name)}


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    return value if isinstance(value, bool | int | float | str | type(None)) else str(value)


def run_hf_static(hf: Any, requests: list[Request], options: BenchOptions,
                  device: torch.device, seed: int) -> tuple[dict[str, Any], list[list[int]]]:
    """model.generate on left-padded batches of hf_batch_size requests, in workload order.
    A batch generates its longest output length for every row; only the requested tokens
    count (the rest is reported as padding_tokens)."""
    batch = options.hf_batch_size
    if options.warmup:
        _static_batch(hf, [Request(0, 0.0, requests[0].prompt_token_ids[:16], 2)],
                      options.temperature, device)
    torch.manual_seed(seed)
    outputs, wasted = [], 0
    t0 = clock(device)
    for start in range(0, len(requests), batch):
        rows, padding = _static_batch(hf, requests[start:start + batch], options.temperature,
                                      device)
        outputs += rows
        wasted += padding
    wall = clock(device) - t0
    return peer_result(requests, outputs, 0.0, wall, batch_size=batch, padding_tokens=wasted,
                       attn_implementation=hf.config._attn_implementation), outputs


def _static_batch(hf: Any, chunk: list[Request], temperature: float,
                  device: torch.device) -> tuple[list[list[int]], int]:
    width = max(len(r.prompt_token_ids) for r in chunk)
    ids = torch.zeros((len(chunk), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, r in enumerate(chunk):
        ids[row, width - len(r.prompt_token_ids):] = torch.tensor(r.prompt_token_ids)
        mask[row, width - len(r.prompt_token_ids):] = 1
    longest = max(output_len(r) for r in chunk)
    out = hf.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                      generation_config=generation_config(temperature, max_new_tokens=longest))
    new = out[:, width:].tolist()
    if any(len(row) < output_len(r) for row, r in zip(new, chunk, strict=True)):
        raise RuntimeError("HF generate stopped before the requested output length")
    return [row[:output_len(r)] for row, r in zip(new, chunk, strict=True)], \
        len(chunk) * longest - sum(output_len(r) for r in chunk)


def run_peers(model: BenchModel, config: EngineConfig, state: dict[str, torch.Tensor],
              requests: list[Request], options: BenchOptions,
              device: torch.device) -> dict[str, tuple[dict[str, Any], list[list[int]]]]:
    t0 = time.perf_counter()
    hf = build_hf_model(model, state, config.dtype, device)
    build_s = clock(device) - t0
    state.clear()
    runners = {"generate_batch": run_hf_continuous, "generate": run_hf_static}
    done = {}
    for peer in options.peers:
        result, outputs = runners[peer](hf, requests, options, device, config.seed)
        result["startup_s"] += build_s
        result["note"] = PEER_NOTES[peer]
        done[peer] = (result, outputs)
    return done


# -- the whole bench ---------------------------------------------------------------------------

def run_bench(model: BenchModel, config: EngineConfig, workload: BenchWorkload,
              options: BenchOptions | None = None, command: str | None = None) -> dict[str, Any]:
    """kvtwin on every request, then each HF peer on the first hf_requests; one result dict."""
    options = (options or BenchOptions()).validate()
    config.validate(model.config)
    ours = run_kvtwin(model, config, workload, options, export_weights=bool(options.peers))
    device = torch.device(ours.result["memory"]["device"])
    released = _release(device)
    subset = workload.requests[:options.hf_requests]
    peers = run_peers(model, config, ours.hf_state, subset, options, device) \
        if options.peers else {}
    result = describe_run(model, config, workload, options, ours.result, device, command)
    result["peers"] = {name: r for name, (r, _) in peers.items()}
    result["device_memory_before_peers"] = released
    result["ratios"] = ratios(ours.result, result["peers"], len(subset), len(workload.requests))
    if options.temperature == 0:
        result["greedy_match"] = {name: compare_outputs(ours.outputs, outs)
                                  for name, (_, outs) in peers.items()}
    return result


def _release(device: torch.device) -> dict[str, int] | None:
    """Free the engine (its KV cache above all) before the peers size their own caches;
    returns what this process still holds on the GPU (the exported weights, ideally)."""
    gc.collect()
    if device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    return {"allocated_bytes": torch.cuda.memory_allocated(device),
            "reserved_bytes": torch.cuda.memory_reserved(device)}


def ratios(ours: dict[str, Any], peers: dict[str, dict[str, Any]], peer_requests: int,
           total: int) -> dict[str, Any]:
    basis = "output tok/s: kvtwin on all requests, the peer on " + \
        ("all of them" if peer_requests == total else f"the first {peer_requests} of {total}")
    out: dict[str, Any] = {"basis": basis}
    for name, peer in peers.items():
        rate = peer["output_tok_s"]
        out[name] = ours["output_tok_s"] / rate if rate > 0 else None
    return out


def compare_outputs(ours: list[list[int]], theirs: list[list[int]]) -> dict[str, Any]:
    """Greedy runs only: requests with identical tokens, the first that differs, and how many
    leading tokens agree (bf16 kernels may diverge at near-ties on random weights)."""
    pairs = list(zip(ours, theirs, strict=False))
    same = [a == b for a, b in pairs]
    prefix = [_common_prefix(a, b) for a, b in pairs]
    return {"requests": len(same), "identical": sum(same),
            "first_mismatch": next((i for i, ok in enumerate(same) if not ok), None),
            "min_common_prefix": min(prefix, default=0),
            "mean_common_prefix": sum(prefix) / len(prefix) if prefix else 0.0}


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                min(len(a), len(b)))


def describe_run(model: BenchModel, config: EngineConfig, workload: BenchWorkload,
                 options: BenchOptions, ours: dict[str, Any], device: torch.device,
                 command: str | None) -> dict[str, Any]:
    return {"kind": "kvtwin.bench", "version": 1,
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": command, "environment": environment(device),
            "model": {"name": model.label, "display_name": model.config.name,
                      "architecture": model.config.architecture, "weights": model.weights,
                      "num_parameters": model.config.num_parameters()},
            "attention_backend": ours["attention_backend"], "cuda_graphs": ours["cuda_graphs"],
            "engine_config": config.to_dict(),
            "sampling": {"temperature": options.temperature, "seed": config.seed,
                         "ignore_eos": True, "top_k": None, "top_p": 1.0},
            "options": {**asdict(options), "peers": list(options.peers)},
            "workload": {**workload.description, "prompt_tokens": workload.prompt_tokens,
                         "output_tokens": workload.output_tokens},
            "kvtwin": ours}


def environment(device: torch.device) -> dict[str, Any]:
    return {"device": device.type, "device_name": device_name(device),
            "driver_version": driver_version() if device.type == "cuda" else None,
            "cuda_version": torch.version.cuda,
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": _version("transformers"), "triton": _version("triton"),
            "host": platform.node()}


def driver_version() -> str | None:
    """The NVIDIA driver (nvidia-smi), or None without one (CPU runs record None)."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=30, check=True).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return out[0] if out else None


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # absent, or broken on this machine (triton without a GPU)
        return None


# -- output ------------------------------------------------------------------------------------

def default_out_path(result: dict[str, Any], root: Path = RESULTS_DIR) -> Path:
    """outputs/bench/<gpu-or-cpu>__<model>__<backend>__<timestamp>.json"""
    env = result["environment"]
    where = env["device_name"] if env["device"] == "cuda" else "cpu"
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    parts = [where, result["model"]["name"], result["attention_backend"], stamp]
    return root / ("__".join(_slug(p) for p in parts) + ".json")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.-]+", "_", str(text).lower()).strip("_")


def save_result(result: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    return path


def format_report(result: dict[str, Any]) -> str:
    """The header lines, the comparison table, and what the ratio is computed on."""
    table = _table(result)
    width = int(table["system"].str.len().max())
    table["system"] = table["system"].str.ljust(width)  # names left, numbers right
    text = table.rename(columns={"system": "system".ljust(width)}).to_string(index=False)
    return "\n".join([*_header(result), "", text, "",
                      "kvtwin / peer = " + result["ratios"]["basis"]])


def _header(result: dict[str, Any]) -> list[str]:
    env, model, ours, wl = (result["environment"], result["model"], result["kvtwin"],
                            result["workload"])
    mem, cfg = ours["memory"], result["engine_config"]
    name = wl.get("preset") or wl.get("path")
    return [
        f"model     {model['name']} ({model['weights']} weights), {cfg['dtype']} on "
        f"{env['device_name']}; torch {env['torch']}, transformers {env['transformers']}",
        f"engine    attention {result['attention_backend']}, CUDA graphs "
        f"{'on' if result['cuda_graphs'] else 'off'}; {mem['num_blocks']:,} KV blocks x "
        f"{cfg['block_size']} tokens, max_num_seqs {cfg['max_num_seqs']}, "
        f"max_num_batched_tokens {cfg['max_num_batched_tokens']:,}",
        f"workload  {name}: {wl['num_requests']:,} requests, {wl['prompt_tokens']:,} prompt / "
        f"{wl['output_tokens']:,} output tokens, all at t=0, EOS ignored, temperature "
        f"{result['sampling']['temperature']}",
        f"kvtwin    startup {ours['startup_s']:.2f} s; {_count(ours['num_steps'], 'step')} in "
        f"{ours['step_time_s']:.2f} s: with prefill {ours['prefill_s']:.2f} s "
        f"({_count(ours['prefill_steps'], 'step')}), decode-only {ours['decode_s']:.2f} s "
        f"({_count(ours['decode_steps'], 'step')})"]


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def _table(result: dict[str, Any]) -> Any:
    rows = [_row("kvtwin", result["kvtwin"], None)]
    for name, peer in result["peers"].items():
        label = PEER_LABELS[name].format(batch=peer.get("batch_size"))
        rows.append(_row(label, peer, result["ratios"].get(name)))
    return pd.DataFrame(rows)


def _row(label: str, r: dict[str, Any], ratio: float | None) -> dict[str, str]:
    return {"system": label, "requests": f"{r['num_requests']:,}",
            "output tokens": f"{r['output_tokens']:,}", "startup s": f"{r['startup_s']:.2f}",
            "wall s": f"{r['wall_s']:.2f}", "output tok/s": f"{r['output_tok_s']:,.0f}",
            "total tok/s": f"{r['total_tok_s']:,.0f}",
            "kvtwin / peer": "-" if ratio is None else f"{ratio:.2f}x"}


# -- command line ------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.tools.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen3_0_6b",
                   help="catalog name (conf/model) or a local HF folder (default: qwen3_0_6b)")
    p.add_argument("--workload", default="nanovllm_bench",
                   help="workload preset or trace file (default: nanovllm_bench)")
    p.add_argument("--num-requests", type=int, help="the preset's n, else the first N requests")
    p.add_argument("--workload-param", action="append", default=[], metavar="KEY=VALUE",
                   help="override a preset parameter (repeatable)")
    _engine_arguments(p)
    p.add_argument("--temperature", type=float, default=NANOVLLM_TEMPERATURE,
                   help="sampling temperature (nano-vllm's 0.6; 0 = greedy, outputs compared)")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up")
    _peer_arguments(p)
    p.add_argument("--out", type=Path, help="JSON path (default outputs/bench/<...>.json)")
    return p


def _engine_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine (EngineConfig fields; unset ones keep the preset's)")
    g.add_argument("--engine", help="a conf/engine preset, e.g. cpu_tiny (default: defaults)")
    g.add_argument("--dtype")
    g.add_argument("--device")
    g.add_argument("--attention-backend")
    for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_model_len",
                 "seed"):
        g.add_argument("--" + name.replace("_", "-"), type=int)
    g.add_argument("--gpu-memory-utilization", type=float)
    g.add_argument("--enforce-eager", action="store_true", default=None)
    g.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="any other EngineConfig field, e.g. --set enable_prefix_caching=false")


def _peer_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("HF transformers peers")
    g.add_argument("--no-hf", action="store_true", help="run no peer")
    g.add_argument("--peers", default=",".join(PEERS), help="comma-separated subset of "
                   f"{', '.join(PEERS)} (default: both)")
    g.add_argument("--hf-requests", type=int, help="peers run only the first N requests")
    g.add_argument("--hf-batch-size", type=int, default=64, help="static generate batch size")
    g.add_argument("--hf-num-blocks", type=int, help="HF continuous batching KV blocks")
    g.add_argument("--hf-max-batch-tokens", type=int, help="HF continuous batching token budget")


def parse_assignments(items: list[str], what: str) -> dict[str, Any]:
    """KEY=VALUE strings; values read as JSON (numbers, true/false/null), else as text."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(what, item, "KEY=VALUE")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def setup_from_args(args: argparse.Namespace) -> tuple[BenchModel, EngineConfig,
                                                        BenchWorkload, BenchOptions]:
    """Everything checked before any weight is built: model, engine fields, workload, peers."""
    model = resolve_model(args.model)
    flags = {name: getattr(args, name) for name in ENGINE_FLAGS}
    config = engine_config(args.engine, **flags, enforce_eager=args.enforce_eager,
                           **parse_assignments(args.set, "set")).validate(model.config)
    workload = build_workload(args.workload, model.config.vocab_size, args.num_requests,
                              parse_assignments(args.workload_param, "workload_param"))
    peers = () if args.no_hf else tuple(p for p in args.peers.split(",") if p)
    options = BenchOptions(peers, args.hf_requests, args.hf_batch_size, args.temperature,
                           not args.no_warmup, args.hf_num_blocks, args.hf_max_batch_tokens)
    return model, config, workload, options.validate()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        model, config, workload, options = setup_from_args(args)
    except (ValueError, FileNotFoundError) as err:  # ConfigError is a ValueError
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    result = run_bench(model, config, workload, options,
                       command=shlex.join(["python", "-m", "engine.tools.bench", *argv]))
    path = save_result(result, args.out or default_out_path(result))
    print(format_report(result))
    print(f"\nsaved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
