"""``medft eval --base URI --record-as NAME``: a base model's scores beside its fine-tunes in the registry."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from registry.errors import ConfigError
from registry.records import EvaluationRecord
from registry.registry import Registry
from tests.cli import error_lines, run_main
from tests.eval_factory import write_benchmark
from tests.integration.test_registry_gate import scored_run


def test_base_scores_are_recorded_under_a_name_and_compared_with_its_versions(
        tiny_model_dir: Path, tmp_path: Path, publish_sample_run: Callable[..., str],
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MEDFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    store = str(tmp_path / "store")
    reg = Registry.open(store + "/registry")
    reg.register("m", publish_sample_run(store, **scored_run(0.6)))
    args = ["--store", store]
    base = ["eval", "--base", str(tiny_model_dir), "--benchmarks", "medqa", "--limit", "3", "--max-new-tokens", "4",
            "--batch-size", "3", "--data", f"medqa={write_benchmark(tmp_path, 'medqa')}"]
    code, out, err = run_main([*base, "--record-as", "m", *args], capsys)
    assert code == 0, err[-2000:]
    assert "recorded as m@base" in out
    mv = reg.get("m@base")
    assert mv.ref == "m@base" and mv.base_model["uri"] == str(tiny_model_dir)
    assert mv.evaluations[0].benchmarks is not None and mv.evaluations[0].benchmarks["medqa"].scored == 3
    code, out, _ = run_main(["registry", "compare", "m@base", "m:1", "--json", *args], capsys)
    versions = json.loads(out)["versions"]
    assert code == 0 and [v["ref"] for v in versions] == ["m@base", "m:1"]
    assert versions[0]["benchmarks"]["medqa"]["scored"] == 3 and versions[1]["benchmarks"]["medqa"]["accuracy"] == 0.6
    # One base per name; a REF is recorded with --record; 'base' is no alias.
    with pytest.raises(ConfigError, match=r"m@base holds the scores of .*, not hf://org/other"):
        reg.record_base_evaluation("m", "hf://org/other", None, EvaluationRecord(benchmarks={}))
    code, _, err = run_main(["eval", "m:1", "--record-as", "m", *args], capsys)
    assert code == 2 and "--record-as NAME records a base model's scores" in error_lines(err)[0]
    code, _, err = run_main(["registry", "alias", "m", "1", "base", *args], capsys)
    assert code == 2 and "alias 'base' is reserved" in error_lines(err)[0]
