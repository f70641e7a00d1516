"""The run page's KV timelines built while the steps are written equal those read back from
steps.parquet (run.py draws the page from the former, `python -m reports` from the latter)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from reports.metrics import STEP_COLUMNS
from reports.run_folder import StepsWriter, iter_steps
from reports.timeline import KvTimelines, _by_source

BATCH = 3000  # more than the plots' 2,000 points: a batch of a long run is thinned


def steps(first: int, n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    ends = first * 0.01 + np.cumsum(rng.uniform(0.001, 0.02, n))
    cols = {c: rng.integers(0, 500, n) for c in STEP_COLUMNS}
    cols.update(step=np.arange(first, first + n), start_s=ends - 0.001, end_s=ends)
    return pd.DataFrame(cols)


def written(tmp_path: Path, chunks: list[tuple[pd.DataFrame, str]]) -> KvTimelines:
    built = KvTimelines(BATCH)
    writer = StepsWriter(tmp_path, observe=built.add)
    for frame, source in chunks:
        writer.add(frame, source)
    writer.close()
    return built


def read_back(tmp_path: Path) -> dict[str, pd.DataFrame]:
    timelines = KvTimelines(BATCH)
    for batch in iter_steps(tmp_path, list(STEP_COLUMNS), BATCH):
        timelines.add(batch)
    return timelines.frames()


@pytest.mark.parametrize("sizes", [[BATCH, BATCH, 1200], [1000], [BATCH], [2500, 2500, 7000]])
def test_built_while_writing_equals_read_back(tmp_path: Path, sizes: list[int]) -> None:
    chunks, first = [], 0
    for i, n in enumerate(sizes):
        chunks.append((steps(first, n, i), "sim"))
        first += n
    chunks.append((steps(0, 1700, 99), "real"))  # a second source, not on a batch boundary
    built = written(tmp_path, chunks).frames()
    back = read_back(tmp_path)
    assert built.keys() == back.keys() == {"sim", "real"}
    for name in back:
        pd.testing.assert_frame_equal(built[name], back[name])
    thinned = sum(sizes) + 1700 > BATCH
    assert (len(built["sim"]) < sum(sizes)) == (thinned and max(sizes) > 2000)


@pytest.mark.parametrize("sources", [["sim"] * 5, ["sim", "sim", "real", "sim", "real"]])
def test_a_batch_splits_by_source_as_groupby_does(sources: list[str]) -> None:
    batch = steps(0, len(sources), 3).assign(source=sources)
    got = [(name, frame) for name, frame in _by_source(batch)]
    want = list(batch.groupby("source", sort=False))
    assert [name for name, _ in got] == [name for name, _ in want]
    for (_, a), (_, b) in zip(got, want, strict=True):
        pd.testing.assert_frame_equal(a, b)
