"""The version-3 step features: the longest decode's context and the prefill keys gathered
from the cache, in single steps and in decode runs."""

from __future__ import annotations

import numpy as np

from engine.scheduler import ScheduledSequence, SchedulerOutput
from engine.sequence import SamplingParams, Sequence
from sim.features import DecodeDurations, StepFeatures, decode_run_features, features_of
from sim.step_time import CalibratedStepTime, term_column


def step(items: list[tuple[int, int, bool]]) -> SchedulerOutput:
    """(computed tokens, new tokens, is_decode) per sequence."""
    out = SchedulerOutput()
    for computed, new, decode in items:
        seq = Sequence(list(range(3, 3 + computed + new)), SamplingParams())
        out.scheduled.append(ScheduledSequence(seq, new, computed, True, decode))
    return out


def test_features_of_gives_the_longest_decode_and_the_gathered_keys() -> None:
    f = features_of(step([(99, 1, True), (9, 1, True), (0, 30, False), (64, 16, False)]))
    assert f.decode_ctx[0] == 110 and f.decode_max_ctx[0] == 100
    assert f.prefill_gather[0] == 30 + 80  # every chunk's keys once one has a prefix
    fresh = features_of(step([(0, 30, False), (5, 1, True)]))
    assert fresh.prefill_gather[0] == 0 and fresh.decode_max_ctx[0] == 6


def model() -> CalibratedStepTime:
    return CalibratedStepTime(np.array([1e-3, 1e-6, 1e-5]), np.array([1e-2, 1e-7, 1e-8]),
                              None, "test", decode_terms=("const", "decode_ctx",
                                                          "decode_max_ctx"),
                              mixed_terms=("const", "num_tokens", "prefill_gather"))


def test_decode_runs_with_their_longest_context_match_single_steps() -> None:
    m, memo = model(), DecodeDurations(model().predict)
    direct = m.predict(decode_run_features(4, 4 * 50 + 3, 300, 80))
    assert np.array_equal(memo.run(4, 4 * 50 + 3, 300, 80), direct)
    later = m.predict(decode_run_features(4, 4 * 60 + 3, 20, 90))
    assert np.array_equal(memo.run(4, 4 * 60 + 3, 20, 90), later)
    assert (direct > m.predict(decode_run_features(4, 4 * 50 + 3, 300))).all()


def test_steps_without_the_extra_features_estimate_them() -> None:
    """Built from the five core features (older callers): a uniform batch, one chunk."""
    f = StepFeatures.from_columns(dict(prefill_tokens=[0, 16], prefill_attn=[0, 16 * 64 + 136],
                                       decode_seqs=[4, 0], decode_ctx=[402, 0],
                                       num_seqs=[4, 1]))
    assert f.decode_max_ctx is None
    assert term_column(f, "decode_max_ctx", None)[0] == 101
    assert term_column(f, "prefill_gather", None)[1] == 80
