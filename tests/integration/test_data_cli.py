"""``medft data validate`` end to end: the report on good data, one line and the exit code on bad data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from job.cli import main
from tests.data_factory import record, records, smollm2_tokenizer, write_bytes, write_csv, write_jsonl

ROOT = Path(__file__).resolve().parents[2]


def validate(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, list[str]]:
    """Run ``medft data validate ARGS`` in-process; returns (exit code, stdout, the medft error lines)."""
    code = 0
    try:
        main(["data", "validate", *args])
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, [line for line in err.splitlines() if line.startswith("medft: error:")]


def test_the_demo_config_validates_and_prints_the_report(capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    code, out, errors = validate(capsys, "--config", "configs/demo.yaml", "--no-tokenizer")
    assert (code, errors) == (0, [])
    assert out.startswith("Data report: data/sample.jsonl\n")
    assert "rows read        40" in out and "rows kept        40" in out and "dropped          none" in out


def test_with_a_tokenizer_the_report_has_token_statistics_as_text_and_json(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from job import model

    monkeypatch.setattr(model, "tokenizer_for_report", lambda cfg: smollm2_tokenizer())
    path = write_jsonl(tmp_path / "d.jsonl", records(10) + [record(4)])
    code, out, _ = validate(capsys, "--set", f"data.source={path}", "--set", "model.max_seq_length=512")
    assert code == 0
    assert "dropped          duplicate 1" in out and "split            train 9 / eval 1" in out
    assert "tokens" in out and "p95" in out and "total" in out
    code, out, _ = validate(capsys, "--set", f"data.source={path}", "--json")
    report: dict[str, Any] = json.loads(out)
    assert code == 0 and report["rows_read"] == 11 and report["rows_kept"] == 10
    assert report["token_stats"]["prompt"]["min"] > 0 and len(report["content_sha256"]) == 64


@pytest.mark.parametrize(("content", "code", "line"), [
    (b'{"Question": "q", "Complex_CoT": "r", "Response": "a"}\n{"Question": "q2", "Complex_CoT": "r"}\n', 3,
     "{path}: row 2: missing column 'Response' (data.columns.answer)"),
    (b'{"Question": "q", "Complex_CoT": "r", "Response": "a"}\n{"Question": 12, "Complex_CoT": "r"}\n', 3,
     "{path}: row 2: field 'Question' is a number, expected text"),
    (b'{"Question": "q", "Complex_CoT": "r", "Response": "a"}\n{"Question": "q2", "Compl', 3,
     "{path}: row 2: invalid JSON"),
    (b"", 3, "{path}: row 1: the file is empty (0 bytes)"),
])
def test_bad_data_exits_3_with_one_line_naming_file_row_and_field(capsys: pytest.CaptureFixture[str],
                                                                  tmp_path: Path, content: bytes, code: int,
                                                                  line: str) -> None:
    path = write_bytes(tmp_path / "bad.jsonl", content)
    got, out, errors = validate(capsys, "--set", f"data.source={path}")
    assert got == code and out == ""
    assert len(errors) == 1 and errors[0].startswith("medft: error: " + line.format(path=path)), errors


def test_csv_row_numbers_are_data_rows_through_the_cli(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", [record(0, Complex_CoT="multi\nline\nreasoning"), record(1, Question=" ")])
    code, _, errors = validate(capsys, "--set", f"data.source={path}", "--no-tokenizer")
    expected = (f"medft: error: {path}: row 2 (line 5): field 'Question' is empty or whitespace-only; fill it "
                "or remove the row")
    assert code == 3 and errors == [expected]


def test_a_missing_file_exits_4_and_an_unsupported_one_exits_2(capsys: pytest.CaptureFixture[str],
                                                               tmp_path: Path) -> None:
    code, _, errors = validate(capsys, "--set", f"data.source={tmp_path / 'absent.jsonl'}")
    assert code == 4 and "absent.jsonl: no such file" in errors[0]
    code, _, errors = validate(capsys, "--set", f"data.source={write_bytes(tmp_path / 'd.xlsx', b'PK')}")
    assert code == 2 and "unsupported file type '.xlsx'" in errors[0]


def test_s3_data_is_read_through_the_store(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                           s3_bucket: str) -> None:
    from registry.store import open_store

    open_store(s3_bucket).put_file("sets/train.jsonl", write_jsonl(tmp_path / "t.jsonl", records(6)))
    code, out, errors = validate(capsys, "--set", f"data.source={s3_bucket}/sets/train.jsonl", "--no-tokenizer")
    assert (code, errors) == (0, [])
    assert f"Data report: {s3_bucket}/sets/train.jsonl" in out and "rows kept        6" in out
    code, _, errors = validate(capsys, "--set", f"data.source={s3_bucket}/sets/absent.jsonl", "--no-tokenizer")
    assert code == 4 and len(errors) == 1


def test_an_uncached_hub_dataset_offline_exits_4_through_the_real_datasets_library(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEDFT_", "HF_"))}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "job.cli", "data", "validate", "--no-tokenizer",
                           "--set", "data.source=hf://medft-tests/absent-dataset",
                           "--set", f"data.cache_dir={tmp_path / 'cache'}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("medft: error:")]
    assert proc.returncode == 4, proc.stderr[-2000:]
    assert len(errors) == 1 and "hf://medft-tests/absent-dataset" in errors[0]
    assert "HF_HUB_OFFLINE is set" in errors[0]
