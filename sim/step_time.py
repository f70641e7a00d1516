"""Step-time models: predict a step's duration from its composition.

Two implementations behind one interface (`StepTimeModel.predict`):
- `CalibratedStepTime`: a non-negative linear fit to steps measured on the real engine.
- `RooflineStepTime`: compute and HBM-traffic bounds from the hardware catalog.
Both are vectorised over steps; every prediction states `kind` and `source`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from engine.config import DTYPE_BYTES, ModelConfig
from sim.features import StepFeatures


class StepTimeModel(Protocol):
    kind: str
    source: str

    def predict(self, features: StepFeatures, first_step: int) -> np.ndarray:
        """Seconds for each step; `first_step` is the index of the first one."""
        ...


def graph_buckets(max_num_seqs: int) -> list[int]:
    """CUDA-graph batch sizes captured for decode: 1, 2, 4, 8, then every 16."""
    small = [b for b in (1, 2, 4, 8) if b < max_num_seqs]
    return small + list(range(16, max_num_seqs + 16, 16))


def padded_batch(decode_seqs: np.ndarray, buckets: list[int] | None) -> np.ndarray:
    """Batch size the graph replays: the smallest bucket that holds the decodes."""
    if not buckets:
        return decode_seqs
    edges = np.asarray(buckets)
    idx = np.minimum(np.searchsorted(edges, decode_seqs), len(edges) - 1)
    padded = edges[idx]
    return np.where(decode_seqs <= edges[-1], padded, decode_seqs)


# -- calibrated -------------------------------------------------------------------------------

DECODE_TERMS = ("const", "padded_batch", "decode_ctx")
MIXED_TERMS = ("const", "prefill_tokens", "prefill_attn", "decode_seqs", "decode_ctx",
               "num_seqs")


def design_matrix(f: StepFeatures, terms: tuple[str, ...],
                  buckets: list[int] | None) -> np.ndarray:
    cols = {
        "const": np.ones(len(f)),
        "padded_batch": padded_batch(f.decode_seqs, buckets).astype(np.float64),
    }
    return np.stack([cols[t] if t in cols else getattr(f, t).astype(np.float64)
                     for t in terms], axis=1)


@dataclass
class CalibratedStepTime:
    """t = decode_coef . [1, padded batch, context] on decode-only (graph) steps,
    t = mixed_coef . [1, prefill tokens, prefill attention, decodes, context, seqs] otherwise.
    """

    decode_coef: np.ndarray
    mixed_coef: np.ndarray
    buckets: list[int] | None
    source: str
    kind: str = "calibrated"

    def predict(self, features: StepFeatures, first_step: int = 0) -> np.ndarray:
        decode = design_matrix(features, DECODE_TERMS, self.buckets) @ self.decode_coef
        mixed = design_matrix(features, MIXED_TERMS, None) @ self.mixed_coef
        return np.where(features.is_decode_only, decode, mixed)


def fit_nonnegative(x: np.ndarray, seconds: np.ndarray) -> np.ndarray:
    """Non-negative least squares on relative error (rows weighted by 1 / t)."""
    from scipy.optimize import nnls

    w = 1.0 / np.maximum(seconds, 1e-9)
    coef, _ = nnls(x * w[:, None], seconds * w)
    return coef


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
