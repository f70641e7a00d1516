"""Compose a trace: arrivals x prompt lengths x output lengths x prefix / conversation structure.

Every component draws from its own stream, PCG64 seeded by SeedSequence(seed, spawn_key=(i,)),
so changing one spec leaves the other columns unchanged. A generated trace is byte-identical for
the same seed and numpy version; token ids (tokens.py) are identical on every numpy version.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from workloads.arrivals import ArrivalSpec
from workloads.conversations import conversation_rows
from workloads.errors import SpecError, check_number
from workloads.lengths import LengthSpec
from workloads.schema import Trace, base_meta
from workloads.specs import spec_from_dict, spec_to_dict
from workloads.structure import MultiTurn, SharedPrefix
from workloads.tokens import TokenSpec
from workloads.validate import make_trace

STREAMS = ("arrivals", "prompt_lens", "output_lens", "prefix", "turns", "think")


def stream_rngs(seed: int) -> dict[str, np.random.Generator]:
    """One independent generator per trace component."""
    return {name: np.random.Generator(np.random.PCG64(
        np.random.SeedSequence(seed, spawn_key=(i,)))) for i, name in enumerate(STREAMS)}


def build_trace(*, n: int, arrivals: ArrivalSpec, prompt_lens: LengthSpec,
                output_lens: LengthSpec, prefix: SharedPrefix | None = None,
                multi_turn: MultiTurn | None = None, seed: int = 0,
                tokens: TokenSpec | None = None, name: str = "custom",
                extra_meta: dict[str, Any] | None = None) -> Trace:
    """n requests (turns, with multi_turn) with ids 0..n-1 in arrival order.

    With `prefix`, prompt_len = prefix_len + a draw of `prompt_lens`; with `multi_turn`, see
    MultiTurn. The metadata records every spec, so `regenerate(trace.meta)` rebuilds the trace.
    """
    check_number("n", n, 1, integer=True)
    check_number("seed", seed, 0, (1 << 64) - 1, integer=True)
    tokens = tokens or TokenSpec()
    rngs = stream_rngs(seed)
    if multi_turn is None:
        df = _independent_rows(n, arrivals, prompt_lens, output_lens, prefix, rngs)
    else:
        df = conversation_rows(n, arrivals, prompt_lens, output_lens, prefix, multi_turn, rngs)
    df.insert(0, "request_id", np.arange(n, dtype=np.int64))
    generator = {"builder": "build_trace", "name": name, "n": n,
                 **{key: spec_to_dict(spec) if spec is not None else None for key, spec in
                    (("arrivals", arrivals), ("prompt_lens", prompt_lens),
                     ("output_lens", output_lens), ("prefix", prefix),
                     ("multi_turn", multi_turn))}}
    meta = base_meta(seed, generator=generator, tokens=tokens.to_meta(), **(extra_meta or {}))
    return make_trace(df, meta)


def _independent_rows(n: int, arrivals: ArrivalSpec, prompt_lens: LengthSpec,
                      output_lens: LengthSpec, prefix: SharedPrefix | None,
                      rngs: dict[str, np.random.Generator]) -> pd.DataFrame:
    df = pd.DataFrame({"arrival_s": np.sort(arrivals.sample(n, rngs["arrivals"])),
                       "prompt_len": prompt_lens.sample(n, rngs["prompt_lens"]),
                       "output_len": output_lens.sample(n, rngs["output_lens"])})
    if prefix is not None:
        df["prefix_group"] = prefix.sample_groups(n, rngs["prefix"])
        df["prefix_len"] = prefix.prefix_len
        df["prompt_len"] += prefix.prefix_len
    return df


def regenerate(meta: dict[str, Any]) -> Trace:
    """Rebuild a trace from its metadata (presets and build_trace traces)."""
    if "preset" in meta:
        from workloads.presets import make_preset  # presets build on this module

        return make_preset(meta["preset"]["name"], **meta["preset"]["params"])
    generator = meta.get("generator") or {}
    if generator.get("builder") != "build_trace":
        raise SpecError("meta.generator", generator.get("builder"),
                        "a build_trace record or a preset (imports cannot be regenerated)")
    specs = {key: spec_from_dict(generator[key]) if generator.get(key) else None
             for key in ("arrivals", "prompt_lens", "output_lens", "prefix", "multi_turn")}
    extra = {k: v for k, v in meta.items()
             if k not in ("format", "version", "seed", "generator", "tokens")}
    return build_trace(n=generator["n"], seed=meta["seed"], name=generator["name"],
                       tokens=TokenSpec.from_meta(meta), extra_meta=extra, **specs)
