"""Loading: every format, the column mapping, duplicates, lineage, and every rejection with its message.

Every bad input must fail with the right exit code and ONE line naming the file, the row and the field (or
what is wrong with the file), plus how to fix it.
"""

from __future__ import annotations

import codecs
import gzip
import json
import os
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from job.data import DatasetIdentity, Row, load_rows, readers
from registry.errors import ConfigError, DataError, MedftError, NotFoundError
from tests.data_factory import (
    SAMPLE,
    config_for,
    record,
    records,
    sample_records,
    write_bytes,
    write_csv,
    write_json_list,
    write_jsonl,
    write_parquet,
    write_records,
)


def load(path: Path | str, *overrides: str) -> tuple[list[Row], DatasetIdentity, Any]:
    return load_rows(config_for(path, *overrides))


def rejects(path: Path | str, exc: type[MedftError], *fragments: str, overrides: tuple[str, ...] = ()) -> str:
    """Assert loading fails with ``exc`` and one line holding every fragment; returns the message."""
    with pytest.raises(exc) as e:
        load(path, *overrides)
    assert type(e.value) is exc
    msg = e.value.message
    assert "\n" not in msg, msg
    assert str(path) in msg, f"the message does not name {path}: {msg!r}"
    # Fragments that do not name the file must match the rest of the message, not the (test-named) path.
    rest = msg.replace(str(path), "<file>")
    for fragment in fragments:
        assert fragment in (msg if str(path) in fragment else rest), f"{fragment!r} not in {msg!r}"
    return msg


# ------------------------------------------------------------------------------------------ good data


def test_the_sample_is_40_rows_in_the_dataset_schema_sized_for_the_cpu_demo() -> None:
    recs = sample_records()
    assert len(recs) == 40
    assert all(list(r) == ["Question", "Complex_CoT", "Response"] for r in recs)
    chinese = [r for r in recs if any("\u4e00" <= ch <= "\u9fff" for ch in r["Question"])]
    assert len(chinese) == 5
    for r in recs:
        if r in chinese:  # roughly 2 characters per English word
            assert 150 <= len(r["Complex_CoT"]) <= 330 and 60 <= len(r["Response"]) <= 160
        else:
            assert 80 <= len(r["Complex_CoT"].split()) <= 160, r["Question"][:40]
            assert 30 <= len(r["Response"].split()) <= 80, r["Question"][:40]
    rows, _, report = load(SAMPLE)
    assert len(rows) == 40 and report.dropped["duplicate"] == 0
    assert len({r.question for r in rows}) == 40


def test_rows_carry_stripped_fields_and_their_1_based_source_row(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [record(0), record(1, Question="  padded question \n")])
    rows, identity, report = load(path)
    assert [r.source_row for r in rows] == [1, 2]
    assert rows[1].question == "padded question"
    assert identity == DatasetIdentity(source=str(path), revision=None, subset=None, split=None, rows=2,
                                       content_sha256=identity.content_sha256)
    assert set(identity.to_dict()) == {"source", "revision", "subset", "split", "rows", "content_sha256",
                                       "loaded_rows", "loaded_sha256"}
    assert identity.loaded_rows is None  # set only once prepare() has narrowed the rows (used_identity)
    assert report.rows_read == 2 and report.rows_kept == 2


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_every_format_gives_the_same_rows_and_the_same_content_hash(tmp_path: Path, suffix: str) -> None:
    # Commas, quotes, newlines, non-ASCII and a bracket-heavy text exercise each format's quoting.
    recs = records(5) + [record(9, Complex_CoT='Line one, with "quotes".\nLine two: [[[[x]]]] {y}.',
                                Response="Antwort: ja; 答案：是")]
    reference = load(write_jsonl(tmp_path / "ref.jsonl", recs))
    rows, identity, _ = load(write_records(tmp_path / f"d{suffix}", recs))
    assert rows == reference[0]
    assert identity.content_sha256 == reference[1].content_sha256
    assert identity.rows == 6


def test_the_content_hash_changes_with_any_text_and_ignores_duplicates(tmp_path: Path) -> None:
    base = load(write_jsonl(tmp_path / "a.jsonl", records(3)))[1].content_sha256
    edited = load(write_jsonl(tmp_path / "b.jsonl", records(2) + [record(2, Response="Other answer.")]))[1]
    with_dup = load(write_jsonl(tmp_path / "c.jsonl", records(3) + [record(1)]))[1]
    assert edited.content_sha256 != base
    assert with_dup.content_sha256 == base


def test_exact_duplicates_are_dropped_counted_and_the_first_is_kept(tmp_path: Path) -> None:
    recs = [record(0), record(1), record(0), record(1, Response="  " + record(1)["Response"] + "\n"),
            record(2)]
    rows, identity, report = load(write_jsonl(tmp_path / "d.jsonl", recs))
    assert [r.source_row for r in rows] == [1, 2, 5]
    assert report.rows_read == 5 and report.rows_kept == 3 and report.dropped["duplicate"] == 2
    assert identity.rows == 3


def test_the_column_mapping_reads_other_column_names(tmp_path: Path) -> None:
    recs = [{"q": f"question {i}", "cot": f"thinking {i}", "a": f"answer {i}", "extra": i} for i in range(3)]
    path = write_jsonl(tmp_path / "d.jsonl", recs)
    rows, _, _ = load(path, "data.columns.question=q", "data.columns.reasoning=cot", "data.columns.answer=a")
    assert rows[2] == Row("question 2", "thinking 2", "answer 2", 3)


def test_valid_quoted_csv_with_embedded_newlines_loads_and_rows_are_data_row_indices(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", [record(0, Complex_CoT="step 1,\nstep 2,\n\"quoted\" step 3"),
                                          record(1), record(2, Response="")])
    text = path.read_text()
    assert text.count("\n") > 4  # row 1 really spans several physical lines
    # Row 3 is the third data row even though it starts on line 6 of the file (header, 3 + 1 lines).
    rejects(path, DataError, f"{path}: row 3 (line 6): field 'Response' is empty")
    rows, _, _ = load(write_csv(tmp_path / "ok.csv", [record(0, Complex_CoT="a,\nb\r\nc")]))
    assert rows[0].reasoning == "a,\nb\r\nc"


def test_blank_lines_and_a_utf8_bom_are_tolerated(tmp_path: Path) -> None:
    lines = [json.dumps(r) for r in records(3)]
    path = write_bytes(tmp_path / "d.jsonl", codecs.BOM_UTF8 + "\n\n".join(lines).encode() + b"\n\n")
    rows, _, _ = load(path)
    assert [r.source_row for r in rows] == [1, 2, 3]
    csv_path = write_csv(tmp_path / "d.csv", records(2))
    csv_path.write_bytes(codecs.BOM_UTF8 + csv_path.read_bytes())
    assert len(load(csv_path)[0]) == 2


# ------------------------------------------------------------------------------------------ rejections


def test_a_missing_file_exits_4_and_an_unknown_type_or_scheme_exits_2(tmp_path: Path) -> None:
    rejects(tmp_path / "nope.jsonl", NotFoundError, "data.source", "no such file")
    rejects(tmp_path / "nope.parquet", NotFoundError, "no such file")
    write_bytes(tmp_path / "d.txt", b"hello")
    rejects(tmp_path / "d.txt", ConfigError, "unsupported file type '.txt'", ".jsonl")
    rejects("ftp://host/d.jsonl", ConfigError, "unsupported scheme")


def test_empty_files_directories_and_files_without_rows_exit_3(tmp_path: Path) -> None:
    for suffix in (".jsonl", ".json", ".csv", ".parquet"):
        empty = write_bytes(tmp_path / f"empty{suffix}", b"")
        rejects(empty, DataError, str(empty), "row 1", "empty (0 bytes)")
    (tmp_path / "dir.jsonl").mkdir()
    rejects(tmp_path / "dir.jsonl", DataError, "is a directory")
    rejects(write_bytes(tmp_path / "blank.jsonl", b"\n  \n"), DataError, "holds no rows")
    rejects(write_bytes(tmp_path / "list.json", b" [ ] "), DataError, "holds no rows")
    rejects(write_bytes(tmp_path / "head.csv", b"Question,Complex_CoT,Response\n"), DataError, "holds no rows")
    rejects(write_bytes(tmp_path / "ws.json", b"  \n "), DataError, "row 1", "nothing but whitespace")
    rejects(_empty_parquet(tmp_path), DataError, "holds no rows")


def _empty_parquet(tmp_path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "none.parquet"
    pq.write_table(pa.table({c: pa.array([], pa.string()) for c in ("Question", "Complex_CoT", "Response")}),
                   path)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_a_missing_column_names_the_row_the_config_key_and_the_columns_that_exist(tmp_path: Path,
                                                                                  suffix: str) -> None:
    recs = [{"Question": "q", "Reasoning": "r", "Response": "a"}]
    msg = rejects(write_records(tmp_path / f"d{suffix}", recs) if suffix != ".csv" else
                  write_csv(tmp_path / "d.csv", recs, columns=["Question", "Reasoning", "Response"]),
                  DataError, "row 1", "missing column 'Complex_CoT'", "data.columns.reasoning", "'Reasoning'")
    assert "'Question'" in msg


def test_a_missing_column_in_a_later_jsonl_row_names_that_row(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", records(3) + [{"Question": "q", "Response": "a"}])
    rejects(path, DataError, f"{path}: row 4: missing column 'Complex_CoT'")


@pytest.mark.parametrize(("value", "kind"), [(3, "number"), (["a"], "list"), ({"t": "a"}, "object"),
                                             (True, "boolean")])
def test_wrong_types_name_the_row_the_field_and_the_type(tmp_path: Path, value: Any, kind: str) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", records(2) + [record(2, Response=value)])
    rejects(path, DataError, f"{path}: row 3: field 'Response' is a {kind}, expected text")


def test_null_empty_and_whitespace_fields_are_rejected(tmp_path: Path) -> None:
    rejects(write_jsonl(tmp_path / "n.jsonl", [record(0, Question=None)]), DataError,
            "row 1: field 'Question' is null")
    rejects(write_jsonl(tmp_path / "e.jsonl", [record(0), record(1, Complex_CoT="")]), DataError,
            "row 2: field 'Complex_CoT' is empty or whitespace-only", "remove the row")
    rejects(write_json_list(tmp_path / "w.json", [record(0), record(1), record(2, Response=" \n\t ")]), DataError,
            "row 3: field 'Response' is empty")


def test_a_parquet_column_of_numbers_is_a_wrong_type(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "d.parquet", [record(0, Response=1), record(1, Response=2)])
    rejects(path, DataError, "row 1: field 'Response' is a number, expected text")


def test_invalid_and_truncated_json_lines_name_the_row_and_the_line(tmp_path: Path) -> None:
    good = [json.dumps(r) for r in records(3)]
    path = write_bytes(tmp_path / "bad.jsonl", "\n".join([good[0], "", good[1], '{"Question": "q",,}', good[2]])
                       .encode() + b"\n")
    rejects(path, DataError, f"{path}: row 3 (line 4): invalid JSON", "each line must be one JSON object")
    cut = write_bytes(tmp_path / "cut.jsonl", ("\n".join(good) + "\n" + good[0][:25]).encode())
    rejects(cut, DataError, "row 4: invalid JSON", "truncated file?")
    listy = write_json_list(tmp_path / "list.jsonl", records(2))
    rejects(listy, DataError, "row 1", "looks like a JSON list: name the file .json")
    rejects(write_bytes(tmp_path / "arr.jsonl", b'["a", "b"]\n'), DataError, "row 1: a JSON list, expected an object")


def test_truncated_and_malformed_json_lists(tmp_path: Path) -> None:
    full = json.dumps(records(3))
    rejects(write_bytes(tmp_path / "cut.json", full[: full.index("Case 2") + 3].encode()), DataError,
            "row 3: the file ends inside this row (truncated file?)")
    rejects(write_bytes(tmp_path / "open.json", full[:-1].encode()), DataError,
            "row 4: the file ends before the list is closed (truncated file?)")
    rejects(write_bytes(tmp_path / "obj.json", json.dumps(record(0)).encode()), DataError,
            "row 1: expected a JSON list", "name the file .jsonl")
    rejects(write_bytes(tmp_path / "nocomma.json", f"[{json.dumps(record(0))} {json.dumps(record(1))}]".encode()),
            DataError, "after row 1: expected ',' or ']'")
    rejects(write_bytes(tmp_path / "tail.json", (full + " x").encode()), DataError, "after row 3: unexpected 'x'")
    rejects(write_bytes(tmp_path / "comma.json", (full[:-1] + ",]").encode()), DataError,
            "after row 3: a trailing ',' before the closing ']'")
    rejects(write_bytes(tmp_path / "str.json", b'[{"Question": "q", "Complex_CoT": "r", "Response": "a"}, "s"]'),
            DataError, "row 2: a JSON string, expected an object")
    rejects(write_bytes(tmp_path / "syntax.json", b'[{"Question": "q", "Complex_CoT": "r" "Response": "a"}]'),
            DataError, "row 1: invalid JSON")


def test_bad_encodings_name_the_row(tmp_path: Path) -> None:
    lines = [json.dumps(r, ensure_ascii=False).encode() for r in records(3)]
    lines[1] = json.dumps(record(1, Question="Fièvre et toux ?"), ensure_ascii=False).encode("latin-1")
    path = write_bytes(tmp_path / "latin1.jsonl", b"\n".join(lines) + b"\n")
    rejects(path, DataError, f"{path}: row 2 (line 2): not valid UTF-8", "0xe8", "re-save the file as UTF-8")
    csv_path = write_csv(tmp_path / "d.csv", [record(0), record(1, Response="réponse")])
    csv_path.write_bytes(csv_path.read_bytes().replace("é".encode(), b"\xe9"))
    rejects(csv_path, DataError, "row 2 (line 3): not valid UTF-8")
    big = records(2000)
    big[1500] = record(1500, Response="naïve")
    json_path = write_json_list(tmp_path / "d.json", big)
    json_path.write_bytes(json_path.read_bytes().replace("ï".encode(), b"\xef"))
    # The bad byte lies well past the first read chunk; the message still names its row.
    assert json_path.stat().st_size > 2 * readers._CHUNK_BYTES // 3
    rejects(json_path, DataError, "row 1501: not valid UTF-8")


def test_utf16_and_binary_files_are_refused_as_such(tmp_path: Path) -> None:
    text = "".join(json.dumps(r) + "\n" for r in records(2))
    rejects(write_bytes(tmp_path / "u16.jsonl", text.encode("utf-16")), DataError, "row 1 (line 1): NUL bytes",
            "UTF-16", "give a UTF-8 JSONL file")
    blob = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8
    for suffix in (".jsonl", ".csv"):
        rejects(write_bytes(tmp_path / f"b{suffix}", blob), DataError, "row 1 (line 1): not text but a binary")
    gz = write_bytes(tmp_path / "d.jsonl", gzip.compress(write_jsonl(tmp_path / "x.jsonl", records(50)).read_bytes()))
    rejects(gz, DataError, "row 1 (line 1): NUL bytes at column", "a binary or compressed file")
    rejects(write_bytes(tmp_path / "b.json", b"[" + blob), DataError, "row 1: NUL bytes", "binary")
    # A NUL deep in a JSON list is reported at the row that holds it, not where its chunk was read.
    rows = [json.dumps(r) for r in records(4000)]
    rows[3500] = rows[3500].replace("Case", "Ca\x00se")  # a raw NUL byte in the file
    late = write_bytes(tmp_path / "late.json", ("[" + ",".join(rows) + "]").encode())
    assert late.read_bytes().count(b"\x00") == 1 and late.stat().st_size > readers._CHUNK_BYTES
    rejects(late, DataError, "row 3501: NUL bytes")
    rejects(write_bytes(tmp_path / "b.parquet", blob), DataError, "not a readable Parquet file")


def test_a_truncated_parquet_file_exits_3(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "d.parquet", records(50))
    raw = path.read_bytes()
    rejects(write_bytes(tmp_path / "cut.parquet", raw[: len(raw) // 2]), DataError, "not a readable Parquet file")


def test_csv_problems_name_the_data_row(tmp_path: Path) -> None:
    header = b"Question,Complex_CoT,Response\n"
    rejects(write_bytes(tmp_path / "open.csv", header + b'q1,r1,a1\nq2,"r2 never closed,a2\n'), DataError,
            "row 2 (line 3): invalid CSV", "ends inside a quoted field")
    rejects(write_bytes(tmp_path / "fields.csv", header + b"q1,r1,a1\nq2,r2 with, a comma,a2\n"), DataError,
            "row 2 (line 3): 4 fields but the header has 3")
    rejects(write_bytes(tmp_path / "nohead.csv", b"\n\nq,r,a\n"), DataError, "row 1: no header line")


def test_unpaired_surrogates_are_refused_with_the_field(tmp_path: Path) -> None:
    path = write_bytes(tmp_path / "d.jsonl", b'{"Question": "q \\ud800", "Complex_CoT": "r", "Response": "a"}\n')
    rejects(path, DataError, "row 1: field 'Question' holds an unpaired surrogate")


# ------------------------------------------------------------------------------------------ hostile data


def test_json_bombs_are_refused_before_decoding(tmp_path: Path) -> None:
    bomb = '{"Question": ' + "[" * 100_000 + "]" * 100_000 + ', "Complex_CoT": "r", "Response": "a"}'
    path = write_bytes(tmp_path / "bomb.jsonl", (json.dumps(record(0)) + "\n" + bomb + "\n").encode())
    rejects(path, DataError, f"{path}: row 2: JSON nested more than {readers.MAX_JSON_DEPTH} levels deep")
    listed = write_bytes(tmp_path / "bomb.json", ("[" + json.dumps(record(0)) + "," + bomb + "]").encode())
    rejects(listed, DataError, "row 2: JSON nested more than")
    # A deep but unclosed bomb (a truncated one) is refused just the same.
    rejects(write_bytes(tmp_path / "open.jsonl", b"[" * 5_000_000), DataError, "row 1: JSON nested more than")


def test_brackets_inside_strings_are_text_not_nesting(tmp_path: Path) -> None:
    text = "[" * 500 + " escaped \\\" quote and {" * 40
    rows, _, _ = load(write_json_list(tmp_path / "d.json", [record(0, Complex_CoT=text)]))
    assert rows[0].reasoning == text.strip()
    rows, _, _ = load(write_jsonl(tmp_path / "d.jsonl", [record(0, Complex_CoT=text)]))
    assert rows[0].reasoning == text.strip()


def test_enormous_rows_are_refused_in_every_streamed_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(readers, "MAX_ROW_BYTES", 64 * 1024)
    huge = "x" * (100 * 1024)
    rejects(write_jsonl(tmp_path / "d.jsonl", [record(0), record(1, Complex_CoT=huge)]), DataError,
            "row 2 (line 2): line longer than 0.0625 MiB")
    rejects(write_json_list(tmp_path / "d.json", [record(0), record(1, Complex_CoT=huge)]), DataError,
            "row 2: row larger than 0.0625 MiB")
    # A huge quoted CSV field made of short lines is caught by the field limit, not the line limit.
    rejects(write_csv(tmp_path / "d.csv", [record(0, Complex_CoT="line\n" * 20_000)]), DataError,
            "row 1 (line 2): invalid CSV: a field is larger than 0.0625 MiB")
    assert len(load(write_jsonl(tmp_path / "ok.jsonl", [record(0, Complex_CoT="y" * 60_000)]))[0]) == 1


def _peak_bytes_loading(path: Path) -> int:
    tracemalloc.start()
    try:
        load(path)
    except DataError:
        pass
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak


def test_reading_a_huge_single_line_costs_bounded_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(readers, "MAX_ROW_BYTES", 1024 * 1024)
    path = tmp_path / "one-line.jsonl"
    with open(path, "wb") as f:  # 48 MiB with no newline at all
        f.truncate(0)
        block = b"A" * (1024 * 1024)
        f.writelines(block for _ in range(48))
    peak = _peak_bytes_loading(path)
    assert peak < 6 * 1024 * 1024, peak


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".json"])
def test_streaming_keeps_memory_bounded_on_large_files(tmp_path: Path, suffix: str) -> None:
    # 1,500 copies of 3 rows (~14 MB): only the 3 unique rows stay, so memory must not follow file size.
    recs = [record(i, Complex_CoT=f"reasoning {i} " + "z" * 3000) for i in range(3)] * 1500
    path = write_records(tmp_path / f"big{suffix}", recs)
    size = os.path.getsize(path)
    assert size > 12 * 1024 * 1024
    peak = _peak_bytes_loading(path)
    assert peak < 6 * 1024 * 1024, (peak, size)


# ------------------------------------------------------------------------------------------ other sources


def test_s3_sources_are_downloaded_through_the_store_and_named_in_messages(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "src.jsonl", records(3))
    bad = write_jsonl(tmp_path / "bad.jsonl", [record(0, Response="")])
    calls: list[tuple[str, str]] = []

    class FakeStore:
        def __init__(self, uri: str) -> None:
            self.uri = uri

        def get_file(self, key: str, dest: Path) -> None:
            calls.append((self.uri, key))
            if key == "missing.jsonl":
                raise NotFoundError(f"not found: {self.uri}/{key}")
            Path(dest).write_bytes((bad if key == "bad.jsonl" else src).read_bytes())

    rows, identity, _ = load_rows(config_for("s3://bucket/sets/v1/data.jsonl"), store_opener=FakeStore)
    assert calls == [("s3://bucket/sets/v1", "data.jsonl")]
    assert [r.source_row for r in rows] == [1, 2, 3] and identity.source == "s3://bucket/sets/v1/data.jsonl"
    assert identity.content_sha256 == load(src)[1].content_sha256
    with pytest.raises(DataError, match=r"^s3://bucket/bad.jsonl: row 1: field 'Response' is empty"):
        load_rows(config_for("s3://bucket/bad.jsonl"), store_opener=FakeStore)
    with pytest.raises(NotFoundError):
        load_rows(config_for("s3://bucket/missing.jsonl"), store_opener=FakeStore)
    with pytest.raises(ConfigError, match="name one object"):
        load_rows(config_for("s3://bucket-only"), store_opener=FakeStore)


def test_hub_datasets_go_through_load_dataset_with_every_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    seen: dict[str, Any] = {}

    def fake_load_dataset(name: str, subset: str | None, **kw: Any) -> Any:
        seen.update(name=name, subset=subset, **kw)
        return datasets.Dataset.from_list(records(4) + [record(1)])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token_value")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # also keeps the revision lookup off the network
    cfg = config_for("hf://FreedomIntelligence/medical-o1-reasoning-SFT", "data.subset=zh",
                     "data.split=train[10%:]", "data.revision=abc123", "data.cache_dir=/tmp/medft-hf-cache")
    rows, identity, report = load_rows(cfg)
    assert seen == {"name": "FreedomIntelligence/medical-o1-reasoning-SFT", "subset": "zh",
                    "split": "train[10%:]", "revision": "abc123", "cache_dir": "/tmp/medft-hf-cache",
                    "token": "hf_test_token_value"}
    assert len(rows) == 4 and report.dropped["duplicate"] == 1
    assert (identity.subset, identity.split, identity.revision) == ("zh", "train[10%:]", "abc123")


@pytest.mark.parametrize(("error", "exc", "fragment"), [
    (ConnectionError("Couldn't reach 'x/y' on the Hub (OfflineModeIsEnabled)"), NotFoundError,
     "not in the local cache and HF_HUB_OFFLINE is set"),
    (ValueError('Unknown split "tran". Should be one of [\'train\'].'), ConfigError, "data.split"),
    (ValueError("BuilderConfig 'fr' not found. Available: ['en', 'zh']"), ConfigError, "data.subset"),
])
def test_hub_failures_map_to_exit_codes(monkeypatch: pytest.MonkeyPatch, error: Exception,
                                        exc: type[MedftError], fragment: str) -> None:
    import datasets

    def failing(*_a: Any, **_k: Any) -> Any:
        raise error

    monkeypatch.setattr(datasets, "load_dataset", failing)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(exc, match=fragment):
        load_rows(config_for("hf://x/y"))


def test_a_hub_dataset_without_the_columns_names_them(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    monkeypatch.setattr(datasets, "load_dataset",
                        lambda *a, **k: datasets.Dataset.from_list([{"instruction": "i", "output": "o"}]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match=r"row 1: missing column 'Question' .*'instruction', 'output'"):
        load_rows(config_for("hf://x/y"))


def test_a_folder_without_a_suffix_as_the_data_source_says_so(tmp_path: Path) -> None:
    folder = tmp_path / "rows"
    folder.mkdir()
    rejects(folder, DataError, "is a directory; give one .json (a list), .jsonl, .parquet or .csv file")
