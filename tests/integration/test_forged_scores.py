"""Scores cannot be forged (issue 23): the alias gate and ``registry compare`` recompute every score they use
from its answers file, on a local store and the moto S3 server.

Each attack is planted by hand, as a hostile user with write access to the store would: a score edited in
the registry record, a count that cannot be, an answers file edited or deleted, a recorded evaluation
edited; and a score from an older medft, with no answers file at all. Each must refuse the move (exit 3,
naming the version, nothing changed) however ``--force`` is set, and fail ``compare`` the same way.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from registry.answers import put_answers
from registry.compare import verify_scores
from registry.errors import DataError
from registry.records import BenchmarkScore, EvaluationRecord
from registry.registry import Registry
from registry.store import open_store
from tests.cli import error_lines, run_main
from tests.eval_factory import answers_and_score
from tests.integration.test_registry_gate import _aliases_doc, _versions


@pytest.fixture(params=["local", "s3"])
def store_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_bucket")


@contextmanager
def _edited(store: Any, key: str, edit: Callable[[bytes], bytes | None]) -> Iterator[None]:
    """``key`` of ``store`` replaced by ``edit(its bytes)`` (None: deleted) inside the block, restored after."""
    original, _ = store.get_bytes(key)
    new = edit(original)
    if new is None:
        store.delete(key)
    else:
        store.put_bytes(key, new)
    try:
        yield
    finally:
        store.put_bytes(key, original)


def _record_edit(change: Callable[[dict[str, Any]], None]) -> Callable[[bytes], bytes]:
    def edit(data: bytes) -> bytes:
        doc = json.loads(data)
        change(doc)
        return json.dumps(doc).encode()
    return edit


def _after(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["metrics"]["benchmarks_after"]["medqa"]


def _flip_first_wrong_answer(data: bytes) -> bytes:
    lines = data.decode().splitlines(keepends=True)
    for n, line in enumerate(lines):
        row = json.loads(line)
        if not row["correct"]:
            lines[n] = json.dumps({**row, "choice": row["gold"], "correct": True}) + "\n"
            return "".join(lines).encode()
    raise AssertionError("no wrong answer to flip")


def _refused(store_uri: str, capsys: pytest.CaptureFixture[str], reg: Registry, needles: list[str]) -> None:
    """The gate (forced or not) and compare both refuse with DataError (exit 3), one line holding every needle;
    nothing moved. On S3 through the API (each CLI call would build new S3 clients: seconds), locally through
    the CLI."""
    before = _aliases_doc(reg)
    if store_uri.startswith("s3://"):
        for force in (False, True):
            with pytest.raises(DataError) as refused:
                reg.set_alias("m", 2, "production", require=["medqa"], force=force, reason="forged" if force else None)
            assert all(n in refused.value.message for n in needles), refused.value.message
        with pytest.raises(DataError) as refused:
            verify_scores([reg.get("m:1"), reg.get("m:2")], reg.store)
        assert all(n in refused.value.message for n in needles), refused.value.message
        assert _aliases_doc(reg) == before
        return
    for force in ([], ["--force", "--reason", "a forged score must be refused even when forced"]):
        code, out, err = run_main(["registry", "alias", "m", "production", "2", "--require", "medqa", *force,
                                   "--store", store_uri], capsys)
        [line] = error_lines(err)
        assert code == 3 and out == "" and all(n in line for n in needles), (force, line)
    assert _aliases_doc(reg) == before
    code, out, err = run_main(["registry", "compare", "m:1", "m:2", "--store", store_uri], capsys)
    [line] = error_lines(err)
    assert code == 3 and out == "" and all(n in line for n in needles), line


def test_a_forged_score_is_refused_by_the_gate_and_compare(store_uri: str, publish_sample_run: Callable[..., str],
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """m:2 (60%) would replace @production's m:1 (55%) honestly; every forgery of its score is caught."""
    reg = _versions(store_uri, publish_sample_run, [0.55, 0.60, 0.60])
    record = "models/m/versions/2.json"
    run = open_store(reg.get("m:2").run_uri)
    answers = "benchmarks/after/medqa.jsonl"

    # A lower score edited up, its interval with it: the file says otherwise.
    def lift(doc: dict[str, Any]) -> None:
        _after(doc).update(accuracy=1.0, correct=200, interval=[0.98, 1.0])
    with _edited(reg.store, record, _record_edit(lift)):
        _refused(store_uri, capsys, reg, ["m:2's medqa score (training) does not match its answers file",
                                          "accuracy recorded 1.0, recomputed 0.6"])
    # An impossible count fails on reading the record, naming it.
    with _edited(reg.store, record, _record_edit(lambda doc: _after(doc).update(scored=-5))):
        _refused(store_uri, capsys, reg, ["versions/2.json", "benchmarks_after.medqa.scored", "(got -5)"])
    with _edited(reg.store, record, _record_edit(lambda doc: _after(doc).update(correct=201))):
        _refused(store_uri, capsys, reg, ["versions/2.json", "correct (201) is more than the answers scored (200)"])
    # The answers file edited to match an edited record: its hash gives it away.
    with _edited(run, answers, _flip_first_wrong_answer):
        _refused(store_uri, capsys, reg, ["m:2's medqa score (training): its answers file", "does not match the record"])
    with _edited(run, answers, lambda data: None):
        _refused(store_uri, capsys, reg, ["m:2's medqa score (training): its answers file", "is missing"])
    # A path out of the run folder (to another version's file, say) is refused before anything is read.
    def escape(doc: dict[str, Any]) -> None:
        _after(doc)["answers_file"]["path"] = "../run-1/benchmarks/after/medqa.jsonl"
    with _edited(reg.store, record, _record_edit(escape)):
        _refused(store_uri, capsys, reg, ["m:2's medqa score (training): answers file path", "'..' path segment"])
    # Restored, the move passes: nothing above was a false alarm. An equal score passes too (not only a higher).
    assert reg.set_alias("m", 2, "production", require=["medqa"]).version == 2
    assert reg.set_alias("m", 3, "production", require=["medqa"]).version == 3  # 60% = 60%
    assert reg.gate_overrides("m") == []


def test_a_forged_recorded_evaluation_is_refused(tmp_path: Path, publish_sample_run: Callable[..., str],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A recorded evaluation keeps its answers file in the registry: editing the score it names is caught."""
    store_uri = str(tmp_path / "store")
    reg = _versions(store_uri, publish_sample_run, [0.55, None])
    data, score = answers_and_score(0.6)
    kept = put_answers(reg.store, "m", 2, "medqa", data)
    assert kept.path is not None and kept.path.startswith("models/m/answers/2/medqa-")
    evaluation = EvaluationRecord(benchmarks={"medqa": BenchmarkScore.model_validate(
        {**score, "answers_file": kept.model_dump()})}, artifact="merged", evaluated_at="2026-12-01T10:00:00Z")
    reg.record_evaluation("m", 2, evaluation)

    def lift(doc: dict[str, Any]) -> None:
        doc["evaluations"][0]["benchmarks"]["medqa"]["correct"] = 130
    with _edited(reg.store, "models/m/versions/2.json", _record_edit(lift)):
        _refused(store_uri, capsys, reg, ["m:2's medqa score (medft eval 2026-12-01T10:00:00Z) does not match",
                                          "correct recorded 130, recomputed 120"])
    with _edited(reg.store, kept.path, lambda data: None):
        _refused(store_uri, capsys, reg, ["m:2's medqa score (medft eval", "is missing"])
    assert reg.set_alias("m", 2, "production", require=["medqa"]).version == 2


def test_a_score_without_an_answers_file_is_unverified(tmp_path: Path, publish_sample_run: Callable[..., str],
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """A score recorded by an older medft (no answers file, no protocol): compare shows it marked unverified,
    read as greedy with one sample; the gate refuses to use it and says how to re-score."""
    store_uri = str(tmp_path / "store")
    reg = _versions(store_uri, publish_sample_run, [0.55, 0.60])
    for key in ("models/m/versions/1.json", "models/m/versions/2.json"):
        doc = json.loads(reg.store.get_bytes(key)[0])
        for when in ("benchmarks_before", "benchmarks_after"):
            del doc["metrics"][when]["medqa"]["answers_file"]
        reg.store.put_bytes(key, json.dumps(doc).encode())
    code, out, _ = run_main(["registry", "compare", "m:1", "m:2", "--store", store_uri], capsys)
    lines = {line.split("  ")[0].strip(): line for line in out.splitlines()}
    assert code == 0 and lines["medqa scored by"].count("training (unverified: no answers file)") == 2
    assert lines["medqa protocol"].split()[-2:] == ["greedy", "greedy"]
    code, out, err = run_main(["registry", "alias", "m", "production", "2", "--require", "medqa", "--store",
                               store_uri], capsys)
    [line] = error_lines(err)
    assert code == 3 and "m:1's medqa score (training) has no answers file" in line
    assert "re-score m:1 with `medft eval m:1 --benchmarks medqa --limit 200 --seed 0 --max-new-tokens 1024 " \
           "--temperature 0 --record" in line
    assert reg.get("m@production").version == 1
