"""Shared fixtures for the workloads tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from workloads.arrivals import Poisson
from workloads.build import build_trace
from workloads.importers import import_azure
from workloads.lengths import Uniform
from workloads.presets import TRACE_DIR
from workloads.schema import Trace
from workloads.structure import MultiTurn, SharedPrefix
from workloads.validate import make_trace

AZURE_CONV = TRACE_DIR / "azure_llm_2023_conv.csv"  # $KVTWIN_TRACE_DIR overrides


@pytest.fixture(scope="session")
def azure_path() -> Path:
    if not AZURE_CONV.is_file():
        pytest.skip(f"Azure trace not present at {AZURE_CONV}")
    return AZURE_CONV


@pytest.fixture(scope="session")
def azure_trace(azure_path: Path) -> Trace:
    return import_azure(azure_path)[0]


@pytest.fixture(scope="session")
def mixed_trace() -> Trace:
    """Plain requests, prefix-group requests and conversations (with and without a prefix),
    with nulls in every optional column."""
    chat = build_trace(n=40, arrivals=Poisson(2.0), prompt_lens=Uniform(5, 60),
                       output_lens=Uniform(3, 30), prefix=SharedPrefix(3, 48, 1.0),
                       multi_turn=MultiTurn(Uniform(1, 5), think_time_s=3.0), seed=11)
    df = chat.df.copy()
    df.loc[df["conversation_id"] % 2 == 1, ["prefix_group", "prefix_len"]] = pd.NA
    solo = pd.DataFrame({"request_id": np.arange(1000, 1020), "arrival_s": np.linspace(0, 9, 20),
                         "prompt_len": np.arange(20) * 7 + 50, "output_len": np.full(20, 5)})
    solo["prefix_group"] = pd.array([7, None] * 10, dtype="Int64")
    solo["prefix_len"] = pd.array([33, None] * 10, dtype="Int64")
    merged = pd.concat([df, solo]).sort_values("arrival_s", kind="stable")
    return make_trace(merged, {**chat.meta, "note": "mixed"})
