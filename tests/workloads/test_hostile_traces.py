"""Hostile trace files: each bad input ends in one TraceError line naming the file (and the row,
the column and the allowed range where a row is at fault), checked before any work that a value
could size. docs/reliability.md lists these cases."""

from __future__ import annotations

import io
import json
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from workloads.bounds import LengthBounds
from workloads.errors import SpecError, TraceError, TraceWarning
from workloads.importers import import_azure
from workloads.presets import make_preset
from workloads.schema import MAX_LEN
from workloads.trace_io import read_trace, write_trace

HEADER = "request_id,arrival_s,prompt_len,output_len\n"
AZURE_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"
GOOD_ROWS = "0,0.0,10,2\n1,0.5,20,3\n"


def write(path: Path, data: str | bytes) -> Path:
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data, encoding="utf-8")
    return path


def error_of(reader, path: Path, **kwargs) -> TraceError:
    with pytest.raises(TraceError) as info:
        reader(path, **kwargs)
    text = str(info.value)
    assert "\n" not in text and text.startswith(f"{path}: "), text
    return info.value


def parquet_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


# -- lengths are bounded before anything is built ---------------------------------------------

@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_huge_prompt_len_names_file_row_column_and_range(tmp_path: Path, fmt: str) -> None:
    df = pd.DataFrame({"request_id": [0, 1, 2], "arrival_s": [0.0, 1.0, 2.0],
                       "prompt_len": [10, 20, 10**9], "output_len": [2, 2, 2]})
    path = tmp_path / f"t.{fmt}"
    if fmt == "csv":
        df.to_csv(path, index=False)
    elif fmt == "jsonl":
        path.write_text(df.to_json(orient="records", lines=True))
    else:
        df.to_parquet(path, index=False)
    err = error_of(read_trace, path)
    assert (err.field, err.row, err.value) == ("prompt_len", 2, 10**9)
    assert f"must be an integer in [1, {MAX_LEN}]" in str(err) and "too_long='keep'" in str(err)


def test_huge_prompt_len_in_an_azure_csv_names_its_column(tmp_path: Path) -> None:
    path = write(tmp_path / "az.csv", AZURE_HEADER + "2023-11-16 18:00:00,5,3\n"
                 "2023-11-16 18:00:01,1000000000,3\n")
    err = error_of(import_azure, path)
    assert (err.field, err.row) == ("ContextTokens", 1)
    assert f"[1, {MAX_LEN}]" in str(err)


def test_max_model_len_bounds_prompt_then_output(tmp_path: Path) -> None:
    path = write(tmp_path / "t.csv", HEADER + "0,0,10,2\n1,1,5000,2\n")
    err = error_of(read_trace, path, max_model_len=4096)
    assert (err.field, err.row) == ("prompt_len", 1) and "[1, 4095]" in str(err)
    write(path, HEADER + "0,0,10,2\n1,1,4000,200\n")
    err = error_of(read_trace, path, max_model_len=4096)
    assert (err.field, err.row) == ("output_len", 1)
    assert "[1, 96] (max_model_len=4096 - prompt_len)" in str(err)


def test_too_long_keep_keeps_the_row_with_one_warning(tmp_path: Path) -> None:
    path = write(tmp_path / "t.csv", HEADER + "0,0,10,2\n1,1,1000000000,2\n2,2,5000,9\n")
    with pytest.warns(TraceWarning, match=r"t.csv: requests longer than max_model_len=4096: 2"):
        trace = read_trace(path, max_model_len=4096, too_long="keep")
    assert trace.df["prompt_len"].tolist() == [10, 10**9, 5000]


def test_azure_policies_over_max_model_len(tmp_path: Path) -> None:
    path = write(tmp_path / "az.csv", AZURE_HEADER + "2023-11-16 18:00:00,5,3\n"
                 "2023-11-16 18:00:01,5000,3\n")
    err = error_of(import_azure, path, max_model_len=4096, too_long="error")
    assert (err.field, err.row) == ("ContextTokens", 1)
    with pytest.warns(TraceWarning, match="requests longer than max_model_len=4096: 1"):
        kept, report = import_azure(path, max_model_len=4096, too_long="keep")
    assert kept.df["prompt_len"].tolist() == [5, 5000] and report.too_long == 1


def test_a_kept_huge_prompt_is_rejected_by_the_simulator_in_bounded_memory(
        tmp_path: Path) -> None:
    from engine.core.config import EngineConfig
    from sim.twin import setup_twin, simulate
    from workloads.trace_requests import model_requests

    path = write(tmp_path / "t.csv", HEADER + "0,0,10,2\n1,0.1,1000000000,2\n2,0.2,30,4\n")
    tracemalloc.start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TraceWarning)
            trace = read_trace(path, too_long="keep")
        setup = setup_twin("qwen3_0_6b", "h100_80gb", EngineConfig(max_model_len=4096))
        run = simulate(setup, model_requests(trace, setup.model.vocab_size))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    reqs = run.requests.set_index("request_id")
    assert bool(reqs.loc[1, "rejected"]) and "longer than max_model_len" in \
        reqs.loc[1, "finish_reason"]
    assert not reqs.loc[[0, 2], "rejected"].any()
    assert peak < 64 << 20  # nothing sized by the 1e9 tokens (4 GB as int32 ids)


def test_reading_and_describing_never_allocate_by_length(tmp_path: Path) -> None:
    from workloads.describe import describe

    path = write(tmp_path / "t.csv", HEADER + "".join(
        f"{i},{i * 0.1},{2_000_000_000 if i % 3 else 16},{2_000_000_000}\n" for i in range(30)))
    tracemalloc.start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TraceWarning)
            trace = read_trace(path, too_long="keep")
        summary = describe(trace, kv_bytes_per_token=114_688)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert summary.prompt_len["max"] == 2e9 and summary.cacheable_prompt_tokens == 0
    assert peak < 16 << 20


def test_describe_builds_no_token_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    import workloads.tokens_bulk as bulk
    from workloads.describe import describe

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("all_prompt_token_ids on a default path")

    monkeypatch.setattr(bulk, "all_prompt_token_ids", refuse)
    for name in ("shared_prefix", "multi_turn", "nanovllm_bench"):
        describe(make_preset(name, n=50))


def test_bounds_options_are_checked() -> None:
    with pytest.raises(SpecError, match="too_long='trim'"):
        LengthBounds(too_long="trim")
    with pytest.raises(SpecError, match="max_model_len=1 "):
        LengthBounds(max_model_len=1)


def test_nanovllm_bench_refuses_a_huge_max_input_len_before_drawing() -> None:
    with pytest.raises(SpecError, match="max_input_len=1000000000"):
        make_preset("nanovllm_bench", max_input_len=10**9)
    with pytest.raises(SpecError, match=r"max_input_len=100000 .* \(n=256\)"):
        make_preset("nanovllm_bench", max_input_len=100_000)


# -- files that are not traces -----------------------------------------------------------------

@pytest.mark.parametrize("suffix", ["csv", "jsonl", "parquet"])
def test_empty_file(tmp_path: Path, suffix: str) -> None:
    err = error_of(read_trace, write(tmp_path / f"t.{suffix}", b""))
    assert err.field == "file" and "<empty: 0 bytes>" in str(err)


def test_binary_garbage_csv_names_the_first_bad_byte(tmp_path: Path) -> None:
    data = bytes(range(256)) * 4
    err = error_of(read_trace, write(tmp_path / "t.csv", data))
    assert err.field == "encoding" and "<byte 0x80 at offset 128, line 2>" in str(err)


def test_latin1_cell_names_its_row(tmp_path: Path) -> None:
    path = write(tmp_path / "t.csv", (HEADER + GOOD_ROWS + "2,1.0,caf\xe9,2\n").encode("latin-1"))
    err = error_of(read_trace, path)
    assert (err.field, err.row) == ("encoding", 2) and "line 4" in str(err)


def test_utf16_file_is_named_as_not_utf8(tmp_path: Path) -> None:
    err = error_of(read_trace, write(tmp_path / "t.csv", (HEADER + GOOD_ROWS).encode("utf-16")))
    assert err.field == "encoding" and "UTF-8" in str(err)


def test_utf8_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    path = write(tmp_path / "t.csv", (HEADER + GOOD_ROWS).encode("utf-8-sig"))
    assert read_trace(path).df["prompt_len"].tolist() == [10, 20]


def test_blank_lines_only(tmp_path: Path) -> None:
    err = error_of(read_trace, write(tmp_path / "t.csv", "\n\n\n"))
    assert err.field == "file" and "no header line" in str(err)


def test_header_without_rows(tmp_path: Path) -> None:
    err = error_of(read_trace, write(tmp_path / "t.csv", HEADER))
    assert "at least one request" in str(err)


def test_ragged_row(tmp_path: Path) -> None:
    err = error_of(read_trace, write(tmp_path / "t.csv", HEADER + GOOD_ROWS + "2,1,10,2,7\n"))
    assert (err.field, err.row) == ("csv", 2) and "Expected 4 fields" in str(err)


def test_unclosed_quote(tmp_path: Path) -> None:
    err = error_of(read_trace, write(tmp_path / "t.csv", HEADER + GOOD_ROWS + '2,1,"10,2\n'))
    assert err.field == "csv" and "quotes closed" in str(err)


def test_missing_columns_are_named(tmp_path: Path) -> None:
    err = error_of(read_trace, write(tmp_path / "t.csv", "request_id,arrival_s\n0,0\n"))
    assert err.field == "prompt_len" and "<missing column>" in str(err)


def test_directory_and_missing_file(tmp_path: Path) -> None:
    (tmp_path / "d.csv").mkdir()
    assert "<a directory>" in str(error_of(read_trace, tmp_path / "d.csv"))
    with pytest.raises(FileNotFoundError, match="trace not found: .*nope.csv"):
        read_trace(tmp_path / "nope.csv")


@pytest.mark.parametrize("cell,field", [("nan", "prompt_len"), ("-4", "output_len"),
                                        ("1e400", "prompt_len"), ("ten", "output_len"),
                                        ("99999999999999999999999", "request_id")])
def test_bad_cells_name_file_row_and_column(tmp_path: Path, cell: str, field: str) -> None:
    cells = {"request_id": "1", "arrival_s": "0.5", "prompt_len": "20", "output_len": "3"}
    cells[field] = cell
    path = write(tmp_path / "t.csv", HEADER + "0,0.0,10,2\n" + ",".join(cells.values()) + "\n")
    err = error_of(read_trace, path)
    assert (err.field, err.row) == (field, 1)


def test_rows_are_numbered_across_chunks(tmp_path: Path) -> None:
    rows = "".join(f"{i},{i},10,2\n" for i in range(7)) + "3,9,10,2\n" + "8,9,-1,2\n"
    path = write(tmp_path / "t.csv", HEADER + rows)
    err = error_of(read_trace, path, chunk_rows=2)
    assert (err.field, err.row) == ("output_len", 8) or (err.field, err.row) == ("prompt_len", 8)
    write(path, HEADER + "".join(f"{i},{i},10,2\n" for i in range(7)) + "3,9,10,2\n")
    err = error_of(read_trace, path, chunk_rows=3)
    assert (err.field, err.row) == ("request_id", 7) and "row 3 has the same" in str(err)


def test_chunked_reads_equal_one_read(tmp_path: Path) -> None:
    trace = make_preset("multi_turn", n=40, seed=2)
    for fmt in ("csv", "jsonl", "parquet"):
        path = write_trace(trace, tmp_path / f"t.{fmt}")
        assert read_trace(path, chunk_rows=3).equals(trace)


def test_unsorted_arrivals_warn_naming_the_file_or_fail_when_asked(tmp_path: Path) -> None:
    path = write(tmp_path / "t.csv", HEADER + "0,5,10,2\n1,1,10,2\n")
    with pytest.warns(TraceWarning, match=r"t.csv: arrivals are not sorted \(row 1"):
        assert read_trace(path).df["request_id"].tolist() == [1, 0]
    err = error_of(read_trace, path, unsorted="error")
    assert (err.field, err.row) == ("arrival_s", 1) and ">= 5.0 of row 0" in str(err)


def test_token_cell_that_is_not_ids(tmp_path: Path) -> None:
    path = write(tmp_path / "t.csv", HEADER.strip() + ",prompt_token_ids\n0,0,3,2,1 2 3\n"
                 "1,0,3,2,1 x 3\n")
    err = error_of(read_trace, path)
    assert (err.field, err.row) == ("prompt_token_ids", 1)


def test_sidecar_metadata_that_is_not_json(tmp_path: Path) -> None:
    path = write(tmp_path / "t.csv", HEADER + GOOD_ROWS)
    write(tmp_path / "t.csv.meta.json", "{oops")
    with pytest.raises(TraceError, match=r"t.csv.meta.json: metadata='<JSONDecodeError>'"):
        read_trace(path)


# -- JSONL ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("line,why", [("{oops", "valid JSON"), ("[1, 2]", "a JSON object"),
                                      ("[" * 50_000, "RecursionError"),
                                      ('{"request_id": ' + "9" * 5000 + "}", "ValueError")])
def test_jsonl_lines_that_are_not_objects(tmp_path: Path, line: str, why: str) -> None:
    row = json.dumps({"request_id": 0, "arrival_s": 0, "prompt_len": 3, "output_len": 1})
    err = error_of(read_trace, write(tmp_path / "t.jsonl", f"{row}\n{line}\n"))
    assert (err.field, err.row) == ("<line>", 1) and why in str(err)


def test_jsonl_key_first_seen_after_the_first_chunk(tmp_path: Path) -> None:
    rows = [{"request_id": i, "arrival_s": 0, "prompt_len": 3, "output_len": 1} for i in range(3)]
    rows[2]["turn"] = 0
    path = write(tmp_path / "t.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    err = error_of(read_trace, path, chunk_rows=2)
    assert (err.field, err.row) == ("turn", 2)


# -- Parquet ---------------------------------------------------------------------------------

def test_parquet_garbage_and_truncation(tmp_path: Path) -> None:
    err = error_of(read_trace, write(tmp_path / "g.parquet", b"PAR1" + b"\x00" * 64))
    assert err.field == "file" and "Parquet" in str(err)
    good = parquet_bytes(pa.table({"request_id": [0], "arrival_s": [0.0], "prompt_len": [5],
                                   "output_len": [1]}))
    err = error_of(read_trace, write(tmp_path / "t.parquet", good[: len(good) // 2]))
    assert err.field == "file"


@pytest.mark.parametrize("column", [pa.array(["x", "5"]), pa.array([True, False]),
                                    pa.array([[1], [2]]), pa.array([2**64 - 1, 5], pa.uint64()),
                                    pa.array([{"a": 1}, {"a": 2}]),
                                    pa.array([1.5, 2.0])])
def test_parquet_wrong_types_name_the_row(tmp_path: Path, column: pa.Array) -> None:
    table = pa.table({"request_id": [0, 1], "arrival_s": [0.0, 1.0], "prompt_len": column,
                      "output_len": [1, 1]})
    err = error_of(read_trace, write(tmp_path / "t.parquet", parquet_bytes(table)))
    assert (err.field, err.row) == ("prompt_len", 0)


def test_parquet_duplicate_columns_and_bad_metadata(tmp_path: Path) -> None:
    arrays = [pa.array([0]), pa.array([0.0]), pa.array([5]), pa.array([1]), pa.array([6])]
    names = ["request_id", "arrival_s", "prompt_len", "output_len", "prompt_len"]
    err = error_of(read_trace, write(tmp_path / "d.parquet",
                                     parquet_bytes(pa.Table.from_arrays(arrays, names=names))))
    assert err.field == "columns" and "'prompt_len'" in str(err)
    schema = pa.schema([pa.field(n, a.type) for n, a in zip(names[:4], arrays, strict=False)],
                       metadata={b"kvtwin": b"[1, 2]"})
    table = pa.Table.from_arrays(arrays[:4], schema=schema)
    err = error_of(read_trace, write(tmp_path / "m.parquet", parquet_bytes(table)))
    assert err.field == "metadata"


def test_parquet_reads_only_the_schema_columns_in_batches(tmp_path: Path) -> None:
    n = 50
    table = pa.table({"request_id": np.arange(n), "arrival_s": np.linspace(0, 5, n),
                      "prompt_len": np.full(n, 9), "output_len": np.full(n, 2),
                      "blob": pa.array([b"x" * 1000] * n)})
    path = write(tmp_path / "t.parquet", parquet_bytes(table))
    with pytest.warns(TraceWarning, match="ignoring unknown columns: blob"):
        trace = read_trace(path, chunk_rows=7)
    assert len(trace) == n and "blob" not in trace.df
