"""A JSON list of row objects, streamed with ijson: one record at a time, memory bounded by the row size cap.

ijson (its yajl C backend) parses; this module adds what a data file needs on top of a parser: bytes are
checked before the parser sees them (no NUL, valid UTF-8, no unpaired ``\ud800``-style surrogate escape,
no row over the size cap), nesting is refused
beyond a depth, and every failure becomes one :class:`DataError` line naming the row, as the other
readers do. yajl reports no byte offsets, so the few messages that name the offending character between
rows are completed by re-parsing the file up to that point (:func:`_char_after`), on the error path only.
"""

from __future__ import annotations

import codecs
import io
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import ijson

from job.data.rows import Record
from registry.errors import DataError

# The C backend, named so a missing one fails at import rather than falling back to the pure-Python parser,
# which is an order of magnitude slower and decodes a broken \ud800 escape differently.
_backend = ijson.get_backend("yajl2_c")
_WHITESPACE = b" \t\r\n"
# A \uD800-\uDFFF escape (when its backslash is not itself escaped), how one starts, its high and low halves.
_SURROGATE_START = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_LOW_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][c-fC-F][0-9a-fA-F]{2}")
_HIGH_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abAB][0-9a-fA-F]{2}")
_SURROGATE_PAIR = re.compile(rb"\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}")


def mib(n: int) -> str:
    """``n`` bytes for a message: ``64 MiB``, ``0.5 MiB``."""
    return f"{n / 1024 / 1024:g} MiB"


@dataclass(frozen=True)
class Limits:
    """The reader's caps, passed in so they are read when reading starts (tests lower them)."""

    row_bytes: int
    depth: int
    chunk_bytes: int


def _surrogate_check(data: bytes, final: bool) -> tuple[str, int] | None:
    """``("unpaired", i)`` when the first unpaired surrogate escape in ``data`` starts at ``i``; ``("hold", i)``
    when an escape from ``i`` on may go on past the end of ``data`` (so is judged with the next bytes, unless
    ``final``); None when ``data`` holds neither.

    yajl decodes a high surrogate escape without its low half (``"\\ud800"``) as ``?``, silently, and a lone
    low one (``"\\udc00"``) raises UnicodeDecodeError; ``json.loads`` keeps both as unpaired surrogates, which
    the row check refuses. Refusing them in the bytes holds a JSON list to the same rule as JSONL.
    """
    pos = 0
    if b"\\\\" not in data:  # no escaped backslash, so every \u starts an escape: count them in C
        starts = len(_SURROGATE_START.findall(data))
        if starts and starts == 2 * len(_SURROGATE_PAIR.findall(data)):
            # Every one is half of a whole pair (emoji as json.dump writes them): only the last bytes are left
            # to look at, for an escape the end of the bytes cuts off.
            pos = max(0, len(data) - 5)
    while found := _SURROGATE_START.search(data, pos):  # a C-speed search: most text has none
        at = pos = found.start()
        if _escaped(data, at):
            pos += 1
        elif len(data) - at < 12 and not final:  # the escape, or the low half after it, may go on
            return "hold", at
        elif not _SURROGATE_ESCAPE.match(data, at):
            pos += 1  # not four hex digits: invalid JSON, which the parser names
        elif not (_HIGH_SURROGATE_ESCAPE.match(data, at) and _LOW_SURROGATE_ESCAPE.match(data, at + 6)):
            return "unpaired", at  # a low half with no high one before it, or a high one without its low
        else:
            pos = at + 12
    last = data.rfind(b"\\", max(pos, len(data) - 5))
    if last >= 0 and not final and not _escaped(data, last):
        tail = data[last:]
        if len(tail) < 2 or (tail[1:2] == b"u" and len(tail) < 6):
            return "hold", last  # an escape cut off by the end of the bytes read so far
    return None


def _escaped(data: bytes, at: int) -> bool:
    """Whether the backslash at ``at`` is escaped: an odd number of backslashes runs right before it (the
    bytes before ``data`` need not be seen: an escape held back starts ``data``)."""
    start = at
    while start > 0 and data[start - 1] == 0x5C:  # backslash
        start -= 1
    return (at - start) % 2 == 1


class _CheckedBytes:
    """The file's bytes for the parser, without a BOM, cut off just before a NUL, invalid UTF-8 or too big a row.

    Cutting (rather than failing at once) lets the parser finish the rows before the bad byte, so the
    error names the row that holds it; the parser then sees an early end and ``stop`` says why:
    ``"binary"``, ``"utf-8"``, ``"surrogate"`` or ``"row_size"``, at file offset ``stop_offset``.
    """

    def __init__(self, f: BinaryIO, limits: Limits) -> None:
        self._f, self._limits = f, limits
        self._pending = b""  # held back to go with the next read: a character or an escape split across two
        self._held = b""  # read by peek_char, not yet handed to the parser
        self.offset = 0  # file offset of the next byte to hand out
        self.chunk_start = 0  # file offset of the last chunk handed out
        self.row_start: int | None = None  # offset handed out when the current row began
        self.eof = False
        self.stop: str | None = None
        self.stop_offset = 0
        self.cut_reached = False  # the parser was handed everything before the cut: ``stop`` is why it ended

    def _checked(self, size: int) -> bytes:
        chunk = self._f.read(size)
        if self.offset == 0 and chunk.startswith(codecs.BOM_UTF8):
            chunk = chunk[len(codecs.BOM_UTF8):]
            self.offset = len(codecs.BOM_UTF8)
        data, self.eof = self._pending + chunk, not chunk
        nul = data.find(b"\x00")
        if nul >= 0:  # no JSON text holds a raw NUL: binary data, or UTF-16
            data, self.stop, self.stop_offset = data[:nul], "binary", self.offset + nul
        try:
            data.decode("utf-8")
            self._pending = b""
        except UnicodeDecodeError as e:
            if e.reason == "unexpected end of data" and not self.eof and self.stop is None:
                self._pending = data[e.start:]
            else:  # a chunk with NUL bytes is binary even where an invalid byte comes first
                self.stop, self.stop_offset = self.stop or "utf-8", self.offset + e.start
            data = data[:e.start]
        surrogate = _surrogate_check(data, self.eof or self.stop is not None)
        if surrogate is not None and surrogate[0] == "hold":  # read again, with what follows it
            self._pending, data = data[surrogate[1]:] + self._pending, data[:surrogate[1]]
        elif surrogate is not None:  # it comes before any other cut in these bytes
            data, self.stop, self.stop_offset = data[:surrogate[1]], "surrogate", self.offset + surrogate[1]
        return data

    def read(self, size: int = -1) -> bytes:
        """Up to about ``size`` checked bytes; ``b""`` at the end of the file or of the valid bytes."""
        if size == 0:  # ijson's probe for text or bytes
            return b""
        data, self._held = self._held, b""
        while not data and self.stop is None and not self.eof:
            data = self._checked(max(size, 1) if size > 0 else self._limits.chunk_bytes)
        if self.row_start is not None and self.offset + len(data) - self.row_start > self._limits.row_bytes:
            # The row began at or before row_start, so it is already over the cap: stop reading it.
            data, self.stop, self.stop_offset = b"", "row_size", self.offset
        self.cut_reached = self.cut_reached or (not data and self.stop is not None)
        self.chunk_start = self.offset
        self.offset += len(data)
        return data

    def peek_char(self) -> str | None:
        """The first character that is not whitespace, left to be read; None when there is none."""
        while True:
            stripped = self._held.lstrip(_WHITESPACE)
            if stripped:
                return stripped[:4].decode("utf-8", errors="ignore")[:1] or chr(stripped[0])
            if self.stop is not None or self.eof:
                self.cut_reached = self.stop is not None
                return None
            self._held += self._checked(self._limits.chunk_bytes)


class _ListParse:
    """Parse events to records: where the parse is (for messages), the row being built, depth and size checks."""

    def __init__(self, display: str, wanted: list[str], source: _CheckedBytes, limits: Limits) -> None:
        self.display, self.wanted, self.source, self.limits = display, wanted, source, limits
        self.done = 0  # rows fully read
        self.depth = 0  # the list itself is depth 1, a row depth 2
        self.closed = False
        self.boundary_chunk = 0  # offset of the chunk in which the last row (or the list) ended
        self._builder: Any = None
        self._size = 0

    @property
    def where(self) -> str:
        return f"after row {self.done}" if self.closed else f"row {self.done + 1}"

    def _fail(self, what: str) -> DataError:
        return DataError(f"{self.display}: {self.where}: {what}")

    def event(self, event: str, value: Any) -> dict[str, Any] | None:
        """Take one parse event; returns a row's record when its closing brace arrives."""
        if event in ("start_map", "start_array"):
            self.depth += 1
            if self.depth == 1:  # the list itself
                return None
            if self.depth == 2:
                if event == "start_array":
                    raise self._not_an_object("list")
                self._builder, self._size = ijson.ObjectBuilder(), 0
                self.source.row_start = self.source.offset
            elif self.depth - 1 > self.limits.depth:
                raise self._fail(f"JSON nested more than {self.limits.depth} levels deep; a row must be one flat "
                                 "object of text fields")
        elif event in ("end_map", "end_array"):
            self.depth -= 1
            if self.depth == 0:
                self.boundary_chunk, self.closed = self.source.chunk_start, True
                return None
            if self.depth == 1:
                self._builder.event(event, value)
                self.boundary_chunk, self.done, self.source.row_start = self.source.chunk_start, self.done + 1, None
                return self._builder.value
        elif self.depth == 1:
            raise self._not_an_object(event)  # string, number, boolean or null
        elif event in ("map_key", "string"):
            self._size += len(value)
            if self._size > self.limits.row_bytes:
                raise self._too_big()
        self._builder.event(event, value)
        return None

    def _not_an_object(self, kind: str) -> DataError:
        return self._fail(f"a JSON {kind}, expected an object with the columns {', '.join(self.wanted)}")

    def _too_big(self) -> DataError:
        return self._fail(f"row larger than {mib(self.limits.row_bytes)}; a row is a few kilobytes, so this row "
                          "is corrupt")

    def error(self, path: Path, exc: ijson.JSONError) -> DataError:
        """The parser's failure (or a cut made by :class:`_CheckedBytes`) as one line naming the row."""
        source = self.source
        stop = source.stop if source.cut_reached else None  # else the parser failed on something before the cut
        if stop == "binary":
            return self._fail(f"NUL bytes near byte offset {source.stop_offset}: a binary or compressed file, or "
                              "text not in UTF-8 (UTF-16?); give a UTF-8 JSON list")
        if stop == "utf-8":
            return self._fail(f"not valid UTF-8 (byte offset {source.stop_offset}); re-save the file as UTF-8")
        if stop == "surrogate":
            return self._fail(f"an unpaired surrogate (a broken \\ud800-style escape) near byte offset "
                              f"{source.stop_offset}; fix the text")
        if stop == "row_size":
            return self._too_big()
        if source.eof and self.depth >= 2:
            return self._fail("the file ends inside this row (truncated file?)")
        if source.eof and self.depth == 1:
            return self._fail("the file ends before the list is closed (truncated file?)")
        if self.depth >= 2:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return self._fail(f"invalid JSON ({reason}); fix the row's JSON")
        return self._between_rows(_char_after(path, self))

    def _between_rows(self, found: tuple[str | None, str | None]) -> DataError:
        first, second = found
        after = f"{self.display}: after row {self.done}"
        if self.closed:
            return DataError(f"{after}: unexpected {first!r} after the closing ']'")
        if first == "," and second == "]":
            return DataError(f"{after}: a trailing ',' before the closing ']'; remove it")
        if first == "," or self.done == 0:
            # What should open row done + 1 is neither an object nor any valid JSON value.
            kind = {'"': "string", "t": "boolean", "f": "boolean", "n": "null"}.get(
                (second if first == "," else first) or "", "number")
            return self._not_an_object(kind)
        return DataError(f"{after}: expected ',' or ']', found {first!r}")


def _char_after(path: Path, parse: _ListParse) -> tuple[str | None, str | None]:
    """The first two characters that are not whitespace after the last boundary the parse passed: the
    list's opening bracket, the closing brace of its last complete row or the list's closing bracket.

    yajl reports no offsets, so the file is parsed again: in one piece up to the chunk in which that
    boundary was seen, then byte by byte (at most one chunk) until the boundary's event arrives.
    """
    events = ijson.utils.sendable_list()
    coro = _backend.basic_parse_coro(events, use_float=True)
    depth = passed = 0
    target = 1 + parse.done + parse.closed
    with open(path, "rb") as f:
        if f.read(len(codecs.BOM_UTF8)) != codecs.BOM_UTF8:
            f.seek(0)
        for piece in _pieces(f.read(max(0, parse.boundary_chunk - f.tell())), f):
            try:
                coro.send(piece)
            except ijson.JSONError:
                break
            for event, _ in events:
                if event in ("start_map", "start_array"):
                    depth += 1
                    passed += depth == 1
                elif event in ("end_map", "end_array"):
                    depth -= 1
                    passed += depth <= 1
            del events[:]
            if passed >= target:
                break
        rest = f.read(parse.limits.chunk_bytes).decode("utf-8", errors="replace").lstrip()
    return rest[:1] or None, rest[1:].lstrip()[:1] or None


def _pieces(head: bytes, f: BinaryIO) -> Iterator[bytes]:
    """``head`` in one piece, then the file from where ``f`` stands, one byte at a time."""
    if head:
        yield head
    while byte := f.read(1):
        yield byte


def iter_rows(f: BinaryIO, path: Path, display: str, wanted: list[str], limits: Limits) -> Iterator[Record]:
    """Records of the JSON list in ``f``: (row number, "row N", the row object), in order."""
    source = _CheckedBytes(f, limits)
    first = source.peek_char()
    if first != "[":
        if first is None and source.stop is not None:
            raise _ListParse(display, wanted, source, limits).error(path, ijson.JSONError())
        found = "nothing but whitespace" if first is None else f"{first!r}"
        raise DataError(f"{display}: row 1: expected a JSON list of row objects ('['), found {found}; "
                        "for one object per line name the file .jsonl")
    parse = _ListParse(display, wanted, source, limits)
    try:
        for event, value in _backend.basic_parse(source, buf_size=limits.chunk_bytes, use_float=True):
            record = parse.event(event, value)
            if record is not None:
                yield parse.done, f"row {parse.done}", record
    except ijson.JSONError as e:
        raise parse.error(path, e) from None
    if source.stop is not None:  # a NUL or bad byte after the closing ']'
        raise parse.error(path, ijson.JSONError())


def check_line_depth(text: str, display: str, where: str, depth: int) -> None:
    """DataError when the JSON value in ``text`` (one JSONL line) nests deeper than ``depth``, before decoding.

    Counting brackets is C-speed; only a line with many of them is parsed, and only as far as the depth.
    Syntax errors are left to the decoder that follows, which names them.
    """
    if text.count("[") + text.count("{") <= depth:
        return
    level = 0
    # Surrogate escapes become spaces here: yajl cannot decode an unpaired one, and the row check names it.
    data = _SURROGATE_ESCAPE.sub(rb"\\u0020", text.encode("utf-8"))
    try:
        for event, _ in _backend.basic_parse(io.BytesIO(data), use_float=True):
            if event in ("start_map", "start_array"):
                level += 1
                if level > depth:
                    raise DataError(f"{display}: {where}: JSON nested more than {depth} levels deep; a row must be "
                                    "one flat object of text fields")
            elif event in ("end_map", "end_array"):
                level -= 1
    except ijson.JSONError:
        return
