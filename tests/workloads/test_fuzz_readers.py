"""Fuzz every trace reader: random bytes, random CSV text, random JSONL, random Parquet files and
extreme values end in a Trace or in one TraceError line naming the file (and the row and column
where a row is at fault); never another exception. Sizes are capped so the suite stays fast and
the examples are fixed; for a longer hunt: KVTWIN_FUZZ_RANDOM=1 KVTWIN_FUZZ_EXAMPLES=2000."""

from __future__ import annotations

import io
import json
import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workloads.errors import TraceError
from workloads.importers import import_azure
from workloads.load import load_trace
from workloads.schema import ALL_COLUMNS, Trace
from workloads.trace_io import read_trace

EXAMPLES = int(os.environ.get("KVTWIN_FUZZ_EXAMPLES", "60"))
FIXED = os.environ.get("KVTWIN_FUZZ_RANDOM") is None  # the suite replays the same examples
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=FIXED, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
AZURE_NAMES = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
NAMES = st.sampled_from([*ALL_COLUMNS, *AZURE_NAMES, "user", "", " prompt_len", "prompt_len "])
Reader = Callable[[Path], Any]
READERS: dict[str, tuple[str, Reader]] = {
    "read_trace csv": (".csv", read_trace),
    "read_trace jsonl": (".jsonl", read_trace),
    "read_trace parquet": (".parquet", read_trace),
    "import_azure": (".csv", import_azure),
    "load_trace csv": (".csv", load_trace),
    "load_trace parquet": (".parquet", load_trace),
    "load_trace jsonl": (".jsonl", load_trace),
    "load_trace keep": (".csv", lambda p: load_trace(p, max_model_len=4096, too_long="keep")),
}
CELLS = st.one_of(
    st.sampled_from(["", "0", "1", "-1", "7", "1.5", "nan", "NaN", "inf", "-inf", "1e9",
                     "1e400", "2147483647", "2147483648", "16777217", "9" * 30, "0x10",
                     " 5 ", "1_000", "١٢", "true", "None", '"', '""', "a,b", "\x00", "é",
                     "2023-11-16 18:15:46.6805900", "9999-12-31", "1 2 3", "\t"]),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=8),
)


def outcome(reader: Reader, path: Path) -> Trace | TraceError:
    """What `reader` made of `path`: a Trace or its TraceError (anything else fails)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            got = reader(path)
        except TraceError as err:
            check_one_line(err, path)
            return err
    return got[0] if isinstance(got, tuple) else got


def check_one_line(err: TraceError, path: Path) -> None:
    text = str(err)
    assert "\n" not in text and "\r" not in text
    assert str(path) in text and err.path == str(path)
    assert " is invalid: must be " in text
    if err.row is not None:
        assert err.row >= 0 and f"row {err.row}: " in text and err.field


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def run_all(folder: Path, data: bytes, suffixes: tuple[str, ...] | None = None) -> None:
    for name, (suffix, reader) in READERS.items():
        if suffixes is None or suffix in suffixes:
            path = folder / f"trace{suffix}"
            path.write_bytes(data)
            result = outcome(reader, path)
            assert isinstance(result, Trace | TraceError), name


@FUZZ
@given(data=st.binary(max_size=600))
def test_random_bytes(folder: Path, data: bytes) -> None:
    run_all(folder, data)


@FUZZ
@given(data=st.binary(max_size=400))
def test_random_bytes_after_a_valid_header(folder: Path, data: bytes) -> None:
    run_all(folder, b"request_id,arrival_s,prompt_len,output_len\n0,0,5,3\n" + data, (".csv",))
    run_all(folder, b"TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:00:00,5,3\n" + data,
            (".csv",))


def csv_text(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(",".join(cells) for cells in [header, *rows]) + "\n"


@FUZZ
@given(header=st.lists(NAMES, min_size=0, max_size=7),
       rows=st.lists(st.lists(CELLS, min_size=0, max_size=8), max_size=6))
def test_random_csv_text(folder: Path, header: list[str], rows: list[list[str]]) -> None:
    run_all(folder, csv_text(header, rows).encode("utf-8", "surrogatepass"), (".csv",))


@FUZZ
@given(rows=st.lists(st.tuples(CELLS, CELLS, CELLS, CELLS), min_size=1, max_size=6),
       azure=st.booleans())
def test_random_cells_under_a_valid_header(folder: Path, rows: list[tuple[str, ...]],
                                           azure: bool) -> None:
    header = [*AZURE_NAMES, "id"] if azure else ["request_id", "arrival_s", "prompt_len",
                                                 "output_len"]
    text = csv_text(header, [list(r) for r in rows])
    run_all(folder, text.encode("utf-8", "surrogatepass"), (".csv",))


JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**80), max_value=2**80),
              st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner,
                                                               max_size=3),
    max_leaves=6)


@FUZZ
@given(rows=st.lists(st.dictionaries(NAMES, JSON_VALUES, max_size=6), max_size=5),
       junk=st.sampled_from(["", "{oops\n", "[1, 2]\n", "\n\n", "[" * 3000 + "\n",
                             "1" * 5000 + "\n"]))
def test_random_jsonl(folder: Path, rows: list[dict[str, Any]], junk: str) -> None:
    text = "".join(json.dumps(r, allow_nan=True) + "\n" for r in rows) + junk
    run_all(folder, text.encode(), (".jsonl",))


def arrow_column(kind: str, values: list[Any]) -> pa.Array:
    n = len(values)
    builders: dict[str, Callable[[], pa.Array]] = {
        "int64": lambda: pa.array([v if isinstance(v, int) and -(2**63) <= v < 2**63 else None
                                   for v in values], pa.int64()),
        "uint64": lambda: pa.array([abs(v) % 2**64 if isinstance(v, int) else None
                                    for v in values], pa.uint64()),
        "int8": lambda: pa.array([v % 128 if isinstance(v, int) else None for v in values],
                                 pa.int8()),
        "float64": lambda: pa.array([float(v) if isinstance(v, int | float) and
                                     (not isinstance(v, int) or abs(v) < 2**1000) else None
                                     for v in values], pa.float64()),
        "string": lambda: pa.array([None if v is None else str(v) for v in values]),
        "bool": lambda: pa.array([bool(v) if v is not None else None for v in values]),
        "null": lambda: pa.nulls(n),
        "list": lambda: pa.array([[v % 1000] if isinstance(v, int) else None for v in values],
                                 pa.list_(pa.int32())),
        "timestamp": lambda: pa.array([0] * n, pa.timestamp("s")),
        "binary": lambda: pa.array([b"\xff\x00"] * n, pa.binary()),
        "dictionary": lambda: pa.array([str(v) for v in values]).dictionary_encode(),
        "struct": lambda: pa.array([{"x": 1}] * n),
    }
    return builders[kind]()


PARQUET_VALUES = st.one_of(st.none(), st.integers(min_value=-(2**64), max_value=2**64),
                           st.sampled_from([0, 1, -1, 10**9, 2**31, 2**24 + 1, 2**56, 2**63 - 1]),
                           st.floats(allow_nan=True, allow_infinity=True))


@FUZZ
@given(columns=st.lists(st.tuples(NAMES, st.sampled_from(
    ["int64", "uint64", "int8", "float64", "string", "bool", "null", "list", "timestamp",
     "binary", "dictionary", "struct"])), max_size=6),
       values=st.lists(PARQUET_VALUES, min_size=0, max_size=5),
       cut=st.integers(min_value=0, max_value=40), meta=st.sampled_from([None, b"{}", b"[1]",
                                                                          b"{oops"]))
def test_random_parquet(folder: Path, columns: list[tuple[str, str]], values: list[Any],
                        cut: int, meta: bytes | None) -> None:
    arrays = [arrow_column(kind, values) for _, kind in columns]
    schema = pa.schema([pa.field(name, a.type) for (name, _), a in zip(columns, arrays,
                                                                        strict=True)],
                       metadata={b"kvtwin": meta} if meta else None)
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_arrays(arrays, schema=schema), buffer)
    data = buffer.getvalue()
    run_all(folder, data, (".parquet",))
    run_all(folder, data[:len(data) * cut // 40], (".parquet",))  # truncated


EXTREMES = [0, -1, 1, 2**24, 2**24 + 1, 10**9, 2**31 - 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63,
            2**64, 10**30, math.nan, math.inf, -math.inf, 0.5, 1e-300]


@FUZZ
@given(column=st.sampled_from(["request_id", "arrival_s", "prompt_len", "output_len"]),
       row=st.integers(min_value=0, max_value=3), value=st.sampled_from(EXTREMES),
       fmt=st.sampled_from([".csv", ".jsonl"]))
def test_extreme_values_name_their_row_and_column(folder: Path, column: str, row: int,
                                                  value: float, fmt: str) -> None:
    rows = [{"request_id": 100 + i, "arrival_s": float(i), "prompt_len": 10, "output_len": 4}
            for i in range(4)]  # ids no extreme value repeats
    rows[row][column] = value
    path = folder / f"extreme{fmt}"
    if fmt == ".csv":
        path.write_text(csv_text(list(rows[0]), [[repr(r[c]) if isinstance(r[c], float) else
                                                  str(r[c]) for c in r] for r in rows]))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = outcome(read_trace, path)
    if isinstance(result, TraceError):
        assert (result.field, result.row) == (column, row)
    else:
        assert len(result) == 4
