"""The front door for trace files: `load_trace` (kvtwin traces and Azure CSVs, detected or named)
and `trace_source`, what a run records about where its requests came from.

format: "auto" (default) reads a CSV whose header holds TIMESTAMP, ContextTokens and
GeneratedTokens as an Azure trace and anything else as a kvtwin trace (Parquet, CSV or JSONL by
suffix); "kvtwin" and "azure" name the reader; "parquet", "csv" and "jsonl" name a kvtwin file
format whatever the suffix.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from workloads.errors import SpecError
from workloads.importers import AZURE_COLUMNS, import_azure
from workloads.schema import Trace
from workloads.trace_io import FORMATS as FILE_SUFFIXES
from workloads.trace_io import read_trace, trace_format

READERS = ("auto", "kvtwin", "azure")
FILE_FORMATS = ("parquet", "csv", "jsonl")
HEADER_BYTES = 1 << 16
HASH_BLOCK = 1 << 20
LOADED = "loaded_from"  # meta key load_trace adds: the file and the reader


def load_trace(path: str | Path, format: str = "auto", *, max_model_len: int | None = None,
               too_long: str | None = None, **azure_params: Any) -> Trace:
    """The trace in `path`, read by the reader `format` names (see the module docstring).

    max_model_len bounds prompt_len + output_len; too_long says what happens to a longer
    request: kvtwin traces "error" (default) or "keep"; Azure traces "cap" (default), "drop",
    "error" or "keep". azure_params go to import_azure (start_s, duration_s, rate_scale,
    zero_lengths, seed); they are refused for a kvtwin trace.
    """
    path = Path(path)
    reader, fmt = resolve_format(path, format)
    if reader == "azure":
        trace, _ = import_azure(path, max_model_len=max_model_len, too_long=too_long or "cap",
                                **azure_params)
    else:
        if azure_params:
            key, value = next(iter(azure_params.items()))
            raise SpecError(key, value, f"given only for an Azure trace, and {path} is a kvtwin "
                                        "trace (format=azure reads it as one)")
        trace = read_trace(path, fmt, max_model_len=max_model_len, too_long=too_long or "error")
    label = "azure" if reader == "azure" else f"kvtwin-{trace_format(path, fmt)}"
    return Trace(trace.df, {**trace.meta, LOADED: {"path": str(path), "format": label}})


def resolve_format(path: Path, format: str) -> tuple[str, str | None]:
    """(reader, kvtwin file format or None: from the suffix)."""
    if format in FILE_FORMATS:
        return "kvtwin", format
    if format not in READERS:
        raise SpecError("format", format, f"one of {', '.join(READERS + FILE_FORMATS)}")
    if format == "auto":
        return ("azure" if is_azure_csv(path) else "kvtwin"), None
    return format, None


def is_azure_csv(path: Path) -> bool:
    """A .csv file whose first line names TIMESTAMP, ContextTokens and GeneratedTokens."""
    if path.suffix.lower() != ".csv" or not path.is_file():
        return False
    try:
        with path.open("rb") as f:
            head = f.read(HEADER_BYTES)
    except OSError:
        return False  # the reader says why
    first = head.decode("utf-8-sig", errors="replace").splitlines()[:1]
    names = {c.strip().strip('"') for c in (first[0] if first else "").split(",")}
    return set(AZURE_COLUMNS.values()) <= names


def trace_source(trace_or_path: Trace | str | Path) -> dict[str, Any]:
    """Where a trace came from, for summary.json.

    kind "file" (load_trace or an importer read it), "preset", "generated" or "table"; a file's
    path, format, bytes, sha256 (its bytes read a block at a time) and file_rows; a preset's
    {"name", "params"} (the Azure preset has both: its file too); an import's options; `rows`:
    the trace's request count (a Trace given) or, for a bare path, file_rows only.
    """
    if not isinstance(trace_or_path, Trace):
        return {"kind": "file", **file_facts(Path(trace_or_path))}
    meta = trace_or_path.meta
    loaded, source = meta.get(LOADED) or {}, meta.get("source") or {}
    preset, path = meta.get("preset"), loaded.get("path") or source.get("path")
    kind = "file" if loaded or (source and not preset) else "preset" if preset else \
        "generated" if meta.get("generator") else "table"
    out: dict[str, Any] = {"kind": kind, "rows": len(trace_or_path), "seed": trace_or_path.seed}
    if path:
        out.update(file_facts(Path(path), loaded.get("format")))
    if preset:
        out["preset"] = {"name": preset.get("name"), "params": preset.get("params")}
    elif meta.get("generator"):
        out["generator"] = meta["generator"]
    if source:
        out["import"] = {k: v for k, v in source.items() if k not in ("path", "report")}
    return out


def file_facts(path: Path, label: str | None = None) -> dict[str, Any]:
    """path, format, bytes, sha256 and file_rows of a trace file (None where unreadable)."""
    facts: dict[str, Any] = {"path": str(path.resolve()), "format": label or _label(path),
                             "bytes": None, "sha256": None, "file_rows": None}
    try:
        digest, newlines, size, last = _hash(path)
    except OSError:
        return facts
    facts.update(bytes=size, sha256=digest)
    if facts["format"] == "kvtwin-parquet":
        facts["file_rows"] = _parquet_rows(path)
    elif size:
        lines = newlines + (last != b"\n")
        facts["file_rows"] = lines - (facts["format"] != "kvtwin-jsonl")  # the header line
    return facts


def _label(path: Path) -> str:
    if is_azure_csv(path):
        return "azure"
    suffix = FILE_SUFFIXES.get(path.suffix.lower())
    return f"kvtwin-{suffix}" if suffix else "unknown"


def _hash(path: Path) -> tuple[str, int, int, bytes]:
    """sha256 hex digest, newline count, size and last byte, one block at a time."""
    sha, newlines, size, last = hashlib.sha256(), 0, 0, b""
    with path.open("rb") as f:
        while block := f.read(HASH_BLOCK):
            sha.update(block)
            newlines += block.count(b"\n")
            size += len(block)
            last = block[-1:]
    return sha.hexdigest(), newlines, size, last


def _parquet_rows(path: Path) -> int | None:
    try:
        return int(pq.ParquetFile(path).metadata.num_rows)
    except (pa.ArrowException, OSError, ValueError):
        return None
