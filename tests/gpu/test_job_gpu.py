"""``medft train`` with the unsloth backend on a GPU: merge exactness and SIGTERM resume, end to end.

Each job runs as a subprocess, as in production; the tiny random model keeps each one under a minute.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

from tests.gpu.conftest import ROOT, job_args, medft_cmd


def _run(args: list[str], env: dict[str, str], timeout: float = 420) -> subprocess.CompletedProcess:
    return subprocess.run(medft_cmd(*args), cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def _manifest(store: Path, run_id: str) -> dict:
    from registry.runs import read_manifest
    from registry.store import open_store

    return read_manifest(open_store(str(store)), run_id)


def test_job_merges_what_unsloth_trained_exactly(tiny_weights: Path, tiny_data: Path, tmp_path: Path,
                                                 job_env: dict[str, str]):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from registry.store import open_store

    store = tmp_path / "store"
    proc = _run(job_args(tiny_weights, tiny_data, store, "gpu-a", "--set", "export.dtype=float32"), job_env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = _manifest(store, "gpu-a")["metrics"]
    assert metrics["backend"] == "unsloth" and metrics["steps"] == 6
    reasons = metrics["plan"]["reasons"]
    assert reasons["packing"].startswith("padded (auto)") and reasons["gpu"]
    assert metrics["merge_check"]["relative_diff"] <= metrics["merge_check"]["tolerance"]

    run = open_store(str(store)).child("runs/gpu-a")
    local = tmp_path / "fetched"
    for rel in run.list(""):
        if rel.startswith(("adapter/", "merged/")):
            run.get_file(rel, local / rel)
    # The adapter unsloth trained loads in plain peft, and the merge reproduces base + adapter in float32.
    ids = torch.tensor([[2000, 17, 42, 99, 7, 301, 1999, 5]], device="cuda")
    base = AutoModelForCausalLM.from_pretrained(tiny_weights, dtype=torch.float32).cuda()
    with torch.no_grad():
        reference = PeftModel.from_pretrained(base, local / "adapter").eval()(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(local / "merged", dtype=torch.float32).cuda().eval()
        merged_logits = merged(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_weights, dtype=torch.float32).cuda().eval()
        base_logits = plain(input_ids=ids).logits
    torch.testing.assert_close(merged_logits, reference, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(merged_logits, base_logits, atol=1e-3)  # training moved the model


def test_sigterm_on_gpu_checkpoints_and_resume_finishes_the_same_steps(
        tiny_weights: Path, tiny_data: Path, tmp_path: Path, job_env: dict[str, str]):
    from registry.store import open_store

    steps, store = 40, tmp_path / "store"
    args = job_args(tiny_weights, tiny_data, store, "gpu-sig", "--set", f"train.max_steps={steps}",
                    "--set", "train.checkpoint_every=100", "--set", "export.merge=false",
                    "--set", "eval.enabled=false")
    proc = subprocess.Popen(medft_cmd(*args), cwd=ROOT, env=job_env, stderr=subprocess.PIPE, text=True)
    seen_step, deadline = 0, time.time() + 300
    assert proc.stderr is not None
    for line in proc.stderr:  # signal once training is under way
        if '"train.progress"' in line and json.loads(line)["step"] >= 3:
            seen_step = json.loads(line)["step"]
            proc.send_signal(signal.SIGTERM)
            break
        assert time.time() < deadline, "training never started"
    rest = proc.stderr.read()
    assert proc.wait(timeout=180) == 143, rest[-4000:]
    keys = open_store(str(store)).child("runs/gpu-sig").list("checkpoints/")
    complete = [k for k in keys if k.endswith("COMPLETE.json")]
    assert len(complete) == 1  # checkpoint_every=100: it exists only because of the SIGTERM
    stopped_at = int(complete[0].split("/")[1].split("-")[1])
    assert seen_step <= stopped_at < steps

    resumed = _run(args, job_env)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    metrics = _manifest(store, "gpu-sig")["metrics"]
    assert metrics["steps"] == steps and metrics["resumed_from_step"] == stopped_at
    assert [h["step"] for h in metrics["loss_history"]] == list(range(1, steps + 1))
