"""One decode step of a full batch against its HBM lower bound (GPU only).

    python -m engine.tools.bench_decode             # Qwen3-0.6B, 256 sequences, contexts 256, 1024
    python -m engine.tools.bench_decode --contexts 512 2048 --profile --out decode.json

The lower bound is the bytes a decode step must read, the weights plus every sequence's KV
cache, over the copy bandwidth measured in the same process (a device-to-device copy of
2 GiB, read + write). The step is timed twice: the model's forward and logits (the CUDA graph
replay), and the whole `execute_model` (input preparation, sampling, reading tokens back).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from engine.core.catalog import load_model
from engine.core.sequence import SamplingParams, Sequence
from engine.runtime.llm import LLM


class Item:
    """A scheduled sequence: the fields ModelRunner reads from a scheduler output's entries."""

    def __init__(self, seq: Sequence, num_new_tokens: int = 1):
        self.seq, self.num_new_tokens = seq, num_new_tokens


class Plan:
    def __init__(self, items: list[Item]):
        self.scheduled = items


def timed(fn: Callable[[], Any], repeats: int = 20) -> float:
    """Mean seconds of fn after 3 warm-up calls, the device synchronised around the loop."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def copy_bandwidth(num_bytes: int = 2 << 30) -> float:
    """Bytes per second of a device-to-device copy, counting the read and the write."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), repeats=10)
    return 2 * num_bytes / seconds


def decode_plan(batch: int, context: int, block_size: int, temperature: float) -> Plan:
    """`batch` sequences of `context` tokens whose last token is the step's new one."""
    params = SamplingParams(temperature=temperature, max_tokens=1 << 20, ignore_eos=True)
    blocks = -(-context // block_size)
    items = []
    for i in range(batch):
        seq = Sequence(list(range(1, context + 1)), params)
        seq.block_table = list(range(i * blocks, (i + 1) * blocks))
        seq.num_computed_tokens = context - 1
        items.append(Item(seq))
    return Plan(items)


def measure(llm: LLM, batch: int, context: int, bandwidth: float,
            temperature: float) -> dict[str, Any]:
    runner = llm.model_runner
    needed = batch * -(-context // llm.config.block_size)
    if needed > llm.num_blocks:
        raise ValueError(f"batch {batch} x context {context} needs {needed} KV blocks; the "
                         f"engine has {llm.num_blocks}: lower --batch or --contexts")
    plan = decode_plan(batch, context, llm.config.block_size, temperature)
    step = runner.prepare_inputs(plan.scheduled)
    forward = timed(lambda: runner.compute_step_logits(step))
    execute = timed(lambda: runner.execute_model(plan))
    kv_bytes = batch * context * llm.model_config.kv_bytes_per_token(llm.config.kv_dtype)
    bound = (runner.weight_bytes + kv_bytes) / bandwidth
    return {"batch": batch, "context": context, "forward_ms": forward * 1e3,
            "execute_ms": execute * 1e3, "hbm_bound_ms": bound * 1e3,
            "forward_over_bound": forward / bound, "execute_over_bound": execute / bound}


def profile_table(llm: LLM, batch: int, context: int, temperature: float) -> str:
    # only with a profile asked for
    from torch.profiler import ProfilerActivity, profile

    plan = decode_plan(batch, context, llm.config.block_size, temperature)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            llm.model_runner.execute_model(plan)
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m engine.tools.bench_decode",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen3_0_6b")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--profile", action="store_true",
                        help="print the torch profiler table of the longest context")
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("engine.tools.bench_decode needs a CUDA GPU")
    bandwidth = copy_bandwidth()
    llm = LLM(load_model(args.model), dtype="bfloat16", block_size=args.block_size,
              max_num_seqs=args.batch, enforce_eager=args.enforce_eager,
              max_model_len=max(args.contexts) + 1)
    rows = [measure(llm, args.batch, c, bandwidth, args.temperature) for c in args.contexts]
    result = report(llm, args.model, cuda_graphs=llm.model_runner.cuda_graphs_enabled,
                    copy_bandwidth_GBps=bandwidth / 1e9, steps=rows)
    if args.profile:
        print(profile_table(llm, args.batch, max(args.contexts), args.temperature))
    save(result, args.out)
    return result


def report(llm: LLM, model: str, **fields: Any) -> dict[str, Any]:
    """A step bench's result: when, where, which engine, then `fields`; printed as JSON."""
    result = {"date": datetime.now(UTC).isoformat(timespec="seconds"),
              "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "model": model,
              "attention_backend": llm.model_runner.attention_backend, **fields}
    print(json.dumps(result, indent=1))
    return result


def save(result: dict[str, Any], out: Path | None) -> None:
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
