"""Raw records to validated rows: the column mapping, every field's checks, duplicates and the content hash.

A record is what a reader or the hub yields for one source row: ``(row number, "row N (line L)" for
messages, the raw mapping)``. :func:`collect` turns them into :class:`Row` objects, failing with one
:class:`DataError` line naming the source, the row and the field.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

from job.config import ColumnsConfig
from job.data.results import FIELDS, Row
from registry.errors import DataError
from registry.logs import get_logger

log = get_logger(__name__)

#: (row number, "row N (line L)" for messages, the raw record as a dict).
Record = tuple[int, str, dict[str, Any]]


def json_type(value: Any) -> str:
    """The JSON name of a decoded value's type, for messages (``object``, ``list``, ``number`` ...)."""
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


def _missing_column(display: str, where: str, field_name: str, col: str, have: list[Any]) -> DataError:
    shown = [repr(str(k)[:40]) for k in have[:20]]
    more = f" and {len(have) - 20} more" if len(have) > 20 else ""
    return DataError(f"{display}: {where}: missing column {col!r} (data.columns.{field_name}); the row has "
                     f"{', '.join(shown) + more if shown else 'no columns'}; fix the data or set "
                     f"data.columns.{field_name}")


def check_columns(display: str, names: list[str], wanted: list[str]) -> None:
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
            raise DataError(f"{display}: {where}: field {col!r} is a {json_type(value)}, expected text")
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


def canonical(row: Row) -> bytes:
    """The row as hashed for duplicates and lineage: canonical JSON of ``[question, reasoning, answer]``."""
    return json.dumps([row.question, row.reasoning, row.answer], ensure_ascii=False).encode("utf-8")


def collect(records: Iterable[Record], display: str, cols: ColumnsConfig) -> tuple[list[Row], int, int, str]:
    """Validate records, drop exact duplicates; returns rows, rows read, duplicates and the content hash."""
    rows: list[Row] = []
    seen: set[bytes] = set()
    content = hashlib.sha256()
    read = duplicates = 0
    for row_no, where, record in records:
        read += 1
        row = _row_from_record(record, row_no, where, display, cols)
        line = canonical(row)
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

