"""The benchmark's worst-case rows (``--row-tokens``), the plan's estimate beside each arm's peak, and the
import timing arms (``benchmarks.import_profile --time``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from benchmarks import import_profile, train
from benchmarks.rows import full_length_rows, synthetic_rows
from job import architectures

ARCH = architectures.QWEN_1_5B


def test_full_length_rows_are_exactly_as_long_as_asked_with_the_real_rows_prompts_and_an_eos():
    rows, real = full_length_rows(ARCH, 6, 2048, seed=3), synthetic_rows(ARCH, 6, seed=3)
    for row, like in zip(rows, real, strict=True):
        prompt = like["completion_mask"].count(0)
        assert len(row["input_ids"]) == len(row["completion_mask"]) == 2048
        assert row["input_ids"][:prompt] == like["input_ids"][:prompt]  # the same prompt, masked out
        assert row["completion_mask"] == [0] * prompt + [1] * (2048 - prompt)
        assert row["input_ids"][-1] == ARCH.eos_token_id and ARCH.eos_token_id not in row["input_ids"][:-1]
    # Shorter than the real rows: the reasoning is cut, still ending in EOS.
    short = full_length_rows(ARCH, 2, 300, seed=3)
    assert [len(r["input_ids"]) for r in short] == [300, 300] and short[0]["input_ids"][-1] == ARCH.eos_token_id
    with pytest.raises(ValueError, match="cannot hold a .*-token prompt"):
        full_length_rows(ARCH, 1, 20)


def test_row_tokens_reach_every_arms_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(train, "_prepare_model", lambda key, work, env, timeout: {
        "weights": str(tmp_path / "w"), "save_s": 0.0, "matmul_tflops": 1.0})
    monkeypatch.setattr(train, "_run_arms", lambda *args: iter(()))  # no arm runs: only their rows are written
    ok = CliRunner().invoke(train.command, ["--models", "tiny-qwen2", "--arms", "C", "--rows", "5",
                                            "--row-tokens", "512", "--work", str(tmp_path),
                                            "--out", str(tmp_path / "r.json")], obj=[])
    assert ok.exit_code == 0, ok.output
    rows = json.loads((tmp_path / "rows-tiny-qwen2.json").read_text())
    assert [len(r["input_ids"]) for r in rows] == [512] * 5


def test_the_table_sets_each_arms_peak_beside_the_plans_estimate():
    common = {"model": "llama8b", "seconds_per_step": 1.0, "peak_reserved_gib": 1.0, "micro_batch": 8,
              "grad_accum": 1, "padding_share": 0.0, "load_s": 1.0}
    text = train.table([{**common, "arm": "B", "tokens_per_s": 100.0, "peak_allocated_gib": 6.2},
                        {**common, "arm": "C", "tokens_per_s": 200.0, "peak_allocated_gib": 70.31,
                         "estimate_gib": 74.5}])
    lines = text.splitlines()
    assert "plan's estimate GiB" in lines[0]
    b, c = (line.split(" | ") for line in lines[2:])
    column = lines[0].split(" | ").index("plan's estimate GiB")
    assert (b[column], c[column]) == ("-", "74.50") and c[column - 1] == "70.31"


def test_import_timing_arms_take_name_value_lists_and_refuse_anything_else():
    assert import_profile._arm_env("-") == {}
    assert import_profile._arm_env("A=1 B=x=y") == {"A": "1", "B": "x=y"}
    bad = CliRunner().invoke(import_profile.main, ["--time", "UNSLOTH_DISABLE_VENDORED_FLA"])
    assert bad.exit_code == 2 and "'UNSLOTH_DISABLE_VENDORED_FLA' is not NAME=VALUE" in bad.output


def test_import_timing_arms_take_turns_and_a_failed_import_is_reported(monkeypatch: pytest.MonkeyPatch,
                                                                        tmp_path: Path):
    seen: list[str | None] = []

    class Done:
        def __init__(self, env: dict[str, str]) -> None:
            seen.append(env.get("SWITCH"))
            self.returncode = 1 if env.get("SWITCH") == "broken" else 0
            self.stdout, self.stderr = "Unsloth banner\n12.5\n", "no GPU"

    monkeypatch.setattr(import_profile.subprocess, "run", lambda args, env, **kw: Done(env))
    result = CliRunner().invoke(import_profile.main, ["--time", "-", "--time", "SWITCH=broken", "--repeat", "2",
                                                      "--out", str(tmp_path / "t.json")])
    assert result.exit_code == 1  # an arm that failed to import fails the command, after writing the rest
    assert seen == [None, "broken", None, "broken"]
    report = json.loads((tmp_path / "t.json").read_text())
    assert [r.get("import_s") for r in report] == [12.5, None, 12.5, None]
    assert report[1]["error"] == "exit 1: no GPU"
