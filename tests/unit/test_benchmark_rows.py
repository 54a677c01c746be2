"""Hostile benchmark rows and files (job/medical_benchmarks.py, job/evals/sources.py), one class at a time, then
property-based: whatever a row holds, it becomes a question that can be scored fairly (2 to 10 options in letter
order, the gold among them, a text id) or is refused with one DataError naming the source and the row."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from job.evals.sources import load_questions
from job.medical_benchmarks import BENCHMARKS, LETTERS, MIN_OPTIONS, to_question
from registry.errors import DataError, MedftError
from tests.data_factory import write_jsonl
from tests.eval_factory import medmcqa_rows, medqa_rows, pubmedqa_rows

PROPERTY = settings(max_examples=30, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _medqa(options: Any) -> list[dict[str, Any]]:
    rows = medqa_rows()
    rows[1]["options"] = options
    return rows


@pytest.mark.parametrize("options, says", [
    ({"A": "Aspirin"}, r"row 2: column 'options' holds only 1 option \(A\); .*at least 2"),
    ({}, r"row 2: column 'options' holds no options \(an empty mapping\); .*at least 2"),
    ({letter: f"option {letter}" for letter in "ABCDEFGHIJK"}, "has 11 options; a question may have at most 10 "
                                                               r"\(A-J\)"),
    ({chr(65 + i): str(i) for i in range(26)}, "has 26 options; a question may have at most 10"),
    ({"A": "x", "C": "y"}, r"option keys \['A', 'C'\], expected the letters A, B \(A up to at most J\)"),
])
def test_options_a_question_cannot_be_fairly_scored_with_are_refused(tmp_path: Path, options, says) -> None:
    with pytest.raises(DataError, match=says):
        load_questions(BENCHMARKS["medqa"], path=write_jsonl(tmp_path / "q.jsonl", _medqa(options)))


def test_two_and_ten_options_are_accepted(tmp_path: Path) -> None:
    for n in (MIN_OPTIONS, len(LETTERS)):
        options = {letter: f"option {letter}" for letter in LETTERS[:n]}
        rows = _medqa(options)
        rows[1]["answer_idx"] = LETTERS[n - 1]
        data = load_questions(BENCHMARKS["medqa"], path=write_jsonl(tmp_path / f"q{n}.jsonl", rows))
        assert [len(q.options) for q in data.questions if q.row == 2] == [n]


@pytest.mark.parametrize("raw_id", [float("nan"), 12.0, 1.5, float("inf")])
def test_float_and_nan_ids_are_refused_not_read_as_text(raw_id: float) -> None:
    row = medmcqa_rows()[0] | {"id": raw_id}
    with pytest.raises(DataError, match=r"t.jsonl: row 4: column 'id' holds .*expected an id \(text or integer\)"):
        to_question(BENCHMARKS["medmcqa"], row, 4, "medmcqa: t.jsonl")


def test_a_device_or_pipe_given_as_data_is_named_as_such(tmp_path: Path) -> None:
    link = tmp_path / "zero.jsonl"
    link.symlink_to("/dev/zero")
    fifo = tmp_path / "rows.jsonl"
    os.mkfifo(fifo)
    for path in ("/dev/zero", link, fifo):
        with pytest.raises(DataError, match="is not a regular file"):
            load_questions(BENCHMARKS["medqa"], path=path)


# ------------------------------------------------------------------------------------------- properties

HOSTILE_TEXT = st.sampled_from(["", " ", "nan", "NaN", "A", "\u202e", "é😀", "a\nb", "0", "-1"])
TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12) | HOSTILE_TEXT
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(min_value=-3, max_value=12),
                    st.floats(allow_nan=True, allow_infinity=True), TEXT)
KEYS = st.sampled_from([*LETTERS, "K", "Z", "a", "b", "", "0", "AA"])
OPTIONS = st.one_of(SCALARS, st.lists(SCALARS, max_size=4),
                    st.dictionaries(KEYS, SCALARS | TEXT, max_size=14),
                    st.dictionaries(st.sampled_from(list(LETTERS)), TEXT, min_size=0, max_size=10))
VALUE = SCALARS | OPTIONS


def _checked(name: str, record: dict[str, Any]) -> None:
    try:
        q = to_question(BENCHMARKS[name], record, 7, f"{name}: rows.jsonl")
    except DataError as e:
        assert e.message.startswith(f"{name}: rows.jsonl: row 7: "), e.message
        assert "\n" not in e.message.strip()
        return
    assert MIN_OPTIONS <= len(q.options) <= len(LETTERS)
    assert list(q.options) == list(LETTERS[:len(q.options)]) and q.gold in q.options
    assert all(isinstance(t, str) and t.strip() for t in q.options.values())
    assert isinstance(q.id, str) and q.id.strip() and not isinstance(record.get(BENCHMARKS[name].columns.id or ""),
                                                                     float)
    assert q.question.strip()


@st.composite
def _lettered(draw: st.DrawFn) -> dict[str, Any]:
    """Options keyed A, B, ... (0 to 26 of them) with an answer among them: the rows that look right."""
    n = draw(st.integers(min_value=0, max_value=12) | st.just(26))
    options = {chr(65 + i): draw(TEXT | st.just(f"option {i}")) for i in range(n)}
    return {"options": options, "answer_idx": draw(st.sampled_from(sorted(options) or ["A"]) | VALUE)}


@PROPERTY
@example(columns={"options": {"A": "only"}, "answer_idx": "A"})  # the classes the issue found, always tried
@example(columns={"options": {chr(65 + i): f"o{i}" for i in range(11)}, "answer_idx": "K"})
@given(columns=st.one_of(_lettered(), st.fixed_dictionaries({}, optional={
    "question": VALUE, "options": OPTIONS, "answer_idx": VALUE})))
def test_any_medqa_row_is_a_fair_question_or_one_named_refusal(columns: dict[str, Any]) -> None:
    _checked("medqa", medqa_rows()[0] | columns)


@PROPERTY
@example(columns={"id": float("nan")})
@example(columns={"id": 12.0})
@given(columns=st.fixed_dictionaries({"id": st.floats(allow_nan=True) | VALUE}, optional={
    "opa": VALUE, "opb": VALUE, "opd": VALUE, "cop": VALUE, "question": VALUE}))
def test_any_medmcqa_row_is_a_fair_question_or_one_named_refusal(columns: dict[str, Any]) -> None:
    _checked("medmcqa", medmcqa_rows()[0] | columns)


@PROPERTY
@given(columns=st.fixed_dictionaries({}, optional={"pubid": VALUE, "context": VALUE | st.fixed_dictionaries(
    {"contexts": st.lists(VALUE, max_size=3), "labels": st.lists(VALUE, max_size=3)}), "final_decision": VALUE}))
def test_any_pubmedqa_row_is_a_fair_question_or_one_named_refusal(columns: dict[str, Any]) -> None:
    _checked("pubmedqa", pubmedqa_rows()[0] | columns)


@PROPERTY
@given(lines=st.lists(st.one_of(st.binary(max_size=40), st.sampled_from(
    [b"{}", b"[]", b"null", b'{"question": NaN}', b'{"options": {}}', b"\xff\xfe", b'{"a":' * 40])), max_size=4))
def test_any_benchmark_file_loads_or_is_refused_in_one_line(tmp_path_factory: pytest.TempPathFactory,
                                                            lines: list[bytes]) -> None:
    path = tmp_path_factory.mktemp("rows") / "medqa.jsonl"
    path.write_bytes(b"\n".join(lines))
    try:
        data = load_questions(BENCHMARKS["medqa"], path=path)
    except MedftError as e:
        assert e.exit_code in (2, 3, 4) and str(path) in e.message and "\n" not in e.message.strip()
        return
    assert data.questions and all(MIN_OPTIONS <= len(q.options) for q in data.questions)
    assert not any(isinstance(q.id, float) and math.isnan(q.id) for q in data.questions)
