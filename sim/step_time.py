"""Step-time models: predict a step's duration from its composition.

Three implementations behind one interface (`StepTimeModel`):
- `CalibratedStepTime`: a non-negative linear fit to steps measured on the real engine, its
  terms (`sim.step_terms`) compiled once per run;
- `RooflineStepTime`: compute and HBM-traffic bounds from the hardware catalog;
- `ReplayedStepTime`: durations an engine measured, by step index.
Each predicts many steps at once (`predict`), one step in plain Python (`step`) and a run of
decode steps in one vectorised pass (`decode_run`), the three bit-identical; every prediction
states `kind` and `source`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np

from engine.core.config import DTYPE_BYTES, ModelConfig
from engine.core.features import (
    DecodeRunFeatures,
    StepFeatures,
    StepRow,
    decode_run_features,
)
from engine.core.parallel import (
    RankShapes,
    rank_kv_bytes_per_token,
    rank_num_parameters,
    rank_weight_bytes,
)
from sim.step_terms import (
    DECODE_TERMS,
    MIXED_TERMS,
    Term,
    compile_term,
    renamed_token_limit,
    term_args,
)


class StepTimeModel(Protocol):
    kind: str
    source: str
    reads_longest: bool  # whether a decode step's time depends on its longest context
    reads_shared: bool   # ... or on the prefix keys its decodes re-read

    def predict(self, features: StepFeatures, first_step: int = 0) -> np.ndarray:
        """Seconds for each step; `first_step` is the index of the first one."""
        ...

    def step(self, row: StepRow, index: int) -> float:
        """Seconds for the one step `row`, the `index`-th of the run."""
        ...

    def decode_run(self, run: DecodeRun, first_step: int) -> np.ndarray:
        """Seconds for each step of a run of decode steps (equal to `predict` of its
        features, bit for bit)."""
        ...


@dataclass(frozen=True)
class DecodeRun:
    """`num_steps` decode steps of the same `num_seqs` sequences, from summed context
    `ctx_start` (one more key per sequence a step); the longest context at the first step
    (None: unknown, estimated) and the prefix keys the decodes re-read (constant in a run:
    new tokens go to each sequence's own last block)."""

    num_seqs: int
    ctx_start: int
    num_steps: int
    max_ctx_start: int | None = None
    shared: int = 0

    def features(self) -> StepFeatures:
        return decode_run_features(self.num_seqs, self.ctx_start, self.num_steps,
                                   self.max_ctx_start, self.shared)


# -- calibrated -------------------------------------------------------------------------------

@dataclass
class LinearTerms:
    """t = sum_i coef[i] * term_i(step), summed term by term in order (so a run of steps and
    single steps give bit-identical results); the terms compiled once."""

    terms: tuple[str, ...]
    coef: np.ndarray
    buckets: list[int] | None = None
    row_cap: int = 0
    compiled: tuple[tuple[Term, float], ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.compiled = tuple((compile_term(t, self.buckets, self.row_cap), float(c))
                              for t, c in zip(self.terms, self.coef, strict=True) if c != 0.0)

    def predict(self, f: StepFeatures) -> np.ndarray:
        total = np.zeros(len(f))
        for term, c in self.compiled:
            total = total + c * term.column(f)
        return total

    def value(self, row: StepRow) -> float:
        total = 0.0
        for term, c in self.compiled:
            total = total + c * term.value(row)
        return total

    def reads(self, *names: str) -> bool:
        """Whether a term with a nonzero coefficient is one of `names` (by base name)."""
        return any(t.split(">")[0].split("(")[0] in names
                   for t, c in zip(self.terms, self.coef, strict=True) if c != 0.0)

    def to_dict(self) -> dict[str, list]:
        return {"terms": list(self.terms), "coef": [float(c) for c in self.coef]}

    @classmethod
    def from_dict(cls, data: dict[str, list], what: str,
                  buckets: list[int] | None = None) -> LinearTerms:
        terms, coef = tuple(data.get("terms", ())), np.asarray(data.get("coef", ()), float)
        if len(terms) != len(coef) or not terms:
            raise ValueError(f"{what}: terms and coef must be non-empty lists of one length "
                             f"(got {len(terms)} terms, {len(coef)} coef)")
        return cls(terms, coef, buckets)


class DecodeRunTerms:
    """A decode part compiled for runs of decode steps: its leading batch-only terms (and a
    host part of batch-only terms) folded into one value per batch size, the same partial
    sum a step adds up; the rest evaluated over the run's steps in one vectorised pass."""

    def __init__(self, device: LinearTerms, host: LinearTerms | None):
        lead = 0
        while lead < len(device.compiled) and device.compiled[lead][0].batch_only:
            lead += 1
        self.lead, self.rest = device.compiled[:lead], device.compiled[lead:]
        self.host = host
        self.host_fixed = host is None or all(t.batch_only for t, _ in host.compiled)
        self._base: dict[int, tuple[float, float]] = {}

    def base(self, n: int) -> tuple[float, float]:
        """(the leading terms' partial sum, the host part if fixed) of a decode step of n."""
        got = self._base.get(n)
        if got is None:
            row = StepRow(0, 0, n, 0, n, 0, 0, 0)
            lead = 0.0
            for term, c in self.lead:
                lead = lead + c * term.value(row)
            host = self.host.value(row) if self.host and self.host_fixed else 0.0
            got = self._base[n] = (lead, host)
        return got

    def step(self, row: StepRow) -> float:
        total, host = self.base(row.decode_seqs)
        for term, c in self.rest:
            total = total + c * term.value(row)
        if self.host is None:
            return total
        return total + (host if self.host_fixed else self.host.value(row))

    def run(self, run: DecodeRun) -> np.ndarray:
        lead, host = self.base(run.num_seqs)
        total = np.full(run.num_steps, lead)
        f = DecodeRunFeatures(run.num_seqs, run.ctx_start, run.num_steps, run.max_ctx_start,
                              run.shared)
        for term, c in self.rest:
            total = total + c * term.column(f)
        if self.host is None:
            return total
        return total + (host if self.host_fixed else self.host.predict(f))


@dataclass
class CalibratedStepTime:
    """Device time (`decode_coef` over `decode_terms` on decode-only (graph) steps,
    `mixed_coef` over `mixed_terms` otherwise) plus host overhead (`host_decode` /
    `host_mixed`, zero when absent: version-1 profiles timed the forward pass alone).
    The terms are compiled once, at construction."""

    decode_coef: np.ndarray
    mixed_coef: np.ndarray
    buckets: list[int] | None
    source: str
    kind: str = "calibrated"
    decode_terms: tuple[str, ...] = DECODE_TERMS
    mixed_terms: tuple[str, ...] = MIXED_TERMS
    host_decode: LinearTerms | None = None
    host_mixed: LinearTerms | None = None
    row_cap: int = 0  # the engine's token budget: padded steps never run more rows

    def __post_init__(self) -> None:
        self._decode = LinearTerms(self.decode_terms, self.decode_coef, self.buckets)
        self._mixed = LinearTerms(self.mixed_terms, self.mixed_coef, self.buckets,
                                  self.row_cap)
        self._runs = DecodeRunTerms(self._decode, self.host_decode)
        # Whether a decode step's time depends on its longest context (not only the sum),
        # and on the prefix keys its decodes re-read.
        self.reads_longest = self._decode.reads("decode_max_ctx", "decode_share")
        self.reads_shared = any(part.reads("decode_unique_ctx", "decode_shared")
                                for part in (self._decode, self._mixed))

    @property
    def token_limit(self) -> int | None:
        """The mixed-step graphs' token limit its mixed terms read (None: no such terms)."""
        for term in self.mixed_terms:
            if term.startswith(("padded_tokens(", "eager(")):
                return term_args(term.split(">")[0])[0]
        return None

    def with_token_limit(self, limit: int, row_cap: int = 0) -> CalibratedStepTime:
        """The same fit for an engine whose mixed-step graphs reach `limit` tokens, not the
        calibration's: its `padded_tokens(...)` and `eager(...)` terms read the new limit
        (and padded steps stop at `row_cap` rows, the engine's token budget)."""
        return replace(self, row_cap=row_cap, mixed_terms=tuple(
            renamed_token_limit(t, limit) for t in self.mixed_terms))

    def scaled(self, factor: float) -> CalibratedStepTime:
        """Every step `factor` times as long (coefficients scaled: still linear, so runs of
        steps and single steps keep giving identical durations)."""
        def host(h: LinearTerms | None) -> LinearTerms | None:
            return None if h is None else LinearTerms(h.terms, h.coef * factor)
        return replace(self, decode_coef=self.decode_coef * factor,
                       mixed_coef=self.mixed_coef * factor, host_decode=host(self.host_decode),
                       host_mixed=host(self.host_mixed),
                       source=f"{self.source}, every step x {factor:g}")

    def predict(self, features: StepFeatures, first_step: int = 0) -> np.ndarray:
        decode = self._part(features, self._decode, self.host_decode)
        mixed = self._part(features, self._mixed, self.host_mixed)
        return np.where(features.is_decode_only, decode, mixed)

    @staticmethod
    def _part(f: StepFeatures, device: LinearTerms, host: LinearTerms | None) -> np.ndarray:
        total = device.predict(f)
        return total if host is None else total + host.predict(f)

    def step(self, row: StepRow, index: int = 0) -> float:
        if row.prefill_tokens == 0:
            return self._runs.step(row)
        total = self._mixed.value(row)
        return total if self.host_mixed is None else total + self.host_mixed.value(row)

    def decode_run(self, run: DecodeRun, first_step: int = 0) -> np.ndarray:
        return self._runs.run(run)


IRLS_ITERATIONS = 4


def fit_nonnegative(x: np.ndarray, seconds: np.ndarray, weights: np.ndarray | None = None,
                    iterations: int = IRLS_ITERATIONS) -> np.ndarray:
    """Non-negative least squares on error relative to the fitted time, times `weights`:
    iteratively reweighted, from rows weighted by 1 / measured. Dividing by the measured time
    alone biases the fit low (a slow sample's error counts less than a fast one's); dividing
    by the fit is the mean-unbiased choice (quasi-likelihood, variance proportional to t^2).
    `iterations=0` is the relative-to-measured fit of kvtwin-profile/1 and /2."""
    coef = _nnls_weighted(x, seconds, 1.0 / np.maximum(seconds, 1e-9), weights)
    floor = 0.25 * max(float(seconds.min(initial=0.0)), 1e-9)  # keeps the weights finite
    for _ in range(iterations):
        fitted = np.maximum(x @ coef, floor)
        coef = _nnls_weighted(x, seconds, 1.0 / fitted, weights)
    return coef


def _nnls_weighted(x: np.ndarray, seconds: np.ndarray, w: np.ndarray,
                   weights: np.ndarray | None) -> np.ndarray:
    from scipy.optimize import nnls  # only calibration fits: keeps the twin's start light

    if weights is not None:
        w = w * np.sqrt(weights)
    scale = np.maximum(np.abs(x * w[:, None]).max(axis=0), 1e-30)  # conditioning
    coef, _ = nnls(x * w[:, None] / scale, seconds * w, maxiter=50 * x.shape[1])
    return coef / scale


# -- roofline ---------------------------------------------------------------------------------

@dataclass
class Roofline:
    """What a step must do at minimum: FLOPs and HBM bytes."""

    flops: np.ndarray
    bytes: np.ndarray


@dataclass(frozen=True)
class ModelWork:
    """Per-model constants of the roofline, computed once."""

    body_params: float   # parameters touched per token, embeddings excluded
    embed_params: float  # the lm_head (vocab x hidden) applied to each sampled row
    attn_unit: float     # attention FLOPs per (query, key) pair, all layers
    weight_bytes: float
    kv_token_bytes: float

    @classmethod
    def of(cls, model: ModelConfig, dtype: str, quantization: str = "none",
           kv_dtype: str | None = None, tp: int = 1) -> ModelWork:
        """One rank's work (the whole model at tp=1). int8 weights and an fp8 cache cut the
        bytes a step reads, not its FLOPs (weights are dequantized into `dtype` matmuls)."""
        s = RankShapes.of(model, tp)
        embed = s.vocab * model.hidden_size
        body = rank_num_parameters(model, tp) - embed * (1 if model.tie_word_embeddings else 2)
        attn = 4.0 * model.num_hidden_layers * s.num_heads * model.head_dim
        looked_up = 0 if model.tie_word_embeddings else embed * DTYPE_BYTES[dtype]
        read = rank_weight_bytes(model, tp, dtype, quantization) - looked_up
        kv = rank_kv_bytes_per_token(model, tp, kv_dtype or dtype)
        return cls(float(body), float(embed), attn, float(read), float(kv))


def roofline_work(work: ModelWork, f: StepFeatures) -> Roofline:
    flops = (2.0 * work.body_params * f.num_tokens
             + work.attn_unit * (f.prefill_attn + f.decode_ctx)
             + 2.0 * work.embed_params * f.num_seqs)
    traffic = work.weight_bytes + work.kv_token_bytes * (f.decode_ctx + f.prefill_tokens)
    return Roofline(flops, traffic)


@dataclass
class RooflineStepTime:
    """max(FLOPs / achievable FLOP/s, bytes / achievable bandwidth) + per-step overhead.

    The efficiencies and overhead are documented defaults (typical of a tuned engine on
    Hopper-class GPUs), not measurements: calibrate for accuracy.
    """

    model: ModelConfig
    dtype: str
    peak_flops: float
    bandwidth: float
    source: str
    compute_efficiency: float = 0.6
    bandwidth_efficiency: float = 0.8
    overhead_s: float = 0.0004
    quantization: str = "none"
    kv_dtype: str | None = None  # None: the model dtype
    tp: int = 1  # one rank's shard of the work
    kind: str = "roofline"
    work: ModelWork = field(init=False)

    def __post_init__(self) -> None:
        self.work = ModelWork.of(self.model, self.dtype, self.quantization, self.kv_dtype,
                                 self.tp)

    reads_longest = False
    reads_shared = False

    def predict(self, features: StepFeatures, first_step: int = 0) -> np.ndarray:
        work = roofline_work(self.work, features)
        compute = work.flops / (self.peak_flops * self.compute_efficiency)
        memory = work.bytes / (self.bandwidth * self.bandwidth_efficiency)
        return np.maximum(compute, memory) + self.overhead_s

    def step(self, row: StepRow, index: int = 0) -> float:
        """`predict` of one step, in the same float operations."""
        w = self.work
        flops = (2.0 * w.body_params * (row.prefill_tokens + row.decode_seqs)
                 + w.attn_unit * (row.prefill_attn + row.decode_ctx)
                 + 2.0 * w.embed_params * row.num_seqs)
        traffic = w.weight_bytes + w.kv_token_bytes * (row.decode_ctx + row.prefill_tokens)
        compute = flops / (self.peak_flops * self.compute_efficiency)
        memory = traffic / (self.bandwidth * self.bandwidth_efficiency)
        return max(compute, memory) + self.overhead_s

    def decode_run(self, run: DecodeRun, first_step: int = 0) -> np.ndarray:
        return self.predict(run.features())


# -- replayed -------------------------------------------------------------------------------

@dataclass
class ReplayedStepTime:
    """Durations measured by the engine, by step index: isolates the scheduler from timing."""

    durations: np.ndarray
    source: str = "replayed engine step times"
    kind: str = "replayed"

    reads_longest = False
    reads_shared = False

    def predict(self, features: StepFeatures, first_step: int = 0) -> np.ndarray:
        return self._slice(first_step, len(features))

    def step(self, row: StepRow, index: int) -> float:
        return float(self._slice(index, 1)[0])

    def decode_run(self, run: DecodeRun, first_step: int) -> np.ndarray:
        return self._slice(first_step, run.num_steps)

    def _slice(self, first: int, n: int) -> np.ndarray:
        end = first + n
        if end > len(self.durations):
            raise IndexError(f"no measured duration for step {len(self.durations)}: the sim "
                             "took more steps than the engine did")
        return self.durations[first:end]
