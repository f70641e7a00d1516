"""Named workloads (the Hydra `workload` group exposes these): PRESETS and make_preset.

Every preset records {"name", "params"} under meta["preset"], so `regenerate(meta)` rebuilds it.
"""

from __future__ import annotations

import inspect
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from workloads.arrivals import Poisson, Ramp
from workloads.build import build_trace
from workloads.errors import SpecError, check_number
from workloads.importers import import_azure
from workloads.lengths import LogNormal, Uniform
from workloads.schema import MAX_LEN, Trace, base_meta
from workloads.structure import MultiTurn, SharedPrefix
from workloads.validate import make_trace

REPO = Path(__file__).resolve().parents[1]
# The shared traces sit beside the checkout (../shared/traces); $KVTWIN_TRACE_DIR overrides.
TRACE_DIR = Path(os.environ.get("KVTWIN_TRACE_DIR")
                 or Path(__file__).resolve().parents[2] / "shared" / "traces")
# Lengths shaped like the Azure 2023 conversation trace (median / p99 / max from its README).
CHAT_PROMPT = LogNormal(median=1020, p99=4142, max_len=14050)
CHAT_OUTPUT = LogNormal(median=129, p99=601, max_len=1000)
MAX_BENCH_TOKENS = 1 << 24  # nanovllm_bench: n x max_input_len


def nanovllm_bench(n: int = 256, max_input_len: int = 1024, max_output_len: int = 1024,
                   seed: int = 0) -> Trace:
    """nano-vllm's bench.py, draw for draw: random.Random(seed); per request a prompt length
    randint(100, max_input_len) then its ids randint(0, 10000); then every output length
    randint(100, max_output_len). Offline (all at t=0); the ids are carried explicitly."""
    check_number("n", n, 1, integer=True)
    check_number("max_input_len", max_input_len, 100, MAX_LEN, integer=True)
    check_number("max_output_len", max_output_len, 100, MAX_LEN, integer=True)
    if n * max_input_len > MAX_BENCH_TOKENS:  # each id is a Python int: bound them first
        raise SpecError("max_input_len", max_input_len,
                        f"at most {MAX_BENCH_TOKENS:,} // n = {MAX_BENCH_TOKENS // n:,} (n={n})")
    rng = random.Random(seed)
    prompts = [[rng.randint(0, 10000) for _ in range(rng.randint(100, max_input_len))]
               for _ in range(n)]
    outputs = [rng.randint(100, max_output_len) for _ in range(n)]
    df = pd.DataFrame({"request_id": np.arange(n), "arrival_s": np.zeros(n),
                       "prompt_len": [len(p) for p in prompts], "output_len": outputs,
                       "prompt_token_ids": [np.asarray(p, dtype=np.int32) for p in prompts]})
    params = {"n": n, "max_input_len": max_input_len, "max_output_len": max_output_len,
              "seed": seed}
    meta = base_meta(seed, generator={"builder": "nanovllm_bench", **params},
                     tokens={"scheme": "explicit (python random, nano-vllm bench.py)",
                             "vocab_size": 10001, "low": 0})
    return make_trace(df, meta)


def poisson_chat(n: int = 1000, rate: float = 4.0, seed: int = 0) -> Trace:
    """Poisson arrivals; chat-like lognormal lengths (Azure conv medians and p99s)."""
    return build_trace(n=n, arrivals=Poisson(rate), prompt_lens=CHAT_PROMPT,
                       output_lens=CHAT_OUTPUT, seed=seed, name="poisson_chat")


def shared_prefix(n: int = 1000, rate: float = 8.0, num_groups: int = 16,
                  prefix_len: int = 1024, zipf_s: float = 1.1, seed: int = 0) -> Trace:
    """System prompts of prefix_len tokens in Zipf-popular groups, then U[32, 512] question
    tokens; U[32, 256] output; Poisson arrivals."""
    return build_trace(n=n, arrivals=Poisson(rate), prompt_lens=Uniform(32, 512),
                       output_lens=Uniform(32, 256),
                       prefix=SharedPrefix(num_groups, prefix_len, zipf_s), seed=seed,
                       name="shared_prefix")


def multi_turn(n: int = 1000, rate: float = 0.5, min_turns: int = 2, max_turns: int = 8,
               think_time_s: float = 15.0, max_model_len: int = 8192, seed: int = 0) -> Trace:
    """Conversations starting at `rate` per second (Poisson), U[min_turns, max_turns] turns,
    exponential think time; a 256-token system prompt from 4 groups (Zipf 1); user turns
    lognormal median 64 / p99 512, answers median 200 / p99 800 tokens."""
    chat = MultiTurn(Uniform(min_turns, max_turns), think_time_s, "exponential", max_model_len)
    return build_trace(n=n, arrivals=Poisson(rate), prompt_lens=LogNormal(64, 512),
                       output_lens=LogNormal(200, 800), prefix=SharedPrefix(4, 256, 1.0),
                       multi_turn=chat, seed=seed, name="multi_turn")


def azure_conv(path: str | None = None, start_s: float = 0.0, duration_s: float = 600.0,
               rate_scale: float = 1.0, max_model_len: int | None = None,
               too_long: str = "cap", seed: int = 0) -> Trace:
    """A window of the Azure 2023 conversation trace (default: its first 10 minutes), time
    compressed by rate_scale. path defaults to $KVTWIN_TRACE_DIR/azure_llm_2023_conv.csv; a
    relative path not found from here is read from the repository (a committed window)."""
    source = path or str(TRACE_DIR / "azure_llm_2023_conv.csv")
    if not Path(source).is_absolute() and not Path(source).exists() and \
            (REPO / source).exists():
        source = str(REPO / source)
    trace, _ = import_azure(source, start_s=start_s, duration_s=duration_s,
                            rate_scale=rate_scale, max_model_len=max_model_len,
                            too_long=too_long, seed=seed)
    return trace


def ramp(start_rate: float = 2.0, stop_rate: float = 16.0, step: float = 2.0,
         stage_s: float = 30.0, seed: int = 0) -> Trace:
    """Poisson rate stepping start_rate, +step, ... stop_rate, stage_s each (to find the
    saturation point); n is the expected count over the ramp; chat-like lengths."""
    arrivals = Ramp.linear(start_rate, stop_rate, step, stage_s)
    return build_trace(n=max(1, round(arrivals.expected_count())), arrivals=arrivals,
                       prompt_lens=CHAT_PROMPT, output_lens=CHAT_OUTPUT, seed=seed,
                       name="ramp")


PRESETS: dict[str, Callable[..., Trace]] = {
    "nanovllm_bench": nanovllm_bench, "poisson_chat": poisson_chat,
    "shared_prefix": shared_prefix, "multi_turn": multi_turn, "azure_conv": azure_conv,
    "ramp": ramp,
}


def preset_params(name: str, **overrides: Any) -> dict[str, Any]:
    """The preset's full parameters: its defaults updated by `overrides` (checked by name)."""
    if name not in PRESETS:
        raise SpecError("preset", name, f"one of {', '.join(PRESETS)}")
    signature = inspect.signature(PRESETS[name])
    for key, value in overrides.items():
        if key not in signature.parameters:
            raise SpecError(f"{name}.{key}", value,
                            f"a parameter of {name}: one of {', '.join(signature.parameters)}")
    bound = signature.bind(**overrides)
    bound.apply_defaults()
    return dict(bound.arguments)


def make_preset(name: str, **overrides: Any) -> Trace:
    """Build preset `name` with some parameters overridden, e.g. make_preset("ramp", seed=1)."""
    params = preset_params(name, **overrides)
    trace = PRESETS[name](**params)
    meta = {**trace.meta, "preset": {"name": name, "params": params}}
    return Trace(trace.df, meta)
