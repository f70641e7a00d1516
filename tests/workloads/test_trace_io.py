"""Parquet / CSV / JSONL round trips are lossless, metadata included, and byte-deterministic."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.workloads.helpers import good_frame
from workloads.arrivals import Gamma
from workloads.build import build_trace
from workloads.errors import SpecError
from workloads.lengths import LogNormal
from workloads.presets import make_preset
from workloads.schema import Trace
from workloads.trace_io import read_trace, sidecar_path, write_trace
from workloads.validate import make_trace

FORMATS = ("parquet", "csv", "jsonl")


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_with_every_optional_column(tmp_path: Path, fmt: str,
                                               mixed_trace: Trace) -> None:
    assert mixed_trace.df["prefix_group"].isna().any()
    path = write_trace(mixed_trace, tmp_path / f"t.{fmt}")
    back = read_trace(path)
    assert back.equals(mixed_trace)
    assert list(back.df.dtypes.astype(str)) == list(mixed_trace.df.dtypes.astype(str))


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_with_explicit_token_ids(tmp_path: Path, fmt: str) -> None:
    trace = make_preset("nanovllm_bench", n=5)
    back = read_trace(write_trace(trace, tmp_path / f"t.{fmt}"))
    assert back.equals(trace)
    assert back.df["prompt_token_ids"].iloc[3].tolist() == \
        trace.df["prompt_token_ids"].iloc[3].tolist()


def test_parquet_keeps_metadata_in_the_schema(tmp_path: Path, mixed_trace: Trace) -> None:
    path = write_trace(mixed_trace, tmp_path / "t.parquet")
    stored = json.loads(pq.read_schema(path).metadata[b"kvtwin"])
    assert stored == mixed_trace.meta
    assert not sidecar_path(path).exists()


@pytest.mark.parametrize("fmt", ("csv", "jsonl"))
def test_text_formats_keep_metadata_in_a_sidecar(tmp_path: Path, fmt: str,
                                                 mixed_trace: Trace) -> None:
    path = write_trace(mixed_trace, tmp_path / f"t.{fmt}")
    assert json.loads(sidecar_path(path).read_text()) == mixed_trace.meta
    assert path.with_name(f"t.{fmt}.meta.json").is_file()


def test_text_file_without_sidecar_loads_with_empty_metadata(tmp_path: Path) -> None:
    path = tmp_path / "plain.csv"
    good_frame().to_csv(path, index=False)
    trace = read_trace(path)
    assert trace.meta == {} and trace.seed == 0 and len(trace) == 6


def _generated(seed: int) -> Trace:
    return build_trace(n=300, arrivals=Gamma(3.0, 0.5), prompt_lens=LogNormal(200, 900),
                       output_lens=LogNormal(50, 300), seed=seed)


@pytest.mark.parametrize("fmt", FORMATS)
def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path, fmt: str) -> None:
    files = [write_trace(_generated(seed), tmp_path / f"{i}.{fmt}")
             for i, seed in enumerate((5, 5, 6))]
    first, same, other = (p.read_bytes() for p in files)
    assert first == same
    assert first != other


def test_unknown_suffix_is_rejected(tmp_path: Path, mixed_trace: Trace) -> None:
    with pytest.raises(SpecError, match="path=.*t.xlsx.*ending in one of"):
        write_trace(mixed_trace, tmp_path / "t.xlsx")
    with pytest.raises(SpecError, match="format='xml'"):
        read_trace(tmp_path / "t.csv", fmt="xml")


def test_missing_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        read_trace(tmp_path / "nope.parquet")


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(min_value=0, max_value=1e7, allow_nan=False, allow_infinity=False),
                min_size=1, max_size=30))
def test_any_arrival_times_survive_text_formats(tmp_path_factory: pytest.TempPathFactory,
                                                times: list[float]) -> None:
    n = len(times)
    df = pd.DataFrame({"request_id": np.arange(n), "arrival_s": sorted(times),
                       "prompt_len": np.full(n, 3), "output_len": np.ones(n, dtype=int)})
    trace = make_trace(df, {"seed": 1})
    folder = tmp_path_factory.mktemp("h")
    for fmt in FORMATS:
        back = read_trace(write_trace(trace, folder / f"t.{fmt}"))
        assert back.df["arrival_s"].tolist() == trace.df["arrival_s"].tolist()
