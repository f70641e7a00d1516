"""Azure and generic CSV import: known facts, windows, rate scaling, capping, zero lengths."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from workloads.errors import SpecError, TraceError, TraceImportWarning
from workloads.importers import import_azure, import_csv
from workloads.schema import Trace


def test_azure_conv_known_facts(azure_trace: Trace) -> None:
    df = azure_trace.df
    assert len(df) == 19_366
    assert df["prompt_len"].median() == 1020
    assert np.percentile(df["prompt_len"], 99) == 4142 and df["prompt_len"].max() == 14_050
    assert df["output_len"].median() == 129 and df["output_len"].max() == 1000
    assert df["arrival_s"].iloc[0] == 0.0
    assert df["arrival_s"].iloc[-1] == pytest.approx(3501.72, abs=0.01)  # 18:15:46 -> 19:14:08
    assert df["request_id"].tolist() == list(range(19_366))


def test_full_import_changes_nothing_and_warns_nothing(azure_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, report = import_azure(azure_path)
    assert report.changed == 0 and report.kept == report.rows_read == 19_366


def test_window_and_rate_scale(azure_path: Path, azure_trace: Trace) -> None:
    trace, report = import_azure(azure_path, start_s=600, duration_s=300, rate_scale=2.0)
    full = azure_trace.df.set_index("request_id")
    inside = full[(full["arrival_s"] >= 600) & (full["arrival_s"] < 900)]
    assert trace.df["request_id"].tolist() == inside.index.tolist()
    assert np.allclose(trace.df["arrival_s"], (inside["arrival_s"] - 600) / 2.0)
    assert trace.df["arrival_s"].max() < 150
    assert report.outside_window == 19_366 - len(inside) and report.kept == len(inside)
    assert trace.meta["source"]["rate_scale"] == 2.0


@pytest.mark.parametrize("policy", ["cap", "drop"])
def test_max_model_len_is_enforced_and_counted(azure_path: Path, azure_trace: Trace,
                                               policy: str) -> None:
    df = azure_trace.df
    over = int(((df["prompt_len"] + df["output_len"]) > 2048).sum())
    with pytest.warns(TraceImportWarning, match=f"over max_model_len {over} \\({policy}"):
        trace, report = import_azure(azure_path, max_model_len=2048, too_long=policy)
    assert report.too_long == over > 0
    assert ((trace.df["prompt_len"] + trace.df["output_len"]) <= 2048).all()
    if policy == "drop":
        assert len(trace) == 19_366 - over and report.dropped == over
    else:
        assert len(trace) == 19_366
        assert report.capped_prompt == int((df["prompt_len"] >= 2048).sum())
        assert report.capped_output == over
        assert trace.meta["source"]["report"]["capped_output"] == over


def _small_csv(tmp_path: Path, rows: list[str]) -> Path:
    path = tmp_path / "azure.csv"
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "\n".join(rows) + "\n")
    return path


ROWS = ["2023-11-16 18:00:00.0000000,100,0", "2023-11-16 18:00:01.5000000,0,20",
        "2023-11-16 18:00:02.0000000,50,10", "2023-11-16 18:00:03.2500000,0,0"]


def test_zero_lengths_are_clamped_and_counted(tmp_path: Path) -> None:
    with pytest.warns(TraceImportWarning, match=r"zero prompt 2 / zero output 2 \(clamped"):
        trace, report = import_azure(_small_csv(tmp_path, ROWS))
    assert trace.df["prompt_len"].tolist() == [100, 1, 50, 1]
    assert trace.df["output_len"].tolist() == [1, 20, 10, 1]
    assert trace.df["arrival_s"].tolist() == [0.0, 1.5, 2.0, 3.25]
    assert (report.zero_prompt, report.zero_output, report.changed) == (2, 2, 4)


def test_zero_lengths_can_be_dropped(tmp_path: Path) -> None:
    with pytest.warns(TraceImportWarning, match="3 dropped"):
        trace, report = import_azure(_small_csv(tmp_path, ROWS), zero_lengths="drop")
    assert trace.df["request_id"].tolist() == [2]
    assert report.dropped == 3


@pytest.mark.parametrize("row,field", [("2023-11-16 18:00:04.0,-5,3", "ContextTokens"),
                                       ("2023-11-16 18:00:04.0,5,2.5", "GeneratedTokens"),
                                       ("yesterday,5,3", "TIMESTAMP")])
def test_bad_source_rows_are_named(tmp_path: Path, row: str, field: str) -> None:
    with pytest.raises(TraceError) as info:
        import_azure(_small_csv(tmp_path, ROWS[:2] + [row]))
    assert (info.value.field, info.value.row) == (field, 2)


def test_empty_window_is_reported(azure_path: Path) -> None:
    with pytest.raises(SpecError, match="start_s=5000 .* spans 3501"):
        import_azure(azure_path, start_s=5000)


@pytest.mark.parametrize("kwargs,field", [({"rate_scale": 0}, "rate_scale"),
                                          ({"duration_s": -1}, "duration_s"),
                                          ({"max_model_len": 1}, "max_model_len"),
                                          ({"too_long": "trim"}, "too_long"),
                                          ({"zero_lengths": "keep"}, "zero_lengths")])
def test_bad_options_are_named(tmp_path: Path, kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(SpecError) as info:
        import_azure(_small_csv(tmp_path, ROWS[2:3]), **kwargs)
    assert info.value.field == field


def test_generic_csv_with_column_mapping(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    path.write_text("t_ms,in,out,sys,sys_len\n2000,30,5,1,10\n500,40,6,,\n1250,25,7,1,10\n")
    columns = {"arrival_s": "t_ms", "prompt_len": "in", "output_len": "out",
               "prefix_group": "sys", "prefix_len": "sys_len"}
    with pytest.warns(UserWarning, match="not sorted"):
        trace, _ = import_csv(path, columns=columns, time_unit="ms")
    assert trace.df["arrival_s"].tolist() == [0.0, 0.75, 1.5]
    assert trace.df["request_id"].tolist() == [1, 2, 0]
    assert trace.df["prefix_group"].tolist()[1:] == [1, 1]
    with pytest.raises(TraceError, match="row 0: tokens_in='<missing column>'"):
        import_csv(path, columns={**columns, "prompt_len": "tokens_in"})
