"""The fidelity campaign's report (`engine.tools.fidelity_campaign`), made on the CPU from
its folder: DIR/report.md.

For each profile (the committed one, this machine's quick one, the committed one rescaled
to it) the run-1 set's median errors and set scores (coverage of the 90 % bands, median
|error|, bias per metric); run 2 against run 1 (the floor no predictor goes under); the
signed error per step class of the replayed steps; and the serving overhead fit on one
run's steps, checked on the other run (DIR/profiles_serving_run1 predicts run 2;
DIR/profiles_serving, fit on run 2, goes with the run-1 set for the gates).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from reports.validation.accuracy import (
    BAND_REPLICATES,
    ValidationSet,
    coverage_frame,
    errors_frame,
    load_set,
    markdown,
    median_table,
    repeat_frame,
    set_scores,
)
from reports.validation.steps import (
    class_bias,
    format_bias,
    set_steps,
    speed_spread,
    write_overhead_profiles,
)
from sim.profile import PROFILE_DIR, Profile, format_holdout


def report(out: Path, sets: dict[int, Path], replicates: int = BAND_REPLICATES) -> str:
    profiles = {"committed": PROFILE_DIR, "quick": out / "profiles" / "quick",
                "rescaled": out / "profiles"}
    profiles = {k: v for k, v in profiles.items() if any(v.glob("*.json"))}
    parts = ["# Fidelity campaign", "", *_calibration(profiles)]
    first, second = (load_set(sets[r]) if r in sets else None for r in (1, 2))
    if first is not None:
        parts += _accuracy(first, profiles, replicates)
        parts += _steps(first, profiles)
    if first is not None and second is not None:
        parts += ["## Run 2 against run 1 (measured against measured)", "",
                  markdown(median_table(repeat_frame(first, second))), ""]
        parts += _overhead(out, first, second, profiles.get("rescaled", PROFILE_DIR),
                           replicates)
    return "\n".join(parts) + "\n"


def _calibration(profiles: dict[str, Path]) -> list[str]:
    out = []
    for name in ("quick", "rescaled"):
        for path in sorted(profiles.get(name, Path("/nonexistent")).glob("*.json")):
            p = Profile.load(path)
            out += [f"## {name} profile `{path.name}`", "",
                    f"calibration {p.meta.get('calibration_wall_s', '–')} s, "
                    f"{p.meta.get('points_measured', '–')} shapes, "
                    f"{p.meta.get('engine_steps', '–')} engine steps", "",
                    "```", format_holdout(p.fit.get("holdout") or {"n": 0}), "```", ""]
            rescale = p.meta.get("rescaled")
            if rescale:
                out += [f"scales {rescale['scales']}; the committed fit on the quick samples "
                        f"before: median |error| {rescale['before']['median_abs_pct_err']:.1f}"
                        f" %, bias {rescale['before']['median_signed_pct_err']:+.1f} %", ""]
    return out


def _accuracy(vset: ValidationSet, profiles: dict[str, Path], replicates: int) -> list[str]:
    out = [f"## Run 1 (`{vset.name}`, {len(vset.points)} points)", ""]
    for name, where in profiles.items():
        frame = errors_frame(vset, where)
        scores = set_scores(frame, coverage_frame(vset, replicates, 0, where))
        out += [f"### predicted with the {name} profile", "", markdown(median_table(frame)),
                "", _scores(scores), ""]
    return out


def _scores(scores: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:+.2f} %" if k != "coverage" else f"{k} {v:.1f} %"
                     for k, v in scores.items())


def _steps(vset: ValidationSet, profiles: dict[str, Path]) -> list[str]:
    out = ["## Signed error per step class (replayed steps; + = over-predicted)", ""]
    for name, where in profiles.items():
        points = set_steps(str(vset.path), str(where))
        spread = speed_spread(points)
        out += [f"### {name} profile", "", "```", format_bias(class_bias(points)), "```",
                "point speed (measured / predicted busy time): "
                + ", ".join(f"{k} {v:.3f}" for k, v in spread.items() if k != "points"), ""]
    return out


def _overhead(out: Path, first: ValidationSet, second: ValidationSet, profiles: Path,
              replicates: int) -> list[str]:
    """Fit the serving overhead on one run, check it on the other."""
    lines = ["## Serving overhead: fit on one run, checked on the other", ""]
    fit_1 = out / "profiles_serving_run1"
    write_overhead_profiles(first, set_steps(str(first.path), str(profiles)), fit_1, profiles)
    write_overhead_profiles(second, set_steps(str(second.path), str(profiles)),
                            out / "profiles_serving", profiles)
    rows = []
    for label, where in (("without", profiles), ("fit on run 1", fit_1)):
        frame = errors_frame(second, where)
        scores = set_scores(frame, coverage_frame(second, replicates, 0, where))
        rows.append({"run 2 predicted": label, **{k: round(v, 2) for k, v in scores.items()}})
    seconds = {p.name: Profile.load(p).serving_overhead for p in fit_1.glob("*.json")}
    lines += [f"overhead fit on run 1: {seconds}", "",
              pd.DataFrame(rows).to_markdown(index=False) if _has_tabulate()
              else pd.DataFrame(rows).to_string(index=False), ""]
    return lines


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True
