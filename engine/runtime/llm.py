"""LLMEngine (online: add_request / step) and LLM (offline: generate)."""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from engine.core.config import ConfigError, EngineConfig, ModelConfig
from engine.core.memory import max_concurrency
from engine.core.parallel import RankShapes
from engine.core.records import RequestRecord, StepRecord
from engine.core.scheduler import Scheduler
from engine.core.scheduler_output import SchedulerOutput
from engine.core.sequence import SamplingParams, Sequence
from engine.runtime.distributed import (
    PlanChannel,
    available,
    close_tp,
    free_port,
    init_tp,
    rank_device,
    spawn_workers,
)
from engine.runtime.lookahead import Lookahead
from engine.runtime.startup import check_shared_device, start_runner
from engine.runtime.tp_worker import worker_main

ModelSource = ModelConfig | dict[str, Any] | str | Path
__all__ = ["LLM", "LLMEngine", "RequestOutput", "check_shared_device", "pick_device",
           "resolve_model"]


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
        self.tp_size = self.config.tensor_parallel_size
        self._workers: list[Any] = []
        torch.manual_seed(self.config.seed)
        if self.tp_size > 1:
            self._start_workers(model_path)
        try:
            started = start_runner(self.model_config, self.config, self.device, model_path)
        except BaseException as err:
            self._fail_start(err)
            raise
        self.model_runner = started.runner
        self.memory = started.memory
        self.num_blocks, self.block_bytes = started.size.num_blocks, started.size.block_bytes
        self.cuda_graph_bytes_captured = started.cuda_graph_bytes_captured
        self.rank_memory = started.rank_memory  # TP > 1: every rank's own terms
        if self.tp_size > 1:
            self.model_runner.plan_channel = PlanChannel()
        self.scheduler = Scheduler(self.config, self.num_blocks,
                                   self.model_config.eos_token_ids())
        self.step_records: list[StepRecord] = []
        self.finished: list[Sequence] = []
        self.step_durations: list[float] = []  # step k ends at start_s + step_durations[k]
        self.record_s = 0.0  # time spent building and storing step records
        self._steps_in_flight = 0  # planned, not yet recorded (async scheduling)
        self._t0 = time.perf_counter()

    # -- tensor parallelism ----------------------------------------------------------------------

    def _start_workers(self, model_path: str | None) -> None:
        """Spawn ranks 1..tp-1 (engine.runtime.tp_worker) and join the group as rank 0."""
        tp, kind = self.tp_size, self.device.type
        if not available(kind):
            raise RuntimeError(f"tensor_parallel_size={tp} needs torch.distributed with the "
                               f"{'nccl' if kind == 'cuda' else 'gloo'} backend")
        if kind == "cuda" and torch.cuda.device_count() < tp:
            raise ConfigError("tensor_parallel_size", tp, "at most the number of visible "
                              f"CUDA devices ({torch.cuda.device_count()})")
        port = free_port()
        self._workers, self._errors = spawn_workers(
            worker_main, tp, (tp, port, self.model_config, self.config, model_path, kind))
        self.device = rank_device(self.device, 0)
        init_tp(0, tp, port, self.device)

    def _fail_start(self, err: BaseException) -> None:
        """Stop the workers; their errors (the first cause, often) join rank 0's."""
        self.close()
        for rank, text in self._worker_errors():
            err.add_note(f"tensor-parallel rank {rank}: {text}")

    def _worker_errors(self) -> list[tuple[int, str]]:
        errors = getattr(self, "_errors", None)
        found = []
        while errors is not None and not errors.empty():
            found.append(errors.get())
        return found

    def close(self) -> None:
        """Stop the tensor-parallel workers and leave the group (nothing to do at TP=1)."""
        if not self._workers:
            return
        runner = getattr(self, "model_runner", None)
        if runner is not None and runner.plan_channel is not None:
            runner.plan_channel.send(None)
            runner.plan_channel = None
        for proc in self._workers:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.terminate()
        self._workers = []
        close_tp()

    def __enter__(self) -> LLMEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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
        if self.tp_size > 1:
            report.update(tensor_parallel_size=self.tp_size, rank_memory=self.rank_memory,
                          kv_heads_per_rank=RankShapes.of(self.model_config,
                                                          self.tp_size).num_kv_heads)
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
        with tqdm(total=total, desc="generate", disable=not use_tqdm) as bar:
            bar.update(total - sum(1 for _ in self._pending()))
            if self.config.async_scheduling and self.tp_size == 1:  # TP > 1 steps in turn
                Lookahead(self).run(lambda finished: bar.update(len(finished)))
            while self.has_unfinished():
                bar.update(len(self.step()))

    def _pending(self) -> list[Sequence]:
        return list(self.scheduler.running) + list(self.scheduler.waiting)


def _to_output(seq: Sequence) -> RequestOutput:
    return RequestOutput(seq.request_id, seq.prompt_token_ids, seq.output_token_ids,
                         seq.finish_reason, RequestRecord.from_sequence(seq))
