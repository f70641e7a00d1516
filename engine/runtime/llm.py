"""LLMEngine (online: add_request / step) and LLM (offline: generate)."""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.core.config import EngineConfig, GiB, ModelConfig
from engine.core.memory import (
    MemoryTerms,
    check_free_memory,
    check_startup,
    decide_num_blocks,
    estimate_activation_bytes,
    max_concurrency,
)
from engine.core.records import RequestRecord, StepRecord
from engine.core.scheduler import Scheduler
from engine.core.scheduler_output import SchedulerOutput
from engine.core.sequence import SamplingParams, Sequence
from engine.core.shapes import graph_buckets
from engine.runtime.lookahead import Lookahead
from engine.runtime.model_runner import ModelRunner

ModelSource = ModelConfig | dict[str, Any] | str | Path


@dataclass
class RequestOutput:
    request_id: Any
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    finish_reason: str | None
    metrics: RequestRecord


def resolve_model(model: ModelSource) -> tuple[ModelConfig, str | None]:
    """A config (random weights) or a local HF folder (its safetensors are loaded)."""
    if isinstance(model, ModelConfig):
        return model, None
    if isinstance(model, dict):
        return ModelConfig.from_hf(model), None
    path = Path(model)
    has_weights = path.is_dir() and any(path.glob("*.safetensors"))
    return ModelConfig.from_hf(path), str(path) if has_weights else None


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


class LLMEngine:
    def __init__(self, model: ModelSource, config: EngineConfig | None = None,
                 **engine_args: Any):
        self.model_config, model_path = resolve_model(model)
        self.config = (config or EngineConfig.from_kwargs(**engine_args))
        self.config.validate(self.model_config)
        self.device = pick_device(self.config.device)
        torch.manual_seed(self.config.seed)
        free_before = _cuda_free_bytes(self.device)
        used_at_start = check_shared_device(self.device, free_before,
                                            self.config.gpu_memory_utilization)
        self.model_runner = ModelRunner(self.model_config, self.config, self.device, model_path)
        self.memory = self._profile_memory(free_before)
        self.memory.used_at_start_bytes = used_at_start
        self.memory.cuda_graph_bytes = self._probe_graph_memory()
        size = decide_num_blocks(self.memory, self.model_config, self.config)
        check_startup(size, self.config)
        self.num_blocks, self.block_bytes = size.num_blocks, size.block_bytes
        self.model_runner.allocate_kv_cache(self.num_blocks)
        self.cuda_graph_bytes_captured = self.model_runner.capture_cuda_graphs()
        self.model_runner.warm_up()
        self.scheduler = Scheduler(self.config, self.num_blocks,
                                   self.model_config.eos_token_ids())
        self.step_records: list[StepRecord] = []
        self.finished: list[Sequence] = []
        self.step_durations: list[float] = []  # step k ends at start_s + step_durations[k]
        self.record_s = 0.0  # time spent building and storing step records
        self._steps_in_flight = 0  # planned, not yet recorded (async scheduling)
        self._t0 = time.perf_counter()

    # -- start-up ------------------------------------------------------------------------------

    def _profile_memory(self, free_before: int) -> MemoryTerms:
        cfg, runner = self.config, self.model_runner
        peak = runner.profile_run()
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            # Only what this process took since start-up counts, never other processes' memory.
            non_torch = max(0, free_before - free - torch.cuda.memory_reserved(self.device))
            return MemoryTerms(total, cfg.gpu_memory_utilization, runner.weight_bytes, peak or 0,
                               non_torch_bytes=non_torch, source="measured")
        num_seqs = min(cfg.max_num_seqs, cfg.max_num_batched_tokens)
        act = peak if peak is not None else estimate_activation_bytes(
            self.model_config, cfg.max_num_batched_tokens, num_seqs, cfg.dtype)
        return MemoryTerms(int(cfg.cpu_memory_gib * GiB), cfg.gpu_memory_utilization,
                           runner.weight_bytes, act,
                           source="cpu: configured total, estimated activation")

    def _probe_graph_memory(self) -> int:
        """The graph pool's size, from capturing the largest decode graph and the largest
        mixed-step bucket over a one-block cache: graphs must be captured over the real
        cache, which they are sized for."""
        runner = self.model_runner
        if not runner.uses_cuda_graphs:
            return 0
        runner.allocate_kv_cache(1)
        largest = graph_buckets(self.config.max_num_seqs)[-1]
        tokens = self.config.cudagraph_token_limit
        probed = runner.capture_cuda_graphs([largest], [tokens] if tokens else None)
        runner.release_cuda_graphs()
        runner.release_kv_cache()
        return probed

    def memory_report(self) -> dict[str, Any]:
        cfg = self.config
        report: dict[str, Any] = self.memory.to_dict()
        report.update(
            device=str(self.device), bytes_per_block=self.block_bytes,
            num_blocks=self.num_blocks, kv_cache_tokens=self.num_blocks * cfg.block_size,
            num_blocks_override=cfg.num_gpu_blocks_override,
            cuda_graphs=self.model_runner.cuda_graphs_enabled,
            mixed_graph_buckets=self.model_runner.mixed_graph_buckets,
            cuda_graph_bytes_captured=self.cuda_graph_bytes_captured,
            attention_backend=self.model_runner.attention_backend,
            quantization=cfg.quantization, kv_dtype=cfg.kv_dtype,
            max_concurrency=max_concurrency(self.num_blocks, cfg.block_size, cfg.max_model_len))
        return report

    # -- online API ----------------------------------------------------------------------------

    def now(self) -> float:
        return time.perf_counter() - self._t0

    def reset_clock(self) -> None:
        """Make now() count from this moment (a replay's time origin)."""
        self._t0 = time.perf_counter()

    def add_request(self, prompt_token_ids: list[int],
                    sampling_params: SamplingParams | None = None,
                    request_id: Any = None, arrival: float | None = None) -> Sequence:
        """Queue a request; a request that can never run is rejected and recorded, not raised."""
        arrival = self.now() if arrival is None else arrival
        seq = Sequence(prompt_token_ids, sampling_params, request_id, arrival)
        if not self.scheduler.add_request(seq):
            seq.times.finish = arrival
            self.finished.append(seq)
        return seq

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def abort_request(self, request_id: Any) -> Sequence | None:
        """Stop an unfinished request and free its blocks (None: no such request unfinished).
        Its record stays, unfinished, with finish_reason "abort". Call between steps."""
        sched = self.scheduler
        seq = next((s for s in [*sched.running, *sched.waiting] if s.request_id == request_id),
                   None)
        if seq is None or not sched.abort(seq):
            return None
        self.finished.append(seq)
        return seq

    def step(self, start: float | None = None) -> list[Sequence]:
        """Run one scheduler step on the model; returns the sequences that finished in it.

        The step starts at `start` (default: now; a replay passes the previous step's end or
        the arrival that woke it) and ends at start + (now() - start): the float sum the
        simulator computes from the replayed duration, so the two agree exactly.
        """
        start = self.now() if start is None else start
        planned = self.plan_step(start)
        if planned is None:
            return []
        out, record = planned
        return self.settle_step(out, record, self.model_runner.execute_model(out))

    def plan_step(self, start: float) -> tuple[SchedulerOutput, StepRecord] | None:
        """Schedule a step and snapshot its record (None: nothing to run)."""
        out = self.scheduler.schedule(start)
        if out.is_empty:
            return None
        r0 = time.perf_counter()
        record = StepRecord.from_output(self._next_step_index(), start, out, self.scheduler)
        self.record_s += time.perf_counter() - r0
        return out, record

    def _next_step_index(self) -> int:
        return len(self.step_records) + self._steps_in_flight

    def settle_step(self, out: SchedulerOutput, record: StepRecord,
                    sampled: list[int | None]) -> list[Sequence]:
        """Apply a step's tokens as it ends now; returns the sequences it finished."""
        duration = self.now() - record.start_s
        finished = self.scheduler.update_from_output(out, sampled, record.start_s + duration)
        self.finish_step(record, duration, finished)
        return finished

    def finish_step(self, record: StepRecord, duration: float,
                    finished: list[Sequence]) -> None:
        """Store a step's record: it ends at start_s + duration (that float sum)."""
        r0 = time.perf_counter()
        record.end_s = record.start_s + duration
        self.step_records.append(record)
        self.step_durations.append(duration)
        self.finished.extend(finished)
        self.record_s += time.perf_counter() - r0

    def request_records(self) -> list[RequestRecord]:
        seqs = self.finished + list(self.scheduler.running) + list(self.scheduler.waiting)
        return [RequestRecord.from_sequence(s) for s in seqs]


class LLM(LLMEngine):
    def generate(self, prompt_token_ids: list[list[int]],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in prompt order."""
        params = sampling_params if isinstance(sampling_params, list) \
            else [sampling_params or SamplingParams()] * len(prompt_token_ids)
        if len(params) != len(prompt_token_ids):
            raise ValueError(f"sampling_params has {len(params)} entries for "
                             f"{len(prompt_token_ids)} prompts")
        seqs = [self.add_request(p, sp) for p, sp in zip(prompt_token_ids, params, strict=True)]
        gc.freeze()  # as replay does: no full collection over the model's objects mid-run
        try:
            self._run_to_completion(len(seqs), use_tqdm)
        finally:
            gc.unfreeze()
        return [_to_output(s) for s in seqs]

    def _run_to_completion(self, total: int, use_tqdm: bool) -> None:
        from tqdm.auto import tqdm

        with tqdm(total=total, desc="generate", disable=not use_tqdm) as bar:
            bar.update(total - sum(1 for _ in self._pending()))
            if self.config.async_scheduling:
                Lookahead(self).run(lambda finished: bar.update(len(finished)))
            while self.has_unfinished():
                bar.update(len(self.step()))

    def _pending(self) -> list[Sequence]:
        return list(self.scheduler.running) + list(self.scheduler.waiting)


def _cuda_free_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    torch.cuda.init()
    gc.collect()  # as vLLM before its snapshot: engines dropped in this process give back
    torch.cuda.empty_cache()  # the blocks torch still caches for them
    return torch.cuda.mem_get_info(device)[0]


def check_shared_device(device: torch.device, free: int, utilization: float) -> int:
    """vLLM V1's start-up check on a CUDA device that other processes may share (before the
    model loads); returns the bytes in use at start, 0 off CUDA."""
    if device.type != "cuda":
        return 0
    total = torch.cuda.mem_get_info(device)[1]
    index = device.index if device.index is not None else torch.cuda.current_device()
    check_free_memory(free, total, utilization, f"cuda:{index}")
    return total - free


def _to_output(seq: Sequence) -> RequestOutput:
    return RequestOutput(seq.request_id, seq.prompt_token_ids, seq.output_token_ids,
                         seq.finish_reason, RequestRecord.from_sequence(seq))
