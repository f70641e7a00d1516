"""How good is a quick calibration? Replayed on a full profile's committed samples.

A quick calibration (`calibrate --quick`) times a subset of the full grid's shapes
(`engine.tools.quick_grid`) and one pass over the engine workloads. Both are in a full
profile already: its synthetic rows whose shape the quick rule keeps, and a seeded third of
its engine rows (one of the full calibration's three passes). The quick fit is made from
those alone and judged on every other sample of the full profile (held out: never fitted),
and its measuring time is estimated from the samples' own step times plus the full
calibration's per-shape overhead.

    python -m engine.tools.quick_eval sim/profiles/h200_141gb__qwen3_0_6b__bfloat16__torch.json
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from engine.core.config import EngineConfig
from engine.tools.calibrate import CalibrationGrid
from engine.tools.quick_grid import (
    QUICK_ENGINE_PASSES,
    QUICK_PASSES,
    QUICK_REPEATS,
    QuickRule,
    quick_shapes,
)
from sim.profile import Profile, fit_model, format_holdout, holdout_errors

IMPORT_S = 10.0  # python, torch and the engine's imports before a calibration's clock starts


@dataclass
class QuickEval:
    shapes: int
    rows: int
    holdout: dict[str, Any]  # the quick fit on every full sample it did not see
    full_holdout: dict[str, Any]  # the full fit's own (20 % held out)
    seconds: float  # estimated wall time of the quick calibration


def grid_of(profile: Profile) -> Any:
    """The full calibration's grid, from its meta."""
    known = {f.name for f in fields(CalibrationGrid)}
    data = {k: tuple(tuple(x) if isinstance(x, list) else x for x in v)
            if isinstance(v, list) else v for k, v in profile.meta["grid"].items() if k in known}
    return CalibrationGrid(**data)


def shape_key(shape: Any) -> tuple[int, ...]:
    """The features `features_of` records for a synthetic shape."""
    q = [n for _, n in shape.prefills]
    attn = sum(n * c + n * (n + 1) // 2 for c, n in shape.prefills)
    return (sum(q), attn, len(shape.decodes), sum(shape.decodes),
            len(shape.prefills) + len(shape.decodes), max(shape.decodes, default=0))


def quick_rows(profile: Profile, engine_fraction: float, seed: int = 0
               ) -> tuple[np.ndarray, int]:
    """The samples a quick calibration would have (mask), and its shape count."""
    grid = grid_of(profile)
    config = EngineConfig.from_kwargs(**profile.meta["engine_config"])
    rule = QuickRule.of(grid.decode_contexts, grid.prefill_chunks, grid.prefill_contexts,
                        profile.cudagraph_token_limit, config.max_num_batched_tokens)
    kept = {shape_key(s) for s in quick_shapes(grid.shapes(), rule)}
    f, synthetic = profile.features(), profile.source == "synthetic"
    keys = zip(f.prefill_tokens, f.prefill_attn, f.decode_seqs, f.decode_ctx, f.num_seqs,
               f.decode_max_ctx, strict=True)
    in_grid = np.array([tuple(int(x) for x in k) in kept for k in keys])
    engine = np.random.default_rng(seed).random(len(f)) < engine_fraction
    return (synthetic & in_grid) | (~synthetic & engine), len(kept)


def evaluate(profile: Profile, engine_fraction: float = 1 / 3, seed: int = 0,
             weights: str = "rows") -> QuickEval:
    mask, shapes = quick_rows(profile, engine_fraction, seed)
    data = profile.fit_data()
    rules = (*profile.rules[:3], weights)
    model = fit_model(data.subset(mask), profile.buckets, profile.name, 4, *rules)
    full = replace(profile, meta={**profile.meta, "fit_weights": weights}, fit={})
    full.fit_step_time()
    return QuickEval(shapes, int(mask.sum()), holdout_errors(model, data.subset(~mask)),
                     full.fit["holdout"], quick_seconds(profile, mask, engine_fraction))


def quick_seconds(profile: Profile, mask: np.ndarray, engine_fraction: float) -> float:
    """Synthetic shapes x passes x repeats at their measured times, plus the full
    calibration's per shape-pass overhead; the engine pass; start-up and imports."""
    meta, grid = profile.meta, profile.meta["grid"]
    synthetic = profile.source == "synthetic"
    full_kernel = profile.seconds[synthetic].sum() * grid["passes"] * grid["repeats"]
    overhead = (meta["synthetic_s"] - full_kernel) / (synthetic.sum() * grid["passes"])
    kept = mask & synthetic
    quick = profile.seconds[kept].sum() * QUICK_PASSES * QUICK_REPEATS + \
        overhead * kept.sum() * QUICK_PASSES
    engine = meta["engine_steps_s"] * engine_fraction * QUICK_ENGINE_PASSES
    startup = meta["calibration_wall_s"] - meta["engine_steps_s"] - meta["synthetic_s"]
    return float(quick + engine + startup + IMPORT_S)


def report(path: Path) -> str:
    profile = Profile.load(path)
    got = evaluate(profile)
    return "\n".join([
        f"{profile.name}: quick grid {got.shapes} shapes ({got.rows} samples with the "
        f"engine rows kept), estimated {got.seconds:.0f} s on its GPU",
        "quick fit, judged on the full profile's other samples:",
        format_holdout(got.holdout),
        "full fit (row weights), its own 20 % held out:",
        format_holdout(got.full_holdout)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.tools.quick_eval",
                                description=__doc__.splitlines()[0])
    p.add_argument("profiles", type=Path, nargs="+")
    args = p.parse_args(argv)
    for path in args.profiles:
        print(report(path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
