"""``benchmarks/eval.py`` (the GPU benchmark of ``medft eval``'s engine) runs its ``--dry`` smoke mode on CPU:
the tiny Llama architecture, both arms, forced length, one JSON line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
    # The one-at-a-time time is extrapolated from 2 questions to 6, and the speedup is the ratio of the two arms.
    # The printed figures are rounded (the measured time and the batched time to 0.01 s, the extrapolation to
    # 0.1 s, the ratios to 0.01 and 0.1), so each check takes the interval the unrounded values lie in.
    measured, plain, batched = (result[k] for k in ("plain_wall_s_measured", "plain_wall_s_for_all", "batched_wall_s"))
    assert abs(plain - 3 * measured) <= 0.05 + 3 * 0.005 + 1e-9
    plain_low, plain_high = max(plain - 0.05, 3 * (measured - 0.005)), min(plain + 0.05, 3 * (measured + 0.005))
    batched_low, batched_high = batched - 0.005, batched + 0.005
    assert batched_low > 0
    assert plain_low / batched_high - 0.005 <= result["speedup"] <= plain_high / batched_low + 0.005
    assert 96 / batched_high - 0.05 <= result["batched_tokens_per_s"] <= 96 / batched_low + 0.05


def test_eval_benchmark_imports_on_cpu() -> None:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.eval", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0 and "--max-new-tokens" in proc.stdout and "--dry" in proc.stdout
