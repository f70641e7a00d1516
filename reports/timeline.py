"""The run page's KV timelines, built from step records a batch at a time.

A run folder's steps.parquet is read back in batches of STEP_BATCH rows; a long run's
batches are thinned as they come (peaks kept), so its steps are never all in memory. The
same builder watches the steps while a run writes them (`StepsWriter(observe=...)`), so
run.py draws the page without reading steps.parquet back: the batches, hence the
timelines, are the file's.
"""

from __future__ import annotations

from collections.abc import Iterator

import pandas as pd

from reports.metrics import STEP_COLUMNS, kv_usage_timeline
from reports.plots import thin_timeline

STEP_BATCH = 1 << 18  # step records per batch (one streamed chunk of the twin's steps)


class KvTimelines:
    """Per source, the KV timeline of the step records added (with their `source` column),
    cut into the batches a reader of the whole file would see."""

    def __init__(self, batch: int = STEP_BATCH):
        self.batch, self.rows = batch, 0
        self._pending: pd.DataFrame | None = None  # rows of a batch not yet whole
        self._parts: dict[str, list[pd.DataFrame]] = {}
        self._raw: list[tuple[str, pd.DataFrame]] = []  # unthinned while rows <= batch

    def add(self, steps: pd.DataFrame) -> None:
        steps = steps[[*STEP_COLUMNS, "source"]]
        if self._pending is not None:
            steps = pd.concat([self._pending, steps], ignore_index=True)
            self._pending = None
        start = 0
        while len(steps) - start >= self.batch:
            self._add_batch(steps.iloc[start:start + self.batch])
            start += self.batch
        if start < len(steps):
            self._pending = steps.iloc[start:]

    def frames(self) -> dict[str, pd.DataFrame]:
        if self._pending is not None:
            self._add_batch(self._pending)
            self._pending = None
        for name, timeline in self._raw:
            self._parts.setdefault(name, []).append(timeline)
        self._raw = []
        return {name: pd.concat(tl, ignore_index=True) if len(tl) > 1 else tl[0]
                for name, tl in self._parts.items()}

    def _add_batch(self, batch: pd.DataFrame) -> None:
        self.rows += len(batch)
        many = self.rows > self.batch
        if many:  # from here on every batch is thinned, the held ones too
            for name, timeline in self._raw:
                self._parts.setdefault(name, []).append(thin_timeline(timeline))
            self._raw = []
        for name, df in _by_source(batch):
            # blocks, not usage, are drawn: the timeline needs no capacity
            timeline = kv_usage_timeline(df, 0)
            if many:
                self._parts.setdefault(str(name), []).append(thin_timeline(timeline))
            else:
                self._raw.append((str(name), timeline))


def _by_source(batch: pd.DataFrame) -> Iterator[tuple[str, pd.DataFrame]]:
    """The batch's rows per source, in order of appearance (most batches have one)."""
    sources = batch["source"]
    first = sources.iat[0]
    if (sources == first).all():
        yield first, batch
        return
    yield from batch.groupby("source", sort=False)
