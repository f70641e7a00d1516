"""How a decode step's fixed cost follows its (padded) batch: free values at knots, or the
older convex hinges."""

from __future__ import annotations

import numpy as np
import pytest

from engine.core.features import StepFeatures
from engine.core.shapes import graph_buckets
from sim.profile import FitData, Profile, ProfileKey, kind_terms
from sim.step_terms import (
    BATCH_KNOTS,
    batch_knot_terms,
    decode_terms,
    design_matrix,
    term_column,
)
from sim.step_time import fit_nonnegative

BUCKETS = graph_buckets(256)


def decodes(batches: np.ndarray, ctx_per_seq: int = 512) -> StepFeatures:
    n = len(batches)
    zeros = np.zeros(n, dtype=np.int64)
    b = np.asarray(batches, dtype=np.int64)
    return StepFeatures(zeros, zeros.copy(), b, b * ctx_per_seq, b.copy(), b * ctx_per_seq,
                        zeros.copy(), zeros.copy())


def test_knots_are_hat_functions_that_sum_to_one() -> None:
    terms = batch_knot_terms(256)
    assert len(terms) == len(BATCH_KNOTS)
    f = decodes(np.arange(1, 257))
    x = design_matrix(f, tuple(terms), None)
    assert np.allclose(x.sum(axis=1), 1.0)
    for term, knot in zip(terms, BATCH_KNOTS, strict=True):
        assert term_column(decodes(np.array([knot])), term, None)[0] == 1.0
    # between two knots, the two neighbours share the weight linearly
    mid = design_matrix(decodes(np.array([40])), tuple(terms), None)[0]
    assert mid[BATCH_KNOTS.index(32)] == pytest.approx(0.5)
    assert mid[BATCH_KNOTS.index(48)] == pytest.approx(0.5)


def test_the_last_knot_extrapolates_in_proportion() -> None:
    last = batch_knot_terms(64)[-1]
    assert last == "batch_knot(48,64,64)"
    assert term_column(decodes(np.array([96])), last, None)[0] == pytest.approx(1.5)


def test_knots_fit_a_cost_that_no_convex_basis_can() -> None:
    """Fixed cost per graph bucket flat from 16 to 48 rows, then rising (what the H100's
    decode GEMMs do), plus attention per key: the knots recover it; the hinges cannot."""
    rng = np.random.default_rng(0)
    batches = rng.choice(np.arange(1, 257), 3000)
    ctx = rng.choice([64, 512, 2048], 3000)
    f = StepFeatures(*(np.zeros(3000, dtype=np.int64),) * 2, batches, batches * ctx,
                     batches.copy())
    padded = term_column(f, "padded_batch", BUCKETS)
    fixed = np.interp(padded, [1, 16, 48, 64, 256], [1.60e-3, 1.70e-3, 1.72e-3, 1.9e-3, 3e-3])
    seconds = fixed + 38e-9 * f.decode_ctx

    def worst(basis: str) -> float:
        terms = decode_terms(BUCKETS, 256, int(f.decode_ctx.max()), basis=basis)
        x = design_matrix(f, terms, BUCKETS)
        return float(np.abs(x @ fit_nonnegative(x, seconds) / seconds - 1).max())

    assert worst("knots") < 0.002
    assert worst("hinges") > 0.01


def test_profiles_name_their_basis_and_older_ones_keep_the_hinges() -> None:
    key = ProfileKey("h", "m", "bfloat16", "torch")
    assert Profile(key, {}).decode_batch_basis == "hinges"
    assert Profile(key, {}, meta={"decode_batch_basis": "knots"}).decode_batch_basis == "knots"
    with pytest.raises(ValueError, match="decode_batch_basis='cubic' is invalid"):
        _ = Profile(key, {}, meta={"decode_batch_basis": "cubic"}).decode_batch_basis


def test_too_few_decode_samples_for_the_knots_fall_back_to_the_hinges() -> None:
    few = decodes(np.array([1, 4, 8, 16, 16]))
    data = FitData(few, np.full(5, 2e-3), np.full(5, 2e-3), np.array(["synthetic"] * 5))
    d_terms, _ = kind_terms(data, data.kind("mixed"), None, basis="knots")
    assert d_terms[:2] == ("const", "padded_batch")
    many = decodes(np.repeat([1, 4, 8, 16], 20))
    data = FitData(many, np.full(80, 2e-3), np.full(80, 2e-3), np.array(["synthetic"] * 80))
    d_terms, _ = kind_terms(data, data.kind("mixed"), None, basis="knots")
    assert d_terms[:4] == ("batch_knot(1,1,4)", "batch_knot(1,4,8)", "batch_knot(4,8,16)",
                           "batch_knot(8,16,16)")
