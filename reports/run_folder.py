"""A run folder: what every run (and every sweep point) writes, and how reports read it back.

    summary.json      status, config, the sim's and/or the engine's memory terms and metrics
    requests.parquet  RequestRecord columns + `source` ("sim" or "real")
    steps.parquet     StepRecord columns + `source`
    report.html       the run page

summary.json:
    {"status": "ok" | "cannot_start" | "failed" | "interrupted", "error": str | null,
     "error_type": str | null, "trace": {workloads.trace_source(...)} (where run.py records it),
     "mode": "sim" | "real" | "both" | "calibrate",
     "config": {"model": ..., "hardware": ..., "used_by_others_gib": float, "predictor": ...,
                "engine": {EngineConfig},
                "workload": {...}},
     "sim":  {"predictor", "memory", "capacity", "metrics", "sim_stats"} | null,
     "real": {"memory": {memory report}, "metrics": {...}, "device": {...}} | null,
     "versions": {package: version}}
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

SUMMARY = "summary.json"
REQUESTS = "requests.parquet"
STEPS = "steps.parquet"
REPORT = "report.html"
SOURCES = ("sim", "real")
PACKAGES = ("kvtwin", "numpy", "pandas", "simpy", "hydra-core", "plotly", "torch",
            "transformers")


@dataclass
class RunFolder:
    path: Path
    summary: dict[str, Any]
    requests: pd.DataFrame = field(default_factory=pd.DataFrame)
    steps: pd.DataFrame = field(default_factory=pd.DataFrame)

    @property
    def status(self) -> str:
        return str(self.summary.get("status", "unknown"))

    def side(self, source: str) -> tuple[pd.DataFrame, pd.DataFrame]:
        """(requests, steps) of one source, without the `source` column."""
        return _only(self.requests, source), _only(self.steps, source)


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


class StepsWriter:
    """steps.parquet written as step records come, chunk by chunk and source by source, so
    a long run never holds all its steps. It is `steps.parquet.partial` until `close`
    renames it: a folder never holds a steps.parquet that is not whole."""

    def __init__(self, path: Path, observe: Callable[[pd.DataFrame], None] | None = None):
        self.path = Path(path) / STEPS
        self.observe = observe  # shown every non-empty frame written, with its `source`
        self.partial = self.path.with_name(STEPS + ".partial")
        self._writer: pq.ParquetWriter | None = None
        self._empty: pd.DataFrame | None = None  # written if no step ever comes
        self.rows = 0

    def add(self, steps: pd.DataFrame, source: str) -> None:
        if steps.empty:
            self._empty = steps.assign(source=source)
            return
        steps = steps.assign(source=source)
        table = pa.Table.from_pandas(steps, preserve_index=False)
        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # dictionary-encoding the numeric columns doubled the write time and saved no
            # size on the Azure hour's 1.47 M step records
            self._writer = pq.ParquetWriter(self.partial, table.schema,
                                            use_dictionary=["source"])
        self._writer.write_table(table.cast(self._writer.schema))
        self.rows += len(steps)
        if self.observe is not None:
            self.observe(steps)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            os.replace(self.partial, self.path)
        elif self._empty is not None:
            write_atomic(self.path, lambda tmp: self._empty.to_parquet(tmp, index=False))


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write `path` through a temporary file and a rename: it is whole or absent."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    """summary.json, whole or not at all (a run's folder is read while it runs)."""
    path.mkdir(parents=True, exist_ok=True)
    text = json.dumps(summary, indent=1, default=_jsonable) + "\n"
    write_atomic(path / SUMMARY, lambda tmp: tmp.write_text(text))


def write_run(path: Path, summary: dict[str, Any],
              records: dict[str, tuple[pd.DataFrame, pd.DataFrame | None]] | None = None,
              steps: StepsWriter | None = None) -> Path:
    """Write summary.json and, per source, the request and step records; a source's steps
    are None where they were streamed to `steps` already."""
    path.mkdir(parents=True, exist_ok=True)
    writer = steps or StepsWriter(path)
    if records:
        reqs = pd.concat([df.assign(source=src) for src, (df, _) in records.items()],
                         ignore_index=True)
        write_atomic(path / REQUESTS, lambda tmp: reqs.to_parquet(tmp, index=False))
        for src, (_, frame) in records.items():
            if frame is not None:
                writer.add(frame, src)
    writer.close()
    write_summary(path, {**summary, "versions": summary.get("versions") or versions()})
    return path


def read_run(path: Path, steps: bool = True) -> RunFolder:
    """A run folder; `steps=False` leaves the step records on disk (see `iter_steps`)."""
    path = Path(path)
    summary = json.loads((path / SUMMARY).read_text())
    reqs = pd.read_parquet(path / REQUESTS) if (path / REQUESTS).is_file() else pd.DataFrame()
    frame = pd.read_parquet(path / STEPS) if steps and (path / STEPS).is_file() \
        else pd.DataFrame()
    return RunFolder(path, summary, reqs, frame)


def num_steps(path: Path) -> int:
    """How many step records a run folder holds (from the file's metadata)."""
    file = Path(path) / STEPS
    return pq.ParquetFile(file).metadata.num_rows if file.is_file() else 0


def iter_steps(path: Path, columns: list[str], rows: int = 1 << 20) -> Iterator[pd.DataFrame]:
    """A run's step records (`columns` and `source`), `rows` at a time, in file order."""
    file = Path(path) / STEPS
    if not file.is_file():
        return
    for batch in pq.ParquetFile(file).iter_batches(batch_size=rows,
                                                   columns=[*columns, "source"]):
        yield batch.to_pandas()


def find_runs(root: Path) -> list[Path]:
    """Every run folder under `root` (folders holding a summary.json), in a stable order."""
    return sorted((p.parent for p in Path(root).rglob(SUMMARY)), key=_natural)


def _natural(path: Path) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in path.parts]


def _only(df: pd.DataFrame, source: str) -> pd.DataFrame:
    if df.empty or "source" not in df.columns:
        return df
    return df[df["source"] == source].drop(columns="source").reset_index(drop=True)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
