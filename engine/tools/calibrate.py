"""Profile the engine on this machine's device and write a `sim.profile.Profile`.

Two kinds of samples, both keyed by `engine.core.features.features_of` of the step that ran:

- engine steps: real `LLMEngine.step` calls on a few generated offline workloads (decode
  batches shrinking from max_num_seqs, a quarter and a sixteenth of it to 1 over short to
  long and mixed contexts, chunked prefills mixed with decodes, shared prefixes). A step's
  duration is measured as `engine.runtime.replay` measures it (schedule + records + execute_model +
  update_from_output, loop included), and `ModelRunner.execute_model` is timed inside it, so
  the host overhead is known per step (execute_model returns once the step's kernels are
  done, also when it samples nothing).
- synthetic steps: built directly (Sequences with real block tables from the engine's own
  BlockManager) over a grid of compositions (prefill chunk x context x sequences, decode batch
  x context, mixed, decode batches with one long sequence), timed through `execute_model`:
  they reach the corners of the grid (largest batches, longest contexts) that short workloads
  do not.

The fit (`sim.profile`) is device time per step kind from both, plus host overhead from the
engine steps. A time budget bounds the whole run (start-up included): the grid is measured
in a shuffled order and cut at the deadline, so a trimmed grid keeps its spread.

    python -m engine.tools.calibrate --model tiny_qwen3 --hardware cpu --dtype float32 \\
        --device cpu --backend sdpa --time-budget 240

`--quick` times only the grid's shapes that carry the fit (`engine.tools.quick_grid`; ~90 s
on a GPU, held-out error as the full grid's on the committed profiles: `quick_eval`), and
`--quick --update OLD_PROFILE` rescales a full profile of the same engine to this machine
per step kind (`sim.profile.rescaled`). `calibrate(timer=...)` records given step times
instead of measured ones (the seam tests fit known times through).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import itertools
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.core.catalog import catalog_key, load_model
from engine.core.config import EngineConfig, ModelConfig
from engine.core.features import EXTRA_FEATURES, FEATURES, StepFeatures, features_of
from engine.core.memory import estimate_activation_bytes
from engine.core.scheduler_output import SchedulerOutput
from engine.core.sequence import SamplingParams, Sequence
from engine.core.shapes import DecodeSplit, graph_buckets
from engine.runtime.llm import LLMEngine, ModelSource
from engine.runtime.replay import device_name
from engine.tools.config import compose_engine
from engine.tools.quick_grid import (
    QUICK_BUDGET_S,
    QUICK_ENGINE_PASSES,
    QUICK_ENGINE_SHARE,
    QUICK_PASSES,
    QUICK_REPEATS,
    QuickRule,
    quick_shapes,
)
from sim.profile import PROFILE_DIR, Profile, ProfileKey, format_holdout, rescaled, slug

GREEDY = SamplingParams(temperature=0.0, max_tokens=1 << 20, ignore_eos=True)
Log = Callable[[str], None]
MAX_ENGINE_ROWS = 6000  # engine steps kept in the profile (a seeded subsample beyond)
COLUMNS = (*FEATURES, *EXTRA_FEATURES)  # what each sample records

# Ladders the default grid takes from, cut to what the configuration can run.
PREFILL_CHUNKS = (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
PREFILL_CONTEXTS = (0, 128, 512, 2048, 8192, 24576)
DECODE_BATCHES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 40, 48, 64, 80, 96, 128, 160, 192, 224,
                  256, 384, 512)
DECODE_CONTEXTS = (16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
MIXED_DECODES = (1, 4, 16, 64, 128, 256, 512)
MIXED_CHUNKS = (16, 128, 512, 2048, 8192)
# Decode batches with one long sequence among short ones: the paged decode kernel's time
# follows the longest sequence, which uniform batches cannot tell from the summed context.
SKEWED_BATCHES = (2, 4, 8, 16, 32, 64, 128)
SKEWED_CONTEXTS = ((256, 2048), (512, 4096), (1024, 8192), (1024, 32768))
EAGER_DECODES = (0, 8, 64)


def stamp(started: float) -> Log:
    """Progress lines on stdout, flushed, with the seconds since `started`."""
    def log(message: str) -> None:
        print(f"[calibrate {time.perf_counter() - started:6.1f} s] {message}", flush=True)
    return log


@dataclass(frozen=True)
class StepShape:
    """A synthetic step: prefill chunks as (computed prefix, new tokens), and the context
    length (the new token included) of each decode."""

    prefills: tuple[tuple[int, int], ...] = ()
    decodes: tuple[int, ...] = ()

    @property
    def num_tokens(self) -> int:
        return sum(q for _, q in self.prefills) + len(self.decodes)

    @property
    def num_seqs(self) -> int:
        return len(self.prefills) + len(self.decodes)

    @property
    def max_len(self) -> int:
        return max([c + q for c, q in self.prefills] + list(self.decodes))

    def blocks(self, block_size: int) -> int:
        lens = [c + q for c, q in self.prefills] + list(self.decodes)
        return sum(-(-n // block_size) for n in lens)


@dataclass
class CalibrationGrid:
    """Which steps to time: pure prefill (chunk x prefix x sequences), pure decode
    (batch x context) and mixed (decodes x chunk x context). Steps a config cannot run
    (max_model_len, max_num_batched_tokens, max_num_seqs, KV blocks) are left out."""

    prefill_chunks: tuple[int, ...] = (8, 16, 32, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
    prefill_contexts: tuple[int, ...] = (0, 64, 192, 448, 768)
    prefill_seqs: tuple[int, ...] = (1, 2, 4)
    decode_batches: tuple[int, ...] = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
    decode_contexts: tuple[int, ...] = (16, 64, 128, 256, 384, 640, 1024)
    mixed_decodes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 48)
    mixed_chunks: tuple[int, ...] = (16, 64, 128, 256, 512)
    skewed_batches: tuple[int, ...] = ()
    skewed_contexts: tuple[tuple[int, int], ...] = ()  # (short, long) decode contexts
    # Steps just past the mixed-step graphs' token limit (eager: every kernel launched from
    # Python), each of `eager_tokens` tokens with 0 / 8 / 64 of them decodes: the validation
    # sets' eager steps are there (4,097-4,500 tokens, few decodes) and ran 11-18 % longer
    # than fits without such points predicted.
    eager_tokens: tuple[int, ...] = ()
    eager_decodes: tuple[int, ...] = ()
    repeats: int = 3  # back-to-back executions per pass
    passes: int = 3
    warmup: int = 3

    @classmethod
    def for_config(cls, config: EngineConfig, **overrides: Any) -> CalibrationGrid:
        """The default ladders cut to `config`'s max_model_len, max_num_seqs and
        max_num_batched_tokens, each limit itself included."""
        length, seqs = config.max_model_len, config.max_num_seqs
        tokens = config.max_num_batched_tokens
        grid = cls(
            prefill_chunks=_ladder(PREFILL_CHUNKS, min(tokens, length)),
            prefill_contexts=tuple(c for c in PREFILL_CONTEXTS if c < length),
            decode_batches=_ladder(DECODE_BATCHES, seqs),
            decode_contexts=_ladder(DECODE_CONTEXTS, length),
            mixed_decodes=tuple(b for b in MIXED_DECODES if b < seqs) or (1,),
            mixed_chunks=tuple(q for q in MIXED_CHUNKS if q < tokens) or (1,),
            skewed_batches=tuple(b for b in SKEWED_BATCHES if b <= seqs),
            skewed_contexts=tuple(c for c in SKEWED_CONTEXTS if c[1] <= length),
            eager_tokens=eager_ladder(config.cudagraph_token_limit, min(tokens, length)),
            eager_decodes=tuple(b for b in EAGER_DECODES if b < seqs))
        return dataclasses.replace(grid, **overrides)

    def quick_rule(self, config: EngineConfig) -> QuickRule:
        """Which of its shapes a quick calibration times (`engine.tools.quick_grid`)."""
        return QuickRule.of(self.decode_contexts, self.prefill_chunks, self.prefill_contexts,
                            config.cudagraph_token_limit, config.max_num_batched_tokens)

    def shapes(self) -> list[StepShape]:
        prefill = [StepShape(((c, q),) * k) for q, c, k in itertools.product(
            self.prefill_chunks, self.prefill_contexts, self.prefill_seqs)]
        decode = [StepShape(decodes=(n,) * b)
                  for b, n in itertools.product(self.decode_batches, self.decode_contexts)]
        mixed = [StepShape(((self.prefill_contexts[i % len(self.prefill_contexts)], q),),
                           (n,) * b)
                 for i, (b, q, n) in enumerate(itertools.product(
                     self.mixed_decodes, self.mixed_chunks, self.decode_contexts))]
        skewed = [StepShape(decodes=(long,) + (short,) * (b - 1))
                  for b, (short, long) in itertools.product(self.skewed_batches,
                                                            self.skewed_contexts)]
        ctx = self.decode_contexts[len(self.decode_contexts) // 2] if self.decode_contexts \
            else 16
        eager = [StepShape(((0, n - b),), (ctx,) * b)
                 for n, b in itertools.product(self.eager_tokens, self.eager_decodes) if n > b]
        return prefill + decode + mixed + skewed + eager

    def runnable(self, config: EngineConfig, num_blocks: int) -> list[StepShape]:
        return [s for s in self.shapes()
                if s.max_len <= config.max_model_len
                and s.num_tokens <= config.max_num_batched_tokens
                and s.num_seqs <= config.max_num_seqs
                and s.blocks(config.block_size) <= num_blocks]


def eager_ladder(limit: int, tokens: int) -> tuple[int, ...]:
    """Token counts just past the graphs' token `limit` and halfway to the budget (none
    without graphs, or when the budget is the limit)."""
    if not 0 < limit < tokens:
        return ()
    return tuple(sorted({n for n in (limit + 64, limit + 512, (limit + tokens) // 2)
                         if limit < n < tokens}))


def _ladder(values: tuple[int, ...], limit: int) -> tuple[int, ...]:
    return tuple(sorted({v for v in values if v < limit} | {limit}))


# -- synthetic steps -------------------------------------------------------------------------

class StepBuilder:
    """Sequences with real block tables from the engine's BlockManager, seeded token ids."""

    def __init__(self, engine: LLMEngine, seed: int):
        self.bm = engine.scheduler.block_manager
        self.vocab = engine.model_config.vocab_size
        self.rng = np.random.default_rng(seed)

    def build(self, shape: StepShape) -> SchedulerOutput:
        out = SchedulerOutput()
        try:
            for computed, new in shape.prefills:
                seq = self._sequence(computed + new, computed + new)
                seq.num_computed_tokens = computed
                out.add(seq, new, admitted=True)
            for ctx in shape.decodes:
                seq = self._sequence(ctx - 1, ctx)
                seq.append_token(self._tokens(1)[0])
                seq.num_computed_tokens = ctx - 1
                out.add(seq, 1)
        except RuntimeError:
            self.release(out)  # what was allocated before a sequence did not fit
            raise
        return out

    def release(self, out: SchedulerOutput) -> None:
        for item in out.scheduled:
            self.bm.free(item.seq)

    def _sequence(self, prompt_len: int, slots: int) -> Sequence:
        seq = Sequence(self._tokens(prompt_len), GREEDY, request_id="calibration")
        if not self.bm.allocate_slots(seq, slots):
            raise RuntimeError(f"calibration step needs more KV blocks than the "
                               f"{self.bm.num_free_blocks} free")
        return seq

    def _tokens(self, n: int) -> list[int]:
        return self.rng.integers(3, self.vocab, n).tolist()


def time_step(engine: LLMEngine, out: SchedulerOutput, repeats: int) -> list[float]:
    """Seconds of `repeats` back-to-back executions of one step."""
    runner, seconds = engine.model_runner, []
    for _ in range(repeats):
        t0 = time.perf_counter()
        runner.execute_model(out)
        seconds.append(time.perf_counter() - t0)
    return seconds


def measure_steps(engine: LLMEngine, shapes: list[StepShape], grid: CalibrationGrid,
                  seed: int, deadline: float, log: Log | None = None) -> dict[str, list]:
    """Time every shape in `grid.passes` passes over the list (so a burst of load from
    elsewhere spoils a few samples of many points, not all of one point), until `deadline`
    (perf_counter); each point's time is the median of its samples."""
    builder, failed = StepBuilder(engine, seed), _Failures(log)
    for shape in shapes[:grid.warmup]:
        failed.attempt(engine, builder, shape, 2)
    rows: list[dict[str, int]] = [{} for _ in shapes]
    samples: list[list[float]] = [[] for _ in shapes]
    progress = _Progress(log, len(shapes), grid.passes)
    for p, (i, shape) in itertools.product(range(grid.passes), enumerate(shapes)):
        if time.perf_counter() > deadline:
            progress.cut(p, i)
            break
        timed = failed.attempt(engine, builder, shape, grid.repeats)
        if timed is not None:
            rows[i] = timed[0]
            samples[i].extend(timed[1])
        progress.tick(p, i, deadline)
    return synthetic_columns(rows, samples)


class _Failures:
    """A synthetic step that cannot be built or run is left out (the first few are logged):
    one bad shape must not cost a whole calibration."""

    def __init__(self, log: Log | None):
        self.log, self.count = log, 0

    def attempt(self, engine: LLMEngine, builder: StepBuilder, shape: StepShape,
                repeats: int) -> tuple[dict[str, int], list[float]] | None:
        try:
            return _time_shape(engine, builder, shape, repeats)
        except Exception as err:  # logged and counted
            self.count += 1
            if self.log is not None and self.count <= 3:
                self.log(f"left out a step of {shape.num_seqs} sequences, {shape.num_tokens} "
                         f"tokens, longest {shape.max_len}: {type(err).__name__}: {err}")
            return None


def synthetic_columns(rows: list[dict[str, int]], samples: list[list[float]]) -> dict[str, list]:
    done = [i for i in range(len(rows)) if samples[i]]
    columns: dict[str, list] = {f: [rows[i][f] for i in done] for f in COLUMNS}
    columns["seconds"] = [statistics.median(samples[i]) for i in done]
    columns["exec_seconds"] = list(columns["seconds"])
    columns["source"] = ["synthetic"] * len(done)
    return columns


class _Progress:
    """A line every ~10 s while timing the grid, and one when the deadline cuts it."""

    def __init__(self, log: Log | None, num_shapes: int, passes: int):
        self.log, self.n, self.passes = log, num_shapes, passes
        self.next_at = time.perf_counter() + 10.0

    def tick(self, p: int, i: int, deadline: float) -> None:
        if self.log is None or time.perf_counter() < self.next_at:
            return
        self.next_at = time.perf_counter() + 10.0
        left = max(0.0, deadline - time.perf_counter())
        self.log(f"grid pass {p + 1}/{self.passes}: {i + 1}/{self.n} shapes, {left:.0f} s "
                 "of budget left")

    def cut(self, p: int, i: int) -> None:
        if self.log is None:
            return
        unmeasured = "every shape measured at least once" if p else \
            f"{self.n - i} shapes not measured"
        self.log(f"time budget reached in pass {p + 1}/{self.passes} at shape {i}/{self.n}: "
                 f"the grid is trimmed ({unmeasured})")


def _time_shape(engine: LLMEngine, builder: StepBuilder, shape: StepShape,
                repeats: int) -> tuple[dict[str, int], list[float]]:
    out = builder.build(shape)
    try:
        seconds = time_step(engine, out, repeats)
    finally:
        builder.release(out)
    feats = features_of(out)
    return {f: getattr(feats, f) for f in COLUMNS}, seconds


# -- engine steps ----------------------------------------------------------------------------

@dataclass(frozen=True)
class EngineWorkload:
    """Requests run through the engine. Prompt lengths: uniform over `prompt` (inclusive),
    or lognormal with `prompt` = (median, p99), cut to [1, max_prompt]; output lengths
    uniform over `output` (inclusive). With `prefix_groups`, each prompt starts with one of
    that many shared prefixes of `prefix_len` tokens (prefix-cache hits, decodes sharing
    blocks). All requests arrive at once, or, with `arrive_every`, one every that many
    steps (online serving's steady state: moderate decode batches with a prefill chunk
    mixed in now and then, counted in steps so that the engine never idles)."""

    name: str
    num_requests: int
    prompt: tuple[int, int]
    output: tuple[int, int]
    dist: str = "uniform"
    max_prompt: int = 1 << 30
    prefix_groups: int = 0
    prefix_len: int = 0
    arrive_every: int = 0

    def requests(self, rng: np.random.Generator, vocab: int) -> list[tuple[list[int], int]]:
        lens = self.prompt_lens(rng)
        outs = rng.integers(self.output[0], self.output[1] + 1, self.num_requests)
        prefixes = [rng.integers(3, vocab, self.prefix_len).tolist()
                    for _ in range(self.prefix_groups)]
        return [(self._prompt(rng, vocab, int(n), prefixes, i), int(o))
                for i, (n, o) in enumerate(zip(lens, outs, strict=True))]

    def _prompt(self, rng: np.random.Generator, vocab: int, n: int,
                prefixes: list[list[int]], i: int) -> list[int]:
        head = prefixes[i % len(prefixes)][:n - 1] if prefixes else []
        return head + rng.integers(3, vocab, n - len(head)).tolist()

    def prompt_lens(self, rng: np.random.Generator) -> np.ndarray:
        a, b = self.prompt
        if self.dist == "uniform":
            return rng.integers(a, b + 1, self.num_requests)
        if self.dist != "lognormal":
            raise ValueError(f"dist={self.dist!r} is invalid: must be uniform or lognormal")
        sigma = np.log(max(b, a + 1) / a) / 2.326  # p99 = median * exp(2.326 sigma)
        lens = np.rint(a * np.exp(sigma * rng.standard_normal(self.num_requests)))
        return np.clip(lens, 1, self.max_prompt).astype(np.int64)

    @property
    def mean_prompt(self) -> float:
        if self.dist == "uniform":
            return (self.prompt[0] + self.prompt[1]) / 2
        sigma = np.log(max(self.prompt[1], self.prompt[0] + 1) / self.prompt[0]) / 2.326
        return min(self.prompt[0] * float(np.exp(sigma**2 / 2)), self.max_prompt)


def engine_workloads(config: EngineConfig, num_blocks: int) -> list[EngineWorkload]:
    """Shrinking decode batches over short, chat-like and long contexts, with chunked
    prefills mixing into them. Chat-like: lognormal prompts with the Azure conversation
    trace's median and p99 (1,020 / 4,142 tokens), cut to what max_model_len allows. Each
    workload fits in the KV cache at its mean lengths (preemption is not what is measured
    here) and its prompts total at most 64 token budgets (64 x max_num_batched_tokens),
    which bounds its time."""
    length, seqs = config.max_model_len, config.max_num_seqs
    kv_tokens, budget = num_blocks * config.block_size, config.max_num_batched_tokens
    out = max(2, min(256, length // 8))
    chat = (min(1020, length // 3), min(4142, length - out))
    plans = [("full batch, short prompts", seqs + seqs // 2, (16, length // 16), "uniform"),
             ("chat-like prompts, full batch churn", 3 * seqs, chat, "lognormal"),
             ("few long prompts", max(2, seqs // 16), (length // 4, length // 2), "uniform"),
             ("one longest context", 2, (length * 3 // 4, length - out), "uniform"),
             ("chat-like prompts, quarter batch", max(2, seqs // 4), chat, "lognormal"),
             ("chat-like prompts, 1/16 batch", max(2, seqs // 16), chat, "lognormal")]
    workloads = [_sized(EngineWorkload(name, n, _span(span, length - out), (2, out), dist,
                                       length - out), kv_tokens, 64 * budget)
                 for name, n, span, dist in plans]
    return workloads + [_sized(w, kv_tokens, 64 * budget)
                        for w in (shared_prefix_workload(seqs, length, out),
                                  *arriving_workloads(seqs, chat, length, out))]


def arriving_workloads(seqs: int, chat: tuple[int, int], length: int,
                       out: int) -> list[EngineWorkload]:
    """Chat-like requests arriving one every 2 and every 6 steps: as outputs average
    out / 2 steps, the decode batch settles near out / 4 and out / 12 sequences (64 and
    21 for 256-token outputs), with a prefill chunk mixed in on arrival: the steps a
    replay of online traffic runs most, which the all-at-once workloads barely visit."""
    return [EngineWorkload(f"chat-like prompts arriving every {k} steps", max(2, seqs // 2),
                           _span(chat, length - out), (2, out), "lognormal", length - out,
                           arrive_every=k) for k in (2, 6)]


def shared_prefix_workload(seqs: int, length: int, out: int) -> EngineWorkload:
    """Moderate batches over 4 shared prefixes: chunks with cached prefixes mixed with
    decodes, and decodes reading the same blocks (online serving's prefix sharing, which the
    other workloads' random prompts never hit)."""
    prefix = max(1, min(1024, length // 4))
    span = _span((prefix + 16, prefix + 512), length - out)
    return EngineWorkload("shared prefixes, half batch", max(2, seqs // 2), span, (2, out),
                          "uniform", length - out, prefix_groups=4, prefix_len=prefix)


def _span(span: tuple[int, int], limit: int) -> tuple[int, int]:
    hi = max(1, min(span[1], limit))
    return max(1, min(span[0], hi)), hi


def _sized(w: EngineWorkload, kv_tokens: int, prompt_tokens: int) -> EngineWorkload:
    per_request = w.mean_prompt + (w.output[0] + w.output[1]) / 2
    n = min(w.num_requests, int(prompt_tokens // max(1.0, w.mean_prompt)),
            int(kv_tokens // per_request))
    return dataclasses.replace(w, num_requests=max(1, n))


class StepTap:
    """Wraps one engine's `scheduler.schedule` and `model_runner.execute_model` (instance
    attributes, removed by `close`) to keep each step's plan and its execute_model time."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.outs: list[SchedulerOutput] = []
        self.exec_s: list[float] = []
        schedule, execute = engine.scheduler.schedule, engine.model_runner.execute_model

        def tapped_schedule(*args: Any, **kwargs: Any) -> SchedulerOutput:
            out = schedule(*args, **kwargs)
            if not out.is_empty:
                self.outs.append(out)
            return out

        def tapped_execute(out: Any) -> Any:
            t0 = time.perf_counter()
            sampled = execute(out)
            self.exec_s.append(time.perf_counter() - t0)
            return sampled

        engine.scheduler.schedule = tapped_schedule
        engine.model_runner.execute_model = tapped_execute

    def close(self) -> None:
        del self.engine.scheduler.schedule
        del self.engine.model_runner.execute_model


def run_requests(engine: LLMEngine, requests: list[tuple[list[int], int]],
                 arrive_every: int = 0) -> None:
    """Add the requests (all at once, or one every `arrive_every` steps) and step as a
    replay does: each step starts where the previous one ended, so the loop's own cost
    falls inside the next step."""
    pending = list(reversed(requests))
    t, steps = engine.now(), 0
    while pending or engine.has_unfinished():
        for _ in range(arrivals(len(pending), steps, arrive_every, engine.has_unfinished())):
            _add(engine, *pending.pop())
        count = len(engine.step_records)
        engine.step(t)
        if len(engine.step_records) == count:
            raise RuntimeError("the scheduler planned an empty step with work pending")
        t, steps = engine.step_records[-1].end_s, steps + 1


def arrivals(pending: int, steps: int, every: int, busy: bool) -> int:
    """Requests to add before step `steps`: all of them, or with `every`, one every that
    many steps, and one whenever the engine would otherwise idle."""
    if not every:
        return pending
    return min(pending, 1) if steps % every == 0 or not busy else 0


def _add(engine: LLMEngine, prompt: list[int], output_len: int) -> None:
    engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=output_len,
                                              ignore_eos=True))


def measure_engine_steps(engine: LLMEngine, workloads: list[EngineWorkload], seed: int,
                         deadline: float, log: Log | None = None,
                         passes: int = 3) -> dict[str, list]:
    """Run the workloads (again, with new prompts, while time is left: `passes` at most)
    and return one row per engine step."""
    rng, first = np.random.default_rng(seed + 1), len(engine.step_durations)
    tap = StepTap(engine)
    gc.freeze()  # as engine.runtime.replay does: no full collection of older objects inside a step
    try:
        for p, workload in itertools.product(range(passes), workloads):
            if time.perf_counter() > deadline:
                break
            run_requests(engine, workload.requests(rng, engine.model_config.vocab_size),
                         workload.arrive_every)
            if log is not None:
                log(f"engine steps, pass {p + 1}: {workload.name} ({workload.num_requests} "
                    f"requests); {len(tap.outs)} steps so far")
    finally:
        gc.unfreeze()
        tap.close()
    return engine_columns(tap, engine.step_durations[first:], seed)


def safe_engine_steps(engine: LLMEngine, workloads: list[EngineWorkload], seed: int,
                      deadline: float, log: Log | None, passes: int) -> dict[str, list]:
    """measure_engine_steps, or no engine rows (said on the log) if the engine fails in it:
    the synthetic grid still gives a profile."""
    try:
        return measure_engine_steps(engine, workloads, seed, deadline, log, passes)
    except Exception as err:  # logged; the grid goes on
        _say(log, f"engine steps not measured ({type(err).__name__}: {err}); the profile "
             "will have synthetic steps only and no host-overhead term")
        drain(engine)
        return {**{f: [] for f in COLUMNS}, "seconds": [], "exec_seconds": [], "source": []}


def drain(engine: LLMEngine) -> None:
    """Give back the blocks of every unfinished sequence (after a failed workload)."""
    scheduler = engine.scheduler
    for seq in [*scheduler.running, *scheduler.waiting]:
        scheduler.block_manager.free(seq)
    scheduler.running.clear()
    scheduler.waiting.clear()


def engine_columns(tap: StepTap, durations: list[float], seed: int) -> dict[str, list]:
    if not len(tap.outs) == len(tap.exec_s) == len(durations):
        raise RuntimeError(f"engine step capture is inconsistent: {len(tap.outs)} plans, "
                           f"{len(tap.exec_s)} execute_model calls, {len(durations)} steps")
    keep = np.arange(len(durations))
    if len(keep) > MAX_ENGINE_ROWS:
        keep = np.sort(np.random.default_rng(seed).choice(keep, MAX_ENGINE_ROWS, replace=False))
    feats = [features_of(tap.outs[i]) for i in keep]
    columns: dict[str, list] = {f: [getattr(x, f) for x in feats] for f in COLUMNS}
    columns["seconds"] = [float(durations[i]) for i in keep]
    columns["exec_seconds"] = [float(tap.exec_s[i]) for i in keep]
    columns["source"] = ["engine"] * len(keep)
    return columns


# -- memory ----------------------------------------------------------------------------------

def measure_activation(engine: LLMEngine, num_tokens: int) -> int:
    """Peak activation of a `num_tokens` dummy step. The engine's own start-up measurement
    for its max_num_batched_tokens; otherwise measured on CUDA (the runner's `profile_run`,
    less the KV cache it now holds), the engine's formula elsewhere."""
    runner, cfg = engine.model_runner, engine.config
    if num_tokens == cfg.max_num_batched_tokens:
        return int(engine.memory.activation_peak_bytes)
    if engine.device.type != "cuda":
        return estimate_activation_bytes(engine.model_config, num_tokens,
                                         min(cfg.max_num_seqs, num_tokens), cfg.dtype)
    peak = runner.profile_run(num_tokens) or 0
    kv = runner.kv_cache
    return peak - (kv.numel() * kv.element_size() if kv is not None else 0)


def measure_memory(engine: LLMEngine, token_counts: list[int]) -> dict[str, Any]:
    terms = engine.memory
    return {"total_bytes": terms.total_bytes, "non_torch_bytes": terms.non_torch_bytes,
            "cuda_graph_bytes": int(getattr(terms, "cuda_graph_bytes", 0) or 0),
            "cuda_graph_tokens": cudagraph_tokens(engine),
            "activation": [[n, measure_activation(engine, n)] for n in token_counts]}


def cudagraph_tokens(engine: LLMEngine) -> int:
    """The largest mixed step the mixed-step graphs serve (0: none)."""
    return max(getattr(engine.model_runner, "mixed_graph_buckets", None) or [0])


def graph_info(engine: LLMEngine) -> tuple[bool, list[int] | None, str]:
    """(CUDA graphs on, the decode batch sizes they were captured at, where those came from)."""
    runner = engine.model_runner
    if not getattr(runner, "cuda_graphs_enabled", False):
        return False, None, "none (eager; buckets null)"
    captured = getattr(getattr(runner, "graphs", None), "graphs", None)
    if captured:  # DecodeGraphs.graphs: {batch size: CUDAGraph}
        return True, sorted(int(b) for b in captured), "captured: ModelRunner.graphs.graphs"
    return True, graph_buckets(engine.config.max_num_seqs), \
        "engine.config.graph_buckets(max_num_seqs) (the runner lists no batch sizes)"


# -- calibrate -------------------------------------------------------------------------------

def catalog_stem(name: str) -> str | None:
    """The catalog file stem of a model name in any accepted spelling (None if unknown)."""
    try:
        return catalog_key("model", name)
    except (ValueError, FileNotFoundError):
        return None


def resolve_source(model_source: ModelSource) -> tuple[ModelSource, str]:
    """What LLMEngine loads, and the profile's model key (a catalog stem where possible)."""
    if isinstance(model_source, str) and not Path(model_source).exists():
        stem = catalog_stem(model_source)
        if stem is None:
            raise ValueError(f"model {model_source!r} is neither a path nor a catalog entry")
        return load_model(stem), stem
    if isinstance(model_source, ModelConfig):
        return model_source, slug(model_source.name or model_source.architecture)
    if isinstance(model_source, dict):
        return model_source, slug(str(model_source.get("_name_or_path") or "model"))
    return model_source, slug(Path(model_source).name)


@dataclass
class Plan:
    """What a calibration measures and how its time budget is split."""

    grid: CalibrationGrid | None = None  # default: CalibrationGrid.for_config
    workloads: list[EngineWorkload] | None = None  # default: engine_workloads; [] for none
    engine_share: float = 0.3  # of the budget left after start-up, for engine steps
    memory_tokens: list[int] | None = None
    engine_passes: int = 3
    quick: bool = False  # time the grid's shapes that carry the fit only (quick_grid)
    timer: Timer | None = None  # replaces every measured duration (tests)


# The sample-collection seam: given the features of every step measured, its (device, host)
# seconds to record instead of what was timed (exec_seconds = device; seconds = device + host
# for engine rows, device alone for synthetic ones), so a test can fit known step times.
Timer = Callable[[StepFeatures], tuple[np.ndarray, np.ndarray]]


def calibrate(model_source: ModelSource, engine_config: EngineConfig, *, hardware: str,
              samples: CalibrationGrid | None = None, time_budget_s: float = 300.0,
              seed: int = 0, memory_tokens: list[int] | None = None,
              command: str | None = None, workloads: list[EngineWorkload] | None = None,
              engine_share: float = 0.3, engine_passes: int = 3, quick: bool = False,
              timer: Timer | None = None, verbose: bool = True) -> Profile:
    """Build a fresh engine (seeded random weights unless `model_source` is a folder with
    weights), measure memory terms, engine steps and synthetic steps within `time_budget_s`
    (start-up included), and return the fitted Profile. `quick`: the grid's shapes that
    carry the fit only; `timer`: step times to record instead of the measured ones."""
    started = time.perf_counter()
    log = stamp(started) if verbose else None
    plan = Plan(samples, workloads, engine_share, memory_tokens, engine_passes, quick, timer)
    source, model_key = resolve_source(model_source)
    engine = LLMEngine(source, dataclasses.replace(engine_config, seed=seed))
    _say(log, f"engine ready: {device_name(engine.device)}, backend "
         f"{engine.model_runner.attention_backend}, CUDA graphs "
         f"{graph_info(engine)[0]}, {engine.num_blocks} KV blocks")
    columns, phases = measure_all(engine, plan, seed, started + time_budget_s, log)
    enabled, buckets, buckets_source = graph_info(engine)
    key = ProfileKey(hardware, model_key, engine.config.dtype,
                     engine.model_runner.attention_backend, engine.config.quantization,
                     engine.config.kv_cache_dtype)
    profile = Profile(key, columns, buckets=buckets, memory=phases.pop("memory"))
    profile.meta = _meta(engine, phases, columns, command, buckets_source, time_budget_s)
    profile.meta.update(quick=quick, timer=None if timer is None else _name(timer))
    profile.fit_step_time(seed=seed)
    profile.meta["holdout"] = profile.fit["holdout"]  # the fit's error on held-out steps
    profile.meta["calibration_wall_s"] = round(time.perf_counter() - started, 2)
    _say(log, format_holdout(profile.fit["holdout"]))
    return profile


def measure_all(engine: LLMEngine, plan: Plan, seed: int, deadline: float,
                log: Log | None) -> tuple[dict[str, list], dict[str, Any]]:
    n = engine.config.max_num_batched_tokens
    tokens = plan.memory_tokens or sorted({max(1, n // 4), max(1, n // 2), n})
    phases: dict[str, Any] = {"memory": measure_memory(engine, tokens)}
    grid = plan.grid or CalibrationGrid.for_config(engine.config)
    shapes = grid.runnable(engine.config, engine.num_blocks)
    if plan.quick:
        shapes = quick_shapes(shapes, grid.quick_rule(engine.config))
    np.random.default_rng(seed).shuffle(shapes)  # a time budget cut keeps the spread
    for shape in shapes[:grid.warmup]:  # compile / autotune before anything is timed
        _Failures(log).attempt(engine, StepBuilder(engine, seed), shape, 2)
    workloads = engine_workloads(engine.config, engine.num_blocks) \
        if plan.workloads is None else plan.workloads
    t0 = time.perf_counter()
    engine_deadline = t0 + plan.engine_share * max(0.0, deadline - t0)
    real = safe_engine_steps(engine, workloads, seed, engine_deadline, log,
                             plan.engine_passes)
    t1 = time.perf_counter()
    _say(log, f"{len(real['seconds'])} engine steps in {t1 - t0:.1f} s; timing up to "
         f"{len(shapes)} synthetic shapes x {grid.passes} passes")
    synth = measure_steps(engine, shapes, grid, seed, deadline, log)
    phases.update(grid=grid, workloads=workloads, planned=len(shapes),
                  engine_s=round(t1 - t0, 2), synthetic_s=round(time.perf_counter() - t1, 2))
    columns = {k: synth[k] + real[k] for k in synth}
    return (columns if plan.timer is None else timed(columns, plan.timer)), phases


def timed(columns: dict[str, list], timer: Timer) -> dict[str, list]:
    """`columns` with the timer's step times in place of the measured ones."""
    features = StepFeatures.from_columns({f: np.asarray(columns[f]) for f in COLUMNS})
    device, host = timer(features)
    engine = np.asarray(columns["source"]) == "engine"
    return {**columns, "seconds": [float(x) for x in np.where(engine, device + host, device)],
            "exec_seconds": [float(x) for x in device]}


def _name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", type(fn).__name__)


def _say(log: Log | None, message: str) -> None:
    if log is not None:
        log(message)


def _decode_split(engine: LLMEngine) -> dict[str, int] | None:
    """The split rule of the Triton paged-decode kernel (the `torch` backend); the sim's
    step-time model reads it. The other backends do not split sequences this way."""
    if engine.model_runner.attention_backend != "torch":
        return None
    return dataclasses.asdict(DecodeSplit(engine.model_config.num_key_value_heads))


def _meta(engine: LLMEngine, phases: dict[str, Any], columns: dict[str, list],
          command: str | None, buckets_source: str, budget: float) -> dict[str, Any]:
    cuda = engine.device.type == "cuda"
    runner, grid = engine.model_runner, phases["grid"]
    sources = columns["source"]
    return {
        "device": device_name(engine.device), "torch_version": torch.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": command or "engine.tools.calibrate.calibrate()",
        "model": engine.model_config.name, "dtype": engine.config.dtype,
        "backend": runner.attention_backend, "attention_backend": runner.attention_backend,
        "cuda_graphs_enabled": bool(getattr(runner, "cuda_graphs_enabled", False)),
        "decode_split": _decode_split(engine), "decode_batch_basis": "knots",
        "fit_weights": "rows",
        "cudagraph_token_limit": cudagraph_tokens(engine),
        "buckets_source": buckets_source, "torch_threads": torch.get_num_threads(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "engine_config": engine.config.to_dict(),
        "engine_memory": engine.memory.to_dict(),  # the engine's own start-up terms
        "grid": _plain(dataclasses.asdict(grid)),
        "engine_workloads": [_plain(dataclasses.asdict(w)) for w in phases["workloads"]],
        "time_budget_s": budget, "engine_steps_s": phases["engine_s"],
        "synthetic_s": phases["synthetic_s"],
        "points_measured": sources.count("synthetic"), "points_planned": phases["planned"],
        "engine_steps": sources.count("engine"),
        "seconds": "synthetic rows: median of passes x repeats ModelRunner.execute_model "
                   "calls (greedy sampling), no host overhead; engine rows: one LLMEngine.step "
                   "each (schedule + records + execute_model + update_from_output), as a "
                   "replay measures it; exec_seconds: execute_model alone",
        "activation": "measured: profile_run peak less the KV cache" if cuda else
                      "formula estimate (engine.core.memory.estimate_activation_bytes): "
                      "no peak-memory counter off CUDA",
    }


def _plain(data: dict[str, Any]) -> dict[str, Any]:
    """Tuples as lists: the meta as JSON reads it back."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}


# -- one calibration, as the command line and run.py mode=calibrate ask for it -----------------

@dataclass(frozen=True)
class CalibrationOptions:
    """What to measure and where to write it (`--quick`, ... here; `calibrate.*` in run.py)."""

    quick: bool = False
    update: Path | None = None  # with quick: rescale this full profile instead
    time_budget_s: float | None = None  # None: 300 s, QUICK_BUDGET_S when quick
    repeats: int | None = None
    passes: int | None = None
    engine_share: float | None = None
    engine_passes: int | None = None
    seed: int = 0
    out: Path = PROFILE_DIR

    def checked(self) -> CalibrationOptions:
        if self.update and not self.quick:
            raise ValueError("calibrate.update (--update) needs calibrate.quick (--quick): a "
                             "quick calibration rescales the full profile")
        return self

    @property
    def budget_s(self) -> float:
        return self.time_budget_s or (QUICK_BUDGET_S if self.quick else 300.0)


def run_calibration(model: ModelSource, config: EngineConfig, hardware: str,
                    options: CalibrationOptions, command: str,
                    timer: Timer | None = None) -> tuple[Path, Profile]:
    """Calibrate and save; with `update`, save the old profile rescaled (the quick one goes
    to OUT/quick/). Returns the path written last and its profile."""
    o = options.checked()
    old = Profile.load(o.update) if o.update else None  # fails before measuring
    grid = CalibrationGrid.for_config(config, **_grid_passes(o))
    profile = calibrate(model, config, hardware=hardware, samples=grid,
                        time_budget_s=o.budget_s, seed=o.seed, command=command,
                        engine_share=o.engine_share or (QUICK_ENGINE_SHARE if o.quick else 0.3),
                        engine_passes=o.engine_passes or (
                            QUICK_ENGINE_PASSES if o.quick else 3),
                        quick=o.quick, timer=timer)
    path = profile.save(o.out / "quick" if old else o.out)
    meta = profile.meta
    print(f"wrote {path}: {meta['points_measured']}/{meta['points_planned']} synthetic shapes "
          f"+ {meta['engine_steps']} engine steps in {meta['calibration_wall_s']} s "
          f"(budget {o.budget_s:g} s)", flush=True)
    if old is None:
        return path, profile
    new = rescaled(old, profile)
    path = new.save(o.out)
    scales = new.meta["rescaled"]["scales"]
    print(f"wrote {path}: {o.update} rescaled (decode x {scales['decode']:.4f}, mixed x "
          f"{scales['mixed']:.4f}); {format_holdout(new.fit['holdout'])}", flush=True)
    return path, new


def _grid_passes(o: CalibrationOptions) -> dict[str, int]:
    if o.quick:
        return {"repeats": QUICK_REPEATS, "passes": QUICK_PASSES}
    return {"repeats": o.repeats or CalibrationGrid.repeats,
            "passes": o.passes or CalibrationGrid.passes}


# -- command line ----------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m engine.tools.calibrate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="catalog name or HF folder")
    p.add_argument("--hardware", required=True, help="hardware key, e.g. cpu or h100_80gb")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--backend", default="auto", help="attention backend (auto: the engine's "
                   "default on this device)")
    p.add_argument("--device", default="auto")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-model-len", type=int, default=None,
                   help="default: min(32768, the model's max_position_embeddings)")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--cpu-memory-gib", type=float, default=1.0, help="CPU engine budget")
    p.add_argument("--enforce-eager", action="store_true",
                   help="no CUDA graphs (default: the engine's default, graphs on a GPU)")
    p.add_argument("--max-cudagraph-tokens", type=int,
                   default=EngineConfig.max_cudagraph_tokens,
                   help="largest mixed step that replays a CUDA graph (0: none)")
    p.add_argument("--repeats", type=int, default=CalibrationGrid.repeats,
                   help="back-to-back executions per pass")
    p.add_argument("--passes", type=int, default=CalibrationGrid.passes)
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds for the whole calibration, start-up included; the grid is "
                        f"trimmed to fit (default 300, {QUICK_BUDGET_S:g} with --quick)")
    p.add_argument("--quick", action="store_true",
                   help=f"time only the grid's shapes that carry the fit, {QUICK_PASSES} "
                        f"passes x {QUICK_REPEATS} repeats, {QUICK_ENGINE_PASSES} pass over "
                        "the engine workloads (engine.tools.quick_grid): ~90 s on a GPU")
    p.add_argument("--update", type=Path, metavar="OLD_PROFILE",
                   help="with --quick: write OLD_PROFILE (a full calibration of this engine, "
                        "elsewhere or earlier) rescaled per step kind to this machine's quick "
                        "samples (sim.profile.rescaled) instead of the quick profile, which "
                        "goes to OUT/quick/")
    p.add_argument("--engine-share", type=float, default=None,
                   help="share of the budget (after start-up) for real engine steps "
                        f"(default 0.3, {QUICK_ENGINE_SHARE:g} with --quick)")
    p.add_argument("--engine-passes", type=int, default=None,
                   help="passes over the engine workloads at most (new prompts each pass; "
                        f"default 3, {QUICK_ENGINE_PASSES} with --quick)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=PROFILE_DIR, help="profile directory")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace, model: ModelConfig) -> EngineConfig:
    max_len = args.max_model_len or min(32768, model.max_position_embeddings)
    return compose_engine(
        block_size=args.block_size, max_model_len=max_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        gpu_memory_utilization=args.gpu_memory_utilization, dtype=args.dtype,
        attention_backend=args.backend, device=args.device,
        enforce_eager=args.enforce_eager, cpu_memory_gib=args.cpu_memory_gib, seed=args.seed,
        max_cudagraph_tokens=args.max_cudagraph_tokens)


def options_from_args(args: argparse.Namespace) -> CalibrationOptions:
    return CalibrationOptions(quick=args.quick, update=args.update,
                              time_budget_s=args.time_budget, repeats=args.repeats,
                              passes=args.passes, engine_share=args.engine_share,
                              engine_passes=args.engine_passes, seed=args.seed, out=args.out)


def main(argv: list[str] | None = None, timer: Timer | None = None) -> Path:
    """The command line; `timer`: the sample-collection seam (tests)."""
    args = parse_args(argv)
    source, _ = resolve_source(args.model)
    model = source if isinstance(source, ModelConfig) else ModelConfig.from_hf(source)
    given = sys.argv[1:] if argv is None else argv
    command = "python -m engine.tools.calibrate " + shlex.join(given)
    try:
        options = options_from_args(args).checked()
    except ValueError as err:
        raise SystemExit(str(err)) from None
    path, _ = run_calibration(args.model, config_from_args(args, model), args.hardware,
                              options, command, timer)
    return path


if __name__ == "__main__":
    main()
