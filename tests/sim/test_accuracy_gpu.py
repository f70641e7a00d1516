"""Accuracy gates against committed GPU measurements (run on the CPU, from the files).

Each file in tests/data/*_memory.json is a start-up memory report measured by kvtwin's engine
on a GPU, with its provenance. The twin must re-predict it within the stated thresholds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.core.config import EngineConfig
from sim.twin import setup_twin

MEASURED = sorted((Path(__file__).parents[1] / "data").glob("*_memory.json"))


@pytest.mark.parametrize("path", MEASURED, ids=[p.stem for p in MEASURED])
def test_memory_terms_match_the_measured_gpu_run(path: Path) -> None:
    data = json.loads(path.read_text())
    measured = data["measured"]
    setup = setup_twin(data["model"], data["hardware"], EngineConfig(**data["engine"]))
    terms = setup.memory.terms
    assert terms.total_bytes == measured["total_bytes"]
    assert terms.weights_bytes == measured["weights_bytes"]  # exact from the config
    assert abs(terms.activation_peak_bytes / measured["activation_peak_bytes"] - 1) < 0.05
    assert abs(setup.memory.num_blocks / measured["num_blocks"] - 1) < 0.001
