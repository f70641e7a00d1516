"""Validation on load: every bad input names the field, the row and the allowed range."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.workloads.helpers import good_frame
from workloads.errors import TraceError, TraceWarning
from workloads.trace_io import read_trace
from workloads.validate import make_trace


def _bad(column: str, row: int, value: object) -> pd.DataFrame:
    df = good_frame().astype(object)
    df.loc[row, column] = value
    return df


BAD_CASES = {
    "non-integer prompt_len": ("prompt_len", 3, 12.5, "an integer in [1,"),
    "text output_len": ("output_len", 2, "ten", "an integer in [1,"),
    "zero prompt_len": ("prompt_len", 4, 0, "an integer in [1,"),
    "negative output_len": ("output_len", 1, -3, "an integer in [1,"),
    "negative arrival": ("arrival_s", 5, -0.25, "a finite number >= 0"),
    "NaN arrival": ("arrival_s", 2, float("nan"), "a finite number >= 0"),
    "infinite arrival": ("arrival_s", 3, float("inf"), "a finite number >= 0"),
    "missing output_len": ("output_len", 4, None, "an integer in [1,"),
    "negative request_id": ("request_id", 0, -1, "an integer in [0,"),
}


@pytest.mark.parametrize("case", BAD_CASES, ids=list(BAD_CASES))
def test_bad_value_names_row_field_and_range(case: str) -> None:
    column, row, value, allowed = BAD_CASES[case]
    with pytest.raises(TraceError) as info:
        make_trace(_bad(column, row, value))
    assert (info.value.field, info.value.row) == (column, row)
    assert f"row {row}: {column}=" in str(info.value)
    assert allowed in str(info.value)


def test_missing_column_is_named() -> None:
    with pytest.raises(TraceError, match=r"row 0: prompt_len='<missing column>'") as info:
        make_trace(good_frame().drop(columns="prompt_len"))
    assert info.value.field == "prompt_len"
    assert "request_id, arrival_s, prompt_len, output_len" in str(info.value)


def test_duplicate_id_names_both_rows() -> None:
    df = good_frame()
    df.loc[4, "request_id"] = df.loc[1, "request_id"]
    with pytest.raises(TraceError, match=r"row 4: request_id=11 .*\(row 1 has the same") as info:
        make_trace(df)
    assert (info.value.field, info.value.row) == ("request_id", 4)


def test_unsorted_arrivals_are_sorted_with_a_warning() -> None:
    df = good_frame().iloc[[0, 3, 1, 2, 5, 4]]
    with pytest.warns(TraceWarning, match=r"row 2: arrival_s=0\.5 < 1\.5 of row 1"):
        trace = make_trace(df)
    assert trace.df["arrival_s"].is_monotonic_increasing
    assert trace.df["request_id"].tolist() == [10, 11, 12, 13, 14, 15]


def test_sorted_input_loads_without_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trace = make_trace(good_frame())
    assert trace.df["request_id"].dtype == np.int64
    assert trace.df["arrival_s"].dtype == np.float64


def test_unknown_columns_warn_and_are_dropped() -> None:
    with pytest.warns(TraceWarning, match="ignoring unknown columns: user"):
        trace = make_trace(good_frame().assign(user="x"))
    assert "user" not in trace.df


def test_empty_trace_is_rejected() -> None:
    with pytest.raises(TraceError, match="at least one request"):
        make_trace(good_frame().iloc[:0])


def test_row_numbers_refer_to_the_file_even_when_unsorted(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("request_id,arrival_s,prompt_len,output_len\n"
                    "0,5.0,10,2\n1,1.0,10,2\n2,2.0,10,2\n1,3.0,10,2\n")
    with pytest.raises(TraceError, match="row 3: request_id=1"):
        read_trace(path)


@pytest.mark.parametrize("cell,row", [("abc", 1), ("", 2), ("7.5", 0)])
def test_csv_bad_cells_report_their_row(tmp_path: Path, cell: str, row: int) -> None:
    lines = ["request_id,arrival_s,prompt_len,output_len"] + [
        f"{i},{i}.0,{cell if i == row else 10},2" for i in range(3)]
    path = tmp_path / "t.csv"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(TraceError) as info:
        read_trace(path)
    assert (info.value.field, info.value.row) == ("prompt_len", row)


def test_jsonl_row_missing_a_key(tmp_path: Path) -> None:
    rows = [{"request_id": i, "arrival_s": float(i), "prompt_len": 10, "output_len": 2}
            for i in range(4)]
    del rows[2]["output_len"]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(TraceError, match="row 2: output_len=None"):
        read_trace(path)


def test_jsonl_line_that_is_not_json(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text('{"request_id": 0, "arrival_s": 0, "prompt_len": 3, "output_len": 1}\n{oops\n')
    with pytest.raises(TraceError, match="row 1: <line>="):
        read_trace(path)


def test_large_ids_stay_exact_through_csv(tmp_path: Path) -> None:
    big = (1 << 55) + 3  # not representable as float64
    path = tmp_path / "t.csv"
    path.write_text(f"request_id,arrival_s,prompt_len,output_len\n{big},0.0,4,1\n")
    assert read_trace(path).df["request_id"].iloc[0] == big


def _with_prefix(groups: list[object], lens: list[object]) -> pd.DataFrame:
    df = good_frame(len(groups))
    df["prefix_group"] = pd.array(groups, dtype="Int64")
    df["prefix_len"] = pd.array(lens, dtype="Int64")
    return df


def test_prefix_len_must_leave_a_token_after_it() -> None:
    with pytest.raises(TraceError, match=r"row 1: prefix_len=40 .* \[1, prompt_len - 1 = 39\]"):
        make_trace(_with_prefix([0, 0], [20, 40]))


def test_prefix_len_is_constant_within_a_group() -> None:
    with pytest.raises(TraceError, match="row 2: prefix_len=21 .* prefix_group 1 "):
        make_trace(_with_prefix([1, 0, 1], [20, 30, 21]))


def test_prefix_group_needs_its_length() -> None:
    with pytest.raises(TraceError, match="row 1: prefix_len=.* set exactly when prefix_group"):
        make_trace(_with_prefix([0, 2], [20, None]))


def test_prefix_columns_come_as_a_pair() -> None:
    with pytest.raises(TraceError, match="row 0: prefix_len='<missing column>'"):
        make_trace(good_frame().assign(prefix_group=1))


def _chat(turns: list[int], prompts: list[int], arrivals: list[float]) -> pd.DataFrame:
    n = len(turns)
    return pd.DataFrame({"request_id": range(n), "arrival_s": arrivals, "prompt_len": prompts,
                         "output_len": [5] * n, "conversation_id": [3] * n, "turn": turns})


def test_conversation_turns_have_no_gaps() -> None:
    with pytest.raises(TraceError, match=r"row 2: turn=3 .* without gaps"):
        make_trace(_chat([0, 1, 3], [10, 20, 30], [0.0, 1.0, 2.0]))


def test_conversation_prompt_must_contain_its_history() -> None:
    with pytest.raises(TraceError, match=r"row 1: prompt_len=15 .* previous turn's prompt_len"):
        make_trace(_chat([0, 1], [10, 15], [0.0, 1.0]))


def test_conversation_turn_cannot_arrive_before_the_previous_turn() -> None:
    with pytest.raises(TraceError, match="row 0: arrival_s=2.0 .* previous turn's arrival_s"):
        make_trace(_chat([1, 0], [40, 10], [2.0, 3.0]))


def test_parquet_with_fractional_lengths_is_rejected(tmp_path: Path) -> None:
    df = good_frame().astype({"output_len": float})
    df.loc[3, "output_len"] = 2.5
    path = tmp_path / "t.parquet"
    df.to_parquet(path)
    with pytest.raises(TraceError, match=r"row 3: output_len=2\.5 is invalid"):
        read_trace(path)
