"""Mixed steps replayed from their CUDA graph against the same steps run eagerly (GPU only).

    python -m engine.tools.bench_mixed                     # Qwen3-0.6B, the compositions below
    python -m engine.tools.bench_mixed --out mixed.json

A mixed step is a prefill chunk (after `chunk_context` computed tokens) beside `decodes` one-token
steps of `decode_context` tokens each. Every composition runs on one engine in one process, twice:
through the step's CUDA graph (the whole forward pass, attention by the mixed kernel straight from
the paged cache), and eagerly, as the engine runs steps past `max_cudagraph_tokens` (varlen flash
attention over the gathered prefix for the chunk, the split paged decode kernel for the decodes,
every kernel launched from Python). Each time is the inputs' upload, the forward pass and logits,
synchronised wall time over repeats (`bench_decode.timed`), so an eager step that is host-bound
shows the host's time. The logits of both runs are compared.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from engine.core.catalog import load_model
from engine.core.sequence import SamplingParams, Sequence
from engine.runtime.llm import LLM
from engine.runtime.model_runner import ModelRunner
from engine.tools.bench_decode import Item, Plan, report, save, timed


@dataclass(frozen=True)
class Composition:
    decodes: int
    decode_context: int
    chunk: int
    chunk_context: int = 0

    @property
    def num_tokens(self) -> int:
        return self.decodes + self.chunk


COMPOSITIONS = (
    Composition(0, 0, 256), Composition(0, 0, 1024), Composition(0, 0, 4096),
    Composition(16, 1024, 240), Composition(64, 1024, 448), Composition(128, 1024, 896),
    Composition(32, 2048, 2016), Composition(8, 4096, 1016, 4096),
    Composition(4, 16384, 508, 16384),
)


def mixed_plan(comp: Composition, block_size: int) -> Plan:
    """The decodes, then the chunk, each sequence over its own blocks."""
    params = SamplingParams(temperature=0.0, max_tokens=1 << 20, ignore_eos=True)
    shapes = [(comp.decode_context, comp.decode_context - 1, 1)] * comp.decodes
    if comp.chunk:
        total = comp.chunk_context + comp.chunk
        shapes.append((total, comp.chunk_context, comp.chunk))
    items, first = [], 0
    for length, computed, new in shapes:
        seq = Sequence([1 + i % 1000 for i in range(length)], params)
        blocks = -(-length // block_size)
        seq.block_table = list(range(first, first + blocks))
        seq.num_computed_tokens, first = computed, first + blocks
        items.append(Item(seq, new))
    return Plan(items)


def step_ms(runner: ModelRunner, plan: Plan, repeats: int) -> tuple[float, torch.Tensor]:
    """Milliseconds of upload + forward + logits, and the logits."""
    host = runner.build_host(plan.scheduled)
    logits = runner.compute_step_logits(runner.upload(host)).float()
    return timed(lambda: runner.compute_step_logits(runner.upload(host)), repeats) * 1e3, logits


def measure(llm: LLM, comp: Composition, repeats: int) -> dict[str, Any]:
    runner = llm.model_runner
    plan = mixed_plan(comp, llm.config.block_size)
    needed = sum(len(item.seq.block_table) for item in plan.scheduled)
    if needed > llm.num_blocks:
        raise ValueError(f"{comp} needs {needed} KV blocks; the engine has {llm.num_blocks}")
    if runner.mixed is None or not runner.mixed.serves(comp.num_tokens, len(plan.scheduled),
                                                        comp.chunk == 0):
        raise ValueError(f"{comp} is not a mixed-graph step: raise --max-cudagraph-tokens")
    graph_ms, graph_logits = step_ms(runner, plan, repeats)
    mixed, runner.mixed = runner.mixed, None
    try:
        eager_ms, eager_logits = step_ms(runner, plan, repeats)
    finally:
        runner.mixed = mixed
    return {**asdict(comp), "tokens": comp.num_tokens, "graph_ms": graph_ms,
            "eager_ms": eager_ms, "eager_over_graph": eager_ms / graph_ms,
            "max_logit_diff": float((graph_logits - eager_logits).abs().max())}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m engine.tools.bench_mixed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen3_0_6b")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-cudagraph-tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("engine.tools.bench_mixed needs a CUDA GPU")
    llm = LLM(load_model(args.model), dtype="bfloat16", block_size=args.block_size,
              max_model_len=32768, max_num_batched_tokens=8192,
              max_cudagraph_tokens=args.max_cudagraph_tokens)
    rows = [measure(llm, comp, args.repeats) for comp in COMPOSITIONS]
    result = report(llm, args.model, max_cudagraph_tokens=args.max_cudagraph_tokens, steps=rows)
    save(result, args.out)
    return result


if __name__ == "__main__":
    main()
