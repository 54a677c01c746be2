"""Config values that used to pass ``--dry-run`` and crash after the weights loaded now fail at once.

Each bad value goes through ``medft train --dry-run`` and through a real ``medft train`` (in-process, the tiny
model and the bundled sample): both exit 2 with the same single line naming the key and where its value came
from, and the real run writes nothing to the store (it stops before its lease, config or any stage).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from registry.store import open_store
from tests.cli import error_lines, run_main
from tests.integration.conftest import job_args

BAD = {
    "train.optim=adamw_torchh": "train.optim: unknown optimizer 'adamw_torchh'",
    "train.scheduler=cosinee": "train.scheduler: unknown schedule 'cosinee'",
    "train.scheduler=cosine_with_min_lr": "train.scheduler: 'cosine_with_min_lr' cannot run in this job",
    "train.scheduler=reduce_lr_on_plateau": "steps on an evaluation metric",
    "lora.target_modules=[q_proj,qproj]": "lora.target_modules: 'qproj' matches no module of LlamaForCausalLM",
    "lora.target_modules=[mlp]": "'mlp' names LlamaMLP, which LoRA cannot adapt",
    "train.seed=-1": "train.seed: Input should be greater than or equal to 0",
    "train.learning_rate=.nan": "train.learning_rate: Input should be a finite number",
    "train.epochs=.inf": "train.epochs: Input should be a finite number",
    "output.aliases=[latest]": "output.aliases: alias 'latest' is reserved",
    "output.aliases=[v1]": "output.aliases: alias 'v1' is reserved",
    "output.model_name=r1..medical": "output.model_name: invalid model name 'r1..medical'",
}


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


@pytest.mark.parametrize("override", list(BAD))
def test_dry_run_and_the_real_run_refuse_the_same_way_before_any_work(override: str, tiny_model_dir: Path,
                                                                     tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MEDFT_LOG_FORMAT", "json")
    store = tmp_path / "store"
    argv = job_args(tiny_model_dir, str(store), "run-early", "--set", override)
    lines = []
    for extra in (["--dry-run"], []):
        code, _, err = run_main([*argv, *extra], capsys)
        assert code == 2 and "Traceback" not in err, err[-3000:]
        errors = error_lines(err)
        key = override.split("=")[0]
        assert len(errors) == 1 and errors[0].startswith(f"medft: error: --set {key}: ") and BAD[override] in errors[0]
        assert not [e for e in map(json.loads, filter(None, err.splitlines()[:-1])) if e["event"] == "stage.start"]
        lines.append(errors[0])
    assert lines[0] == lines[1]
    assert _files(store) == []  # no lease, no config.yaml, no run folder


def test_an_environment_variable_is_named_instead_of_the_config_file(tiny_model_dir: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDFT_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "job.yaml"
    path.write_text(f"model:\n  base: {tiny_model_dir}\ntrain:\n  optim: sgd\n  learning_rate: 1.0e-4\n"
                    f"output:\n  store: {tmp_path / 'store'}\n")
    for var, value, words in (("MEDFT_TRAIN__OPTIM", "sgdd", "train.optim: unknown optimizer 'sgdd'"),
                              ("MEDFT_TRAIN__LEARNING_RATE", "abc", "train.learning_rate: Input should be"),
                              ("MEDFT_LORA__TARGET_MODULES", "[qproj]", "lora.target_modules: 'qproj' matches"),
                              ("MEDFT_OUTPUT__ALIASES", "[latest]", "output.aliases: alias 'latest' is reserved")):
        with monkeypatch.context() as m:
            m.setenv(var, value)
            code, _, err = run_main(["train", "--config", str(path), "--dry-run"], capsys)
        errors = error_lines(err)
        assert code == 2 and len(errors) == 1 and "Traceback" not in err, err[-2000:]
        assert errors[0].startswith(f"medft: error: {var}: ") and words in errors[0], errors
        assert str(path) not in errors[0]


def test_duplicate_keys_in_a_config_file_exit_2_naming_key_and_file(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDFT_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "job.yaml"
    path.write_text("train:\n  learning_rate: 2.0e-4\n  max_steps: 60\n  learning_rate: 2.0e+4\n")
    code, _, err = run_main(["train", "--config", str(path), "--dry-run"], capsys)
    assert code == 2 and "Traceback" not in err
    assert error_lines(err) == [f"medft: error: {path} line 4: invalid YAML (key 'learning_rate' is given twice in "
                                "the same section; keep one)"]


def test_targets_of_a_base_not_here_yet_are_checked_after_the_pull_before_the_load(
        tiny_model_dir: Path, s3_bucket: str, tmp_path: Path, capsys: pytest.CaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    base = f"{s3_bucket}/bases/tiny"
    open_store(base).put_dir("", tiny_model_dir)
    monkeypatch.setenv("MEDFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MEDFT_LOG_FORMAT", "json")
    argv = [*job_args(tiny_model_dir, f"{s3_bucket}/store", "run-s3-targets", "--set", "lora.target_modules=[qproj]"),
            "--set", f"model.base={base}"]
    code, out, err = run_main([*argv, "--dry-run"], capsys)
    assert code == 0, err[-2000:]  # its config.json is not on this machine: nothing to check it against yet
    code, _, err = run_main(argv, capsys)
    errors = error_lines(err)
    assert code == 2 and len(errors) == 1 and "'qproj' matches no module of LlamaForCausalLM" in errors[0], err[-3000:]
    stages = [e["stage"] for e in map(json.loads, err.splitlines()[:-1]) if e["event"] == "stage.start"]
    assert stages == ["pull"]  # refused after the pull, before the load stage


def test_the_backend_is_chosen_before_the_checks_import_transformers(tiny_model_dir: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """unsloth must be imported before transformers (it patches it); selecting it is what imports it."""
    from job import pipeline, preflight

    calls: list[str] = []
    real_select, real_check = pipeline.select_backend, preflight.check
    monkeypatch.setattr(pipeline, "select_backend", lambda cfg: calls.append("select_backend") or real_select(cfg))
    monkeypatch.setattr(preflight, "check", lambda cfg: calls.append("preflight") or real_check(cfg))
    monkeypatch.setenv("MEDFT_CACHE", str(tmp_path / "cache"))
    argv = job_args(tiny_model_dir, str(tmp_path / "store"), "run-order", "--set", "train.optim=nope")
    code, _, err = run_main(argv, capsys)
    assert code == 2 and calls == ["select_backend", "preflight"], (calls, err[-2000:])


MISSING = {  # a local path the config names, and the exit code the pull would give
    "data.source=no/such/rows.jsonl": (4, "data.source: no/such/rows.jsonl: no such file"),
    "data.source=data": (3, "data.source: data: is a directory"),
    "model.base=no/such/model": (4, "model.base: no/such/model: no such file or directory"),
    "model.merge_base=/no/such/base": (4, "model.merge_base: /no/such/base: no such file or directory"),
    "eval.benchmark_sources={medqa: {file: no/such/medqa.jsonl}}":
        (4, "eval.benchmark_sources.medqa.file: no/such/medqa.jsonl: no such file"),
}


@pytest.mark.parametrize("override", list(MISSING))
def test_dry_run_checks_local_paths_as_the_real_run_does(override: str, tiny_model_dir: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A missing file used to pass ``--dry-run`` and fail the real run; now both fail at once, alike, naming the
    directory a relative path was looked up from."""
    monkeypatch.setenv("MEDFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    store = tmp_path / "store"
    argv = job_args(tiny_model_dir, str(store), "run-paths", "--set", "eval.benchmarks=[medqa]", "--set", override)
    code_expected, needle = MISSING[override]
    lines = []
    for extra in (["--dry-run"], []):
        code, out, err = run_main([*argv, *extra], capsys)
        errors = error_lines(err)
        assert code == code_expected and len(errors) == 1 and needle in errors[0], err[-3000:]
        assert out == ""  # no plan printed for a config that cannot run
        lines.append(errors[0])
    assert lines[0] == lines[1] and _files(store) == []
    if " no/such" in needle:  # a relative path: the line says where it was looked up from
        assert lines[0].endswith(f"; check the path (relative paths are from {Path.cwd()})")


def test_dry_run_takes_a_benchmark_file_as_a_file_uri_as_eval_does(tiny_model_dir: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.eval_factory import write_benchmark

    monkeypatch.setenv("MEDFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    medqa = write_benchmark(tmp_path, "medqa")
    argv = job_args(tiny_model_dir, str(tmp_path / "store"), "run-uri", "--set", "eval.benchmarks=[medqa]",
                    "--set", f"eval.benchmark_sources={{medqa: {{file: 'file://{medqa}'}}}}", "--dry-run")
    code, _, err = run_main(argv, capsys)
    assert code == 0 and not error_lines(err), err[-2000:]
