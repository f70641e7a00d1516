"""Calibration profiles: steps measured on the real engine, and the fit the sim uses.

A profile is one JSON file in `sim/profiles/`, keyed by hardware, model, dtype and attention
backend (`<hardware>__<model>__<dtype>__<backend>.json`):

    {"format": "kvtwin-profile/1",
     "key": {"hardware": ..., "model": ..., "dtype": ..., "backend": ...},
     "meta": {device name, torch version, date, command, ...},
     "buckets": [CUDA-graph batch sizes] or null when steps ran eagerly,
     "memory": {"total_bytes", "non_torch_bytes", "cuda_graph_bytes",
                "activation": [[max_num_batched_tokens, peak activation bytes], ...]},
     "samples": {"prefill_tokens": [...], "prefill_attn": [...], "decode_seqs": [...],
                 "decode_ctx": [...], "num_seqs": [...], "seconds": [...]},
     "fit": {"decode_coef": [...], "mixed_coef": [...], "holdout": {...}}}
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sim.features import FEATURES, StepFeatures
from sim.step_time import (
    DECODE_TERMS,
    MIXED_TERMS,
    CalibratedStepTime,
    design_matrix,
    fit_nonnegative,
)

FORMAT = "kvtwin-profile/1"
PROFILE_DIR = Path(__file__).resolve().parent / "profiles"


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
    samples: dict[str, list[float]]
    buckets: list[int] | None = None
    memory: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    fit: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.key.filename.removesuffix(".json")

    def features(self) -> StepFeatures:
        return StepFeatures.from_columns({f: np.asarray(self.samples[f]) for f in FEATURES})

    @property
    def seconds(self) -> np.ndarray:
        return np.asarray(self.samples["seconds"], dtype=np.float64)

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

    def fit_step_time(self, holdout: float = 0.2, seed: int = 0) -> CalibratedStepTime:
        """Fit on all samples; report the error of a fit on the rest on a held-out share."""
        f, t = self.features(), self.seconds
        test = np.random.default_rng(seed).random(len(t)) < holdout
        held = _fit(f, t, ~test, self.buckets, self.name)
        model = _fit(f, t, np.ones(len(t), dtype=bool), self.buckets, self.name)
        self.fit = {"decode_coef": model.decode_coef.tolist(),
                    "mixed_coef": model.mixed_coef.tolist(),
                    "holdout": _errors(held.predict(_subset(f, test)), t[test])}
        return model

    def step_time(self) -> CalibratedStepTime:
        if not self.fit:
            return self.fit_step_time()
        return CalibratedStepTime(np.asarray(self.fit["decode_coef"]),
                                  np.asarray(self.fit["mixed_coef"]), self.buckets,
                                  source=f"profile {self.name}")

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
        if data.get("format") != FORMAT:
            raise ValueError(f"{path}: format={data.get('format')!r} is invalid: must be "
                             f"{FORMAT!r}")
        return cls(ProfileKey(**data["key"]), data["samples"], data.get("buckets"),
                   data.get("memory", {}), data.get("meta", {}), data.get("fit", {}))


def find_profile(key: ProfileKey, directory: Path = PROFILE_DIR) -> Profile | None:
    path = directory / key.filename
    return Profile.load(path) if path.is_file() else None


def _subset(f: StepFeatures, mask: np.ndarray) -> StepFeatures:
    return StepFeatures(*(getattr(f, name)[mask] for name in FEATURES))


def _fit(f: StepFeatures, t: np.ndarray, mask: np.ndarray, buckets: list[int] | None,
         name: str) -> CalibratedStepTime:
    sub, ts = _subset(f, mask), t[mask]
    decode = sub.is_decode_only
    coefs = []
    for rows, terms in ((decode, DECODE_TERMS), (~decode, MIXED_TERMS)):
        if rows.sum() < len(terms):
            raise ValueError(f"profile {name}: {int(rows.sum())} samples for "
                             f"{len(terms)} terms; measure more steps")
        x = design_matrix(_subset(sub, rows), terms, buckets if terms is DECODE_TERMS else None)
        coefs.append(fit_nonnegative(x, ts[rows]))
    return CalibratedStepTime(coefs[0], coefs[1], buckets, source=f"profile {name}")


def _errors(predicted: np.ndarray, measured: np.ndarray) -> dict[str, float]:
    if len(measured) == 0:
        return {"n": 0}
    pct = 100 * np.abs(predicted - measured) / measured
    return {"n": int(len(measured)), "median_abs_pct_err": float(np.median(pct)),
            "p90_abs_pct_err": float(np.percentile(pct, 90)),
            "max_abs_pct_err": float(pct.max())}
