"""Deterministic prompt token ids: stable, exact prefix sharing, conversation history."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from workloads.arrivals import Offline, Poisson
from workloads.build import build_trace
from workloads.errors import SpecError
from workloads.lengths import Fixed, Uniform
from workloads.presets import make_preset
from workloads.schema import Trace
from workloads.structure import MultiTurn, SharedPrefix
from workloads.tokens import (
    KIND_ANSWER,
    KIND_BODY,
    KIND_PREFIX,
    PhiloxStream,
    TokenSpec,
    prompt_token_ids,
    segment_tokens,
)
from workloads.tokens_bulk import all_prompt_token_ids


def test_golden_values_pin_the_scheme() -> None:
    # If these change, every stored trace's prompts change: bump the scheme name instead.
    assert segment_tokens(0, KIND_BODY, 5, 0, 8, TokenSpec()).tolist() == \
        [6014, 2196, 17757, 18972, 11786, 30208, 2314, 31253]
    assert segment_tokens(12345, KIND_PREFIX, 3, 0, 5, TokenSpec()).tolist() == \
        [5816, 31480, 16577, 3770, 17527]
    assert segment_tokens(7, KIND_ANSWER, 2, 4, 5, TokenSpec(151936, 0)).tolist() == \
        [55047, 7114, 3350, 43853, 136925]


def test_scheme_matches_an_independent_derivation() -> None:
    seed, kind, key, sub, n, spec = 99, KIND_BODY, 123456, 3, 11, TokenSpec(50000, 7)
    bits = np.random.Philox(key=np.array([seed, (kind << 56) | key], dtype=np.uint64),
                            counter=sub << 64)
    words = [int(w) for w in bits.random_raw((n + 1) // 2)]
    halves = [h for w in words for h in (w & 0xFFFFFFFF, w >> 32)][:n]
    expected = [spec.low + (h * spec.span >> 32) for h in halves]
    assert segment_tokens(seed, kind, key, sub, n, spec).tolist() == expected


def test_reused_stream_equals_a_fresh_one() -> None:
    stream = PhiloxStream(4)
    stream.halves(KIND_BODY, 1, 0, 999)  # leave state behind
    again = stream.halves(KIND_ANSWER, 8, 2, 7)
    assert again.tolist() == PhiloxStream(4).halves(KIND_ANSWER, 8, 2, 7).tolist()


@pytest.fixture(scope="module")
def grouped() -> Trace:
    return build_trace(n=400, arrivals=Poisson(10.0), prompt_lens=Uniform(1, 40),
                       output_lens=Fixed(4), prefix=SharedPrefix(5, 37, 0.5), seed=21)


def test_a_prefix_group_shares_exactly_prefix_len_tokens(grouped: Trace) -> None:
    prompts = all_prompt_token_ids(grouped)
    groups = grouped.column("prefix_group")
    for g in range(5):
        rows = np.flatnonzero(groups == g)
        heads = np.stack([prompts[r][:37] for r in rows])
        after = np.array([prompts[r][37] for r in rows])
        assert (heads == heads[0]).all()
        assert np.unique(after).size == rows.size  # differs right after the prefix
    firsts = [prompts[int(np.flatnonzero(groups == g)[0])][0] for g in range(5)]
    assert len(set(firsts)) == 5  # distinct groups differ at token 0


def test_tokens_stay_in_the_vocabulary_range(grouped: Trace) -> None:
    values = all_prompt_token_ids(grouped, TokenSpec(1200, 1000)).values
    assert values.min() >= 1000 and values.max() <= 1199


def test_tokens_are_uniform_over_the_range() -> None:
    values = segment_tokens(3, KIND_BODY, 1, 0, 200_000, TokenSpec(1200, 1000))
    counts = np.bincount(values - 1000, minlength=200)
    assert counts.size == 200 and counts.min() > 0
    assert stats.chisquare(counts).pvalue > 1e-3


@pytest.fixture(scope="module")
def chat() -> Trace:
    return build_trace(n=120, arrivals=Poisson(1.0), prompt_lens=Uniform(3, 30),
                       output_lens=Uniform(2, 20), prefix=SharedPrefix(2, 16),
                       multi_turn=MultiTurn(Uniform(2, 6), think_time_s=5.0), seed=8)


def test_a_turn_extends_the_previous_prompt_and_its_answer(chat: Trace) -> None:
    prompts = all_prompt_token_ids(chat)
    df = chat.df
    checked = 0
    for conv, rows in df.groupby("conversation_id").groups.items():
        ordered = df.loc[rows].sort_values("turn")
        for prev, row in zip(ordered.index[:-1], ordered.index[1:], strict=True):
            answer = segment_tokens(chat.seed, KIND_ANSWER, int(conv),
                                    int(df.at[prev, "turn"]), int(df.at[prev, "output_len"]),
                                    TokenSpec())
            history = np.concatenate([prompts[prev], answer])
            assert np.array_equal(prompts[row][:history.size], history)
            assert prompts[row].size > history.size
            checked += 1
    assert checked > 50


def test_bulk_equals_per_request(mixed_trace: Trace, chat: Trace) -> None:
    for trace in (mixed_trace, chat):
        bulk = all_prompt_token_ids(trace)
        assert bulk.values.dtype == np.int32
        assert [len(p) for p in bulk] == trace.df["prompt_len"].tolist()
        for row in range(len(trace)):
            assert bulk.row_list(row) == prompt_token_ids(trace, row)


def test_same_seed_same_tokens_other_seed_other_tokens() -> None:
    def tokens(seed: int) -> np.ndarray:
        trace = build_trace(n=50, arrivals=Offline(), prompt_lens=Fixed(64),
                            output_lens=Fixed(1), seed=seed)
        return all_prompt_token_ids(trace).values

    assert np.array_equal(tokens(1), tokens(1))
    not_marked = np.arange(3200) % 64 != 0  # token 0 of each prompt is set from its id
    assert (tokens(1) != tokens(2))[not_marked].mean() > 0.99


def test_explicit_token_ids_are_returned_as_given() -> None:
    trace = make_preset("nanovllm_bench", n=3)
    assert prompt_token_ids(trace, 1) == trace.df["prompt_token_ids"].iloc[1].tolist()
    assert all_prompt_token_ids(trace).to_lists() == \
        [t.tolist() for t in trace.df["prompt_token_ids"]]


def test_token_spec_and_row_are_checked(chat: Trace) -> None:
    with pytest.raises(SpecError, match="tokens.low=500 .* in \\[0, 499\\]"):
        TokenSpec(500, 500)
    with pytest.raises(SpecError, match="row=120 .* in \\[0, 119\\]"):
        prompt_token_ids(chat, 120)


def test_the_request_table_carries_ids_times_tokens_and_outputs(chat: Trace) -> None:
    from workloads.trace_requests import request_table

    table = request_table(chat)
    requests = list(table)
    bulk = all_prompt_token_ids(chat)
    assert [r.request_id for r in requests] == chat.df["request_id"].tolist()
    assert [r.arrival_s for r in requests] == chat.df["arrival_s"].tolist()
    assert [r.output_len for r in requests] == chat.df["output_len"].tolist()
    assert all(type(t) is int for t in requests[5].prompt_token_ids)
    assert requests[7].prompt_token_ids == bulk.row_list(7)
    assert all(table.prompt_of(i).tolist() == bulk.row_list(i) for i in range(len(table)))
    assert table.prompt_len.tolist() == [len(r.prompt_token_ids) for r in requests]
