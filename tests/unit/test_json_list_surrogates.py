"""Surrogate escapes in a JSON list (``job.data.json_list``): a pair is a character, an unpaired half is
refused naming the row, exactly as ``json.loads`` and the JSONL reader see it, wherever the reads split the
bytes."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from job.data import json_list
from registry.errors import DataError
from tests.data_factory import write_bytes

WANTED = ["Question", "Complex_CoT", "Response"]
GOOD_ROW = b'{"Question": "q", "Complex_CoT": "r", "Response": "a"}'


def _list_with(question: bytes) -> bytes:
    """A two-row list whose second row's question is the raw JSON string body ``question``."""
    return b"[" + GOOD_ROW + b', {"Question": "' + question + b'", "Complex_CoT": "r", "Response": "a"}]'


def _read(data: bytes, chunk_bytes: int) -> list[dict[str, str]]:
    limits = json_list.Limits(row_bytes=1 << 20, depth=32, chunk_bytes=chunk_bytes)
    return [r for _, _, r in json_list.iter_rows(io.BytesIO(data), Path("d.json"), "d.json", WANTED, limits)]


# Text JSON can carry: pairs, escaped backslashes before a "u", other escapes right after a pair.
@pytest.mark.parametrize("question", [
    rb"smile \ud83d\ude00 end", rb"\uD83D\uDE00", rb"two \ud83d\ude00\ud83d\ude01", rb"\\ud800 is text",
    rb"\\\\ud800 too", rb"\ud83d\ude00\n\"x\"", rb"\u4e2d\u6587 \u00e9", rb"tail \ud83d\ude00",
])
def test_pairs_and_escaped_backslashes_read_as_json_loads_reads_them(question: bytes) -> None:
    data = _list_with(question)
    expected = json.loads(data)
    for chunk_bytes in [*range(1, 24), 64 * 1024]:  # every split of the escapes across reads
        assert _read(data, chunk_bytes) == expected, chunk_bytes


@pytest.mark.parametrize("question", [
    rb"q \ud800 x", rb"q \udc00 x", rb"\ud800", rb"q \ud800\u0041", rb"q \udfff\ud800", rb"\\\ud800",
    rb"q \ud83d\ud83d\ude00", rb"\uDBFF",
])
def test_an_unpaired_half_is_refused_naming_the_row(question: bytes) -> None:
    data = _list_with(question)
    assert any(0xD800 <= ord(c) <= 0xDFFF for c in json.loads(data)[1]["Question"])  # what json.loads keeps
    for chunk_bytes in [*range(1, 24), 64 * 1024]:
        with pytest.raises(DataError, match=r"^d.json: row 2: an unpaired surrogate \(a broken \\ud800-style "
                                            r"escape\) near byte offset [0-9]+; fix the text$"):
            _read(data, chunk_bytes)


def test_through_load_rows_the_message_names_the_file(tmp_path: Path) -> None:
    from job.data import load_rows
    from tests.data_factory import config_for

    path = write_bytes(tmp_path / "d.json", _list_with(rb"q \udc00 x"))
    with pytest.raises(DataError) as e:
        load_rows(config_for(path))
    assert e.value.message.startswith(f"{path}: row 2: an unpaired surrogate")


def test_a_jsonl_line_with_an_unpaired_half_is_still_depth_checked(tmp_path: Path) -> None:
    """The depth check parses a bracket-heavy JSONL line with yajl, which cannot decode a lone low half: the
    line is still checked (a bomb behind the surrogate is refused as one), and a flat one reaches the row
    check, which names the field."""
    from job.data import load_rows
    from tests.data_factory import config_for

    bomb = write_bytes(tmp_path / "bomb.jsonl", b'{"Question": "q \\udc00", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}\n")
    with pytest.raises(DataError, match="row 1: JSON nested more than 32 levels deep"):
        load_rows(config_for(bomb))
    flat = write_bytes(tmp_path / "flat.jsonl", b'{"Question": "q \\udc00", "Complex_CoT": "' + b"[" * 40
                       + b'", "Response": "a"}\n')
    with pytest.raises(DataError, match="row 1: field 'Question' holds an unpaired surrogate"):
        load_rows(config_for(flat))


def test_many_pairs_and_escapes_cut_at_every_read_size_read_as_json_loads_reads_them() -> None:
    """A list whose text is mostly surrogate pairs (the fast path) and other escapes, split every way."""
    text = "".join(["\U0001f600 a\n", "\u4e2d\u6587", "\\", "\U0001f9e0\U0001f4a1", "\"q\""] * 3)
    rows = [{"Question": text, "Complex_CoT": "r", "Response": "\U0001f600"}] * 2
    data = json.dumps(rows).encode()  # ensure_ascii: every emoji as a \ud83d\ude00-style pair
    assert data.count(b"\\ud83d") >= 6
    for chunk_bytes in [*range(1, 40), 64 * 1024]:
        assert _read(data, chunk_bytes) == rows, chunk_bytes
    broken = data.replace(b"\\ude00", b"\\u0041", 1)  # one high half left without its low half
    for chunk_bytes in [*range(1, 40), 64 * 1024]:
        with pytest.raises(DataError, match="row 1: an unpaired surrogate"):
            _read(broken, chunk_bytes)


def test_a_syntax_error_before_a_later_cut_is_named_as_what_it_is() -> None:
    """The bytes are cut at row 3's unpaired surrogate, but the parser fails on row 1 first: that is the error."""
    data = b'[{"Question": "a",, "x": 1}, {"Question": "b"}, {"Question": "\\ud800 and more"}]'
    with pytest.raises(DataError, match=r"^d.json: row 1: invalid JSON"):
        _read(data, 64 * 1024)
