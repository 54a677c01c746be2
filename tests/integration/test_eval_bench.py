"""``benchmarks/eval.py`` (the GPU benchmark of ``medft eval``'s engine) runs its ``--dry`` smoke mode on CPU:
the tiny Llama architecture, both arms, forced length, one JSON line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import ROOT


def test_eval_benchmark_dry_run_prints_one_json_line(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MEDFT_LOG_LEVEL": "warning", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.eval", "--dry", "--work", str(tmp_path / "work")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [line] = proc.stdout.splitlines()
    result = json.loads(line)
    assert result["model"] == "tiny-llama" and result["questions"] == 6 and result["max_new_tokens"] == 16
    assert result["forced"] is True and result["generated_tokens"] == 6 * 16  # every answer ran to the limit
    assert result["plain_questions_timed"] == 2
    # The one-at-a-time time is extrapolated from 2 questions to 6 (the printed figures are rounded: to 0.01 s
    # for the measured time, 0.1 s for the extrapolation), and the speedup is the ratio of the two arms.
    assert result["plain_wall_s_for_all"] == pytest.approx(result["plain_wall_s_measured"] * 3, abs=0.05 + 0.015)
    # The relative error the printed figures' rounding can bring into the ratios.
    rounding = 0.01 + 0.05 / result["plain_wall_s_for_all"] + 0.005 / result["batched_wall_s"]
    assert result["speedup"] == pytest.approx(result["plain_wall_s_for_all"] / result["batched_wall_s"], rel=rounding)
    assert result["batched_tokens_per_s"] == pytest.approx(6 * 16 / result["batched_wall_s"], rel=rounding)


def test_eval_benchmark_imports_on_cpu() -> None:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.eval", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0 and "--max-new-tokens" in proc.stdout and "--dry" in proc.stdout
