"""The benchmark gate on alias moves and ``medft registry compare``, on a local store and the moto S3 server.

Versions are registered from sample runs whose records carry ``metrics.benchmarks_after`` as the job writes
them; scores taken later are appended as ``medft eval --record`` appends them (``Registry.record_evaluation``);
the gate reads them back through the registry.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from registry.answers import put_answers
from registry.errors import ConfigError, DataError
from registry.records import BenchmarkScore, EvaluationRecord
from registry.registry import Registry
from tests.alias_race import move_alias_before_our_write
from tests.cli import error_lines, run_main
from tests.conftest import SAMPLE_RECORD
from tests.eval_factory import answers_and_score


@pytest.fixture(params=["local", "s3"])
def store_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_bucket")


def _record(medqa: float | None, lr: float = 2e-4, loss: float = 1.2, **change: Any
            ) -> tuple[dict[str, Any], dict[str, bytes]]:
    """A run record scored ``medqa`` after training (``change``: arguments of :func:`answers_and_score`), and
    the answers files to publish with it."""
    record = copy.deepcopy(SAMPLE_RECORD)
    record["metrics"]["eval_loss_after"] = loss
    files: dict[str, bytes] = {}
    if medqa is not None:
        before_data, before = answers_and_score(0.4, path="benchmarks/before/medqa.jsonl")
        after_data, after = answers_and_score(medqa, **change)
        record["metrics"]["benchmarks_before"] = {"medqa": before}
        record["metrics"]["benchmarks_after"] = {"medqa": after}
        files = {"benchmarks/before/medqa.jsonl": before_data, "benchmarks/after/medqa.jsonl": after_data}
    record["config"] = {"model": {"base": "hf://org/tiny"}, "train": {"max_steps": 1, "learning_rate": lr},
                        "output": {"run_id": f"run-{lr}"}}
    return record, files


def scored_run(medqa: float | None, **kwargs: Any) -> dict[str, Any]:
    """``publish_sample_run`` keywords for a run scored ``medqa`` (:func:`_record`): the record and its answers
    files."""
    record, files = _record(medqa, **kwargs)
    return {"record": record, "files": files}


def _versions(store_uri: str, publish: Callable[..., str], scores: list[float | None]) -> Registry:
    """Model ``m`` with one version per score (v1 first); v1 is @production."""
    reg = Registry.open(store_uri + "/registry")
    for n, medqa in enumerate(scores, start=1):
        record, files = _record(medqa, lr=n * 1e-4, loss=1.5 - n / 10)
        run_uri = publish(store_uri, run_id=f"run-{n}", record=record, files=files)
        reg.register("m", run_uri, aliases=["production"] if n == 1 else [])
    return reg


def _aliases_doc(reg: Registry) -> dict[str, Any]:
    data, _ = reg.store.get_bytes("models/m/aliases.json")
    return json.loads(data)


def test_gate_refuses_a_version_without_the_score_or_with_a_lower_one(
        store_uri: str, publish_sample_run: Callable[..., str], capsys: pytest.CaptureFixture[str]) -> None:
    reg = _versions(store_uri, publish_sample_run, [0.55, 0.50, None, 0.60])
    before = _aliases_doc(reg)
    args = ["--store", store_uri]
    code, out, err = run_main(["registry", "alias", "m", "production", "2", "--require", "medqa", *args], capsys)
    assert code == 2 and out == ""
    [line] = error_lines(err)
    assert "m:2 scores 50.0%" in line and "m:1 (@production now) at 55.0%" in line and "nothing changed" in line
    code, _, err = run_main(["registry", "alias", "m", "3", "production", "--require", "medqa", *args], capsys)
    assert code == 2 and "m:3 has no medqa score" in error_lines(err)[0]
    assert _aliases_doc(reg) == before  # nothing written, not even updated_at
    assert reg.get("m@production").version == 1
    # A better version passes, in either argument order.
    code, out, _ = run_main(["registry", "alias", "m", "production", "4", "--require", "medqa", *args], capsys)
    assert code == 0 and out.strip() == "m@production -> m:4"
    assert reg.get("m@production").version == 4 and "gate_overrides" not in _aliases_doc(reg)
    # A new alias has nothing to be compared with, but still needs the score.
    assert reg.set_alias("m", 2, "staging", require=["medqa"]).version == 2
    with pytest.raises(ConfigError, match="no medqa score"):
        reg.set_alias("m", 3, "staging2", require=["medqa"])


def test_gate_refuses_scores_taken_on_other_questions_or_token_limits(
        tmp_path: Path, publish_sample_run: Callable[..., str], capsys: pytest.CaptureFixture[str]) -> None:
    """A higher accuracy on 50 other questions, or on the same questions with a quarter of the tokens, says
    nothing about being better: the move is refused until both were scored the same way."""
    store_uri = str(tmp_path / "store")
    reg = Registry.open(store_uri + "/registry")
    changes: list[dict[str, Any]] = [{}, {"content_sha256": "d" * 64, "scored": 50}, {"max_new_tokens": 256}, {}]
    for n, change in enumerate(changes, start=1):
        record, files = _record(0.55 + n / 100, **change)
        reg.register("m", publish_sample_run(store_uri, run_id=f"run-{n}", record=record, files=files),
                     aliases=["production"] if n == 1 else [])
    args = ["--require", "medqa", "--store", store_uri]
    for version, differs in [("2", "different questions"), ("3", "different max_new_tokens")]:
        code, out, err = run_main(["registry", "alias", "m", "production", version, *args], capsys)
        [line] = error_lines(err)
        assert code == 2 and f"m:{version} and m:1 (@production now) were scored on medqa with {differs}" in line
        assert reg.get("m@production").version == 1
    code, out, _ = run_main(["registry", "alias", "m", "production", "4", *args], capsys)  # scored alike
    assert code == 0 and reg.get("m@production").version == 4


def _evaluation(reg: Registry, version: int, accuracy: float, when: str, **change: Any) -> EvaluationRecord:
    """A ``medft eval --record`` of ``m:version`` scoring ``accuracy``, its answers file stored as it stores it."""
    data, score = answers_and_score(accuracy, **change)
    kept = put_answers(reg.store, "m", version, "medqa", data)
    score = BenchmarkScore.model_validate({**score, "answers_file": kept.model_dump()})
    return EvaluationRecord(benchmarks={"medqa": score}, artifact="merged", evaluated_at=when, by="tester")


def test_recorded_evaluations_rescore_versions_for_the_gate_and_compare(
        store_uri: str, publish_sample_run: Callable[..., str], capsys: pytest.CaptureFixture[str]) -> None:
    """v2 was trained without benchmarks: a recorded evaluation gives it its first score. v3 was trained with
    a 256-token limit, so the gate cannot compare it with @production's v1; re-scoring it the same way
    (``medft eval --record``) lets the gate judge it. The latest evaluation of a benchmark is the one that
    counts."""
    reg = _versions(store_uri, publish_sample_run, [0.55, None])
    record, files = _record(0.70, max_new_tokens=256)
    reg.register("m", publish_sample_run(store_uri, run_id="run-3", record=record, files=files))
    # Each refusal gives the command that scores the candidate as @production's version was scored.
    rescore = re.escape(f"--benchmarks medqa --limit 200 --seed 0 --max-new-tokens 1024 --temperature 0 --record "
                        f"--registry "
                        f"{reg.uri}` (its questions came from hf://GBaker/MedQA-USMLE-4-options); or pass --force")
    with pytest.raises(ConfigError, match=f"m:2 has no medqa score .*; score it with `medft eval m:2 {rescore}"):
        reg.set_alias("m", 2, "production", require=["medqa"])
    with pytest.raises(ConfigError, match=f"different max_new_tokens, .*; score m:3 as m:1 was with `medft eval m:3 "
                                          f"{rescore}"):
        reg.set_alias("m", 3, "production", require=["medqa"])

    reg.record_evaluation("m", 3, _evaluation(reg, 3, 0.52, "2026-12-01T10:00:00Z"))  # re-scored at 1024: worse
    with pytest.raises(ConfigError, match=r"m:3 scores 52.0% .* lower than m:1"):
        reg.set_alias("m", 3, "production", require=["medqa"])
    reg.record_evaluation("m", 2, _evaluation(reg, 2, 0.50, "2026-12-01T10:00:00Z"))
    stored = reg.record_evaluation("m", 2, _evaluation(reg, 2, 0.60, "2026-12-01T11:00:00Z"))  # the later one counts
    assert [e.benchmarks["medqa"].accuracy for e in stored.evaluations] == [0.5, 0.6]
    assert reg.set_alias("m", 2, "production", require=["medqa"]).version == 2
    assert reg.gate_overrides("m") == []

    code, out, _ = run_main(["registry", "compare", "m:1", "m:2", "m:3", "--store", store_uri], capsys)
    assert code == 0
    lines = {line.split("  ")[0].strip(): line for line in out.splitlines()}
    assert lines["medqa"].split()[1::3] == ["55.0%", "60.0%", "52.0%"]
    assert lines["medqa scored by"].split()[3:] == ["training", "medft", "eval", "2026-12-01T11:00:00Z", "medft",
                                                   "eval", "2026-12-01T10:00:00Z"]
    # The record as stored: appended, the job's own record untouched.
    data, _ = reg.store.get_bytes("models/m/versions/2.json")
    doc = json.loads(data)
    assert [e["evaluated_at"] for e in doc["evaluations"]] == ["2026-12-01T10:00:00Z", "2026-12-01T11:00:00Z"]
    assert doc["evaluations"][1]["benchmarks"]["medqa"]["content_sha256"] == "c" * 64
    assert doc["run_id"] == "run-2" and "benchmarks_after" not in doc["metrics"]


@pytest.mark.parametrize(("score", "problem"), [
    ({"accuracy": "very high"}, r"accuracy' must be a number \(got 'very high'\)"),
    ({"accuracy": float("nan")}, r"accuracy' is invalid: must be a share from 0 to 1 \(got nan\)"),
    ({"accuracy": 1.5}, r"accuracy' is invalid: must be a share from 0 to 1 \(got 1.5\)"),
    ({"accuracy": 0.5, "interval": [0.6, 0.4]},
     r"interval' is invalid: must be \[low, high\] with 0 <= low <= high <= 1 \(got \[0.6, 0.4\]\)"),
    ({"accuracy": 0.5, "hit_limit_share": -0.1}, r"hit_limit_share' is invalid: must be a share from 0 to 1"
                                                 r" \(got -0.1\)"),
])
def test_a_corrupt_evaluation_is_refused_and_never_extended(tmp_path: Path, publish_sample_run: Callable[..., str],
                                                            score: dict[str, Any], problem: str) -> None:
    """A hand-edited score the gate would compare (NaN passes every ``<``) is refused on reading."""
    store_uri = str(tmp_path / "store")
    reg = _versions(store_uri, publish_sample_run, [0.55])
    path = Path(reg.store.url("models/m/versions/1.json"))
    doc = json.loads(path.read_text())
    doc["evaluations"] = [{"benchmarks": {"medqa": score}}]
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"1.json: evaluations\[0\]: field 'benchmarks.medqa." + problem
                                        + r"; the registry record is corrupt$"):
        reg.get("m:1")
    with pytest.raises(DataError, match="registry record is corrupt"):
        reg.record_evaluation("m", 1, _evaluation(reg, 1, 0.6, "2026-12-01T10:00:00Z"))
    assert path.read_text() == json.dumps(doc)  # not extended


def test_force_moves_past_the_gate_and_records_the_override(
        store_uri: str, publish_sample_run: Callable[..., str], capsys: pytest.CaptureFixture[str]) -> None:
    reg = _versions(store_uri, publish_sample_run, [0.55, 0.50])
    code, out, _ = run_main(["registry", "alias", "m", "production", "2", "--require", "medqa", "--force",
                             "--reason", "hotfix", "--store", store_uri], capsys)
    assert code == 0 and out.startswith("m@production -> m:2 (forced past: m:2 scores 50.0%")
    assert "--force" not in out  # the refusal it records, not the hint to force it
    assert reg.get("m@production").version == 2
    [override] = reg.gate_overrides("m")
    assert {k: override[k] for k in ("alias", "version", "previous", "require")} == {
        "alias": "production", "version": 2, "previous": 1, "require": ["medqa"]}
    assert "lower than m:1" in override["refusal"] and override["at"] and override["reason"] == "hotfix"
    # Later moves keep the record.
    reg.set_alias("m", 1, "production")
    assert reg.gate_overrides("m") == [override]
    code, _, err = run_main(["registry", "alias", "m", "production", "2", "--force", "--reason", "x", "--store",
                             store_uri], capsys)
    assert code == 2 and "--force overrides a gate refusal, and moving m@production has no gate" in error_lines(err)[0]


@pytest.mark.parametrize(("require", "needle"), [
    ("", "--require '': an empty benchmark name"),
    ("medqa,", "--require 'medqa,': an empty benchmark name"),
    ("usmle", "--require 'usmle': unknown benchmark 'usmle'; use one or more of medqa, medmcqa, pubmedqa"),
])
def test_an_empty_or_unknown_required_benchmark_is_refused_before_anything_moves(
        tmp_path: Path, publish_sample_run: Callable[..., str], capsys: pytest.CaptureFixture[str],
        require: str, needle: str) -> None:
    """An empty variable in a CI script (``--require "$BENCH"``) must not turn the gate off, and a typo must not
    ask for a score no command can make, nor be recorded as what a forced move overrode."""
    store_uri = str(tmp_path / "store")
    reg = _versions(store_uri, publish_sample_run, [0.55, 0.50])
    before = _aliases_doc(reg)
    for force in ([], ["--force"]):
        code, out, err = run_main(["registry", "alias", "m", "production", "2", "--require", require, *force,
                                   "--store", store_uri], capsys)
        assert code == 2 and out == "" and needle in error_lines(err)[0]
    with pytest.raises(ConfigError, match="benchmark"):
        reg.set_alias("m", 2, "production", require=[require])
    assert _aliases_doc(reg) == before


def test_gate_is_checked_against_a_concurrent_move(store_uri: str, publish_sample_run: Callable[..., str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """v2 (0.60) beats @production's v1 (0.55) when we read, but another client moves @production to v3
    (0.70) between our read and our compare-and-swap: the swap fails, the retry sees v3 and refuses."""
    reg = _versions(store_uri, publish_sample_run, [0.55, 0.60, 0.70])
    other = Registry.open(store_uri + "/registry")
    conflicts = move_alias_before_our_write(
        reg, monkeypatch, lambda: other.set_alias("m", 3, "production", require=["medqa"]))
    with pytest.raises(ConfigError, match=r"m:2 scores 60.0% .* lower than m:3 \(@production now\)"):
        reg.set_alias("m", 2, "production", require=["medqa"])
    assert conflicts == ["models/m/aliases.json"]  # our stale write was refused, then the gate ran again
    assert other.get("m@production").version == 3 and other.gate_overrides("m") == []


def test_compare_puts_versions_side_by_side(store_uri: str, publish_sample_run: Callable[..., str],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    _versions(store_uri, publish_sample_run, [0.55, None])
    code, out, _ = run_main(["registry", "compare", "m@production", "m:2", "--store", store_uri], capsys)
    assert code == 0
    lines = {line.split("  ")[0].strip(): line for line in out.splitlines()}
    assert lines[""].split() == ["m:1", "@production", "m:2"]
    assert lines["medqa"].split()[1:] == ["55.0%", "[48.1%,", "61.7%]", "-"]  # Wilson, 110 of 200
    assert lines["eval loss after"].split()[-2:] == ["1.4", "1.3"]
    assert lines["dataset"].split()[-2:] == ["hf://org/data", "hf://org/data"]
    assert lines["train.learning_rate"].split()[-2:] == ["0.0001", "0.0002"]
    assert lines["medqa questions"].split()[-2:] == ["200", "-"]
    assert lines["medqa max new tokens"].split()[-2:] == ["1024", "-"]
    assert lines["medqa protocol"].split()[-2:] == ["greedy", "-"]
    assert "output.run_id" not in lines and "model.base" not in lines  # same everywhere, or always different
    code, out, _ = run_main(["registry", "compare", "m:1", "m:2", "--json", "--store", store_uri], capsys)
    data = json.loads(out)
    assert [v["ref"] for v in data["versions"]] == ["m:1", "m:2"]
    assert data["versions"][0]["benchmarks"]["medqa"]["interval"] == pytest.approx([0.4808, 0.6174], abs=1e-4)
    assert data["versions"][0]["benchmarks_verified"] == {"medqa": True}
    assert data["versions"][1]["benchmarks"] == {}
    assert data["settings_that_differ"] == {"train.learning_rate": [0.0001, 0.0002]}
    code, _, err = run_main(["registry", "compare", "m:1", "--store", store_uri], capsys)
    assert code == 2 and "two or more refs" in error_lines(err)[0]
    code, _, err = run_main(["registry", "compare", "m:1", "m:9", "--store", store_uri], capsys)
    assert code == 4


def _pixels_of(png: Path, rgb: tuple[int, int, int]) -> int:
    """How many pixels of ``png`` have exactly the colour ``rgb``."""
    import numpy as np
    from matplotlib.image import imread

    image = (imread(png)[..., :3] * 255).round().astype(int)
    return int(np.all(image == np.array(rgb), axis=-1).sum())


def test_compare_draws_the_scores(tmp_path: Path, publish_sample_run: Callable[..., str],
                                  capsys: pytest.CaptureFixture[str]) -> None:
    store_uri = str(tmp_path / "store")
    _versions(store_uri, publish_sample_run, [0.30, 0.80, None])
    image = tmp_path / "scores.png"
    code, out, err = run_main(["registry", "compare", "m:1", "m:2", "--image", str(image), "--store", store_uri],
                              capsys)
    assert code == 0 and "medqa" in out and f"drawn to {image}" in err
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    blue, orange = (31, 119, 180), (255, 127, 14)  # matplotlib's first two colours: m:1 then m:2
    # The bars' areas follow the scores (the legend's two swatches are the same size).
    assert _pixels_of(image, orange) > 2 * _pixels_of(image, blue) > 0
    first = image.read_bytes()
    run_main(["registry", "compare", "m:1", "m:2", "--image", str(image), "--store", store_uri], capsys)
    assert image.read_bytes() == first  # no timestamp: the same versions give the same file
    svg = tmp_path / "scores.svg"
    assert run_main(["registry", "compare", "m:1", "m:2", "--image", str(svg), "--store", store_uri], capsys)[0] == 0
    assert svg.read_text().lstrip().startswith("<?xml") and "medqa" in svg.read_text()

    # Nothing to draw, a format it cannot write, a missing folder: exit 2, one line, nothing written.
    for args, message in [(["m:3", "m:3", "--image", str(tmp_path / "none.png")], "has a benchmark score to draw"),
                          (["m:1", "m:2", "--image", str(tmp_path / "scores.jpg")], "must end in .png or .svg"),
                          (["m:1", "m:2", "--image", str(tmp_path / "no" / "s.png")], "does not exist")]:
        code, out, err = run_main(["registry", "compare", *args, "--store", store_uri], capsys)
        assert code == 2 and message in error_lines(err)[0] and out == "", args
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("scores", "none", "no", "."))) == [
        "scores.png", "scores.svg"]


def test_the_rescore_suggestion_is_a_command_a_shell_takes() -> None:
    """A local benchmark file (a path or a file:// URI, spaces and all) becomes one quoted --data argument."""
    from registry.compare import _rescore

    score = BenchmarkScore(source="file:///data/my medqa.jsonl", limit=50, seed=3, max_new_tokens=256)
    assert _rescore("m:2", "medqa", score, "s3://bucket/registry") == (
        "`medft eval m:2 --benchmarks medqa --limit 50 --seed 3 --max-new-tokens 256 --temperature 0 "
        "--data 'medqa=/data/my medqa.jsonl' --record --registry s3://bucket/registry`")
    sampled = BenchmarkScore(source="hf://x/y", seed=7, max_new_tokens=2048, temperature=0.6, top_p=0.95, samples=4)
    assert _rescore("m:2", "medqa", sampled, "reg") == (
        "`medft eval m:2 --benchmarks medqa --seed 7 --max-new-tokens 2048 --temperature 0.6 --top-p 0.95 "
        "--samples 4 --record --registry reg` (its questions came from hf://x/y)")
