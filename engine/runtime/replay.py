"""Replay a trace on the real engine against the wall clock, and record what happened.

Engine time is partitioned exactly into steps and idle gaps, with the simulator's own rule
(`sim.simulator`), so that the simulator fed the measured step durations reproduces the run:

    t = 0                                # replay start
    while requests remain or the engine has work:
        add every request with arrival <= t (stamped with its trace arrival, not t)
        if nothing is unfinished: sleep until the next arrival a; t = a (logical); continue
        run one step starting at t: schedule(t), execute, d = clock() - t, end = t + d,
        update_from_output(end); t = end

Step k + 1 starts exactly where step k ended; a step after an idle gap starts exactly at the
arrival that woke the engine. Whatever the loop itself costs between steps falls inside the
next step's duration. The measured durations `d` (not `end - start`, which may differ from
`d` by one ulp) are what `sim.step_time.ReplayedStepTime` must be given.
"""

from __future__ import annotations

import gc
import platform
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from engine.core.config import EngineConfig
from engine.core.records import RequestRecord, StepRecord
from engine.core.request import Request
from engine.core.sequence import SamplingParams, Sequence
from engine.runtime.llm import LLMEngine

SPIN_S = 0.0005  # the last stretch of an idle wait is spun, not slept (sleep overshoots)
ProgressFn = Callable[[int, int], None]  # (requests finished or rejected, total)
ParamsFn = Callable[[Request], SamplingParams]


def greedy_params(request: Request) -> SamplingParams:
    """Forced output length: greedy, EOS ignored (as the simulator assumes)."""
    return SamplingParams(temperature=0.0, max_tokens=max(1, request.output_len),
                          ignore_eos=True)


@dataclass
class ReplayResult:
    """Everything a replay measured. Lists are in the order the requests were given."""

    requests: list[RequestRecord]
    steps: list[StepRecord]
    step_durations_s: list[float]  # feed these to sim.step_time.ReplayedStepTime
    output_token_ids: list[list[int]]
    memory: dict[str, Any]
    device: str
    torch_version: str
    attention_backend: str
    record_s: float  # time spent building and storing records
    wall_s: float

    @property
    def step_s(self) -> float:
        return sum(self.step_durations_s)

    @property
    def record_overhead(self) -> float:
        """Record keeping as a fraction of step time (the target is < 2 %)."""
        return self.record_s / self.step_s if self.step_durations_s else 0.0


def wait_until(engine: LLMEngine, target: float) -> None:
    """Sleep until the engine's clock reads `target`, spinning only for the last SPIN_S."""
    while (left := target - engine.now()) > SPIN_S:
        time.sleep(left - SPIN_S)
    while engine.now() < target:
        pass


def replay(engine: LLMEngine, requests: Iterable[Request], *, time_scale: float = 1.0,
           on_progress: ProgressFn | None = None,
           sampling_params_fn: ParamsFn = greedy_params) -> ReplayResult:
    """Replay `requests` online. Request i arrives at `arrival_s * time_scale` seconds after
    the start, and its records use that time axis. `engine` must be fresh (no steps yet)."""
    if engine.step_records or engine.has_unfinished():
        raise ValueError("replay needs a fresh engine: this one has already run steps")
    if not time_scale > 0:
        raise ValueError(f"time_scale={time_scale!r} is invalid: must be > 0")
    return _Replayer(engine, list(requests), time_scale, on_progress, sampling_params_fn).run()


class _Replayer:
    def __init__(self, engine: LLMEngine, requests: list[Request], time_scale: float,
                 on_progress: ProgressFn | None, params_fn: ParamsFn):
        self.engine = engine
        self.requests = requests
        self.arrivals = [float(r.arrival_s) * time_scale for r in requests]
        order = sorted(range(len(requests)), key=lambda i: (self.arrivals[i], i))
        self.pending = deque(order)  # the simulator's order: by arrival, then trace order
        self.seqs: list[Sequence | None] = [None] * len(requests)
        self.on_progress = on_progress
        self.params_fn = params_fn
        self.record_s = 0.0
        self.done = 0

    def run(self) -> ReplayResult:
        # What the process holds already (the trace, a simulation run beside it) is frozen
        # out of the garbage collector, as vLLM does after start-up: otherwise a full
        # collection scanning it lands inside a step (~100 ms for 350k objects on the CPU).
        gc.freeze()
        try:
            wall = self._loop()
        finally:
            gc.unfreeze()
        return self._result(wall)

    def _loop(self) -> float:
        """The replay itself; returns its wall time."""
        self.engine.reset_clock()  # time 0: the replay starts now
        t = 0.0
        while self.pending or self.engine.has_unfinished():
            self._admit(t)
            if not self.engine.has_unfinished():
                if not self.pending:
                    break  # the last arrivals were all rejected
                t = self.arrivals[self.pending[0]]
                wait_until(self.engine, t)
                continue
            t = self._step(t)
        return self.engine.now()

    def _admit(self, now: float) -> None:
        while self.pending and self.arrivals[self.pending[0]] <= now:
            i = self.pending.popleft()
            req = self.requests[i]
            seq = self.engine.add_request(req.prompt_token_ids, self.params_fn(req),
                                          req.request_id, arrival=self.arrivals[i])
            self.seqs[i] = seq
            if seq.is_finished:  # rejected at admission
                self.done += 1

    def _step(self, start: float) -> float:
        """One engine step starting exactly at `start`; returns its end."""
        engine = self.engine
        count = len(engine.step_records)
        finished = engine.step(start)
        if len(engine.step_records) == count:
            raise RuntimeError("the scheduler planned an empty step with work pending")
        self._progress(len(finished))
        return engine.step_records[-1].end_s

    def _progress(self, newly_finished: int) -> None:
        self.done += newly_finished
        if self.on_progress is not None:
            self.on_progress(self.done, len(self.requests))

    def _result(self, wall: float) -> ReplayResult:
        r0 = time.perf_counter()
        seqs = [s for s in self.seqs if s is not None]
        records = [RequestRecord.from_sequence(s) for s in seqs]
        self.record_s += time.perf_counter() - r0
        engine = self.engine
        return ReplayResult(records, list(engine.step_records), list(engine.step_durations),
                            [s.output_token_ids for s in seqs], engine.memory_report(),
                            device_name(engine.device), torch.__version__,
                            engine.model_runner.attention_backend,
                            self.record_s + engine.record_s, wall)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_model() or platform.processor() or platform.machine() or "cpu"


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def records_frames(result: ReplayResult) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(requests, steps) as DataFrames with the columns of RequestRecord and StepRecord."""
    return (_frame(result.requests, RequestRecord), _frame(result.steps, StepRecord))


def _frame(rows: list[Any], cls: type) -> pd.DataFrame:
    columns = [f.name for f in fields(cls)]
    return pd.DataFrame([r.to_dict() for r in rows], columns=columns)


def replay_run(model: Any, config: EngineConfig, requests: list[Request], path: str | None,
               progress: bool) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """Build the engine and replay the trace on the wall clock: (requests, steps, what the
    summary's `real` side records). On the CPU, torch's intra-op threads are set to one
    per replay: a tiny model's steps are too small for threads to pay, and their start-up
    jitter would be measured as step time (a 40x slower TPOT on 2 cores)."""
    threads = _cpu_threads(config)
    with LLMEngine(path or model, config) as engine, \
            tqdm(total=len(requests), desc="replay", unit="req", disable=not progress) as bar:
        result = replay(engine, requests, on_progress=lambda done, _: bar.update(done - bar.n))
    reqs, steps = records_frames(result)
    info = {"memory": result.memory, "device": {"name": result.device},
            "torch": result.torch_version, "attention_backend": result.attention_backend,
            "record_overhead": result.record_overhead, "wall_s": result.wall_s,
            "torch_threads": threads}
    return reqs, steps, info


CPU_REPLAY_THREADS = 1


def _cpu_threads(config: EngineConfig) -> int:
    if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()):
        return torch.get_num_threads()
    torch.set_num_threads(CPU_REPLAY_THREADS)
    return CPU_REPLAY_THREADS
