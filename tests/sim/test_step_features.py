"""The version-3 step features: the longest decode's context and the prefill keys gathered
from the cache, in single steps and in decode runs."""

from __future__ import annotations

import numpy as np

from engine.core.features import StepFeatures, decode_run_features, features_of
from engine.core.scheduler_output import ScheduledSequence, SchedulerOutput
from engine.core.sequence import SamplingParams, Sequence
from sim.step_terms import compile_term, term_column
from sim.step_time import CalibratedStepTime, DecodeRun


def step(items: list[tuple[int, int, bool]]) -> SchedulerOutput:
    """(computed tokens, new tokens, is_decode) per sequence."""
    out = SchedulerOutput()
    for computed, new, decode in items:
        seq = Sequence(list(range(3, 3 + computed + new)), SamplingParams())
        out.scheduled.append(ScheduledSequence(seq, new, computed, True, decode))
    return out


def test_features_of_gives_the_longest_decode_and_the_gathered_keys() -> None:
    f = features_of(step([(99, 1, True), (9, 1, True), (0, 30, False), (64, 16, False)]))
    assert f.decode_ctx == 110 and f.decode_max_ctx == 100
    assert f.prefill_gather == 30 + 80  # every chunk's keys once one has a prefix
    fresh = features_of(step([(0, 30, False), (5, 1, True)]))
    assert fresh.prefill_gather == 0 and fresh.decode_max_ctx == 6


def model() -> CalibratedStepTime:
    return CalibratedStepTime(np.array([1e-3, 1e-6, 1e-5]), np.array([1e-2, 1e-7, 1e-8]),
                              None, "test", decode_terms=("const", "decode_ctx",
                                                          "decode_max_ctx"),
                              mixed_terms=("const", "num_tokens", "prefill_gather"))


def test_decode_runs_with_their_longest_context_match_single_steps() -> None:
    m = model()
    direct = m.predict(decode_run_features(4, 4 * 50 + 3, 300, 80))
    assert np.array_equal(m.decode_run(DecodeRun(4, 4 * 50 + 3, 300, 80)), direct)
    later = m.predict(decode_run_features(4, 4 * 60 + 3, 20, 90))
    assert np.array_equal(m.decode_run(DecodeRun(4, 4 * 60 + 3, 20, 90)), later)
    assert (direct > m.predict(decode_run_features(4, 4 * 50 + 3, 300))).all()


def test_steps_without_the_extra_features_estimate_them() -> None:
    """Built from the five core features (older callers): a uniform batch, one chunk."""
    f = StepFeatures.from_columns(dict(prefill_tokens=[0, 16], prefill_attn=[0, 16 * 64 + 136],
                                       decode_seqs=[4, 0], decode_ctx=[402, 0],
                                       num_seqs=[4, 1]))
    assert f.decode_max_ctx is None
    assert term_column(f, "decode_max_ctx", None)[0] == 101
    assert term_column(f, "prefill_gather", None)[1] == 80


def test_decode_share_is_the_longest_contexts_share_of_the_bucket_splits() -> None:
    """The kernel splits by the batch it runs (the graph bucket), so 5 decodes split as 8."""
    from engine.core.shapes import DecodeSplit
    from sim.step_terms import split_term

    rule = DecodeSplit(num_kv_heads=2, target_programs=64, max_splits=8, min_share=16,
                       block_n=8)
    f = StepFeatures.from_columns(dict(
        prefill_tokens=[0, 0, 0, 0], prefill_attn=[0, 0, 0, 0], decode_seqs=[1, 5, 5, 40],
        decode_ctx=[1000, 1500, 1500, 4000], num_seqs=[1, 5, 5, 40],
        decode_max_ctx=[1000, 700, 60, 300], prefill_gather=[0, 0, 0, 0]))
    share = term_column(f, split_term(rule), [1, 2, 4, 8, 16, 32, 48])
    # 1 -> 8 splits of 125 keys -> 128; 8 -> 4 splits: 175 -> 176, and 60 -> 15 -> 16;
    # a batch of 48 makes 96 programs: no split, the whole 300 keys
    assert share.tolist() == [128, 176, 16, 300]
    assert [rule.splits(b) for b in (1, 8, 48)] == [8, 4, 1]


def test_decode_combine_marks_mixed_steps_whose_own_decodes_are_split() -> None:
    """An eager (mixed) step splits by its real decode count, not a graph bucket: 4 and 16
    decodes make 8 and 32 of 64 programs (split), 40 make 80 (whole); no decodes, nothing to
    combine. The term belongs to the mixed model of a profile that records the split rule."""
    from engine.core.shapes import DecodeSplit
    from sim.step_terms import mixed_terms, split_term

    rule = DecodeSplit(num_kv_heads=2, target_programs=64, max_splits=8, min_share=16,
                       block_n=8)
    f = StepFeatures.from_columns(dict(
        prefill_tokens=[100, 100, 100, 100], prefill_attn=[5050] * 4,
        decode_seqs=[0, 4, 16, 40], decode_ctx=[0, 400, 1600, 4000], num_seqs=[1, 5, 17, 41]))
    term = split_term(rule, "decode_combine")
    assert term == "decode_combine(2,64,8,16,8)"
    assert term_column(f, term, None).tolist() == [0.0, 1.0, 1.0, 0.0]
    assert mixed_terms(8192, split=rule)[-1] == term
    assert not any(t.startswith("decode_combine") for t in mixed_terms(8192))


def test_gather_mean_is_the_gathered_keys_per_prefill_sequence() -> None:
    f = StepFeatures.from_columns(dict(prefill_tokens=[48], prefill_attn=[5000],
                                       decode_seqs=[3], decode_ctx=[300], num_seqs=[5],
                                       decode_max_ctx=[100], prefill_gather=[20000]))
    assert term_column(f, "gather_mean", None)[0] == 10000
    assert term_column(f, "gather_mean>8192", None)[0] == 10000 - 8192


def test_decodes_re_reading_a_cached_prefix_count_it_once() -> None:
    """Three decodes hit the same 32-token prefix (first block hash 7), one hit 16 tokens
    of another chain; the re-reads are 2 x 32 of the first group, none of the second. The
    block tables are gone (freed), as when calibration reads a finished step's plan."""
    out = step([(40, 1, True), (50, 1, True), (60, 1, True), (20, 1, True), (30, 1, True)])
    for item, (first, hit) in zip(out.scheduled, [(7, 32), (7, 32), (7, 32), (9, 16), (3, 0)],
                                  strict=True):
        item.seq.block_hashes = [first, 100 + len(item.seq.token_ids)]
        item.seq.num_cached_tokens = hit
    f = features_of(out)
    assert f.decode_shared == 64
    assert compile_term("decode_unique_ctx", None).value(f) == f.decode_ctx - 64
    m = CalibratedStepTime(np.array([1e-3, 1e-6, 1e-7]), np.array([1e-2]), None, "test",
                           decode_terms=("const", "decode_ctx", "decode_unique_ctx"),
                           mixed_terms=("const",))
    assert m.decode_run(DecodeRun(5, 205, 3, None, 64))[0] < \
        m.decode_run(DecodeRun(5, 205, 3, None, 0))[0]


def test_a_scaled_model_makes_every_step_that_much_longer() -> None:
    m = model()
    runs = decode_run_features(4, 4 * 50 + 3, 300, 80)
    assert np.allclose(m.scaled(1.5).predict(runs), 1.5 * m.predict(runs), rtol=1e-12)
    assert "every step x 1.5" in m.scaled(1.5).source
