"""File formats to raw records: JSON list, JSONL, CSV and Parquet, each streamed, with every failure named.

:func:`file_records` picks the reader by suffix. Each reader yields :data:`~job.data.rows.Record` tuples
and fails with one :class:`DataError` line naming the file, the 1-based data row (and the line where it
helps) and how to fix it; :class:`NotFoundError` for a missing file. Reading is streamed: JSONL and CSV
line by line, a JSON list value by value (:mod:`job.data.json_list`), each line or row capped at
:data:`MAX_ROW_BYTES`, so a multi-gigabyte file or one enormous line costs bounded memory beyond the rows
kept. JSON nesting deeper than :data:`MAX_JSON_DEPTH` is refused before it is decoded.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from job.data import json_list
from job.data.rows import Record, check_columns, json_type
from registry.errors import ConfigError, DataError, NotFoundError

#: Longest accepted line (JSONL, CSV) or row (JSON list, counted in characters), in bytes; a real row is a
#: few kilobytes.
MAX_ROW_BYTES = 8 * 1024 * 1024
#: Deepest accepted JSON nesting; a row is an object of strings, so anything deep is hostile or wrong.
MAX_JSON_DEPTH = 32
#: How much of a JSON list is read at a time (ijson's own default).
_CHUNK_BYTES = 64 * 1024
_SUFFIXES = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".csv": "csv"}


def _decode_json(text: str, display: str, where: str, hint: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{display}: {where}: invalid JSON ({e.msg} at column {e.colno}); {hint}") from None
    except RecursionError:
        raise DataError(f"{display}: {where}: JSON nested too deeply; a row must be one flat object of text "
                        "fields") from None


@dataclass
class _Cursor:
    line: int = 0
    rows_done: int = 0
    complete_line: bool = True


def _lines(f: BinaryIO, display: str, cur: _Cursor, kind: str) -> Iterator[str]:
    """Decoded lines (line endings kept), each at most MAX_ROW_BYTES; errors name the row being read."""
    limit = MAX_ROW_BYTES
    while True:
        raw = f.readline(limit + 1)
        if not raw:
            return
        cur.line += 1
        if cur.line == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8):]
        where = f"row {cur.rows_done + 1} (line {cur.line})"
        if len(raw) > limit:
            raise DataError(f"{display}: {where}: line longer than {json_list.mib(limit)}; a row is a few kilobytes, so "
                            f"this is not a {kind} file or a row is corrupt")
        nul = raw.find(b"\x00")
        if nul >= 0:
            raise DataError(f"{display}: {where}: NUL bytes at column {nul + 1}: a binary or compressed file, "
                            f"or text not in UTF-8 (UTF-16?); give a UTF-8 {kind} file")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            # Binary formats (gzip, zip, images) break UTF-8 at once and carry NUL bytes soon after.
            ahead = getattr(f, "peek", lambda _n: b"")(4096)[:4096]
            if cur.line == 1 and b"\x00" in raw[:4096] + ahead:
                raise DataError(f"{display}: {where}: not text but a binary or compressed file (byte "
                                f"0x{raw[e.start]:02x} at column {e.start + 1}, NUL bytes follow); give a UTF-8 "
                                f"{kind} file") from None
            raise DataError(f"{display}: {where}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column "
                            f"{e.start + 1}); re-save the file as UTF-8") from None
        cur.complete_line = raw.endswith(b"\n")
        yield text


def _open(path: Path, display: str) -> BinaryIO:
    try:
        return open(path, "rb")  # the callers close it with `with`
    except FileNotFoundError:
        raise NotFoundError(f"data.source: {display}: no such file; check the path") from None
    except OSError as e:
        raise DataError(f"{display}: cannot read the file ({e.strerror or e}); check its permissions") from None


# --------------------------------------------------------------------------------------------- readers
# Each reader yields (row number, "row N (line L)" for messages, the raw record as a dict).


def _iter_jsonl(path: Path, display: str, wanted: list[str]) -> Iterator[Record]:
    cur = _Cursor()
    with _open(path, display) as f:
        for text in _lines(f, display, cur, "JSONL"):
            if not text.strip():
                continue
            row = cur.rows_done + 1
            where = f"row {row}" + (f" (line {cur.line})" if cur.line != row else "")
            if not cur.complete_line:
                hint = "the last line is cut off (truncated file?)"
            elif row == 1 and text.lstrip().startswith("["):
                hint = "this looks like a JSON list: name the file .json"
            else:
                hint = "each line must be one JSON object"
            json_list.check_line_depth(text, display, where, MAX_JSON_DEPTH)
            record = _decode_json(text, display, where, hint)
            if not isinstance(record, dict):
                raise DataError(f"{display}: {where}: a JSON {json_type(record)}, expected an object with the "
                                f"columns {', '.join(wanted)}")
            cur.rows_done = row
            yield row, where, record


def _iter_json_list(path: Path, display: str, wanted: list[str]) -> Iterator[Record]:
    limits = json_list.Limits(row_bytes=MAX_ROW_BYTES, depth=MAX_JSON_DEPTH, chunk_bytes=_CHUNK_BYTES)
    with _open(path, display) as f:
        yield from json_list.iter_rows(f, path, display, wanted, limits)


@contextlib.contextmanager
def _csv_field_limit(limit: int) -> Iterator[None]:
    # csv's limit is process-wide; raise it only while reading (a reasoning field can exceed the 128 KiB default).
    old = csv.field_size_limit(limit)
    try:
        yield
    finally:
        csv.field_size_limit(old)


def _iter_csv(path: Path, display: str, wanted: list[str]) -> Iterator[Record]:
    cur = _Cursor()
    with _open(path, display) as f, _csv_field_limit(MAX_ROW_BYTES):
        reader = csv.reader(_lines(f, display, cur, "CSV"), strict=True)
        try:
            header = next(reader, None)
        except csv.Error as e:
            raise DataError(f"{display}: header (line {cur.line}): invalid CSV ({e})") from None
        if not header or not any(h.strip() for h in header):
            raise DataError(f"{display}: row 1: no header line; the first line must name the columns "
                            f"({', '.join(wanted)})")
        header = [h.strip() for h in header]
        while True:
            row, first_line = cur.rows_done + 1, cur.line + 1
            where = f"row {row} (line {first_line})"
            try:
                values = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                msg = str(e)
                if "field larger than field limit" in msg:
                    msg = f"a field is larger than {json_list.mib(MAX_ROW_BYTES)}"
                elif "unexpected end of data" in msg:
                    msg = "the file ends inside a quoted field (truncated file, or an unbalanced quote)"
                raise DataError(f"{display}: {where}: invalid CSV: {msg}; quote fields that hold commas, quotes "
                                "or newlines") from None
            if not values:  # a blank line
                continue
            if len(values) != len(header):
                raise DataError(f"{display}: {where}: {len(values)} fields but the header has {len(header)}; "
                                "quote fields that hold commas, quotes or newlines")
            cur.rows_done = row
            yield row, where, dict(zip(header, values))


def open_parquet(path: Path, display: str) -> Any:
    """``pyarrow.parquet.ParquetFile`` of ``path``; DataError (exit 3) naming ``display`` when it is not one."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{display}: not a readable Parquet file ({first}); check it is complete") from None


def parquet_records(pf: Any, display: str, columns: list[str] | None = None) -> Iterator[Record]:
    """The rows of an open Parquet file (only ``columns``; None: all), streamed batch by batch as ``(row number,
    "row N", record)``; DataError naming the row where the data stops being readable."""
    import pyarrow as pa

    row = 0
    try:
        for batch in pf.iter_batches(batch_size=1024, columns=columns):
            for record in batch.to_pylist():
                row += 1
                yield row, f"row {row}", record
    except (pa.ArrowException, OSError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{display}: row {row + 1}: unreadable Parquet data ({first}); the file may be "
                        "truncated") from None


def _iter_parquet(path: Path, display: str, wanted: list[str]) -> Iterator[Record]:
    """Opens the file and checks its columns at once (not lazily), then streams record batches."""
    pf = open_parquet(path, display)
    check_columns(display, pf.schema_arrow.names, wanted)
    return parquet_records(pf, display, wanted)


_READERS: dict[str, Callable[[Path, str, list[str]], Iterator[Record]]] = {
    "json": _iter_json_list, "jsonl": _iter_jsonl, "csv": _iter_csv, "parquet": _iter_parquet}


def file_records(path: Path, display: str, wanted: list[str]) -> Iterator[Record]:
    """Records of a local file, format chosen by suffix; NotFoundError / DataError for unusable files."""
    kind = _SUFFIXES.get(path.suffix.lower())
    if kind is None and path.is_dir():
        raise DataError(f"data.source: {display}: is a directory; give one .json (a list), .jsonl, .parquet or "
                        ".csv file")
    if kind is None:
        raise ConfigError(f"data.source: {display}: unsupported file type {path.suffix or '(none)'!r}; use "
                          ".json (a list), .jsonl, .parquet or .csv")
    if not path.exists():
        raise NotFoundError(f"data.source: {display}: no such file; check the path (relative paths are from "
                            f"{Path.cwd()})")
    if path.is_dir():
        raise DataError(f"{display}: is a directory, not a data file; name a {kind} file")
    if not path.is_file():  # a device, pipe or socket: its size says nothing and reading it may never end
        raise DataError(f"{display}: is not a regular file (a device, pipe or socket); name a {kind} file")
    try:
        size = path.stat().st_size
    except OSError as e:
        raise DataError(f"{display}: cannot read the file ({e.strerror or e})") from None
    if size == 0:
        raise DataError(f"{display}: row 1: the file is empty (0 bytes); write the rows into it")
    return _READERS[kind](path, display, wanted)

