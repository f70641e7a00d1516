"""Step-time models: predict a step's duration from its composition.

Two implementations behind one interface (`StepTimeModel.predict`):
- `CalibratedStepTime`: a non-negative linear fit to steps measured on the real engine.
- `RooflineStepTime`: compute and HBM-traffic bounds from the hardware catalog.
Both are vectorised over steps; every prediction states `kind` and `source`.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np

from engine.config import DTYPE_BYTES, DecodeSplit, ModelConfig, token_buckets
from engine.step_input import TOKEN_MULTIPLE
from sim.features import StepFeatures


class StepTimeModel(Protocol):
    kind: str
    source: str

    def predict(self, features: StepFeatures, first_step: int) -> np.ndarray:
        """Seconds for each step; `first_step` is the index of the first one."""
        ...


def padded_batch(decode_seqs: np.ndarray, buckets: list[int] | None) -> np.ndarray:
    """Batch size the graph replays: the smallest bucket that holds the decodes."""
    if not buckets:
        return decode_seqs
    edges = np.asarray(buckets)
    idx = np.minimum(np.searchsorted(edges, decode_seqs), len(edges) - 1)
    padded = edges[idx]
    return np.where(decode_seqs <= edges[-1], padded, decode_seqs)


# -- calibrated -------------------------------------------------------------------------------

# Version-1 profiles' terms (still read, and the defaults of CalibratedStepTime).
DECODE_TERMS = ("const", "padded_batch", "decode_ctx")
MIXED_TERMS = ("const", "prefill_tokens", "prefill_attn", "decode_seqs", "decode_ctx",
               "num_seqs")
# Host overhead per step (scheduling, records, applying the output): what engine steps add to
# ModelRunner.execute_model.
HOST_DECODE_TERMS = ("const", "num_seqs")
HOST_MIXED_TERMS = ("const", "num_seqs", "prefill_tokens")


CTX_KNOTS = (1024, 4096, 16384, 65536, 262144, 1048576)


# Decode batch sizes where the fixed cost of a decode step may bend (piecewise linear between).
BATCH_KNOTS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 160, 192, 224, 256)
BATCH_BASES = ("knots", "hinges")


def decode_terms(buckets: list[int] | None, max_batch: int, max_ctx: int = 0,
                 longest: bool = False, split: DecodeSplit | None = None,
                 shared: bool = False, basis: str = "hinges",
                 measured: Collection[int] | None = None) -> tuple[str, ...]:
    """Decode-only steps: the fixed cost of the graph bucket, piecewise linear in it:
    `basis` "knots", a free value at each of BATCH_KNOTS (the GEMMs' kernels change with
    the row count, so the cost need not be convex: it is flat from 16 to 48 rows on the
    H100), or "hinges", convex (older profiles); summed context, convex piecewise linear
    (hinge terms at knots below the largest measured value), and mean context per sequence
    (long single-sequence attention); with `longest`, the longest decode's context too, or,
    when the kernel splits sequences (`split`), the longest one's share of its splits; with
    `shared`, the keys read once (HBM) apart from all keys read (re-reads come from L2).
    `measured`: the padded batches the samples have (knots only where a value is known)."""
    longest_terms = (split_term(split) if split else "decode_max_ctx",) if longest else ()
    top = int(padded_batch(np.array([max(max_batch, 1)]), buckets)[0])
    batch = (batch_knot_terms(top, measured) if basis == "knots"
             else batch_hinge_terms(max_batch))
    return (*batch, "decode_ctx", *_ctx_hinges(max_ctx), "mean_ctx",
            *longest_terms, *(("decode_unique_ctx",) if shared else ()))


def batch_hinge_terms(max_batch: int) -> list[str]:
    """const, padded batch and its hinges: convex in the batch."""
    knots = [k for k in (4, 16, 64, 128) if k < max_batch]
    return ["const", "padded_batch", *(f"padded_batch>{k}" for k in knots)]


def batch_knot_terms(max_batch: int, measured: Collection[int] | None = None) -> list[str]:
    """`batch_knot(lo,k,hi)`: the hat function of the padded batch that is 1 at knot k and
    0 at its neighbours lo and hi (the first knot's is flat below it; the last knot's grows
    in proportion past it, to extrapolate), over the BATCH_KNOTS below the largest (padded)
    batch measured that were measured themselves (all of them without `measured`)."""
    knots = [k for k in BATCH_KNOTS if k < max_batch and (measured is None or k in measured)]
    knots.append(max(max_batch, 1))
    lows, highs = [knots[0], *knots[:-1]], [*knots[1:], knots[-1]]
    return [f"batch_knot({lo},{k},{hi})" for lo, k, hi in zip(lows, knots, highs, strict=True)]


def _knot_column(f: StepFeatures, term: str, buckets: list[int] | None) -> np.ndarray:
    lo, k, hi = _term_args(term)
    b = padded_batch(f.decode_seqs, buckets).astype(np.float64)
    rising = np.clip((b - lo) / (k - lo), 0.0, 1.0) if k > lo else np.ones(len(b))
    falling = np.clip((hi - b) / (hi - k), 0.0, 1.0) if hi > k else b / k
    return np.where(b <= k, rising, falling)


GATHER_KNOT = 8192  # keys per prefill chunk: past it, gathering costs more than linearly


def mixed_terms(max_tokens: int, max_ctx: int = 0, extra: bool = False,
                max_gather_mean: float = 0.0, split: DecodeSplit | None = None,
                token_limit: int = 0) -> tuple[str, ...]:
    """Mixed / prefill steps: tokens (hinges: flat while weight-bound, then compute-bound),
    prefill attention pairs, decodes and their context (hinges), sequences; with `extra`,
    the longest decode's context and the prefix keys gathered for prefill chunks (with a
    hinge in the keys per chunk, where measured past GATHER_KNOT); with `split`, whether
    the step's decodes are split (an eager step then launches a combine kernel and two
    buffers per layer: host time, as these steps are host-bound). With `token_limit` (the
    engine's CUDA graphs served mixed steps up to it), tokens are the rows the step ran
    (its bucket) and `eager(limit)` is 1 for the larger steps, which launch every kernel
    from Python."""
    knots = [k for k in (64, 256, 1024, 4096) if k < max_tokens]
    gather = (f"gather_mean>{GATHER_KNOT}",) if max_gather_mean > GATHER_KNOT else ()
    tokens = f"padded_tokens({token_limit})" if token_limit else "num_tokens"
    eager = (f"eager({token_limit})",) if 0 < token_limit < max_tokens else ()
    return ("const", tokens, *(f"{tokens}>{k}" for k in knots), *eager, "prefill_attn",
            "decode_seqs", "decode_ctx", *_ctx_hinges(max_ctx), "mean_ctx", "num_seqs",
            *(("decode_max_ctx", "prefill_gather", *gather) if extra else ()),
            *((split_term(split, "decode_combine"),) if split else ()))


def padded_tokens(num_tokens: np.ndarray, limit: int) -> np.ndarray:
    """Rows a mixed step runs: its graph bucket up to `limit`, else padded to
    TOKEN_MULTIPLE (engine.model_runner.ModelRunner.eager_rows)."""
    n = np.asarray(num_tokens, dtype=np.int64)
    edges = np.asarray(token_buckets(limit) or [0], dtype=np.int64)
    bucket = edges[np.minimum(np.searchsorted(edges, n), len(edges) - 1)]
    return np.where(n <= limit, bucket, -(-n // TOKEN_MULTIPLE) * TOKEN_MULTIPLE)


def split_term(split: DecodeSplit, name: str = "decode_share") -> str:
    """A term of the split rule, the rule in its name: `decode_share`, the longest decode's
    share of its splits; `decode_combine`, 1 where the step's decodes (unpadded: an eager
    step) are split."""
    return (f"{name}({split.num_kv_heads},{split.target_programs},{split.max_splits},"
            f"{split.min_share},{split.block_n})")


def _term_args(term: str) -> list[int]:
    """The integers in a term's name: `name(a,b,...)` -> [a, b, ...]."""
    return [int(x) for x in term[term.index("(") + 1:-1].split(",")]


def _split_rule(term: str) -> DecodeSplit:
    return DecodeSplit(*_term_args(term))


def _combine_column(f: StepFeatures, term: str) -> np.ndarray:
    split = _split_rule(term)
    batches, inverse = np.unique(f.decode_seqs, return_inverse=True)
    split_up = np.array([b > 0 and split.splits(int(b)) > 1 for b in batches], dtype=float)
    return split_up[inverse.reshape(-1)]


def _share_column(f: StepFeatures, term: str, buckets: list[int] | None) -> np.ndarray:
    """Keys of the busiest decode program: the longest context's share of the splits the
    kernel makes for the batch it runs (the graph bucket)."""
    split = _split_rule(term)
    longest = term_column(f, "decode_max_ctx", buckets).astype(np.int64)
    batch = padded_batch(f.decode_seqs, buckets).astype(np.int64)
    pairs, inverse = np.unique(np.stack([longest, batch], axis=1), axis=0, return_inverse=True)
    shares = np.array([split.longest_share(int(m), int(b)) for m, b in pairs], dtype=float)
    return shares[inverse.reshape(-1)]


def _ctx_hinges(max_ctx: int) -> list[str]:
    return [f"decode_ctx>{k}" for k in CTX_KNOTS if 2 * k < max_ctx]


def term_column(f: StepFeatures, term: str, buckets: list[int] | None) -> np.ndarray:
    """One column of the design matrix. `name>k` is the hinge max(0, name - k)."""
    if ">" in term:
        name, knot = term.split(">")
        return np.maximum(term_column(f, name, buckets) - float(knot), 0.0)
    if term == "const":
        return np.ones(len(f))
    if term == "padded_batch":
        return padded_batch(f.decode_seqs, buckets).astype(np.float64)
    if term == "num_tokens":
        return f.num_tokens.astype(np.float64)
    if term == "mean_ctx":
        return f.decode_ctx / np.maximum(f.decode_seqs, 1).astype(np.float64)
    if term == "prefill_seqs":
        return (f.num_seqs - f.decode_seqs).astype(np.float64)
    if term == "decode_unique_ctx":
        return (f.decode_ctx - term_column(f, "decode_shared", buckets)).astype(np.float64)
    if term == "gather_mean":
        seqs = np.maximum(f.num_seqs - f.decode_seqs, 1)
        return term_column(f, "prefill_gather", buckets) / seqs
    if term.startswith("decode_share("):
        return _share_column(f, term, buckets)
    if term.startswith("batch_knot("):
        return _knot_column(f, term, buckets)
    if term.startswith("decode_combine("):
        return _combine_column(f, term)
    if term.startswith("padded_tokens("):
        return padded_tokens(f.num_tokens, _term_args(term)[0]).astype(np.float64)
    if term.startswith("eager("):
        return (f.num_tokens > _term_args(term)[0]).astype(np.float64)
    if not hasattr(f, term):
        raise ValueError(f"step-time term {term!r} is invalid: not a feature of StepFeatures")
    column = getattr(f, term)
    return _estimated(f, term) if column is None else column.astype(np.float64)


def _estimated(f: StepFeatures, term: str) -> np.ndarray:
    """An EXTRA_FEATURES column the steps lack (built from the five core features, as a
    decode run without its longest context is): the longest decode as the mean one (a
    uniform batch), gathered keys as one chunk's (its prefix from the attention pairs), no
    re-read prefix keys."""
    if term == "decode_max_ctx":
        return np.ceil(f.decode_ctx / np.maximum(f.decode_seqs, 1))
    if term == "decode_shared":
        return np.zeros(len(f))
    q = np.maximum(f.prefill_tokens, 1).astype(np.float64)
    prefix = np.maximum(f.prefill_attn / q - (q + 1) / 2, 0.0)
    return np.where(prefix >= 0.5, f.prefill_tokens + np.rint(prefix), 0.0)


def design_matrix(f: StepFeatures, terms: tuple[str, ...],
                  buckets: list[int] | None) -> np.ndarray:
    return np.stack([term_column(f, t, buckets) for t in terms], axis=1)


@dataclass
class LinearTerms:
    """t = sum_i coef[i] * term_i(step), summed term by term (so a run of steps and single
    steps give bit-identical results)."""

    terms: tuple[str, ...]
    coef: np.ndarray

    def predict(self, f: StepFeatures, buckets: list[int] | None) -> np.ndarray:
        total = np.zeros(len(f))
        for term, c in zip(self.terms, self.coef, strict=True):
            if c != 0.0:
                total = total + c * term_column(f, term, buckets)
        return total

    def to_dict(self) -> dict[str, list]:
        return {"terms": list(self.terms), "coef": [float(c) for c in self.coef]}

    @classmethod
    def from_dict(cls, data: dict[str, list], what: str) -> LinearTerms:
        terms, coef = tuple(data.get("terms", ())), np.asarray(data.get("coef", ()), float)
        if len(terms) != len(coef) or not terms:
            raise ValueError(f"{what}: terms and coef must be non-empty lists of one length "
                             f"(got {len(terms)} terms, {len(coef)} coef)")
        return cls(terms, coef)


@dataclass
class CalibratedStepTime:
    """Device time (`decode_coef` over `decode_terms` on decode-only (graph) steps,
    `mixed_coef` over `mixed_terms` otherwise) plus host overhead (`host_decode` /
    `host_mixed`, zero when absent: version-1 profiles timed the forward pass alone)."""

    decode_coef: np.ndarray
    mixed_coef: np.ndarray
    buckets: list[int] | None
    source: str
    kind: str = "calibrated"
    decode_terms: tuple[str, ...] = DECODE_TERMS
    mixed_terms: tuple[str, ...] = MIXED_TERMS
    host_decode: LinearTerms | None = None
    host_mixed: LinearTerms | None = None

    @property
    def uses_longest_decode(self) -> bool:
        """Whether a decode step's time depends on its longest context (not only the sum)."""
        return any(t.split(">")[0].split("(")[0] in ("decode_max_ctx", "decode_share")
                   and c != 0.0 for t, c in zip(self.decode_terms, self.decode_coef,
                                                strict=True))

    @property
    def uses_shared_decode(self) -> bool:
        """Whether a decode step's time depends on the prefix keys its decodes re-read."""
        return any(t == "decode_unique_ctx" and c != 0.0
                   for t, c in zip(self.decode_terms, self.decode_coef, strict=True))

    @property
    def token_limit(self) -> int | None:
        """The mixed-step graphs' token limit its mixed terms read (None: no such terms)."""
        for term in self.mixed_terms:
            if term.startswith(("padded_tokens(", "eager(")):
                return _term_args(term.split(">")[0])[0]
        return None

    def with_token_limit(self, limit: int) -> CalibratedStepTime:
        """The same fit for an engine whose mixed-step graphs reach `limit` tokens, not the
        calibration's: its `padded_tokens(...)` and `eager(...)` terms read the new limit."""
        def renamed(term: str) -> str:
            name, sep, knot = term.partition(">")
            if name.startswith(("padded_tokens(", "eager(")):
                name = f"{name[:name.index('(')]}({limit})"
            return name + sep + knot
        return replace(self, mixed_terms=tuple(renamed(t) for t in self.mixed_terms))

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
        decode = self._part(features, self.decode_terms, self.decode_coef, self.host_decode)
        mixed = self._part(features, self.mixed_terms, self.mixed_coef, self.host_mixed)
        return np.where(features.is_decode_only, decode, mixed)

    def _part(self, f: StepFeatures, terms: tuple[str, ...], coef: np.ndarray,
              host: LinearTerms | None) -> np.ndarray:
        device = LinearTerms(terms, coef).predict(f, self.buckets)
        return device if host is None else device + host.predict(f, None)


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
    from scipy.optimize import nnls

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
    def of(cls, model: ModelConfig, dtype: str) -> ModelWork:
        embed = model.vocab_size * model.hidden_size
        body = model.num_parameters() - embed * (1 if model.tie_word_embeddings else 2)
        attn = 4.0 * model.num_hidden_layers * model.num_attention_heads * model.head_dim
        return cls(float(body), float(embed), attn, float((body + embed) * DTYPE_BYTES[dtype]),
                   float(model.kv_bytes_per_token(dtype)))


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
    kind: str = "roofline"
    work: ModelWork = field(init=False)

    def __post_init__(self) -> None:
        self.work = ModelWork.of(self.model, self.dtype)

    def predict(self, features: StepFeatures, first_step: int = 0) -> np.ndarray:
        work = roofline_work(self.work, features)
        compute = work.flops / (self.peak_flops * self.compute_efficiency)
        memory = work.bytes / (self.bandwidth * self.bandwidth_efficiency)
        return np.maximum(compute, memory) + self.overhead_s


# -- replayed -------------------------------------------------------------------------------

@dataclass
class ReplayedStepTime:
    """Durations measured by the engine, by step index: isolates the scheduler from timing."""

    durations: np.ndarray
    source: str = "replayed engine step times"
    kind: str = "replayed"

    def predict(self, features: StepFeatures, first_step: int = 0) -> np.ndarray:
        end = first_step + len(features)
        if end > len(self.durations):
            raise IndexError(f"no measured duration for step {len(self.durations)}: the sim "
                             "took more steps than the engine did")
        return self.durations[first_step:end]
