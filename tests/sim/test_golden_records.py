"""The twin's records for a fixed set of runs equal the hashes recorded before the speed-ups
(tests/sim/golden.py; the long cases run with `python -m tests.sim.golden`)."""

from __future__ import annotations

import pytest

from tests.sim.golden import CASES, Case, load, run_case
from workloads.presets import TRACE_DIR

AZURE = TRACE_DIR / "azure_llm_2023_conv.csv"


@pytest.mark.parametrize("case", [c for c in CASES if c.ci], ids=lambda c: c.name)
def test_records_equal_the_golden_hashes(case: Case) -> None:
    if case.workload == "azure_conv" and not AZURE.is_file():
        pytest.skip(f"{AZURE} not found (set KVTWIN_TRACE_DIR)")
    assert run_case(case) == load()[case.name]
