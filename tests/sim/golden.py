"""Golden hashes of the twin's records for a fixed set of runs (speed-ups must keep them).

    python -m tests.sim.golden            # check every case (the long ones too)
    python -m tests.sim.golden --write    # record them (only before a change of behaviour)

A case is a workload preset, a model / hardware / predictor and engine overrides, simulated
through `setup_twin` + `simulate` (the path run.py takes). The hash covers every column of
the request and step records, values and dtypes, in order.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xxhash

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden_records.json"


@dataclass(frozen=True)
class Case:
    name: str
    workload: str
    params: dict[str, Any]
    engine: dict[str, Any] = field(default_factory=dict)
    model: str = "qwen3_0_6b"
    hardware: str = "h100_80gb"
    predictor: str = "auto"
    ci: bool = True  # small enough for the test suite


CASES = (
    Case("azure_1h_h100", "azure_conv", {"duration_s": 3600.0}, ci=False),
    Case("azure_1h_h200", "azure_conv", {"duration_s": 3600.0}, hardware="h200_141gb",
         ci=False),
    Case("azure_1h_roofline", "azure_conv", {"duration_s": 3600.0}, predictor="roofline",
         ci=False),
    Case("azure_1h_x10", "azure_conv", {"duration_s": 3600.0, "rate_scale": 10.0}, ci=False),
    Case("chat_20k_saturated", "poisson_chat", {"n": 20000, "rate": 21.5}, ci=False),
    Case("azure_10m_h100", "azure_conv", {"duration_s": 600.0}),
    Case("azure_5m_x10_preempt", "azure_conv", {"duration_s": 300.0, "rate_scale": 10.0},
         {"num_gpu_blocks_override": 3000}),
    Case("azure_5m_prefill_first", "azure_conv", {"duration_s": 300.0, "rate_scale": 4.0},
         {"policy": "prefill_first", "max_num_seqs": 64}),
    Case("azure_5m_no_prefix_bs32", "azure_conv", {"duration_s": 300.0, "rate_scale": 4.0},
         {"enable_prefix_caching": False, "block_size": 32, "max_num_batched_tokens": 2048},
         hardware="h200_141gb"),
    Case("shared_prefix", "shared_prefix", {"n": 1500, "rate": 12.0}),
    Case("shared_prefix_roofline", "shared_prefix", {"n": 800, "rate": 30.0},
         {"num_gpu_blocks_override": 1500}, predictor="roofline"),
    Case("multi_turn", "multi_turn", {"n": 300, "rate": 1.0}),
    Case("chat_2k_saturated_h200", "poisson_chat", {"n": 2000, "rate": 21.5},
         hardware="h200_141gb"),
    Case("cpu_tiny", "poisson_chat", {"n": 300, "rate": 20.0}, {"max_model_len": 2048},
         model="tiny_qwen3", hardware="cpu"),
)


def frame_hash(df: pd.DataFrame) -> str:
    """xxh3 over every column's name, dtype and values (text columns by their repr)."""
    h = xxhash.xxh3_64()
    for name in df.columns:
        col = df[name]
        h.update(f"{name}:{col.dtype}|".encode())
        if pd.api.types.is_numeric_dtype(col.dtype) or pd.api.types.is_bool_dtype(col.dtype):
            h.update(np.ascontiguousarray(col.to_numpy()).tobytes())
        else:  # strings and objects by value, never by address
            h.update(repr(col.tolist()).encode())
    return h.hexdigest()


def run_case(case: Case) -> dict[str, Any]:
    from engine.core.config import EngineConfig
    from sim.twin import setup_twin, simulate
    from workloads import make_preset
    from workloads.trace_requests import model_requests

    config = EngineConfig.from_kwargs(**case.engine)
    setup = setup_twin(case.model, case.hardware, config, case.predictor)
    trace = make_preset(case.workload, **case.params)
    run = simulate(setup, model_requests(trace, setup.model.vocab_size))
    return {"requests": frame_hash(run.requests), "steps": frame_hash(run.steps),
            "num_requests": len(run.requests), "num_steps": len(run.steps)}


def load() -> dict[str, dict[str, Any]]:
    return json.loads(GOLDEN.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="record the hashes")
    parser.add_argument("--only", nargs="*", help="case names")
    args = parser.parse_args(argv)
    known = load() if GOLDEN.is_file() else {}
    failed = 0
    for case in CASES:
        if args.only and case.name not in args.only:
            continue
        got = run_case(case)
        if args.write:
            known[case.name] = got
        ok = known.get(case.name) == got
        failed += not ok
        print(f"{'ok  ' if ok else 'DIFF'} {case.name}: {got}", flush=True)
    if args.write:
        GOLDEN.write_text(json.dumps(known, indent=1, sort_keys=True) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
