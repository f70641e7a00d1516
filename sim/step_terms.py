"""The terms of the calibrated step-time model: their names (as profiles store them) and the
typed objects those names compile to, once per run.

A term is a function of a step's composition. Each compiled term computes its `column` over
many steps (numpy, for calibration fits and runs of decode steps) and its `value` for one step
(plain Python, for the simulator's single steps), with the same float operations in the same
order, so both give bit-identical results. A name is `base`, `base>k` (the hinge
max(0, base - k)) or `base(a,b,...)` (its arguments in its name).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, fields
from functools import cache

import numpy as np

from engine.core.features import StepFeatures, StepRow
from engine.core.shapes import DecodeSplit, decode_batch, step_rows, token_buckets

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
GATHER_KNOT = 8192  # keys per prefill chunk: past it, gathering costs more than linearly


# -- names ------------------------------------------------------------------------------------

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
    top = decode_batch(max(max_batch, 1), buckets)
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


def split_term(split: DecodeSplit, name: str = "decode_share") -> str:
    """A term of the split rule, the rule in its name: `decode_share`, the longest decode's
    share of its splits; `decode_combine`, 1 where the step's decodes (unpadded: an eager
    step) are split."""
    return (f"{name}({split.num_kv_heads},{split.target_programs},{split.max_splits},"
            f"{split.min_share},{split.block_n})")


def _ctx_hinges(max_ctx: int) -> list[str]:
    return [f"decode_ctx>{k}" for k in CTX_KNOTS if 2 * k < max_ctx]


def term_args(term: str) -> list[int]:
    """The integers in a term's name: `name(a,b,...)` -> [a, b, ...]."""
    return [int(x) for x in term[term.index("(") + 1:-1].split(",")]


def renamed_token_limit(term: str, limit: int) -> str:
    """`term` reading the mixed-step graphs' token limit `limit` (padded_tokens, eager)."""
    name, sep, knot = term.partition(">")
    if name.startswith(("padded_tokens(", "eager(")):
        name = f"{name[:name.index('(')]}({limit})"
    return name + sep + knot


# -- shapes the engine runs (engine.core.shapes' rules, over many steps) -------------------------

def padded_batch(decode_seqs: np.ndarray, buckets: list[int] | None) -> np.ndarray:
    """The batch each decode step's graph replays (`decode_batch`)."""
    return _per_value(decode_seqs, lambda n: decode_batch(n, buckets))


def padded_tokens(num_tokens: np.ndarray, limit: int, cap: int = 0) -> np.ndarray:
    """The rows each mixed step runs with mixed-step graphs up to `limit` tokens
    (`step_rows`, as ModelRunner.eager_rows pads them)."""
    return _per_value(num_tokens, lambda n: step_rows(n, _token_edges(limit), cap))


def _per_value(values: np.ndarray, rule: Callable[[int], int]) -> np.ndarray:
    """`rule` of every value, computed once per distinct value."""
    distinct, inverse = np.unique(np.asarray(values, dtype=np.int64), return_inverse=True)
    return np.array([rule(int(v)) for v in distinct], dtype=np.int64)[inverse.reshape(-1)]


@cache
def _token_edges(limit: int) -> list[int]:
    return token_buckets(limit)


# -- compiled terms ---------------------------------------------------------------------------

class Term:
    """A compiled term. `batch_only`: in a decode-only step it depends on the batch alone
    (not on the context), so a run of decode steps has one value of it."""

    batch_only = False

    def column(self, f: StepFeatures) -> np.ndarray:
        raise NotImplementedError

    def value(self, s: StepRow) -> float:
        raise NotImplementedError


class Const(Term):
    batch_only = True

    def column(self, f: StepFeatures) -> np.ndarray:
        return np.ones(len(f))

    def value(self, s: StepRow) -> float:
        return 1.0


@dataclass(frozen=True)
class Feature(Term):
    """A StepFeatures column as it is; an EXTRA_FEATURES column the steps lack is estimated
    from the core ones (`estimate`)."""

    name: str

    @property
    def batch_only(self) -> bool:  # type: ignore[override]
        return self.name in ("decode_seqs", "num_seqs")

    def column(self, f: StepFeatures) -> np.ndarray:
        """As float64, made once per features object (several terms read a column)."""
        made = f.__dict__.setdefault("_float_columns", {})
        col = made.get(self.name)
        if col is None:
            raw = getattr(f, self.name)
            col = made[self.name] = estimate(f, self.name) if raw is None \
                else raw.astype(np.float64)
        return col

    def value(self, s: StepRow) -> float:
        v = getattr(s, self.name)
        return estimate_one(s, self.name) if v is None else float(v)


def estimate(f: StepFeatures, name: str) -> np.ndarray:
    """An EXTRA_FEATURES column the steps lack (built from the five core features, as a
    decode run without its longest context is): the longest decode as the mean one (a
    uniform batch), gathered keys as one chunk's (its prefix from the attention pairs), no
    re-read prefix keys."""
    if name == "decode_max_ctx":
        return np.ceil(f.decode_ctx / np.maximum(f.decode_seqs, 1))
    if name == "decode_shared":
        return np.zeros(len(f))
    q = np.maximum(f.prefill_tokens, 1).astype(np.float64)
    prefix = np.maximum(f.prefill_attn / q - (q + 1) / 2, 0.0)
    return np.where(prefix >= 0.5, f.prefill_tokens + np.rint(prefix), 0.0)


def estimate_one(s: StepRow, name: str) -> float:
    """`estimate` of one step."""
    if name == "decode_max_ctx":
        return float(math.ceil(s.decode_ctx / max(s.decode_seqs, 1)))
    if name == "decode_shared":
        return 0.0
    q = float(max(s.prefill_tokens, 1))
    prefix = max(s.prefill_attn / q - (q + 1) / 2, 0.0)
    return float(s.prefill_tokens + round(prefix)) if prefix >= 0.5 else 0.0


# The feature terms other terms read (made once: a frozen dataclass costs a microsecond).
DECODE_CTX, DECODE_SHARED = Feature("decode_ctx"), Feature("decode_shared")
DECODE_MAX_CTX, PREFILL_GATHER = Feature("decode_max_ctx"), Feature("prefill_gather")


class NumTokens(Term):
    def column(self, f: StepFeatures) -> np.ndarray:
        return f.num_tokens.astype(np.float64)

    def value(self, s: StepRow) -> float:
        return float(s.prefill_tokens + s.decode_seqs)


class MeanCtx(Term):
    def column(self, f: StepFeatures) -> np.ndarray:
        return f.decode_ctx / np.maximum(f.decode_seqs, 1).astype(np.float64)

    def value(self, s: StepRow) -> float:
        return s.decode_ctx / float(max(s.decode_seqs, 1))


class PrefillSeqs(Term):
    def column(self, f: StepFeatures) -> np.ndarray:
        return (f.num_seqs - f.decode_seqs).astype(np.float64)

    def value(self, s: StepRow) -> float:
        return float(s.num_seqs - s.decode_seqs)


class DecodeUniqueCtx(Term):
    """Keys the decodes read from HBM: all of them but the prefix keys another re-reads."""

    def column(self, f: StepFeatures) -> np.ndarray:
        return DECODE_CTX.column(f) - DECODE_SHARED.column(f)

    def value(self, s: StepRow) -> float:
        return float(s.decode_ctx - DECODE_SHARED.value(s))


class GatherMean(Term):
    """Gathered prefix keys per prefilling sequence."""

    def column(self, f: StepFeatures) -> np.ndarray:
        seqs = np.maximum(f.num_seqs - f.decode_seqs, 1)
        return PREFILL_GATHER.column(f) / seqs

    def value(self, s: StepRow) -> float:
        return PREFILL_GATHER.value(s) / max(s.num_seqs - s.decode_seqs, 1)


@dataclass(frozen=True)
class PaddedBatch(Term):
    buckets: tuple[int, ...] | None
    batch_only = True

    def column(self, f: StepFeatures) -> np.ndarray:
        if f.uniform_batch is not None:
            return np.full(len(f), float(decode_batch(f.uniform_batch, self._buckets)))
        return padded_batch(f.decode_seqs, self._buckets).astype(np.float64)

    def value(self, s: StepRow) -> float:
        return float(decode_batch(s.decode_seqs, self._buckets))

    @property
    def _buckets(self) -> list[int] | None:
        return list(self.buckets) if self.buckets else None


@dataclass(frozen=True)
class BatchKnot(Term):
    """The hat function of the padded batch at knot k between lo and hi."""

    lo: int
    k: int
    hi: int
    batch: PaddedBatch
    batch_only = True

    def column(self, f: StepFeatures) -> np.ndarray:
        lo, k, hi = self.lo, self.k, self.hi
        b = self.batch.column(f)
        rising = np.clip((b - lo) / (k - lo), 0.0, 1.0) if k > lo else np.ones(len(b))
        falling = np.clip((hi - b) / (hi - k), 0.0, 1.0) if hi > k else b / k
        return np.where(b <= k, rising, falling)

    def value(self, s: StepRow) -> float:
        lo, k, hi = self.lo, self.k, self.hi
        b = self.batch.value(s)
        if b <= k:
            return min(max((b - lo) / (k - lo), 0.0), 1.0) if k > lo else 1.0
        return min(max((hi - b) / (hi - k), 0.0), 1.0) if hi > k else b / k


@dataclass(frozen=True)
class DecodeShare(Term):
    """Keys of the busiest decode program: the longest context's share of the splits the
    kernel makes for the batch it runs (the graph bucket)."""

    split: DecodeSplit
    batch: PaddedBatch
    _splits: dict[int, int] = field(default_factory=dict, compare=False, repr=False)

    def column(self, f: StepFeatures) -> np.ndarray:
        longest = f.decode_max_ctx
        if longest is None:
            longest = DECODE_MAX_CTX.column(f).astype(np.int64)
        if f.uniform_batch is not None:
            splits = self._splits.get(f.uniform_batch)
            if splits is None:  # the same few batch sizes, run after run
                batch = decode_batch(f.uniform_batch, self.batch._buckets)
                splits = self._splits[f.uniform_batch] = self.split.splits(batch)
            return share_staircase(self.split, longest, splits).astype(np.float64)
        batch = self.batch.column(f).astype(np.int64)
        out = np.empty(len(f), dtype=np.int64)
        for b in np.unique(batch).tolist():  # one staircase per batch size
            rows = batch == b
            out[rows] = share_staircase(self.split, longest[rows], self.split.splits(int(b)))
        return out.astype(np.float64)

    def value(self, s: StepRow) -> float:
        longest = int(DECODE_MAX_CTX.value(s))
        return float(self.split.longest_share(longest, int(self.batch.value(s))))


def share_staircase(split: DecodeSplit, longest: np.ndarray, splits: int) -> np.ndarray:
    """`split.longest_share(m, batch)` for every m of `longest` (int64), vectorised, given
    `splits = split.splits(batch)`. ceil(ceil(m / s) / b) = ceil(m / (s b)) for integers."""
    if splits == 1:
        return longest
    quantum = splits * split.block_n
    return np.maximum((longest + (quantum - 1)) // quantum * split.block_n, split.min_share)


@dataclass(frozen=True)
class DecodeCombine(Term):
    """1 where the step's decodes (unpadded: an eager step) are split."""

    split: DecodeSplit
    batch_only = True

    def column(self, f: StepFeatures) -> np.ndarray:
        batches, inverse = np.unique(f.decode_seqs, return_inverse=True)
        split_up = np.array([self._split_up(int(b)) for b in batches], dtype=float)
        return split_up[inverse.reshape(-1)]

    def value(self, s: StepRow) -> float:
        return float(self._split_up(s.decode_seqs))

    def _split_up(self, batch: int) -> bool:
        return batch > 0 and self.split.splits(batch) > 1


@dataclass(frozen=True)
class PaddedTokens(Term):
    """The rows the step runs: its mixed-graph bucket up to `limit` tokens, else padded
    (never past `cap`, the engine's token budget; 0: no cap, as in calibration fits)."""

    limit: int
    cap: int = 0

    def column(self, f: StepFeatures) -> np.ndarray:
        return padded_tokens(f.num_tokens, self.limit, self.cap).astype(np.float64)

    def value(self, s: StepRow) -> float:
        n = s.prefill_tokens + s.decode_seqs
        return float(step_rows(n, _token_edges(self.limit), self.cap))


@dataclass(frozen=True)
class Eager(Term):
    """1 for the mixed steps larger than the graphs' token limit."""

    limit: int

    def column(self, f: StepFeatures) -> np.ndarray:
        return (f.num_tokens > self.limit).astype(np.float64)

    def value(self, s: StepRow) -> float:
        return float(s.prefill_tokens + s.decode_seqs > self.limit)


@dataclass(frozen=True)
class Hinge(Term):
    """max(0, inner - knot)."""

    inner: Term
    knot: float

    @property
    def batch_only(self) -> bool:  # type: ignore[override]
        return self.inner.batch_only

    def column(self, f: StepFeatures) -> np.ndarray:
        return np.maximum(self.inner.column(f) - self.knot, 0.0)

    def value(self, s: StepRow) -> float:
        return max(self.inner.value(s) - self.knot, 0.0)


FEATURE_NAMES = frozenset(f.name for f in fields(StepFeatures))
_PLAIN = {"const": Const, "num_tokens": NumTokens, "mean_ctx": MeanCtx,
          "prefill_seqs": PrefillSeqs, "decode_unique_ctx": DecodeUniqueCtx,
          "gather_mean": GatherMean}
_SPLIT = {"decode_share": DecodeShare, "decode_combine": DecodeCombine}


def compile_term(term: str, buckets: list[int] | None, row_cap: int = 0) -> Term:
    """The typed term a name stands for; an unknown name is an error naming it. `row_cap`:
    the token budget a padded step never exceeds."""
    if ">" in term:
        name, knot = term.split(">")
        return Hinge(compile_term(name, buckets, row_cap), float(knot))
    batch = PaddedBatch(tuple(buckets) if buckets else None)
    base = term.split("(")[0]
    if term in _PLAIN:
        return _PLAIN[term]()
    if term == "padded_batch":
        return batch
    if base == "batch_knot":
        return BatchKnot(*term_args(term), batch)
    if base == "decode_share":
        return DecodeShare(DecodeSplit(*term_args(term)), batch)
    if base == "decode_combine":
        return DecodeCombine(DecodeSplit(*term_args(term)))
    if base == "padded_tokens":
        return PaddedTokens(term_args(term)[0], row_cap)
    if base == "eager":
        return Eager(term_args(term)[0])
    if term not in FEATURE_NAMES:
        raise ValueError(f"step-time term {term!r} is invalid: not a feature of StepFeatures")
    return Feature(term)


def term_column(f: StepFeatures, term: str, buckets: list[int] | None) -> np.ndarray:
    """One column of the design matrix."""
    return compile_term(term, buckets).column(f)


def design_matrix(f: StepFeatures, terms: tuple[str, ...],
                  buckets: list[int] | None) -> np.ndarray:
    return np.stack([term_column(f, t, buckets) for t in terms], axis=1)
