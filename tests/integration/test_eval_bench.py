"""``benchmarks/eval.py`` (the GPU benchmark of ``medft eval``'s engines) runs its ``--dry`` smoke mode on CPU:
the tiny Llama architecture, both arms on both workloads, forced lengths, one JSON line per arm and a summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.integration.conftest import ROOT


def test_eval_benchmark_dry_run_measures_both_arms_on_both_workloads(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MEDFT_LOG_LEVEL": "warning", "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "eval.jsonl"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.eval", "--dry", "--work", str(tmp_path / "work"),
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [json.loads(line) for line in out.read_text().splitlines()] == lines  # --out keeps the same lines
    *arms, summary = lines
    assert [(a["workload"], a["arm"]) for a in arms] == [("forced", "continuous"), ("forced", "static"),
                                                          ("mixed", "continuous"), ("mixed", "static")]
    assert all(a["model"] == "tiny-llama" and a["questions"] == 6 and a["forced"] is True for a in arms)
    forced = [a for a in arms if a["workload"] == "forced"]
    assert all(a["generated_tokens"] == 6 * 16 for a in forced)  # every answer ran to the limit
    mixed = [a for a in arms if a["workload"] == "mixed"]
    assert mixed[0]["generated_tokens"] == mixed[1]["generated_tokens"] < 6 * 20  # the same drawn lengths
    assert forced[1]["in_flight"] == 4 and "static" in forced[1]["plan"]
    # The summary divides the arms' rounded wall times; allow for the rounding (0.005 s each, 0.005 on the ratio).
    for workload, (cont, static) in (("forced", forced), ("mixed", mixed)):
        low = (static["wall_s"] - 0.005) / (cont["wall_s"] + 0.005) - 0.005
        high = (static["wall_s"] + 0.005) / (cont["wall_s"] - 0.005) + 0.005
        assert low <= summary[workload] <= high


def test_eval_benchmark_imports_on_cpu() -> None:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.eval", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0 and "--max-new-tokens" in proc.stdout and "--dry" in proc.stdout
