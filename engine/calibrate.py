"""Profile the engine on this machine's device and write a `sim.profile.Profile`.

Steps are built directly, not scheduled: each synthetic step gets Sequences with block tables
from the engine's own BlockManager and a SchedulerOutput, so `sim.features.features_of` gives
exactly the composition that was timed. Timed is `ModelRunner.execute_model` (input
preparation, forward, greedy sampling, the device sync of reading the tokens back): the
scheduler's own CPU time is not in the samples.

    python -m engine.calibrate --model tiny_qwen3 --hardware cpu --dtype float32 \\
        --device cpu --backend sdpa
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.config import EngineConfig, ModelConfig
from engine.llm import LLMEngine, ModelSource
from engine.memory import estimate_activation_bytes
from engine.replay import device_name
from engine.scheduler import SchedulerOutput
from engine.sequence import SamplingParams, Sequence
from sim.catalog import catalog_key, load_model
from sim.features import FEATURES, features_of
from sim.profile import PROFILE_DIR, Profile, ProfileKey, slug

GREEDY = SamplingParams(temperature=0.0, max_tokens=1 << 20, ignore_eos=True)


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
    repeats: int = 3  # back-to-back executions per pass
    passes: int = 3
    warmup: int = 3

    def shapes(self) -> list[StepShape]:
        prefill = [StepShape(((c, q),) * k) for q, c, k in itertools.product(
            self.prefill_chunks, self.prefill_contexts, self.prefill_seqs)]
        decode = [StepShape(decodes=(n,) * b)
                  for b, n in itertools.product(self.decode_batches, self.decode_contexts)]
        mixed = [StepShape(((self.prefill_contexts[i % len(self.prefill_contexts)], q),),
                           (n,) * b)
                 for i, (b, q, n) in enumerate(itertools.product(
                     self.mixed_decodes, self.mixed_chunks, self.decode_contexts))]
        return prefill + decode + mixed

    def runnable(self, config: EngineConfig, num_blocks: int) -> list[StepShape]:
        return [s for s in self.shapes()
                if s.max_len <= config.max_model_len
                and s.num_tokens <= config.max_num_batched_tokens
                and s.num_seqs <= config.max_num_seqs
                and s.blocks(config.block_size) <= num_blocks]


# -- synthetic steps -------------------------------------------------------------------------

class StepBuilder:
    """Sequences with real block tables from the engine's BlockManager, seeded token ids."""

    def __init__(self, engine: LLMEngine, seed: int):
        self.bm = engine.scheduler.block_manager
        self.vocab = engine.model_config.vocab_size
        self.rng = np.random.default_rng(seed)

    def build(self, shape: StepShape) -> SchedulerOutput:
        out = SchedulerOutput()
        for computed, new in shape.prefills:
            seq = self._sequence(computed + new, computed + new)
            seq.num_computed_tokens = computed
            out.add(seq, new, admitted=True)
        for ctx in shape.decodes:
            seq = self._sequence(ctx - 1, ctx)
            seq.append_token(self._tokens(1)[0])
            seq.num_computed_tokens = ctx - 1
            out.add(seq, 1)
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
                  seed: int, deadline: float) -> dict[str, list[float]]:
    """Time every shape in `grid.passes` passes over the list (so a burst of load from
    elsewhere spoils a few samples of many points, not all of one point), until `deadline`
    (perf_counter); each point's time is the median of its samples."""
    builder = StepBuilder(engine, seed)
    for shape in shapes[:grid.warmup]:
        _time_shape(engine, builder, shape, repeats=2)
    rows: list[dict[str, int]] = [{} for _ in shapes]
    samples: list[list[float]] = [[] for _ in shapes]
    for _, (i, shape) in itertools.product(range(grid.passes), enumerate(shapes)):
        if time.perf_counter() > deadline:
            break
        rows[i], seconds = _time_shape(engine, builder, shape, grid.repeats)
        samples[i].extend(seconds)
    done = [i for i in range(len(shapes)) if samples[i]]
    columns: dict[str, list[float]] = {f: [rows[i][f] for i in done] for f in FEATURES}
    columns["seconds"] = [statistics.median(samples[i]) for i in done]
    return columns


def _time_shape(engine: LLMEngine, builder: StepBuilder, shape: StepShape,
                repeats: int) -> tuple[dict[str, int], list[float]]:
    out = builder.build(shape)
    seconds = time_step(engine, out, repeats)
    builder.release(out)
    feats = features_of(out)
    return {f: int(getattr(feats, f)[0]) for f in FEATURES}, seconds


# -- memory ----------------------------------------------------------------------------------

def measure_activation(engine: LLMEngine, num_tokens: int) -> int:
    """Peak activation of a `num_tokens` dummy step: measured on CUDA (the runner's
    `profile_run`, less the KV cache it now holds), the engine's formula elsewhere."""
    runner, cfg = engine.model_runner, engine.config
    if engine.device.type != "cuda":
        return estimate_activation_bytes(engine.model_config, num_tokens,
                                         min(cfg.max_num_seqs, num_tokens), cfg.dtype)
    peak = runner.profile_run(num_tokens) or 0
    kv = runner.kv_cache
    return peak - (kv.numel() * kv.element_size() if kv is not None else 0)


def measure_memory(engine: LLMEngine, token_counts: list[int]) -> dict[str, Any]:
    terms = engine.memory
    return {"total_bytes": terms.total_bytes, "non_torch_bytes": terms.non_torch_bytes,
            "cuda_graph_bytes": 0,
            "activation": [[n, measure_activation(engine, n)] for n in token_counts]}


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


def calibrate(model_source: ModelSource, engine_config: EngineConfig, *, hardware: str,
              samples: CalibrationGrid | None = None, time_budget_s: float = 120.0,
              seed: int = 0, memory_tokens: list[int] | None = None,
              command: str | None = None) -> Profile:
    """Time synthetic steps on a fresh engine (seeded random weights unless `model_source`
    is a folder with weights), measure the memory terms, and return the fitted Profile."""
    started = time.perf_counter()
    grid = samples or CalibrationGrid()
    source, model_key = resolve_source(model_source)
    engine = LLMEngine(source, dataclasses.replace(engine_config, seed=seed))
    shapes = grid.runnable(engine.config, engine.num_blocks)
    np.random.default_rng(seed).shuffle(shapes)  # a time budget cut keeps the spread
    columns = measure_steps(engine, shapes, grid, seed, started + time_budget_s)
    n = engine.config.max_num_batched_tokens
    tokens = memory_tokens or sorted({max(1, n // 4), max(1, n // 2), n})
    key = ProfileKey(hardware, model_key, engine.config.dtype,
                     engine.model_runner.attention_backend)
    profile = Profile(key, columns, buckets=None, memory=measure_memory(engine, tokens))
    profile.meta = _meta(engine, grid, len(columns["seconds"]), len(shapes), command)
    profile.fit_step_time(seed=seed)
    profile.meta["calibration_wall_s"] = round(time.perf_counter() - started, 2)
    return profile


def _meta(engine: LLMEngine, grid: CalibrationGrid, measured: int, planned: int,
          command: str | None) -> dict[str, Any]:
    cuda = engine.device.type == "cuda"
    return {
        "device": device_name(engine.device), "torch_version": torch.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": command or "engine.calibrate.calibrate()",
        "model": engine.model_config.name, "dtype": engine.config.dtype,
        "backend": engine.model_runner.attention_backend,
        "torch_threads": torch.get_num_threads(),
        "engine_config": engine.config.to_dict(),
        "engine_memory": engine.memory.to_dict(),  # the engine's own start-up terms
        "grid": {k: list(v) if isinstance(v, tuple) else v  # as JSON reads back
                 for k, v in dataclasses.asdict(grid).items()},
        "points_measured": measured,
        "points_planned": planned,
        "seconds": f"median of {grid.passes} passes x {grid.repeats} "
                   "ModelRunner.execute_model calls per step (greedy sampling); scheduler "
                   "time not included",
        "activation": "measured: profile_run peak less the KV cache" if cuda else
                      "formula estimate (engine.memory.estimate_activation_bytes): "
                      "no peak-memory counter off CUDA",
        "cuda_graphs": "none (eager; buckets null)",
    }


# -- command line ----------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m engine.calibrate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="catalog name or HF folder")
    p.add_argument("--hardware", required=True, help="hardware key, e.g. cpu or h100_80gb")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--backend", default="sdpa")
    p.add_argument("--device", default="auto")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-model-len", type=int, default=None,
                   help="default: min(4096, the model's max_position_embeddings)")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--repeats", type=int, default=CalibrationGrid.repeats,
                   help="back-to-back executions per pass")
    p.add_argument("--passes", type=int, default=CalibrationGrid.passes)
    p.add_argument("--time-budget", type=float, default=120.0, help="seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=PROFILE_DIR, help="profile directory")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace, model: ModelConfig) -> EngineConfig:
    max_len = args.max_model_len or min(4096, model.max_position_embeddings)
    return EngineConfig(
        block_size=args.block_size, max_model_len=max_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        gpu_memory_utilization=args.gpu_memory_utilization, dtype=args.dtype,
        attention_backend=args.backend, device=args.device, enforce_eager=True,
        seed=args.seed)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    source, _ = resolve_source(args.model)
    model = source if isinstance(source, ModelConfig) else ModelConfig.from_hf(source)
    command = "python -m engine.calibrate " + shlex.join(sys.argv[1:] if argv is None else argv)
    profile = calibrate(args.model, config_from_args(args, model), hardware=args.hardware,
                        samples=CalibrationGrid(repeats=args.repeats, passes=args.passes),
                        time_budget_s=args.time_budget, seed=args.seed, command=command)
    path = profile.save(args.out)
    print(f"wrote {path}: {len(profile.seconds)} steps in "
          f"{profile.meta['calibration_wall_s']} s; held-out error {profile.fit['holdout']}")
    return path


if __name__ == "__main__":
    main()
