"""Calibration profiles: steps measured on the real engine, and the fit the sim uses.

A profile is one JSON file in `sim/profiles/`, keyed by hardware, model, dtype and attention
backend (`<hardware>__<model>__<dtype>__<backend>.json`):

    {"format": "kvtwin-profile/3",
     "key": {"hardware": ..., "model": ..., "dtype": ..., "backend": ...,
             "quantization": "none" | "int8", "kv_cache_dtype": "auto" | "fp8"},
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
step follows its batch (`sim.step_time.decode_terms`); `meta.fit_weights` ("rows" since it was
added, "sources" where absent) how the fit weighs its rows (`FIT_WEIGHTS`). A fit since then
also keeps its held-out residuals (`fit.residuals`, quantiles of measured / predicted per
step kind: `sim.noise`), which older files make from their samples when asked. Version-3
files without the later column or those metas refit and predict as they did. Version-2 files
(no such columns; fit relative to the measured time) and version-1 files (`kvtwin-profile/1`:
synthetic rows only, `fit.decode_coef` / `mixed_coef` over the fixed terms
`sim.step_time.DECODE_TERMS` / `MIXED_TERMS`, no host term) still load and predict exactly as
before; a refit of their samples uses the version-3 loss over the version-2 terms; saving
writes version 3.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from engine.core.features import EXTRA_FEATURES, FEATURES, StepFeatures
from engine.core.shapes import DecodeSplit
from sim.noise import KINDS, MIN_ENGINE_ROWS, MachineSpread, Residuals
from sim.step_classes import class_errors, classify
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
# "sources": each source's rows carry half the weight (the engine's thousands of steps and
# the grid's hundreds of points alike); "rows": every row alike. On the committed H200 /
# H100 / H100-eager samples, "rows" cut the held-out median error 2.85 / 5.90 / 3.20 ->
# 2.38 / 4.78 / 2.28 % and the over-prediction of small long-context decode batches
# +4.1 / +6.7 / +6.4 -> +2.2 / +2.6 / +2.1 % (the grid's few such points pulled the fit
# away from the engine's many); the grid's own held-out points moved 7.9 / 9.3 / 5.8 ->
# 7.9 / 10.7 / 7.0 %: the twin predicts engine steps.
FIT_WEIGHTS = ("sources", "rows")


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


@dataclass
class ProfileKey:
    """What a profile was measured on; int8 weights and an fp8 cache are other engines (their
    steps read other bytes), so they get profiles of their own."""

    hardware: str
    model: str
    dtype: str
    backend: str
    quantization: str = "none"
    kv_cache_dtype: str = "auto"

    @property
    def filename(self) -> str:
        parts = [self.hardware, self.model, self.dtype, self.backend]
        parts += [self.quantization] if self.quantization != "none" else []
        parts += [f"{self.kv_cache_dtype}_kv"] if self.kv_cache_dtype != "auto" else []
        return "__".join(slug(v) for v in parts) + ".json"


@dataclass
class Profile:
    key: ProfileKey
    samples: dict[str, list[Any]]
    buckets: list[int] | None = None
    memory: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    fit: dict[str, Any] = field(default_factory=dict)

    _residuals: Residuals | None = field(default=None, init=False, repr=False,
                                         compare=False)

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
        held, test = self._held_out_fit(holdout, seed, iterations)
        model = fit_model(self.fit_data(), self.buckets, self.name, iterations, *self.rules)
        scales = (self.meta.get("rescaled") or {}).get("scales")
        if scales:  # the samples are another machine's: keep the rescale
            model = scaled_kinds(model, scales["decode"], scales["mixed"])
        self.fit = {**model_to_fit(model), "holdout": holdout_errors(held, test),
                    "residuals": heldout_residuals(held, test, self.name).to_dict(),
                    "loss": LOSS if iterations else "relative_to_measured"}
        return model

    def fit_data(self) -> FitData:
        return FitData(self.features(), self.seconds, self.exec_seconds, self.source)

    @property
    def rules(self) -> tuple[DecodeSplit | None, str, int, str]:
        """The fit's rules from the meta: decode split, batch basis, graph token limit,
        row weights."""
        return (self.decode_split, self.decode_batch_basis, self.cudagraph_token_limit,
                self.fit_weights)

    @property
    def fit_weights(self) -> str:
        """How the fit weighs rows (meta "fit_weights"): "rows", each row alike (written
        by calibrations since it was added), else "sources", each source's rows together
        as much as the other's, so older files refit as they did."""
        weights = self.meta.get("fit_weights", "sources")
        if weights not in FIT_WEIGHTS:
            raise ValueError(f"profile {self.name}: meta.fit_weights={weights!r} is invalid: "
                             f"must be one of {FIT_WEIGHTS}")
        return weights

    def _held_out_fit(self, holdout: float = 0.2, seed: int = 0,
                      iterations: int = IRLS_ITERATIONS) -> tuple[CalibratedStepTime, FitData]:
        """A fit on all but a seeded `holdout` share of the samples, and that share."""
        data = self.fit_data()
        test = np.random.default_rng(seed).random(len(data)) < holdout
        held = fit_model(data.subset(~test), self.buckets, self.name, iterations, *self.rules)
        return held, data.subset(test)

    def residuals(self) -> Residuals:
        """Held-out step-time residuals (`sim.noise`): stored by fits since they were added;
        for an older profile, made from its samples by the held-out fit it was reported
        with (its stored fit is left as it is)."""
        stored = self.fit.get("residuals")
        if stored:
            return Residuals.from_dict(stored)
        if self._residuals is None:
            loss = self.fit.get("loss")
            iterations = IRLS_ITERATIONS if loss == LOSS else 0
            held, test = self._held_out_fit(iterations=iterations)
            self._residuals = heldout_residuals(held, test, self.name)
        return self._residuals

    def machine_spread(self) -> MachineSpread:
        return MachineSpread.of_meta(self.meta)

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
        model = model_from_fit(self.fit, self.buckets, f"profile {self.name}") if self.fit \
            else self.fit_step_time()
        return with_overhead(model, self.serving_overhead)

    @property
    def serving_overhead(self) -> float:
        """Seconds every served step takes beyond what the calibration measured (meta
        "serving_overhead": {"seconds", "source"}, fit from a validation run's steps by
        `reports.validation.steps.serving_overhead`; 0 where absent)."""
        got = self.meta.get("serving_overhead") or {}
        seconds = got.get("seconds", 0.0)
        if not isinstance(seconds, int | float) or not math.isfinite(seconds):
            raise ValueError(f"profile {self.name}: meta.serving_overhead.seconds="
                             f"{seconds!r} is invalid: must be a number")
        return float(seconds)

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


# -- rescaling a full profile from a quick one ----------------------------------------------

TRIM = 0.05  # each tail of the ratios left out of a scale (a few disturbed steps)


def rescaled(full: Profile, quick: Profile) -> Profile:
    """`full` (the same engine, calibrated at length elsewhere or earlier) with its fit times
    a scale per step kind, fit to `quick`'s samples: the mean of measured / predicted
    (the fit's loss, relative to the fit; trimmed), engine rows on the whole step and
    synthetic rows on the forward pass, as the held-out errors judge them. The samples
    stay the full profile's; the meta says where the scales came from, and a refit keeps
    them (`fit_step_time`)."""
    if full.key != quick.key:
        raise ValueError(f"profile {quick.name} cannot rescale {full.name}: their keys differ")
    base = model_from_fit(full.fit, full.buckets, f"profile {full.name}") if full.fit \
        else full.fit_step_time()
    data = quick.fit_data()
    ratio = data.seconds / np.maximum(heldout_predictions(base, data), 1e-12)
    decode = data.features.is_decode_only
    scales = {k: _trimmed_mean(ratio[rows]) for k, rows in zip(KINDS, (decode, ~decode),
                                                               strict=True)}
    model = scaled_kinds(base, scales["decode"], scales["mixed"])
    fit = {**model_to_fit(model), "holdout": holdout_errors(model, data),
           "residuals": Residuals.of({k: ratio[rows] / scales[k] for k, rows in zip(
               KINDS, (decode, ~decode), strict=True)},
               f"profile {full.name} rescaled to the samples of quick profile "
               f"{quick.meta.get('date', '?')}").to_dict(),
           "loss": full.fit.get("loss", LOSS)}
    meta = {**full.meta, "rescaled": {
        "scales": scales, "quick_samples": len(data),
        "before": error_stats(heldout_predictions(base, data), data.seconds),
        "quick": {k: quick.meta.get(k) for k in ("date", "device", "command",
                                                 "calibration_wall_s", "torch_version")},
        "full": {k: full.meta.get(k) for k in ("date", "device", "command")}}}
    return Profile(full.key, full.samples, full.buckets, full.memory, meta, fit)


def _trimmed_mean(r: np.ndarray) -> float:
    if r.size == 0:
        return 1.0
    lo, hi = np.quantile(r, [TRIM, 1 - TRIM])
    kept = r[(r >= lo) & (r <= hi)]
    return float(kept.mean()) if kept.size else float(np.median(r))


def scaled_kinds(model: CalibratedStepTime, decode: float, mixed: float) -> CalibratedStepTime:
    """Decode-only steps `decode` times as long, the others `mixed` times (device and host
    parts alike: still linear, so every path stays bit-identical)."""
    def host(h: LinearTerms | None, factor: float) -> LinearTerms | None:
        return None if h is None else LinearTerms(h.terms, h.coef * factor)
    return replace(model, decode_coef=model.decode_coef * decode,
                   mixed_coef=model.mixed_coef * mixed,
                   host_decode=host(model.host_decode, decode),
                   host_mixed=host(model.host_mixed, mixed),
                   source=f"{model.source}, rescaled (decode x {decode:.4f}, mixed x "
                          f"{mixed:.4f})")


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
              token_limit: int = 0, weights: str = "sources") -> CalibratedStepTime:
    """Device time per kind from every row's execute_model time; host overhead per kind
    from the engine rows (their step time minus execute_model). The terms over the
    EXTRA_FEATURES are used where the samples have them (version 3). `weights`: how rows
    count (FIT_WEIGHTS)."""
    decode, mixed = data.kind("decode"), data.kind("mixed")
    d_terms, m_terms = kind_terms(decode, mixed, buckets, split, basis, token_limit)
    return CalibratedStepTime(
        fit_device(decode, d_terms, buckets, name, iterations, weights),
        fit_device(mixed, m_terms, None, name, iterations, weights),
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
               name: str, iterations: int = IRLS_ITERATIONS,
               weights: str = "sources") -> np.ndarray:
    if len(data) < len(terms):
        raise ValueError(f"profile {name}: {len(data)} samples for {len(terms)} terms; "
                         "measure more steps")
    x = design_matrix(data.features, terms, buckets)
    rows = source_weights(data.source) if weights == "sources" else None
    return fit_nonnegative(x, data.exec_seconds, rows, iterations)


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


def with_overhead(model: CalibratedStepTime, seconds: float) -> CalibratedStepTime:
    """`model` with `seconds` more host time in every step (its host parts' constant)."""
    if seconds == 0.0:
        return model
    def host(h: LinearTerms | None) -> LinearTerms:
        if h is None:
            return LinearTerms(("const",), np.array([seconds]))
        if "const" not in h.terms:
            return LinearTerms((*h.terms, "const"), np.append(h.coef, seconds))
        coef = h.coef.copy()
        coef[h.terms.index("const")] += seconds
        return LinearTerms(h.terms, coef)
    return replace(model, host_decode=host(model.host_decode),
                   host_mixed=host(model.host_mixed),
                   source=f"{model.source}, + {seconds * 1e6:.0f} us serving overhead a step")


# -- held-out error -----------------------------------------------------------------------------

def heldout_predictions(model: CalibratedStepTime, test: FitData) -> np.ndarray:
    """Engine rows are judged on the whole step (what a replay measures), synthetic rows
    on the forward pass."""
    predicted = model.predict(test.features)
    device = _device_only(model).predict(test.features)
    return np.where(test.source == "engine", predicted, device)


def holdout_errors(model: CalibratedStepTime, test: FitData) -> dict[str, Any]:
    """Relative error on held-out rows: all, by source, by kind and by class of step
    composition (`sim.step_classes`)."""
    pred = heldout_predictions(model, test)
    out = error_stats(pred, test.seconds)
    out["by_source"] = {s: error_stats(pred[test.source == s], test.seconds[test.source == s])
                        for s in SOURCES}
    decode = test.features.is_decode_only
    out["by_kind"] = {"decode": error_stats(pred[decode], test.seconds[decode]),
                      "mixed": error_stats(pred[~decode], test.seconds[~decode])}
    out["by_class"] = class_errors(pred, test.seconds, step_classes(model, test.features),
                                   error_stats)
    return out


def step_classes(model: CalibratedStepTime, f: StepFeatures) -> np.ndarray:
    """`classify` of steps by the model's graph token limit and host share."""
    total = model.predict(f)
    host = total - _device_only(model).predict(f)
    return classify(f, model.token_limit, host / np.maximum(total, 1e-12))


def heldout_residuals(model: CalibratedStepTime, test: FitData, name: str) -> Residuals:
    """measured / predicted on the held-out rows, per kind: the engine rows alone where a
    kind has MIN_ENGINE_ROWS of them (single whole steps, as the twin predicts them), else
    every row."""
    ratio = test.seconds / np.maximum(heldout_predictions(model, test), 1e-12)
    decode, engine = test.features.is_decode_only, test.source == "engine"
    ratios = {}
    for kind, rows in zip(KINDS, (decode, ~decode), strict=True):
        ratios[kind] = ratio[rows & engine] if (rows & engine).sum() >= MIN_ENGINE_ROWS \
            else ratio[rows]
    return Residuals.of(ratios, f"held-out steps of profile {name} (20 %, seed 0)")


def _device_only(model: CalibratedStepTime) -> CalibratedStepTime:
    return CalibratedStepTime(model.decode_coef, model.mixed_coef, model.buckets, model.source,
                              decode_terms=model.decode_terms, mixed_terms=model.mixed_terms)


def error_stats(predicted: np.ndarray, measured: np.ndarray) -> dict[str, float]:
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
    text = "held-out step-time error (|predicted - measured| / measured):\n" + "\n".join(rows)
    classes = holdout.get("by_class")
    return text + ("\n" + format_classes(classes) if classes else "")


def format_classes(by_class: dict[str, dict[str, Any]]) -> str:
    """One line per class of step composition: n, median signed error and the summed
    time's error (a class's bias), median |error|."""
    rows = [f"  {name:<23} n={e['n']:<5} bias median {e['median_signed_pct_err']:+5.1f} %  "
            f"total time {e['total_time_pct_err']:+5.1f} %  |error| median "
            f"{e['median_abs_pct_err']:.1f} %" for name, e in by_class.items() if e.get("n")]
    return "signed error by step class (predicted - measured; + = over-predicted):\n" + \
        "\n".join(rows)
