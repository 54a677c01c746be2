"""``medft eval`` end to end on CPU (a tiny random model, the made-up benchmark fixtures), and benchmark
scores in the job: metrics, the registry version, the model card, then ``medft eval`` and the alias gate on
the registered version."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from registry.records import dump
from registry.registry import Registry
from registry.runs import read_manifest
from registry.store import open_store
from tests.cli import error_lines, run_main
from tests.eval_factory import medqa_rows, write_benchmark
from tests.integration.conftest import ROOT, job_args, run_medft


@pytest.fixture
def eval_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _files(tmp_path: Path) -> list[str]:
    return ["--data", f"medqa={write_benchmark(tmp_path, 'medqa', '.parquet')}",
            "--data", f"pubmedqa={write_benchmark(tmp_path, 'pubmedqa')}"]


def test_eval_scores_a_base_model_as_a_table_and_as_json(tiny_model_dir: Path, tmp_path: Path, eval_env: None,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    args = ["eval", "--base", str(tiny_model_dir), "--benchmarks", "medqa,pubmedqa", "--limit", "3",
            "--max-new-tokens", "6", "--batch-size", "2", *_files(tmp_path)]
    code, out, err = run_main([*args, "--json"], capsys)
    assert code == 0, err[-2000:]
    data = json.loads(out)
    assert data["ref"] == f"base {tiny_model_dir}" and (data["limit"], data["max_new_tokens"]) == (3, 6)
    assert list(data["benchmarks"]) == ["medqa", "pubmedqa"]
    for name, score in data["benchmarks"].items():
        assert score["benchmark"] == name and score["scored"] == 3 and score["limit"] == 3
        assert score["accuracy"] == score["correct"] / 3
        low, high = score["interval"]
        assert 0 <= low <= score["accuracy"] <= high <= 1 and high - low > 0.3  # 3 questions: a wide interval
        assert 0 <= score["no_answer_share"] <= 1 and 0 <= score["hit_limit_share"] <= 1
        assert score["median_reasoning_tokens"] <= 6 and len(score["content_sha256"]) == 64
        # DeepSeek's protocol by default, recorded with the score.
        assert (score["temperature"], score["top_p"], score["samples"], score["seed"]) == (0.6, 0.95, 1, 0)
    code, table, err = run_main([*args, "--temperature", "0"], capsys)
    assert code == 0, err[-2000:]
    lines = table.splitlines()
    assert lines[0].endswith("greedy, max 6 new tokens, 3 questions per benchmark (seed 0)")
    assert lines[1].split()[:4] == ["BENCHMARK", "ACCURACY", "[95%", "CI]"]
    row = lines[2].split()
    assert row[0] == "medqa" and row[4] == "3"


def test_eval_samples_each_question_k_times_and_keeps_every_answer(tiny_model_dir: Path, tmp_path: Path,
                                                                   eval_env: None,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """--samples 2: two seeded answers per question, all of them in --samples-out, the score recomputable from
    them; the same command gives the same answers again (seeded sampling repeats on one machine)."""
    from job.evals.runner import answer_seed
    from registry import answers

    out_file = tmp_path / "answers.jsonl"
    args = ["eval", "--base", str(tiny_model_dir), "--benchmarks", "medqa", "--limit", "3", "--max-new-tokens", "6",
            "--samples", "2", "--seed", "5", "--samples-out", str(out_file), "--json",
            "--data", f"medqa={write_benchmark(tmp_path, 'medqa')}"]
    code, out, err = run_main(args, capsys)
    assert code == 0, err[-2000:]
    score = json.loads(out)["benchmarks"]["medqa"]
    rows = answers.parse(out_file.read_bytes(), str(out_file))
    assert [(r.question_id, r.sample) for r in rows][:2] == [(rows[0].question_id, 0), (rows[0].question_id, 1)]
    assert len(rows) == 6 and all(r.seed == answer_seed(5, r.question_id, r.sample) for r in rows)
    assert all(r.stop in ("stop", "length") and r.gold in "ABCD" for r in rows)
    assert (score["samples"], score["scored"], score["seed"]) == (2, 3, 5)
    assert answers.differences(score, answers.summarize(rows)) == []
    first = out_file.read_bytes()
    assert run_main(args, capsys)[0] == 0 and out_file.read_bytes() == first
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


@pytest.mark.parametrize(("args", "needle"), [
    (["--samples", "3", "--temperature", "0"], "--samples 3 with --temperature 0: greedy decoding gives the same"),
    (["--samples-out", "/"], "--samples-out /: is a folder"),
    (["--samples-out", "/nonexistent/a.jsonl"], "folder /nonexistent does not exist"),
    (["--samples-out", "/proc/answers.jsonl"], "no folder can be made in /proc"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
])
def test_eval_protocol_usage_errors_exit_2_before_loading(tiny_model_dir: Path, eval_env: None, args: list[str],
                                                         needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(["eval", "--base", "/nonexistent-model", "--benchmarks", "medqa", *args], capsys)
    assert code == 2 and out == "" and needle in error_lines(err)[0], err


@pytest.mark.parametrize(("args", "code", "needle"), [
    (["--benchmarks", "medqa,usmle"], 2, "unknown benchmark 'usmle'"),
    (["--data", "usmle=x.jsonl"], 2, "--data 'usmle=x.jsonl': unknown benchmark 'usmle'"),
    (["--data", "medqa"], 2, "write BENCHMARK=FILE"),
    (["--benchmarks", "pubmedqa", "--data", "medqa=x.jsonl"], 2, "medqa is not in --benchmarks pubmedqa"),
    (["--data", "medqa=/nonexistent/medqa.jsonl"], 4, "/nonexistent/medqa.jsonl: no such file"),
    (["--data", "medqa=a.jsonl", "--data", "MedQA=b.jsonl"], 2, "--data 'MedQA=b.jsonl': medqa is given twice"),
    (["--template", "chatml-ish"], 2, "--template 'chatml-ish': unknown template; use one of"),
    (["--data", "medqa=/"], 3, "is a directory; give the medqa rows as one .jsonl or .parquet file"),
    (["--limit", "0"], 2, "--limit"),
])
def test_eval_bad_input_is_one_line_and_its_exit_code(tiny_model_dir: Path, eval_env: None, args: list[str],
                                                      code: int, needle: str,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    got, out, err = run_main(["eval", "--base", str(tiny_model_dir), "--benchmarks", "medqa", *args], capsys)
    assert got == code and out == ""
    [line] = error_lines(err)
    assert needle in line and "Traceback" not in err


def test_eval_refuses_a_missing_column_before_loading_weights(tmp_path: Path, eval_env: None,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    rows = [{k: v for k, v in row.items() if k != "answer_idx"} for row in medqa_rows()]
    path = write_benchmark(tmp_path, "medqa", rows=rows)
    # The base does not exist: the data is checked first, so the column is what is reported.
    code, _, err = run_main(["eval", "--base", str(tmp_path / "no-model"), "--benchmarks", "medqa",
                             "--data", f"medqa={path}"], capsys)
    assert code == 3
    [line] = error_lines(err)
    assert f"medqa: {path}: row 1: missing column 'answer_idx'" in line


@pytest.mark.parametrize(("args", "needle"), [
    ([], "give a model to score: REF (NAME, NAME:VERSION, NAME@ALIAS or a run folder) or --base URI (a base model)"),
    (["some-model", "--base", "/x"], "give REF (some-model) or --base URI (/x), not both"),
    # options of --base that a REF would silently ignore
    (["some-model", "--template", "r1-medical"], "--template applies to --base only: REF some-model is asked"),
    (["some-model", "--base-revision", "abc123"], "--base-revision applies to --base only"),
    # --record needs a registry version to write to; refused before any question or weight is read
    (["--base", "/x", "--record"], "--record writes the scores into a registered version, and --base names none"),
    (["./runs/run-1", "--record"], "and ./runs/run-1 is a run folder; register it with `medft registry register"),
])
def test_eval_needs_exactly_one_model(args: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(["eval", *args], capsys)
    assert code == 2 and needle in error_lines(err)[0]


def test_eval_of_an_unreachable_dataset_exits_4_offline(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Through the real ``datasets`` (a subprocess: it reads HF_HUB_OFFLINE when imported), nothing cached."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEDFT_", "HF_"))}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), MEDFT_CACHE=str(tmp_path / "cache"),
               PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "job.cli", "eval", "--base", str(tiny_model_dir),
                           "--benchmarks", "medqa"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 4, proc.stderr[-2000:]
    [line] = error_lines(proc.stderr)
    assert "hf://GBaker/MedQA-USMLE-4-options" in line and "HF_HUB_OFFLINE" in line


def test_dry_run_refuses_an_unknown_benchmark(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(["train", "--config", "configs/demo.yaml", "--dry-run", "--set",
                               "eval.benchmarks=[medqa, usmle]", "--set", f"output.store={tmp_path / 's'}"], capsys)
    assert code == 2 and out == ""
    assert error_lines(err) == ["medft: error: --set eval.benchmarks: eval.benchmarks: unknown benchmark 'usmle'; "
                                "use one or more of medqa, medmcqa, pubmedqa"]
    assert not (tmp_path / "s").exists()


def test_the_job_scores_benchmarks_before_and_after_training(tiny_model_dir: Path, s3_bucket: str,
                                                             job_env: dict[str, str], tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    medqa = write_benchmark(tmp_path, "medqa")
    proc = run_medft(*job_args(tiny_model_dir, s3_bucket, "run-bench", "--set", "eval.benchmarks=medqa",
                               "--set", f"eval.benchmark_sources={{medqa: {{file: '{medqa}'}}}}",
                               "--set", "eval.benchmark_limit=4", "--set", "eval.benchmark_max_new_tokens=6"),
                     env=job_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_manifest(open_store(s3_bucket), "run-bench")["metrics"]
    for when in ("benchmarks_before", "benchmarks_after"):
        score = metrics[when]["medqa"]
        assert (score["scored"], score["limit"], score["max_new_tokens"], score["source"]) == (4, 4, 6, str(medqa))
        assert score["accuracy"] == score["correct"] / 4 and len(score["interval"]) == 2
    assert metrics["benchmarks_before"]["medqa"]["content_sha256"] == metrics["benchmarks_after"]["medqa"][
        "content_sha256"]  # the same questions before and after
    # Every answer is published in the run, listed in its manifest, named by each score with its hash.
    files = read_manifest(open_store(s3_bucket), "run-bench")["files"]
    for when in ("before", "after"):
        kept = metrics[f"benchmarks_{when}"]["medqa"]["answers_file"]
        assert kept["path"] == f"benchmarks/{when}/medqa.jsonl" and files[kept["path"]]["sha256"] == kept["sha256"]
        assert metrics[f"benchmarks_{when}"]["medqa"]["temperature"] == 0.6

    # The registry version holds them; so does the model card, with intervals.
    version = Registry.open(s3_bucket + "/registry").get("tiny@candidate")
    assert version.metrics["benchmarks_after"] == metrics["benchmarks_after"]
    open_store(s3_bucket).child("runs/run-bench").get_file("merged/README.md", tmp_path / "README.md")
    card = (tmp_path / "README.md").read_text()
    after = metrics["benchmarks_after"]["medqa"]
    lo, hi = after["interval"]
    assert f"| medqa | {metrics['benchmarks_before']['medqa']['accuracy']:.1%}" in card
    assert f"| {after['accuracy']:.1%} [{lo:.1%}, {hi:.1%}] | 4 |" in card

    # `medft eval` on the registered version asks the same seeded questions.
    for key, value in job_env.items():
        if key.startswith(("MEDFT_", "AWS_", "HF_")):
            monkeypatch.setenv(key, value)
    code, out, err = run_main(["eval", "tiny@candidate", "--benchmarks", "medqa", "--limit", "4",
                               "--max-new-tokens", "6", "--data", f"medqa={medqa}", "--json", "--store", s3_bucket],
                              capsys)
    assert code == 0, err[-2000:]
    scored = json.loads(out)["benchmarks"]["medqa"]
    assert scored["content_sha256"] == after["content_sha256"] and scored["scored"] == 4

    # --record appends what it printed to the version the ref resolved to, and says so; compare says where a
    # score comes from.
    code, out, err = run_main(["eval", "tiny@candidate", "--benchmarks", "medqa", "--limit", "4",
                               "--max-new-tokens", "6", "--data", f"medqa={medqa}", "--json", "--record",
                               "--store", s3_bucket], capsys)
    assert code == 0, err[-2000:]
    [evaluation] = Registry.open(s3_bucket + "/registry").get("tiny:1").evaluations
    printed = json.loads(out)
    assert dump(evaluation.benchmarks["medqa"]) == printed["benchmarks"]["medqa"]
    assert (printed["recorded"]["ref"], printed["recorded"]["evaluation"]) == ("tiny:1", 1)
    kept = evaluation.benchmarks["medqa"].answers_file
    assert kept is not None and kept.path is not None and kept.path.startswith("models/tiny/answers/1/medqa-")
    assert printed["recorded"]["answers"] == {"medqa": f"{s3_bucket}/registry/{kept.path}"}
    assert evaluation.artifact == "merged" and evaluation.evaluated_at
    code, out, err = run_main(["eval", "tiny:1", "--benchmarks", "medqa", "--limit", "4", "--max-new-tokens", "6",
                               "--data", f"medqa={medqa}", "--record", "--store", s3_bucket], capsys)
    assert code == 0 and out.splitlines()[-1].startswith("recorded as evaluation 2 of tiny:1; answers kept at "
                                                         f"{s3_bucket}/registry/models/tiny/answers/1/medqa-"), err
    evaluation, latest = Registry.open(s3_bucket + "/registry").get("tiny:1").evaluations
    code, out, err = run_main(["registry", "compare", "tiny:1", "tiny@candidate", "--store", s3_bucket], capsys)
    assert code == 0, err
    [row] = [line for line in out.splitlines() if line.startswith("medqa scored by")]
    assert row.split()[3:6] == ["medft", "eval", latest.evaluated_at]  # the latest score counts
    code, out, err = run_main(["registry", "show", "tiny:1", "--store", s3_bucket], capsys)
    assert sum(line.startswith("  answers      ") for line in out.splitlines()) == 4  # before, after, 2 evals
    first = [line for line in out.splitlines() if line.startswith("  evaluated ")][0]
    assert first.split()[1:3] == ["medqa", f"{evaluation.benchmarks['medqa'].accuracy:.1%}"]
    assert f"(merged, {evaluation.evaluated_at}, by " in first

    # The gate reads the job's score: a version with a medqa score may become production.
    code, out, err = run_main(["registry", "alias", "tiny", "production", "1", "--require", "medqa",
                               "--store", s3_bucket], capsys)
    assert code == 0 and out.strip() == "tiny@production -> tiny:1", err
