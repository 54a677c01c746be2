"""The data stage: medical chain-of-thought rows in, the exact tokens and loss mask to learn out.

``load_rows`` reads ``data.source`` (a hub dataset, an object in S3 or a local JSON list, JSONL, Parquet or
CSV file), maps ``data.columns`` onto question/reasoning/answer, validates every row and drops exact
duplicates. ``prepare`` formats rows with ``data.template``, tokenizes them, handles rows longer than
``model.max_seq_length`` and splits train from eval. ``validate`` is ``medft data validate``.

Bad input fails before any model is loaded, with one line naming the file, the row and the field:
:class:`DataError` (exit 3) for unreadable, empty, binary, truncated, badly encoded or malformed files,
missing columns, wrong types and empty fields; :class:`NotFoundError` (exit 4) for a missing file or
dataset. Rows are 1-based data-row indices (a CSV header is not a row; blank JSONL lines are not rows).

Reading is streamed: JSONL and CSV line by line and a JSON list value by value, each line or row capped at
:data:`MAX_ROW_BYTES`, so a multi-gigabyte file or one enormous line costs bounded memory beyond the rows
kept. JSON nesting deeper than :data:`MAX_JSON_DEPTH` is refused before it is decoded.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import dataclasses
import hashlib
import json
import math
import os
import random
import re
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from job.config import ColumnsConfig, JobConfig
from job.templates import eos_token, get_template
from registry.errors import (
    AccessDeniedError,
    ConfigError,
    DataError,
    MedftError,
    NotFoundError,
    TransientError,
)
from registry.logs import get_logger

log = get_logger(__name__)

#: Longest accepted line (JSONL, CSV) or row (JSON list, counted in characters), in bytes; a real row is a
#: few kilobytes.
MAX_ROW_BYTES = 8 * 1024 * 1024
#: Deepest accepted JSON nesting; a row is an object of strings, so anything deep is hostile or wrong.
MAX_JSON_DEPTH = 32
#: How much of a JSON list is read at a time.
_CHUNK_BYTES = 1024 * 1024
#: Rows tokenized per call: large enough for the fast tokenizer's batching, small enough to bound memory.
_TOKENIZE_BATCH = 2048
#: Reasoning and answer lengths are measured on at most this many rows (evenly spaced): tokenizing them
#: apart from the completion would otherwise nearly double the cost of ``prepare`` on a large dataset.
STATS_SAMPLE_ROWS = 2000

FIELDS = ("question", "reasoning", "answer")
_SUFFIXES = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".csv": "csv"}
DROP_REASONS = ("duplicate", "too_long", "prompt_too_long")


# --------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Row:
    """One validated row; fields are stripped of surrounding whitespace, ``source_row`` is 1-based."""

    question: str
    reasoning: str
    answer: str
    source_row: int


@dataclass(frozen=True)
class DatasetIdentity:
    """What was trained on, for lineage: ``content_sha256`` hashes the rows ``load_rows`` returned.

    The hash covers the validated, deduplicated rows in order, as canonical JSON lines of
    ``[question, reasoning, answer]``, so it is the same whichever file format carried them.
    """

    source: str
    revision: str | None
    subset: str | None
    split: str | None
    rows: int
    content_sha256: str
    loaded_rows: int | None = None  # set by used_identity: what load_rows returned, before too-long drops
    loaded_sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class DataReport:
    """Rows read, kept and dropped by reason, truncations and (with a tokenizer) token-length statistics.

    ``token_stats`` maps ``prompt``, ``reasoning``, ``answer`` and ``total`` to ``min``, ``median``,
    ``p95`` and ``max``, measured before too-long handling, so it says which ``model.max_seq_length`` the
    data needs. ``total`` counts the whole training example (BOS to EOS). Prompt and total cover every
    row; reasoning and answer cover ``token_stats_rows`` evenly spaced rows (all of them up to
    :data:`STATS_SAMPLE_ROWS`).
    """

    source: str
    rows_read: int = 0
    rows_kept: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    truncated: int = 0
    content_sha256: str | None = None
    template: str | None = None
    max_seq_length: int | None = None
    train_rows: int | None = None
    eval_rows: int | None = None
    token_stats: dict[str, dict[str, float]] | None = None
    token_stats_rows: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)

    def to_text(self) -> str:
        """A human-readable table, as ``medft data validate`` prints it."""
        dropped = ", ".join(f"{k} {v}" for k, v in self.dropped.items() if v) or "none"
        lines = [f"Data report: {self.source}",
                 f"  rows read        {self.rows_read}",
                 f"  rows kept        {self.rows_kept}",
                 f"  dropped          {dropped}",
                 f"  truncated        {self.truncated}"]
        if self.content_sha256:
            lines.append(f"  content sha256   {self.content_sha256}")
        if self.train_rows is not None:
            lines.append(f"  split            train {self.train_rows} / eval {self.eval_rows}")
        if self.template:
            lines.append(f"  template         {self.template} (max_seq_length {self.max_seq_length})")
        if self.token_stats is None:
            lines.append("  token lengths    not measured (no tokenizer given)")
        else:
            lines.append("")
            lines.append(f"  {'tokens':<12}{'min':>8}{'median':>9}{'p95':>8}{'max':>8}")
            for part, s in self.token_stats.items():
                lines.append(f"  {part:<12}{s['min']:>8g}{s['median']:>9g}{s['p95']:>8g}{s['max']:>8g}")
            measured = self.rows_read - self.dropped.get("duplicate", 0)
            if self.token_stats_rows is not None and self.token_stats_rows < measured:
                lines.append(f"  (reasoning and answer measured on {self.token_stats_rows} evenly spaced rows)")
        return "\n".join(lines)


@dataclass
class PreparedData:
    """Tokenized examples: ``{"input_ids": [...], "completion_mask": [...]}``, mask 1 = trained token."""

    train: list[dict[str, list[int]]]
    eval: list[dict[str, list[int]]]
    eval_rows: list[Row]
    report: DataReport
    used_rows: list[Row] = field(default_factory=list)  # every row kept (train and eval), in source order


# --------------------------------------------------------------------------------------------- helpers


def _mib(n: int) -> str:
    return f"{n / 1024 / 1024:g} MiB"


def _json_type(value: Any) -> str:
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "list"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if value is None:
        return "null"
    return type(value).__name__


# A JSON string (possibly cut off at the end of the buffer) or one bracket. Strings are matched whole so
# brackets inside them are not counted; group 1 is set only when the string is closed.
_JSON_TOKEN = re.compile(r'"[^"\\]*(?:\\[\s\S][^"\\]*)*(?:(")|\\?\Z)|[\[\]{}]')


def _json_extent(text: str, start: int, display: str, where: str) -> int | None:
    """End of the JSON object or list opening at ``text[start]``, or None if it does not close in ``text``.

    Raises DataError when it nests deeper than MAX_JSON_DEPTH, before anything is decoded.
    """
    depth = 0
    for m in _JSON_TOKEN.finditer(text, start):
        c = text[m.start()]
        if c == '"':
            if m.group(1) is None:
                return None
        elif c in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                raise DataError(f"{display}: {where}: JSON nested more than {MAX_JSON_DEPTH} levels deep; a row "
                                "must be one flat object of text fields")
        else:
            depth -= 1
            if depth <= 0:
                return m.end()
    return None


def _check_depth(text: str, display: str, where: str) -> None:
    # Counting brackets is C-speed; only a line with many of them needs the exact scan.
    if text.count("[") + text.count("{") <= MAX_JSON_DEPTH:
        return
    start = len(text) - len(text.lstrip())
    if start < len(text) and text[start] in "[{":
        _json_extent(text, start, display, where)


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
            raise DataError(f"{display}: {where}: line longer than {_mib(limit)}; a row is a few kilobytes, so "
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

Record = tuple[int, str, dict[str, Any]]


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
            _check_depth(text, display, where)
            record = _decode_json(text, display, where, hint)
            if not isinstance(record, dict):
                raise DataError(f"{display}: {where}: a JSON {_json_type(record)}, expected an object with the "
                                f"columns {', '.join(wanted)}")
            cur.rows_done = row
            yield row, where, record


class _TextStream:
    """UTF-8 text of a binary file, chunk by chunk, ending just before the first invalid byte or NUL.

    Stopping there (rather than failing at once) lets the parser finish the rows before the bad byte, so
    the error names the row that holds it. ``stop`` then says why: ``"utf-8"`` or ``"binary"``.
    """

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self._pending = b""
        self._offset = 0
        self.stop: str | None = None
        self.stop_offset = 0

    def read(self) -> str | None:
        """The next chunk of text, or None at the end of the file or of the valid text."""
        if self.stop is not None:
            return None
        chunk = self._f.read(_CHUNK_BYTES)
        if self._offset == 0 and chunk.startswith(codecs.BOM_UTF8):
            chunk = chunk[len(codecs.BOM_UTF8):]
            self._offset = len(codecs.BOM_UTF8)
        if not chunk and not self._pending:
            return None
        data, eof = self._pending + chunk, not chunk
        nul = data.find(b"\x00")
        if nul >= 0:  # no JSON text holds a raw NUL: binary data, or UTF-16
            data, self.stop, self.stop_offset = data[:nul], "binary", self._offset + nul
        try:
            text, self._pending = data.decode("utf-8"), b""
        except UnicodeDecodeError as e:
            text = data[:e.start].decode("utf-8")
            if e.reason == "unexpected end of data" and not eof and self.stop is None:
                self._pending = data[e.start:]  # a character split across chunks
            else:
                # A chunk with NUL bytes is binary even where an invalid byte comes first.
                self.stop, self.stop_offset = self.stop or "utf-8", self._offset + e.start
        self._offset += len(data) - len(self._pending)
        return text


def _iter_json_list(path: Path, display: str, wanted: list[str]) -> Iterator[Record]:
    with _open(path, display) as f:
        stream = _TextStream(f)
        buf, pos, row = "", 0, 0

        def more(where: str) -> bool:
            nonlocal buf, pos
            text = stream.read()
            if text is None:
                if stream.stop == "binary":
                    raise DataError(f"{display}: {where}: NUL bytes near byte offset {stream.stop_offset}: a binary "
                                    "or compressed file, or text not in UTF-8 (UTF-16?); give a UTF-8 JSON list")
                if stream.stop == "utf-8":
                    raise DataError(f"{display}: {where}: not valid UTF-8 (byte offset {stream.stop_offset}); "
                                    "re-save the file as UTF-8")
                return False
            buf, pos = buf[pos:] + text, 0
            return True

        def next_char(where: str) -> str | None:
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    pos += 1
                if pos < len(buf):
                    return buf[pos]
                if not more(where):
                    return None

        c = next_char("row 1")
        if c != "[":
            found = "nothing but whitespace" if c is None else f"{c!r}"
            raise DataError(f"{display}: row 1: expected a JSON list of row objects ('['), found {found}; "
                            "for one object per line name the file .jsonl")
        pos += 1
        expect_value = True
        first = True
        while True:
            where = f"row {row + 1}"
            c = next_char(where)
            if c is None:
                raise DataError(f"{display}: {where}: the file ends before the list is closed (truncated "
                                "file?)")
            if c == "]" and (first or not expect_value):
                pos += 1
                rest = next_char(f"after row {row}")
                if rest is not None:
                    raise DataError(f"{display}: after row {row}: unexpected {rest!r} after the closing ']'")
                return
            if c == "]" and expect_value:
                raise DataError(f"{display}: after row {row}: a trailing ',' before the closing ']'; remove it")
            if not expect_value:
                if c != ",":
                    raise DataError(f"{display}: after row {row}: expected ',' or ']', found {c!r}")
                pos += 1
                expect_value = True
                continue
            row += 1
            if c != "{":
                kind = {"[": "list", '"': "string", "t": "boolean", "f": "boolean", "n": "null"}.get(c, "number")
                raise DataError(f"{display}: {where}: a JSON {kind}, expected an object with the columns "
                                f"{', '.join(wanted)}")
            end = _json_extent(buf, pos, display, where)
            while end is None:
                if len(buf) - pos > MAX_ROW_BYTES:
                    raise DataError(f"{display}: {where}: row larger than {_mib(MAX_ROW_BYTES)}; a row is a few "
                                    "kilobytes, so this row is corrupt")
                if not more(where):
                    raise DataError(f"{display}: {where}: the file ends inside this row (truncated file?)")
                end = _json_extent(buf, pos, display, where)
            if end - pos > MAX_ROW_BYTES:
                raise DataError(f"{display}: {where}: row larger than {_mib(MAX_ROW_BYTES)}; a row is a few "
                                "kilobytes, so this row is corrupt")
            record = _decode_json(buf[pos:end], display, where, "fix the row's JSON")
            pos, first, expect_value = end, False, False
            yield row, where, record


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
                    msg = f"a field is larger than {_mib(MAX_ROW_BYTES)}"
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


def _iter_parquet(path: Path, display: str, wanted: list[str]) -> Iterator[Record]:
    """Opens the file and checks its columns at once (not lazily), then streams record batches."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{display}: not a readable Parquet file ({first}); check it is complete") from None
    _check_columns(display, pf.schema_arrow.names, wanted)
    return _parquet_rows(pf, display, wanted)


def _parquet_rows(pf: Any, display: str, wanted: list[str]) -> Iterator[Record]:
    import pyarrow as pa

    row = 0
    try:
        for batch in pf.iter_batches(batch_size=1024, columns=wanted):
            for record in batch.to_pylist():
                row += 1
                yield row, f"row {row}", record
    except (pa.ArrowException, OSError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{display}: row {row + 1}: unreadable Parquet data ({first}); the file may be "
                        "truncated") from None


_READERS: dict[str, Callable[[Path, str, list[str]], Iterator[Record]]] = {
    "json": _iter_json_list, "jsonl": _iter_jsonl, "csv": _iter_csv, "parquet": _iter_parquet}


def _file_records(path: Path, display: str, wanted: list[str]) -> Iterator[Record]:
    """Records of a local file, format chosen by suffix; NotFoundError / DataError for unusable files."""
    kind = _SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise ConfigError(f"data.source: {display}: unsupported file type {path.suffix or '(none)'!r}; use "
                          ".json (a list), .jsonl, .parquet or .csv")
    if not path.exists():
        raise NotFoundError(f"data.source: {display}: no such file; check the path (relative paths are from "
                            f"{Path.cwd()})")
    if path.is_dir():
        raise DataError(f"{display}: is a directory, not a data file; name a {kind} file")
    try:
        size = path.stat().st_size
    except OSError as e:
        raise DataError(f"{display}: cannot read the file ({e.strerror or e})") from None
    if size == 0:
        raise DataError(f"{display}: row 1: the file is empty (0 bytes); write the rows into it")
    return _READERS[kind](path, display, wanted)


# --------------------------------------------------------------------------------------------- validation


def _missing_column(display: str, where: str, field_name: str, col: str, have: list[Any]) -> DataError:
    shown = [repr(str(k)[:40]) for k in have[:20]]
    more = f" and {len(have) - 20} more" if len(have) > 20 else ""
    return DataError(f"{display}: {where}: missing column {col!r} (data.columns.{field_name}); the row has "
                     f"{', '.join(shown) + more if shown else 'no columns'}; fix the data or set "
                     f"data.columns.{field_name}")


def _check_columns(display: str, names: list[str], wanted: list[str]) -> None:
    """For whole-table sources (Parquet, hub): every wanted column must be in the schema; names row 1."""
    for field_name, col in zip(FIELDS, wanted):
        if col not in names:
            raise _missing_column(display, "row 1", field_name, col, names)


def _row_from_record(record: dict[str, Any], row: int, where: str, display: str, cols: ColumnsConfig) -> Row:
    values = []
    for name in FIELDS:
        col = getattr(cols, name)
        if col not in record:
            raise _missing_column(display, where, name, col, list(record))
        value = record[col]
        if value is None:
            raise DataError(f"{display}: {where}: field {col!r} is null; every row needs a {name} text")
        if not isinstance(value, str):
            raise DataError(f"{display}: {where}: field {col!r} is a {_json_type(value)}, expected text")
        text = value.strip()
        if not text:
            raise DataError(f"{display}: {where}: field {col!r} is empty or whitespace-only; fill it or "
                            "remove the row")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise DataError(f"{display}: {where}: field {col!r} holds an unpaired surrogate (a broken "
                            "\\ud800-style escape); fix the text") from None
        values.append(text)
    return Row(values[0], values[1], values[2], row)


def _canonical(row: Row) -> bytes:
    return json.dumps([row.question, row.reasoning, row.answer], ensure_ascii=False).encode("utf-8")


def used_identity(identity: DatasetIdentity, prepared: PreparedData) -> DatasetIdentity:
    """``identity`` narrowed to the rows ``prepare`` kept (train and eval), hashed as ``load_rows`` hashes.

    The loaded count and hash stay beside it, so an auditor can tie the used rows to the source file.
    """
    content = hashlib.sha256()
    for row in prepared.used_rows:
        content.update(_canonical(row) + b"\n")
    return dataclasses.replace(identity, rows=len(prepared.used_rows), content_sha256=content.hexdigest(),
                               loaded_rows=identity.rows, loaded_sha256=identity.content_sha256)


def _collect(records: Iterable[Record], display: str, cols: ColumnsConfig) -> tuple[list[Row], int, int, str]:
    """Validate records, drop exact duplicates; returns rows, rows read, duplicates and the content hash."""
    rows: list[Row] = []
    seen: set[bytes] = set()
    content = hashlib.sha256()
    read = duplicates = 0
    for row_no, where, record in records:
        read += 1
        row = _row_from_record(record, row_no, where, display, cols)
        line = _canonical(row)
        key = hashlib.sha256(line).digest()
        if key in seen:
            duplicates += 1
            log.debug("data.duplicate_dropped", source=display, row=row_no)
            continue
        seen.add(key)
        content.update(line + b"\n")
        rows.append(row)
    if read == 0:
        raise DataError(f"{display}: row 1: the data holds no rows; add rows with the columns "
                        f"{cols.question}, {cols.reasoning}, {cols.answer}")
    return rows, read, duplicates, content.hexdigest()


# --------------------------------------------------------------------------------------------- sources


def _hf_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _load_hf_dataset(name: str, cfg: JobConfig, display: str) -> Any:
    """``datasets.load_dataset`` with its failures mapped onto medft's exit codes."""
    import datasets

    d = cfg.data
    try:
        ds = datasets.load_dataset(name, d.subset, split=d.split, revision=d.revision, cache_dir=d.cache_dir,
                                   token=os.environ.get("HF_TOKEN") or None)
    except MedftError:
        raise
    except Exception as e:  # datasets raises many types; each is mapped below
        msg = " ".join(str(e).split())[:300]
        etype = type(e).__name__
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403) or "gated" in msg.lower() or re.search(r"\b40[13] Client Error", msg):
            raise AccessDeniedError(f"data.source: {display}: access refused ({msg}); accept the dataset's "
                                    "terms on the hub and set HF_TOKEN") from None
        if etype in ("DatasetNotFoundError", "FileNotFoundError", "RepositoryNotFoundError",
                     "EntryNotFoundError", "RevisionNotFoundError"):
            raise NotFoundError(f"data.source: {display}: dataset not found ({msg}); check the name, "
                                "data.revision and HF_TOKEN") from None
        if isinstance(e, ConnectionError) or "OfflineModeIsEnabled" in msg or etype in ("LocalEntryNotFoundError",):
            if _hf_offline():
                raise NotFoundError(f"data.source: {display}: not in the local cache and HF_HUB_OFFLINE is set; "
                                    "download it once online or point data.cache_dir at a cache holding "
                                    "it") from None
            raise TransientError(f"data.source: {display}: cannot reach the Hugging Face hub ({msg}); retry "
                                 "later or set HF_HUB_OFFLINE=1 with a filled cache") from None
        if isinstance(e, ValueError):
            key = "data.split" if "split" in msg.lower() else "data.subset" if "config" in msg.lower() else (
                "data.source")
            raise ConfigError(f"{key}: {display}: {msg}") from None
        raise
    if not isinstance(ds, datasets.Dataset):
        raise ConfigError(f"data.split: {display}: name one split, e.g. train or train[:500]")
    return ds


def _hf_revision(name: str, revision: str | None) -> str | None:
    """The commit the hub resolves ``revision`` to (best effort, skipped offline); else ``revision``."""
    if _hf_offline():
        return revision
    try:
        from huggingface_hub import HfApi

        info = HfApi().dataset_info(name, revision=revision, token=os.environ.get("HF_TOKEN") or None,
                                    timeout=10)
        return info.sha or revision
    except Exception as e:  # noqa: BLE001 - lineage detail only; the content hash identifies the data
        log.warning("data.revision_unresolved", dataset=name, error=str(e)[:200])
        return revision


def _hf_records(ds: Any, wanted: list[str]) -> Iterator[Record]:
    ds = ds.select_columns(wanted)
    for start in range(0, len(ds), 1000):
        batch = ds[start:start + 1000]
        for i in range(len(batch[wanted[0]])):
            row = start + i + 1
            yield row, f"row {row}", {c: batch[c][i] for c in wanted}


def _s3_download(uri: str, dest_dir: Path, store_opener: Callable[[str], Any] | None) -> Path:
    rest = uri[len("s3://"):]
    parent, _, key = uri.rpartition("/")
    if "/" not in rest or not key:
        raise ConfigError(f"data.source: {uri}: name one object, s3://bucket/key.jsonl")
    if store_opener is None:
        from registry.store import open_store

        store_opener = open_store
    dest = dest_dir / key
    store_opener(parent).get_file(key, dest)
    return dest


def load_rows(cfg: JobConfig, *, store_opener: Callable[[str], Any] | None = None
              ) -> tuple[list[Row], DatasetIdentity, DataReport]:
    """Read, validate and deduplicate ``cfg.data.source``.

    ``hf://org/name`` goes through ``datasets.load_dataset`` (``data.subset``, ``data.split``,
    ``data.revision``, ``data.cache_dir``, ``HF_TOKEN``, ``HF_HUB_OFFLINE``); ``s3://bucket/key`` is
    downloaded with ``store_opener(parent_uri).get_file(key, dest)`` (default ``registry.store.open_store``)
    into a temporary directory and read as a local file; anything else is a local .json (list), .jsonl,
    .parquet or .csv file, read whole (``data.subset``/``data.split`` apply to hub datasets only).

    Raises DataError (exit 3) for bad data, NotFoundError (exit 4) for a missing file or dataset,
    ConfigError (exit 2) for an unusable source or split, AccessDeniedError/TransientError from the hub.
    """
    d = cfg.data
    source = d.source
    wanted = [getattr(d.columns, f) for f in FIELDS]
    started = time.monotonic()
    revision, subset, split = None, None, None
    if source.startswith("hf://"):
        name = source[len("hf://"):].strip("/")
        if name.count("/") != 1:
            raise ConfigError(f"data.source: {source}: write hf://org/name")
        display = f"{source} ({d.subset or 'default'}, {d.split})"
        ds = _load_hf_dataset(name, cfg, display)
        _check_columns(display, list(ds.column_names), wanted)
        rows, read, dups, sha = _collect(_hf_records(ds, wanted), display, d.columns)
        revision, subset, split = _hf_revision(name, d.revision), d.subset, d.split
    elif source.startswith("s3://"):
        with tempfile.TemporaryDirectory(prefix="medft-data-") as tmp:
            path = _s3_download(source, Path(tmp), store_opener)
            rows, read, dups, sha = _collect(_file_records(path, source, wanted), source, d.columns)
    elif "://" in source and not source.startswith("file://"):
        raise ConfigError(f"data.source: {source}: unsupported scheme; use hf://org/name, s3://bucket/key or a "
                          "local file")
    else:
        path = Path(source.removeprefix("file://")).expanduser()
        rows, read, dups, sha = _collect(_file_records(path, source, wanted), source, d.columns)
    identity = DatasetIdentity(source=source, revision=revision, subset=subset, split=split, rows=len(rows),
                               content_sha256=sha)
    report = DataReport(source=source, rows_read=read, rows_kept=len(rows), content_sha256=sha)
    report.dropped["duplicate"] = dups
    log.info("data.loaded", source=source, rows_read=read, rows=len(rows), duplicates=dups,
             content_sha256=sha, seconds=round(time.monotonic() - started, 2))
    return rows, identity, report


# --------------------------------------------------------------------------------------------- prepare


class _Encoder:
    """Batch tokenization without special tokens, through the Rust backend when that is provably the same.

    ``tokenizer(texts)`` builds offsets, attention masks and Python objects per token that prepare never
    uses; the fast tokenizer's own ``encode_batch_fast`` skips them and is several times faster. It is
    used only when it gives the same ids as ``tokenizer(...)`` on the texts of the first batch, so a
    tokenizer that preprocesses text in Python is still tokenized its own way.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
        self._backend = getattr(backend, "encode_batch_fast", None) or getattr(backend, "encode_batch", None)
        self._verified = self._backend is None

    def _slow(self, texts: list[str]) -> list[list[int]]:
        return list(self._tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"])

    def _batches(self, texts: list[str]) -> Iterator[list[str]]:
        for i in range(0, len(texts), _TOKENIZE_BATCH):
            yield texts[i:i + _TOKENIZE_BATCH]

    def _fast(self, texts: list[str]) -> list[Any] | None:
        if self._backend is None:
            return None
        encodings = self._backend(texts, add_special_tokens=False)
        if not self._verified:
            probe = texts[:8]
            if [e.ids for e in encodings[:len(probe)]] != self._slow(probe):
                log.info("data.tokenizer_python_path", reason="its backend gives other ids than tokenizer(...)")
                self._backend = None
                return None
            self._verified = True
        return encodings

    def ids(self, texts: list[str]) -> list[list[int]]:
        out: list[list[int]] = []
        for batch in self._batches(texts):
            enc = self._fast(batch)
            out.extend([e.ids for e in enc] if enc is not None else self._slow(batch))
        return out

    def lengths(self, texts: list[str]) -> list[int]:
        out: list[int] = []
        for batch in self._batches(texts):
            enc = self._fast(batch)
            out.extend([len(e) for e in enc] if enc is not None else [len(x) for x in self._slow(batch)])
        return out


def _stats(values: list[int]) -> dict[str, float]:
    s = sorted(values)
    return {"min": s[0], "median": round(float(statistics.median(s)), 1),
            "p95": s[max(0, math.ceil(0.95 * len(s)) - 1)], "max": s[-1]}


def split_indices(rows: list[Row], candidates: list[int], eval_fraction: float, seed: int
                  ) -> tuple[list[int], list[int]]:
    """Split ``candidates`` (indices into ``rows``) into sorted train and eval indices, disjoint.

    ``round(n * eval_fraction)`` rows go to eval, at least 1 when ``eval_fraction > 0`` and ``n >= 2``,
    never all. Rows that share a question stay on one side (so eval questions are unseen), unless every
    row shares one. Deterministic for ``seed``.
    """
    n = len(candidates)
    if eval_fraction <= 0 or n < 2:
        return sorted(candidates), []
    want = min(n - 1, max(1, round(n * eval_fraction)))
    groups: dict[str, list[int]] = {}
    for i in candidates:
        groups.setdefault(rows[i].question, []).append(i)
    order = list(groups.values())
    random.Random(seed).shuffle(order)
    chosen: list[int] = []
    for g in order:
        if len(chosen) >= want:
            break
        if len(chosen) + len(g) < n:
            chosen.extend(g)
    if not chosen:  # one question throughout: split rows, not questions
        shuffled = sorted(candidates)
        random.Random(seed).shuffle(shuffled)
        chosen = shuffled[:want]
    eval_set = set(chosen)
    return sorted(i for i in candidates if i not in eval_set), sorted(eval_set)


def prepare(rows: list[Row], tokenizer: Any, cfg: JobConfig, *, report: DataReport | None = None
            ) -> PreparedData:
    """Format, tokenize, length-check and split ``rows``.

    Each example is ``prefix + prompt + completion + EOS`` where the prompt and the completion are
    tokenized separately, so the mask boundary is exact and the prompt ids equal
    ``Template.encode_prompt``. ``completion_mask`` is 0 on the prompt and 1 on the completion (EOS
    included), or all 1 with ``data.train_on_prompt``. A row longer than ``model.max_seq_length`` is
    dropped (``too_long``) or, with ``data.too_long=truncate``, cut at the limit (losing its EOS); a row
    whose prompt alone fills the limit is dropped (``prompt_too_long``). ``report`` (from ``load_rows``)
    is carried over and completed.

    Raises DataError (exit 3) when no row is left, ConfigError when the tokenizer has no EOS token or
    (``chat``) no chat template.
    """
    d = cfg.data
    started = time.monotonic()
    template = get_template(d.template)
    report = dataclasses.replace(report, dropped=dict(report.dropped)) if report else DataReport(
        source=d.source, rows_read=len(rows), rows_kept=len(rows))
    if not rows:
        raise DataError(f"{d.source}: row 1: no rows to train on; add rows to the data")
    eos_token(tokenizer)
    eos_id = int(tokenizer.eos_token_id)
    if getattr(tokenizer, "bos_token_id", None) == eos_id:
        log.warning("data.eos_is_bos", eos_token=tokenizer.eos_token,
                    hint="if the model's generation stops on another token, it will never learn to stop")
    max_len = cfg.model.max_seq_length
    prefix = template.prefix_ids(tokenizer)

    encoder = _Encoder(tokenizer)
    prompt_ids = encoder.ids([template.prompt(r.question, tokenizer) for r in rows])
    body_ids = encoder.ids([template.completion_body(r.reasoning, r.answer) for r in rows])
    step = max(1, math.ceil(len(rows) / STATS_SAMPLE_ROWS))
    sample = rows[::step]
    reasoning_len = encoder.lengths([r.reasoning for r in sample])
    answer_len = encoder.lengths([r.answer for r in sample])

    examples: dict[int, dict[str, list[int]]] = {}
    totals: list[int] = []
    for i in range(len(rows)):
        head = prefix + prompt_ids[i]
        tail = body_ids[i] + [eos_id]
        total = len(head) + len(tail)
        totals.append(total)
        if total > max_len:
            if d.too_long == "drop":
                report.dropped["too_long"] += 1
                continue
            if len(head) >= max_len:
                report.dropped["prompt_too_long"] += 1
                continue
            tail = tail[:max_len - len(head)]
            report.truncated += 1
        mask = [1] * (len(head) + len(tail)) if d.train_on_prompt else [0] * len(head) + [1] * len(tail)
        examples[i] = {"input_ids": head + tail, "completion_mask": mask}

    report.token_stats = {"prompt": _stats([len(prefix) + len(p) for p in prompt_ids]),
                          "reasoning": _stats(reasoning_len), "answer": _stats(answer_len),
                          "total": _stats(totals)}
    report.token_stats_rows = len(sample)
    report.template, report.max_seq_length = template.name, max_len
    report.rows_kept = len(examples)
    if not examples and d.too_long == "truncate":
        shortest = len(prefix) + min(len(x) for x in prompt_ids)
        raise DataError(f"{d.source}: no row is left: every prompt alone fills model.max_seq_length={max_len} "
                        f"tokens (shortest prompt {shortest}); raise model.max_seq_length")
    if not examples:
        raise DataError(f"{d.source}: no row is left: all {len(rows)} rows are longer than "
                        f"model.max_seq_length={max_len} tokens (shortest {min(totals)}); raise "
                        "model.max_seq_length or set data.too_long=truncate")
    train_idx, eval_idx = split_indices(rows, list(examples), d.eval_fraction, cfg.train.seed)
    report.train_rows, report.eval_rows = len(train_idx), len(eval_idx)
    log.info("data.prepared", template=template.name, train=len(train_idx), eval=len(eval_idx),
             dropped=report.dropped, truncated=report.truncated, seconds=round(time.monotonic() - started, 2))
    return PreparedData(train=[examples[i] for i in train_idx], eval=[examples[i] for i in eval_idx],
                        eval_rows=[rows[i] for i in eval_idx], report=report,
                        used_rows=[rows[i] for i in sorted(examples)])


def validate(cfg: JobConfig, tokenizer: Any = None, *,
             loaded: tuple[list[Row], DatasetIdentity, DataReport] | None = None) -> DataReport:
    """``medft data validate``: load and check the data; with a tokenizer, also format and measure it.

    ``loaded`` is what :func:`load_rows` already returned for ``cfg``, to avoid reading the data twice.
    Raises what :func:`load_rows` and :func:`prepare` raise.
    """
    rows, _identity, report = loaded if loaded is not None else load_rows(cfg)
    if tokenizer is None:
        return report
    return prepare(rows, tokenizer, cfg, report=report).report
