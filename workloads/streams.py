"""Files read a chunk at a time, every failure of the file itself one TraceError naming it.

CSV: UTF-8 (a byte-order mark is allowed), a header line, then pandas chunks of text cells.
JSONL: one JSON object per line, in chunks of rows. Encoding errors are located by a streamed
scan (byte offset, line, the data row after the header); parser errors keep pandas' reason.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from workloads.errors import TraceError

CHUNK_ROWS = 1 << 16
SCAN_BYTES = 1 << 20
CSV_SHAPE = ("a CSV table: one header line naming the columns, then one line per request, "
             "UTF-8 text")
_LINE = re.compile(r"\bline (\d+)")


KIND_NAMES = {"csv": "CSV", "parquet": "Parquet", "jsonl": "JSONL"}


def check_file(path: Path, kind: str) -> None:
    """A FileNotFoundError for a missing path; a TraceError for a folder or an empty file."""
    kind = KIND_NAMES.get(kind, kind)
    if not path.exists():
        raise FileNotFoundError(f"trace not found: {path}")
    if path.is_dir():
        raise TraceError("file", None, "<a directory>", f"a {kind} file", str(path))
    try:
        size = path.stat().st_size
    except OSError as err:
        raise TraceError("file", None, f"<{err.strerror}>", f"a readable {kind} file",
                         str(path)) from None
    if size == 0:
        raise TraceError("file", None, "<empty: 0 bytes>", f"a {kind} file of requests",
                         str(path))


def csv_header(path: Path) -> list[str]:
    """The column names of a CSV file (its first line), names stripped of spaces."""
    try:
        frame = pd.read_csv(path, dtype=str, nrows=0, encoding="utf-8-sig")
    except (ValueError, OverflowError, OSError) as err:
        raise csv_error(path, err) from None
    return [str(c).strip() for c in frame.columns]


def csv_chunks(path: Path, usecols: list[str] | None = None,
               rows: int = CHUNK_ROWS) -> Iterator[pd.DataFrame]:
    """The file's cells as text (empty cells are nulls), `rows` at a time; the columns named
    as `csv_header` names them. Only `usecols` (by those names) when given."""
    header = csv_header(path)
    keep = None if usecols is None else [i for i, name in enumerate(header) if name in usecols]
    try:
        with pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""],
                         chunksize=rows, encoding="utf-8-sig", header=0, usecols=keep) as reader:
            for chunk in reader:
                chunk.columns = [str(c).strip() for c in chunk.columns]
                yield chunk
    except (ValueError, OverflowError, OSError) as err:
        raise csv_error(path, err) from None


def csv_error(path: Path, err: BaseException) -> TraceError:
    """One TraceError for what pandas could not read."""
    if isinstance(err, TraceError):
        return err.at(path)
    if isinstance(err, UnicodeDecodeError):
        return encoding_error(path, header_lines=1)
    if isinstance(err, pd.errors.EmptyDataError):
        return TraceError("file", None, "<no header line>", CSV_SHAPE, str(path))
    if isinstance(err, OSError):
        return TraceError("file", None, f"<{err.strerror or err}>", "a readable file", str(path))
    text = str(err).split("C error: ")[-1].strip()
    found = _LINE.search(text)
    row = int(found.group(1)) - 2 if found and int(found.group(1)) >= 2 else None
    return TraceError("csv", row, f"<{text}>", CSV_SHAPE + ", quotes closed", str(path))


def encoding_error(path: Path, header_lines: int) -> TraceError:
    """Where the file stops being UTF-8: byte offset, line and data row."""
    found = first_bad_utf8(path)
    if found is None:  # the decoder failed on a byte the scan accepts: name the file only
        return TraceError("encoding", None, "<not UTF-8>", "UTF-8 text", str(path))
    offset, line, byte = found
    row = line - 1 - header_lines if line > header_lines else None
    return TraceError("encoding", row, f"<byte 0x{byte:02x} at offset {offset}, line {line}>",
                      "UTF-8 text (save the file as UTF-8)", str(path))


def first_bad_utf8(path: Path) -> tuple[int, int, int] | None:
    """(byte offset, 1-based line, byte) of the first byte that is not UTF-8, or None; reads
    the file a block at a time."""
    offset, lines, carry = 0, 1, b""
    with path.open("rb") as f:
        while True:
            block = f.read(SCAN_BYTES)
            data, final = carry + block, not block
            try:
                _, used = codecs.utf_8_decode(data, "strict", final)
            except UnicodeDecodeError as err:
                return offset + err.start, lines + data.count(b"\n", 0, err.start), \
                    data[err.start]
            lines += data.count(b"\n", 0, used)
            offset += used
            carry = data[used:]
            if final:
                return None


def jsonl_rows(path: Path, rows: int = CHUNK_ROWS) -> Iterator[list[dict[str, Any]]]:
    """The file's JSON objects (blank lines skipped), `rows` at a time."""
    chunk: list[dict[str, Any]] = []
    row = 0
    try:
        with path.open(encoding="utf-8-sig") as lines:
            for line in lines:
                if not line.strip():
                    continue
                chunk.append(json_row(line, row))
                row += 1
                if len(chunk) == rows:
                    yield chunk
                    chunk = []
    except UnicodeDecodeError:
        raise encoding_error(path, header_lines=0) from None
    if chunk:
        yield chunk


def json_row(line: str, row: int) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except (ValueError, RecursionError) as err:  # JSONDecodeError, over-long integers, nesting
        reason = err.msg if isinstance(err, json.JSONDecodeError) else type(err).__name__
        raise TraceError("<line>", row, line.strip()[:60], f"valid JSON ({reason})") from None
    if not isinstance(value, dict):
        raise TraceError("<line>", row, line.strip()[:60], "a JSON object")
    return value


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """A small JSON file holding one object (a metadata sidecar)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:
        raise TraceError(what, None, f"<{type(err).__name__}>", "a JSON object (UTF-8)",
                         str(path)) from None
    if not isinstance(value, dict):
        raise TraceError(what, None, type(value).__name__, "a JSON object", str(path))
    return value
