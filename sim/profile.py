"""Calibration profiles: steps measured on the real engine, and the fit the sim uses.

A profile is one JSON file in `sim/profiles/`, keyed by hardware, model, dtype and attention
backend (`<hardware>__<model>__<dtype>__<backend>.json`):

    {"format": "kvtwin-profile/3",
     "key": {"hardware": ..., "model": ..., "dtype": ..., "backend": ...},
     "meta": {device name, torch version, date, command, attention_backend,
              cuda_graphs_enabled, ...},
     "buckets": [CUDA-graph batch sizes] or null when steps ran eagerly,
     "memory": {"total_bytes", "non_torch_bytes", "cuda_graph_bytes",
                "activation": [[max_num_batched_tokens, peak activation bytes], ...]},
     "samples": {"prefill_tokens": [...], "prefill_attn": [...], "decode_seqs": [...],
                 "decode_ctx": [...], "num_seqs": [...],
                 "decode_max_ctx": [...], "prefill_gather": [...],  # since version 3
                 "seconds": [...],       # what the sim predicts: the whole engine step for
                                         # "engine" rows, the forward pass for "synthetic" ones
                 "exec_seconds": [...],  # ModelRunner.execute_model alone
                 "source": ["synthetic" | "engine", ...]},
     "fit": {"decode": {"terms": [...], "coef": [...]}, "mixed": {...},
             "host_decode": {...} | null, "host_mixed": {...} | null, "holdout": {...},
             "loss": "relative_to_fit"}}  # since version 3

"synthetic" rows are steps built directly and timed through `execute_model`; "engine" rows are
real `LLMEngine.step` calls (schedule + records + execute_model + update_from_output), the
duration a replay measures. The fit: device time (execute_model) per step kind from both
sources, plus host overhead (step minus execute_model) from the engine rows.

Version 3 adds sample columns (`engine.core.features.EXTRA_FEATURES`: the longest decode's context,
the prefix keys gathered for prefill chunks, and in later version-3 files the prefix keys the
decodes re-read), the terms over them, and a fit that is unbiased in seconds
(`sim.step_time.fit_nonnegative`; `fit.loss` names it). `meta.decode_split`, where present,
is the paged-decode kernel's split rule (`engine.core.config.DecodeSplit`): the longest decode
then enters as its share of the splits. `meta.decode_batch_basis` ("knots", written by
calibrations since it was added; "hinges" where absent) says how the fixed cost of a decode
step follows its batch (`sim.step_time.decode_terms`). Version-3 files without the later
column or those metas refit and predict as they did. Version-2 files
(no such columns; fit relative to the measured time) and version-1 files (`kvtwin-profile/1`:
synthetic rows only, `fit.decode_coef` / `mixed_coef` over the fixed terms
`sim.step_time.DECODE_TERMS` / `MIXED_TERMS`, no host term) still load and predict exactly as
before; a refit of their samples uses the version-3 loss over the version-2 terms; saving
writes version 3.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.core.features import EXTRA_FEATURES, FEATURES, StepFeatures
from engine.core.shapes import DecodeSplit
from sim.step_terms import (
    BATCH_BASES,
    DECODE_TERMS,
    HOST_DECODE_TERMS,
    HOST_MIXED_TERMS,
    MIXED_TERMS,
    decode_terms,
    design_matrix,
    mixed_terms,
    padded_batch,
    term_column,
)
from sim.step_time import IRLS_ITERATIONS, CalibratedStepTime, LinearTerms, fit_nonnegative

FORMAT = "kvtwin-profile/3"
FORMAT_V2 = "kvtwin-profile/2"
FORMAT_V1 = "kvtwin-profile/1"
LOSS = "relative_to_fit"  # fit_nonnegative's reweighting (version 2: relative to measured)
PROFILE_DIR = Path(__file__).resolve().parent / "profiles"
SOURCES = ("synthetic", "engine")
KINDS = ("decode", "mixed")


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


@dataclass
class ProfileKey:
    hardware: str
    model: str
    dtype: str
    backend: str

    @property
    def filename(self) -> str:
        return "__".join(slug(v) for v in (self.hardware, self.model, self.dtype,
                                            self.backend)) + ".json"


@dataclass
class Profile:
    key: ProfileKey
    samples: dict[str, list[Any]]
    buckets: list[int] | None = None
    memory: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    fit: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.samples.get("seconds", []))
        self.samples.setdefault("exec_seconds", list(self.samples.get("seconds", [])))
        self.samples.setdefault("source", ["synthetic"] * n)

    @property
    def name(self) -> str:
        return self.key.filename.removesuffix(".json")

    def features(self) -> StepFeatures:
        names = [f for f in (*FEATURES, *EXTRA_FEATURES) if f in self.samples]
        return StepFeatures.from_columns({f: np.asarray(self.samples[f]) for f in names})

    @property
    def seconds(self) -> np.ndarray:
        return np.asarray(self.samples["seconds"], dtype=np.float64)

    @property
    def exec_seconds(self) -> np.ndarray:
        return np.asarray(self.samples["exec_seconds"], dtype=np.float64)

    @property
    def source(self) -> np.ndarray:
        return np.asarray(self.samples["source"], dtype=object)

    def activation_bytes(self, max_num_batched_tokens: int) -> int:
        """Peak activation, interpolated linearly in tokens between measured points."""
        points = sorted(self.memory.get("activation", []))
        if not points:
            raise ValueError(f"profile {self.name} has no activation measurements")
        tokens, peak = zip(*points, strict=True)
        if len(points) == 1:
            return int(peak[0] * max_num_batched_tokens / tokens[0])
        slope = (peak[-1] - peak[0]) / (tokens[-1] - tokens[0])
        if max_num_batched_tokens > tokens[-1]:
            return int(peak[-1] + slope * (max_num_batched_tokens - tokens[-1]))
        return int(np.interp(max_num_batched_tokens, tokens, peak))

    # -- fitting ------------------------------------------------------------------------------

    def fit_step_time(self, holdout: float = 0.2, seed: int = 0,
                      iterations: int = IRLS_ITERATIONS) -> CalibratedStepTime:
        """Fit on all samples; report the error of a fit on the rest on a held-out share.
        `iterations`: fit_nonnegative's reweightings (0: version 2's loss)."""
        data = FitData(self.features(), self.seconds, self.exec_seconds, self.source)
        test = np.random.default_rng(seed).random(len(data)) < holdout
        rules = (self.decode_split, self.decode_batch_basis, self.cudagraph_token_limit)
        held = fit_model(data.subset(~test), self.buckets, self.name, iterations, *rules)
        model = fit_model(data, self.buckets, self.name, iterations, *rules)
        self.fit = {**model_to_fit(model), "holdout": holdout_errors(held, data.subset(test)),
                    "loss": LOSS if iterations else "relative_to_measured"}
        return model

    @property
    def decode_split(self) -> DecodeSplit | None:
        """The decode kernel's split rule the calibration ran with (meta "decode_split"),
        if it splits sequences at all."""
        rule = self.meta.get("decode_split")
        return DecodeSplit(**rule) if rule else None

    @property
    def decode_batch_basis(self) -> str:
        """How a decode step's fixed cost follows its batch (meta "decode_batch_basis"):
        "knots" (free values at BATCH_KNOTS) in profiles calibrated since it was added,
        else "hinges" (convex), so older files refit as they did."""
        basis = self.meta.get("decode_batch_basis", "hinges")
        if basis not in BATCH_BASES:
            raise ValueError(f"profile {self.name}: meta.decode_batch_basis={basis!r} is "
                             f"invalid: must be one of {BATCH_BASES}")
        return basis

    @property
    def cudagraph_token_limit(self) -> int:
        """The largest mixed step the engine served with CUDA graphs when it was
        calibrated (meta "cudagraph_token_limit"; 0 where absent: older engines had none)."""
        limit = self.meta.get("cudagraph_token_limit", 0)
        if not isinstance(limit, int) or limit < 0:
            raise ValueError(f"profile {self.name}: meta.cudagraph_token_limit={limit!r} is "
                             "invalid: must be an integer >= 0")
        return limit

    def step_time(self) -> CalibratedStepTime:
        if not self.fit:
            return self.fit_step_time()
        return model_from_fit(self.fit, self.buckets, f"profile {self.name}")

    # -- files --------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "key": vars(self.key), "meta": self.meta,
                "buckets": self.buckets, "memory": self.memory, "samples": self.samples,
                "fit": self.fit}

    def save(self, directory: Path = PROFILE_DIR) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / self.key.filename
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        data = json.loads(Path(path).read_text())
        if data.get("format") == FORMAT_V1:
            data = upgrade_v1(data)
        if data.get("format") not in (FORMAT, FORMAT_V2):
            raise ValueError(f"{path}: format={data.get('format')!r} is invalid: must be "
                             f"{FORMAT!r}, {FORMAT_V2!r} or {FORMAT_V1!r}")
        return cls(ProfileKey(**data["key"]), data["samples"], data.get("buckets"),
                   data.get("memory", {}), data.get("meta", {}), data.get("fit", {}))


def find_profile(key: ProfileKey, directory: Path = PROFILE_DIR) -> Profile | None:
    path = directory / key.filename
    return Profile.load(path) if path.is_file() else None


def upgrade_v1(data: dict[str, Any]) -> dict[str, Any]:
    """A version-1 profile as version 2 (which version 3 reads as it is): the same samples
    (synthetic) and the same fit."""
    fit = dict(data.get("fit") or {})
    if "decode_coef" in fit:
        fit["decode"] = {"terms": list(DECODE_TERMS), "coef": fit.pop("decode_coef")}
        fit["mixed"] = {"terms": list(MIXED_TERMS), "coef": fit.pop("mixed_coef")}
        fit.update(host_decode=None, host_mixed=None)
    meta = {**(data.get("meta") or {}), "upgraded_from": FORMAT_V1}
    return {**data, "format": FORMAT_V2, "fit": fit, "meta": meta}


# -- the fit ------------------------------------------------------------------------------------

@dataclass
class FitData:
    features: StepFeatures
    seconds: np.ndarray       # the target: whole engine step, or forward pass (synthetic)
    exec_seconds: np.ndarray  # execute_model alone
    source: np.ndarray        # "synthetic" | "engine"

    def __len__(self) -> int:
        return len(self.seconds)

    def subset(self, mask: np.ndarray) -> FitData:
        return FitData(self.features.subset(mask), self.seconds[mask], self.exec_seconds[mask],
                       self.source[mask])

    def kind(self, kind: str) -> FitData:
        decode = self.features.is_decode_only
        return self.subset(decode if kind == "decode" else ~decode)


def fit_model(data: FitData, buckets: list[int] | None, name: str,
              iterations: int = IRLS_ITERATIONS,
              split: DecodeSplit | None = None, basis: str = "hinges",
              token_limit: int = 0) -> CalibratedStepTime:
    """Device time per kind from every row's execute_model time; host overhead per kind
    from the engine rows (their step time minus execute_model). The terms over the
    EXTRA_FEATURES are used where the samples have them (version 3)."""
    decode, mixed = data.kind("decode"), data.kind("mixed")
    d_terms, m_terms = kind_terms(decode, mixed, buckets, split, basis, token_limit)
    return CalibratedStepTime(
        fit_device(decode, d_terms, buckets, name, iterations),
        fit_device(mixed, m_terms, None, name, iterations),
        buckets, source=f"profile {name}", decode_terms=d_terms, mixed_terms=m_terms,
        host_decode=fit_host(decode, HOST_DECODE_TERMS, iterations),
        host_mixed=fit_host(mixed, HOST_MIXED_TERMS, iterations))


FIRST_EXTRA = EXTRA_FEATURES[:2]  # version 3's first two: their terms come as one set


def kind_terms(decode: FitData, mixed: FitData, buckets: list[int] | None,
               split: DecodeSplit | None = None, basis: str = "hinges",
               token_limit: int = 0) -> tuple[tuple[str, ...], tuple[str, ...]]:
    d_terms = decode_terms(buckets, int(decode.features.decode_seqs.max(initial=1)),
                           int(decode.features.decode_ctx.max(initial=0)),
                           longest=informative(decode.features), split=split,
                           shared=informative(decode.features, ("decode_shared",)),
                           basis=basis, measured=measured_batches(decode, buckets))
    if len(decode) < KNOT_ROWS * len(d_terms) and basis == "knots":  # too few to place knots
        return kind_terms(decode, mixed, buckets, split, "hinges", token_limit)
    extra = informative(mixed.features)
    gather = term_column(mixed.features, "gather_mean", None) if extra else np.zeros(1)
    m_terms = mixed_terms(int(mixed.features.num_tokens.max(initial=1)),
                          int(mixed.features.decode_ctx.max(initial=0)), extra=extra,
                          max_gather_mean=float(gather.max(initial=0.0)), split=split,
                          token_limit=token_limit)
    return d_terms, m_terms


KNOT_ROWS = 3  # decode samples per term the knot basis needs, else the hinges


def measured_batches(decode: FitData, buckets: list[int] | None) -> set[int]:
    """The (padded) batches the decode samples ran."""
    return {int(b) for b in np.unique(padded_batch(decode.features.decode_seqs, buckets))}


def informative(f: StepFeatures, names: tuple[str, ...] = FIRST_EXTRA) -> bool:
    """The samples measured these EXTRA_FEATURES, and they say more than the estimates from
    the core features would (else their terms could not be told apart from those)."""
    if any(getattr(f, name) is None for name in names):
        return False
    core = StepFeatures(*(getattr(f, name) for name in FEATURES))
    return any((getattr(f, name) != term_column(core, name, None)).any() for name in names)


def fit_device(data: FitData, terms: tuple[str, ...], buckets: list[int] | None,
               name: str, iterations: int = IRLS_ITERATIONS) -> np.ndarray:
    if len(data) < len(terms):
        raise ValueError(f"profile {name}: {len(data)} samples for {len(terms)} terms; "
                         "measure more steps")
    x = design_matrix(data.features, terms, buckets)
    return fit_nonnegative(x, data.exec_seconds, source_weights(data.source), iterations)


def source_weights(source: np.ndarray) -> np.ndarray:
    """Each source present carries the same total weight, however many rows it has."""
    weights = np.ones(len(source))
    for name in SOURCES:
        rows = source == name
        if rows.any():
            weights[rows] = len(source) / (rows.sum() * len(set(source)))
    return weights


def fit_host(data: FitData, terms: tuple[str, ...],
             iterations: int = IRLS_ITERATIONS) -> LinearTerms | None:
    """Host overhead of engine steps; None without enough engine rows (version-1 style)."""
    engine = data.subset(data.source == "engine")
    if len(engine) < 4 * len(terms):
        return None
    x = design_matrix(engine.features, terms, None)
    host = np.maximum(engine.seconds - engine.exec_seconds, 1e-7)
    return LinearTerms(terms, fit_nonnegative(x, host, iterations=iterations))


def model_to_fit(model: CalibratedStepTime) -> dict[str, Any]:
    def host(h: LinearTerms | None) -> dict[str, Any] | None:
        return None if h is None else h.to_dict()
    return {"decode": LinearTerms(model.decode_terms, model.decode_coef).to_dict(),
            "mixed": LinearTerms(model.mixed_terms, model.mixed_coef).to_dict(),
            "host_decode": host(model.host_decode), "host_mixed": host(model.host_mixed)}


def model_from_fit(fit: dict[str, Any], buckets: list[int] | None,
                   source: str) -> CalibratedStepTime:
    for part in ("decode", "mixed"):
        if not isinstance(fit.get(part), dict):
            raise ValueError(f"{source}: fit.{part} is missing: refit the profile")
    decode = LinearTerms.from_dict(fit["decode"], f"{source}: fit.decode")
    mixed = LinearTerms.from_dict(fit["mixed"], f"{source}: fit.mixed")
    hosts = [LinearTerms.from_dict(fit[k], f"{source}: fit.{k}") if fit.get(k) else None
             for k in ("host_decode", "host_mixed")]
    return CalibratedStepTime(decode.coef, mixed.coef, buckets, source,
                              decode_terms=decode.terms, mixed_terms=mixed.terms,
                              host_decode=hosts[0], host_mixed=hosts[1])


# -- held-out error -----------------------------------------------------------------------------

def holdout_errors(model: CalibratedStepTime, test: FitData) -> dict[str, Any]:
    """Relative error on held-out rows: all, by source and by kind. Engine rows are judged
    on the whole step (what a replay measures), synthetic rows on the forward pass."""
    predicted = model.predict(test.features)
    device = _device_only(model).predict(test.features)
    engine = test.source == "engine"
    pred = np.where(engine, predicted, device)
    out = _errors(pred, test.seconds)
    out["by_source"] = {s: _errors(pred[test.source == s], test.seconds[test.source == s])
                        for s in SOURCES}
    decode = test.features.is_decode_only
    out["by_kind"] = {"decode": _errors(pred[decode], test.seconds[decode]),
                      "mixed": _errors(pred[~decode], test.seconds[~decode])}
    return out


def _device_only(model: CalibratedStepTime) -> CalibratedStepTime:
    return CalibratedStepTime(model.decode_coef, model.mixed_coef, model.buckets, model.source,
                              decode_terms=model.decode_terms, mixed_terms=model.mixed_terms)


def _errors(predicted: np.ndarray, measured: np.ndarray) -> dict[str, float]:
    """|error| percentiles; bias as the mean and median signed error, and as the error of
    the summed time (what queueing integrates: version 3 on)."""
    if len(measured) == 0:
        return {"n": 0}
    pct = 100 * (predicted - measured) / measured
    return {"n": int(len(measured)), "median_abs_pct_err": float(np.median(np.abs(pct))),
            "p90_abs_pct_err": float(np.percentile(np.abs(pct), 90)),
            "max_abs_pct_err": float(np.abs(pct).max()),
            "mean_signed_pct_err": float(pct.mean()),
            "median_signed_pct_err": float(np.median(pct)),
            "total_time_pct_err": float(100 * (predicted.sum() / measured.sum() - 1))}


def format_holdout(holdout: dict[str, Any]) -> str:
    """One line per group: n, median / p90 / max |error| and the mean signed error."""
    def line(label: str, e: dict[str, Any]) -> str:
        if not e.get("n"):
            return f"  {label:<10} n=0"
        return (f"  {label:<10} n={e['n']:<5} median {e['median_abs_pct_err']:.1f} %  "
                f"p90 {e['p90_abs_pct_err']:.1f} %  max {e['max_abs_pct_err']:.1f} %  "
                f"bias {e.get('mean_signed_pct_err', float('nan')):+.1f} %  "
                f"total time {e.get('total_time_pct_err', float('nan')):+.1f} %")
    rows = [line("all", holdout)]
    rows += [line(k, v) for k, v in (holdout.get("by_source") or {}).items()]
    rows += [line(k, v) for k, v in (holdout.get("by_kind") or {}).items()]
    return "held-out step-time error (|predicted - measured| / measured):\n" + "\n".join(rows)
