"""Benchmark specs, the column mapping of each published schema, their errors and the seeded subset
(job/medical_benchmarks.py, job/evals/sources.py), on the made-up rows of tests/eval_factory.py."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from job.evals.sources import _BENCHMARK_HUB_KEYS, load_questions, select_subset
from job.hub import hub_dataset_error
from job.medical_benchmarks import (
    ANSWER_INSTRUCTION,
    BENCHMARKS,
    BenchmarkOverride,
    ColumnsOverride,
    get_benchmark,
    parse_benchmarks,
    prompt_text,
)
from registry.errors import AccessDeniedError, ConfigError, DataError, NotFoundError, TransientError
from tests.data_factory import write_jsonl
from tests.eval_factory import medmcqa_rows, medqa_rows, pubmedqa_rows, write_benchmark

ROOT = Path(__file__).resolve().parents[2]


def test_the_specs_name_the_published_datasets_and_splits() -> None:
    assert set(BENCHMARKS) == {"medqa", "medmcqa", "pubmedqa"}
    medqa, medmcqa, pubmedqa = BENCHMARKS["medqa"], BENCHMARKS["medmcqa"], BENCHMARKS["pubmedqa"]
    assert (medqa.dataset, medqa.subset, medqa.split) == ("GBaker/MedQA-USMLE-4-options", None, "test")
    assert (medmcqa.dataset, medmcqa.split) == ("openlifescienceai/medmcqa", "validation")
    assert (pubmedqa.dataset, pubmedqa.subset, pubmedqa.split) == ("qiaojin/PubMedQA", "pqa_labeled", "train")
    assert all(spec.revision is None for spec in BENCHMARKS.values())
    with pytest.raises(ValidationError, match="frozen"):
        medqa.split = "train"  # type: ignore[misc]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_medqa_rows_map_onto_questions(tmp_path: Path, suffix: str) -> None:
    data = load_questions(BENCHMARKS["medqa"], path=write_benchmark(tmp_path, "medqa", suffix))
    rows = medqa_rows()
    assert data.rows == len(rows) and len(data.questions) == len(rows) and data.revision is None
    first = data.questions[0]
    assert first.question == rows[0]["question"]
    assert first.options == rows[0]["options"] and list(first.options) == ["A", "B", "C", "D"]
    assert [q.gold for q in data.questions] == [r["answer_idx"] for r in rows]
    assert len({q.id for q in data.questions}) == len(rows)  # derived from the content: no id column


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_medmcqa_rows_map_onto_questions(tmp_path: Path, suffix: str) -> None:
    data = load_questions(BENCHMARKS["medmcqa"], path=write_benchmark(tmp_path, "medmcqa", suffix))
    rows = medmcqa_rows()
    assert [q.id for q in data.questions] == [r["id"] for r in rows]
    assert data.questions[0].options == {"A": rows[0]["opa"], "B": rows[0]["opb"], "C": rows[0]["opc"],
                                         "D": rows[0]["opd"]}
    assert [q.gold for q in data.questions] == ["ABCD"[r["cop"]] for r in rows]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_pubmedqa_rows_map_onto_yes_no_maybe_with_context(tmp_path: Path, suffix: str) -> None:
    data = load_questions(BENCHMARKS["pubmedqa"], path=write_benchmark(tmp_path, "pubmedqa", suffix))
    rows = pubmedqa_rows()
    assert [q.id for q in data.questions] == [str(r["pubid"]) for r in rows]
    assert [q.gold for q in data.questions] == [{"yes": "A", "no": "B", "maybe": "C"}[r["final_decision"]]
                                                for r in rows]
    q = data.questions[0]
    assert q.options == {"A": "yes", "B": "no", "C": "maybe"}
    ctx = rows[0]["context"]
    assert q.question.startswith("Context:\n")
    assert f"{ctx['labels'][0]}: {ctx['contexts'][0]}" in q.question
    assert q.question.endswith("Question: " + rows[0]["question"])
    assert rows[0]["long_answer"] not in q.question  # the conclusion would give the answer away


def test_prompt_text_lists_the_options_and_the_instruction(tmp_path: Path) -> None:
    q = load_questions(BENCHMARKS["medmcqa"], path=write_benchmark(tmp_path, "medmcqa")).questions[2]
    assert prompt_text(q) == (f"{q.question}\n\nA. Mumps\nB. Measles\nC. Rubella\nD. Chickenpox\n\n"
                              f"{ANSWER_INSTRUCTION}")


# ------------------------------------------------------------------------------------------------ errors

def test_unknown_benchmark_is_a_config_error_listing_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="unknown benchmark 'usmle'.*medqa, medmcqa, pubmedqa") as e:
        get_benchmark("usmle")
    assert e.value.exit_code == 2
    with pytest.raises(ConfigError, match="'mmlu'"):
        parse_benchmarks("medqa,mmlu")
    with pytest.raises(ConfigError, match="empty name"):
        parse_benchmarks("medqa,,pubmedqa")
    assert parse_benchmarks(" MedQA, pubmedqa ,medqa") == ("medqa", "pubmedqa")


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_missing_column_names_dataset_row_and_column(tmp_path: Path, suffix: str) -> None:
    rows = medmcqa_rows()
    # A Parquet table has one schema: the column is absent from every row, so row 1 is named.
    rows = [{k: v for k, v in r.items() if k != "opc"} for r in rows]
    path = write_benchmark(tmp_path, "medmcqa", suffix, rows=rows)
    with pytest.raises(DataError) as e:
        load_questions(BENCHMARKS["medmcqa"], path=path)
    msg = e.value.message
    assert e.value.exit_code == 3
    assert str(path) in msg and "row 1" in msg and "missing column 'opc'" in msg and "medmcqa" in msg
    # The fix it suggests names the real option and config key.
    assert "medft eval --data medmcqa=FILE" in msg and "eval.benchmark_sources.medmcqa.columns." in msg


def test_a_later_bad_row_is_named(tmp_path: Path) -> None:
    rows = medqa_rows()
    rows[3]["answer_idx"] = "E"
    path = write_jsonl(tmp_path / "medqa.jsonl", rows)
    with pytest.raises(DataError, match=r"row 4: column 'answer_idx' holds 'E', expected one of A, B, C, D"):
        load_questions(BENCHMARKS["medqa"], path=path)


def test_medmcqa_test_split_without_answers_says_so(tmp_path: Path) -> None:
    rows = medmcqa_rows()
    rows[0]["cop"] = -1  # as in the published test split
    with pytest.raises(DataError, match="row 1: column 'cop' holds -1.*use validation"):
        load_questions(BENCHMARKS["medmcqa"], path=write_jsonl(tmp_path / "m.jsonl", rows))


def test_options_that_are_not_a_mapping_are_refused(tmp_path: Path) -> None:
    rows = medqa_rows()
    rows[1]["options"] = ["x", "y", "z", "w"]
    with pytest.raises(DataError, match="row 2: column 'options' holds a list, expected a mapping"):
        load_questions(BENCHMARKS["medqa"], path=write_jsonl(tmp_path / "q.jsonl", rows))


def test_repeated_ids_are_refused_and_repeated_questions_get_distinct_ids(tmp_path: Path) -> None:
    rows = medmcqa_rows()
    rows[2]["id"] = rows[0]["id"]
    with pytest.raises(DataError, match="row 3: id .* repeats"):
        load_questions(BENCHMARKS["medmcqa"], path=write_jsonl(tmp_path / "m.jsonl", rows))
    medqa = medqa_rows()
    data = load_questions(BENCHMARKS["medqa"], path=write_jsonl(tmp_path / "q.jsonl", medqa + medqa[:1]))
    assert len({q.id for q in data.questions}) == len(medqa) + 1 and data.questions[-1].id.endswith("#2")


def test_missing_file_unsupported_type_and_empty_file(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="no such file") as e:
        load_questions(BENCHMARKS["medqa"], path=tmp_path / "absent.jsonl")
    assert e.value.exit_code == 4
    (tmp_path / "q.csv").write_text("question\n")
    with pytest.raises(ConfigError, match=r"unsupported file type '\.csv'"):
        load_questions(BENCHMARKS["medqa"], path=tmp_path / "q.csv")
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(DataError, match="empty"):
        load_questions(BENCHMARKS["medqa"], path=tmp_path / "e.jsonl")


def test_overrides_rename_columns_and_pin_dataset(tmp_path: Path) -> None:
    rows = [{"qid": r["id"], "stem": r["question"], "a": r["opa"], "b": r["opb"], "c": r["opc"], "d": r["opd"],
             "label": r["cop"]} for r in medmcqa_rows()]
    override = BenchmarkOverride(dataset="mirror/medmcqa", revision="abc123", split="train",
                                 columns=ColumnsOverride(id="qid", question="stem", options=("a", "b", "c", "d"),
                                                         answer="label"))
    spec = get_benchmark("medmcqa", override)
    assert (spec.dataset, spec.revision, spec.split, spec.subset) == ("mirror/medmcqa", "abc123", "train", None)
    assert BENCHMARKS["medmcqa"].columns.question == "question"  # the shipped spec is untouched
    data = load_questions(spec, path=write_jsonl(tmp_path / "renamed.jsonl", rows))
    assert [q.gold for q in data.questions] == ["ABCD"[r["cop"]] for r in medmcqa_rows()]
    with pytest.raises(ValidationError, match="colums"):
        BenchmarkOverride(colums={})  # type: ignore[call-arg]  # a typo is refused, not ignored


# ------------------------------------------------------------------------------------------------ subset

def test_seeded_subset_is_the_same_whatever_the_row_order(tmp_path: Path) -> None:
    rows = medqa_rows() * 1  # six questions
    shuffled = rows[:]
    random.Random(7).shuffle(shuffled)
    a = load_questions(BENCHMARKS["medqa"], path=write_jsonl(tmp_path / "a.jsonl", rows), limit=3, seed=11)
    b = load_questions(BENCHMARKS["medqa"], path=write_jsonl(tmp_path / "b.jsonl", shuffled), limit=3, seed=11)
    assert len(a.questions) == 3
    assert {q.id for q in a.questions} == {q.id for q in b.questions}
    assert [q.row for q in a.questions] == sorted(q.row for q in a.questions)  # listed in the file's order
    again = load_questions(BENCHMARKS["medqa"], path=write_jsonl(tmp_path / "a.jsonl", rows), limit=3, seed=11)
    assert again.questions == a.questions and again.content_sha256 == a.content_sha256


def test_seeded_subset_grows_by_adding_and_depends_on_the_seed(tmp_path: Path) -> None:
    data = load_questions(BENCHMARKS["medqa"], path=write_benchmark(tmp_path, "medqa"))
    questions = list(data.questions)
    subsets = [{q.id for q in select_subset(questions, k, seed=3)} for k in range(1, len(questions) + 1)]
    assert all(small < large for small, large in zip(subsets, subsets[1:]))
    by_seed = {frozenset(q.id for q in select_subset(questions, 3, seed=s)) for s in range(8)}
    assert len(by_seed) > 1
    assert select_subset(questions, None, seed=0) == questions
    with pytest.raises(ConfigError, match="--limit"):
        load_questions(BENCHMARKS["medqa"], path=write_benchmark(tmp_path, "medqa"), limit=0)


# -------------------------------------------------------------------------------------------------- hub

def test_hub_failures_map_onto_exit_codes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    transient = hub_dataset_error(ConnectionError("Max retries exceeded"), "medqa: hf://x/y", _BENCHMARK_HUB_KEYS)
    assert isinstance(transient, TransientError) and transient.exit_code == 75
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert isinstance(hub_dataset_error(ConnectionError("offline"), "medqa: hf://x/y", _BENCHMARK_HUB_KEYS), NotFoundError)

    class DatasetNotFoundError(Exception):
        pass

    assert isinstance(hub_dataset_error(DatasetNotFoundError("nope"), "d", _BENCHMARK_HUB_KEYS), NotFoundError)
    assert isinstance(hub_dataset_error(Exception("401 Client Error: Unauthorized"), "d", _BENCHMARK_HUB_KEYS), AccessDeniedError)
    assert isinstance(hub_dataset_error(ValueError("Unknown split 'tset'"), "d", _BENCHMARK_HUB_KEYS), ConfigError)
    assert hub_dataset_error(RuntimeError("a bug"), "d", _BENCHMARK_HUB_KEYS) is None


def test_an_uncached_benchmark_offline_is_not_found_in_one_line(tmp_path: Path) -> None:
    """Through the real ``datasets.load_dataset`` (in a subprocess: datasets reads HF_HUB_OFFLINE on import)."""
    script = ("import sys\nfrom job.medical_benchmarks import get_benchmark\nfrom job.evals.sources import load_questions\n"
              "from registry.errors import MedftError\n"
              "try:\n    load_questions(get_benchmark('pubmedqa'), cache_dir=sys.argv[1])\n"
              "except MedftError as e:\n    print(type(e).__name__, e.exit_code, e.message)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MEDFT_"))}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "cache")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    kind, code, message = proc.stdout.strip().split(" ", 2)
    assert (kind, code) == ("NotFoundError", "4"), proc.stdout
    assert "hf://qiaojin/PubMedQA (pqa_labeled, train)" in message and "\n" not in message
    assert "HF_HUB_OFFLINE" in message or "not found" in message
    json.dumps(message)  # one printable line


def test_the_registry_gate_knows_every_benchmark_the_job_scores() -> None:
    """``registry`` imports nothing from ``job``, so ``--require`` checks names against its own list."""
    from registry.names import BENCHMARK_NAMES

    assert tuple(BENCHMARKS) == BENCHMARK_NAMES
