"""`medft train` end to end on CPU: a tiny random model, the sample data and a moto S3 endpoint."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
import torch

from registry.registry import Registry
from registry.runs import read_manifest
from registry.store import open_store
from tests.integration.conftest import ROOT, job_args, medft_cmd, run_medft


def _manifest(store_uri: str, run_id: str) -> dict:
    return read_manifest(open_store(store_uri), run_id)


def _reload_logits(path, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_train_publishes_registers_and_merges_exactly(tiny_model_dir, s3_bucket, job_env, tmp_path):
    # Shards of about 150 kB: the merged weights come in several, each uploaded as soon as it is written.
    proc = run_medft(*job_args(tiny_model_dir, s3_bucket, "run-a", "--set", "export.dtype=float32",
                               "--set", "export.shard_size=150000"), env=job_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    assert events[0]["event"] == "config.resolved"
    merged_upload = next(e for e in events if e["event"] == "publish.uploaded" and e["artifact"] == "merged")
    shards = next(e for e in events if e["event"] == "export.merged")["shards"]
    assert shards > 1 and merged_upload["during_export"] == shards  # the publish stage sent only the rest
    assert "medft registry show tiny:1" in proc.stdout

    manifest = _manifest(s3_bucket, "run-a")
    files = manifest["files"]
    for required in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "merged/config.json",
                     "merged/model.safetensors.index.json", f"merged/model-00001-of-{shards:05d}.safetensors",
                     f"merged/model-{shards:05d}-of-{shards:05d}.safetensors", "merged/README.md",
                     "merged/generation_config.json",
                     "merged/tokenizer.json", "config.yaml", "metrics.json"):
        assert required in files, required
    store = open_store(s3_bucket).child("runs/run-a")
    for rel, info in files.items():  # every checksum in the manifest holds
        store.get_file(rel, tmp_path / "check" / rel, sha256=info["sha256"])
    metrics = manifest["metrics"]
    assert metrics["steps"] == 6 and metrics["eval_loss_after"] < metrics["eval_loss_before"]
    assert metrics["merge_check"]["relative_diff"] <= metrics["merge_check"]["tolerance"]
    assert set(metrics["stage_seconds"]) >= {"pull", "load", "eval_before", "train", "eval_after", "export"}
    assert manifest["lineage"]["dataset"]["rows"] > 0 and manifest["lineage"]["base_model"]["sha256"]
    card = (tmp_path / "check" / "merged" / "README.md").read_text()
    assert "Not medical advice" in card and "Before:" in card

    version = Registry.open(s3_bucket + "/registry").get("tiny@candidate")
    assert version.version == 1 and version.run_id == "run-a"

    # The merged weights reload in plain transformers and reproduce base + adapter, unmerged.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    merged = _reload_logits(tmp_path / "check" / "merged", ids)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        reference = PeftModel.from_pretrained(base, tmp_path / "check" / "adapter").eval()(input_ids=ids).logits
    torch.testing.assert_close(merged, reference, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(merged, _reload_logits(tiny_model_dir, ids), atol=1e-3)  # training changed it

    # A re-run of the finished run id publishes nothing new.
    again = run_medft(*job_args(tiny_model_dir, s3_bucket, "run-a"), env=job_env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "already published" in again.stdout
    assert [v.version for v in Registry.open(s3_bucket + "/registry").list("tiny")] == [1]
    assert _manifest(s3_bucket, "run-a")["created_at"] == manifest["created_at"]


def test_sigterm_checkpoints_then_resume_finishes_the_same_steps(tiny_model_dir, s3_bucket, job_env):
    steps = 40
    args = job_args(tiny_model_dir, s3_bucket, "run-sig", "--set", f"train.max_steps={steps}",
                    "--set", "train.checkpoint_every=100", "--set", "export.merge=false",
                    "--set", "eval.enabled=false")
    proc = subprocess.Popen(medft_cmd(*args), cwd=ROOT, env=job_env, stderr=subprocess.PIPE, text=True)
    seen_step = 0
    deadline = time.time() + 240
    for line in proc.stderr:  # signal as soon as training is under way
        if '"train.progress"' in line and json.loads(line)["step"] >= 3:
            seen_step = json.loads(line)["step"]
            proc.send_signal(signal.SIGTERM)
            break
        assert time.time() < deadline
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 143, rest[-3000:]
    assert "SIGTERM" in rest and "resume" in rest
    keys = open_store(s3_bucket).child("runs/run-sig").list("checkpoints/")
    complete = [k for k in keys if k.endswith("COMPLETE.json")]
    assert len(complete) == 1  # checkpoint_every=100: this one exists only because of the SIGTERM
    stopped_at = int(complete[0].split("/")[1].split("-")[1])
    assert seen_step <= stopped_at < steps
    assert not open_store(s3_bucket).exists("runs/run-sig/MANIFEST.json")

    resumed = run_medft(*args, env=job_env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = _manifest(s3_bucket, "run-sig")["metrics"]
    assert metrics["steps"] == steps and metrics["resumed_from_step"] == stopped_at
    logged = [h["step"] for h in metrics["loss_history"]]
    assert logged == list(range(1, steps + 1))  # the loss curve continues where it stopped, no gap, no repeat
    assert len(Registry.open(s3_bucket + "/registry").list("tiny")) == 1


@pytest.mark.parametrize("override, code, needle", [
    ("train.bogus=1", 2, "train.bogus"),
    ("train.learning_rate=abc", 2, "train.learning_rate"),
    ("data.source=/nonexistent/rows.jsonl", 4, "/nonexistent/rows.jsonl"),
    ("model.base=/nonexistent/model", 4, "/nonexistent/model"),
])
def test_expected_failures_print_one_line_and_exit_code(tiny_model_dir, tmp_path, job_env, override, code, needle):
    proc = run_medft(*job_args(tiny_model_dir, str(tmp_path / "store"), "run-bad", "--set", override),
                     env=job_env)
    assert proc.returncode == code, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("medft: error:")]
    assert len(errors) == 1 and needle in errors[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "store" / "runs" / "run-bad" / "MANIFEST.json").exists()


def test_dry_run_prints_plan_and_touches_nothing(tmp_path, job_env):
    proc = run_medft("train", "--config", "configs/demo.yaml", "--dry-run",
                     "--set", f"output.store={tmp_path / 'store'}", env=job_env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "model_name: smollm2-medical-demo" in proc.stdout and "register smollm2-medical-demo" in proc.stdout
    assert not (tmp_path / "store").exists()


def test_a_merge_base_is_pulled_recorded_in_lineage_and_named_in_the_card(tiny_model_dir, s3_bucket, job_env,
                                                                          tmp_path):
    """``model.merge_base`` (the 16-bit weights a pre-quantized base is merged into) is part of the lineage:
    its URI, revision and the sha256 of every weight file, as for the base; and the merge uses it."""
    import hashlib
    import shutil

    from safetensors.torch import load_file, save_file

    merge_base = tmp_path / "merge-base"
    shutil.copytree(tiny_model_dir, merge_base)
    weights = load_file(merge_base / "model.safetensors")
    name = next(k for k in weights if k.endswith("q_proj.weight"))
    weights[name] = weights[name] + 1.0  # other 16-bit weights than the base's: the merge must use these
    save_file(weights, merge_base / "model.safetensors", metadata={"format": "pt"})
    proc = run_medft(*job_args(tiny_model_dir, s3_bucket, "run-mb", "--set", "export.dtype=float32",
                               "--set", f"model.merge_base={merge_base}"), env=job_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lineage = _manifest(s3_bucket, "run-mb")["lineage"]
    sha = hashlib.sha256((merge_base / "model.safetensors").read_bytes()).hexdigest()
    assert lineage["merge_base"] == {"uri": str(merge_base), "revision": None, "sha256": {"model.safetensors": sha}}
    assert lineage["base_model"]["uri"] == str(tiny_model_dir) and lineage["base_model"]["sha256"] != {
        "model.safetensors": sha}
    store = open_store(s3_bucket).child("runs/run-mb")
    store.get_file("merged/README.md", tmp_path / "card.md")
    assert f"merged into `{merge_base}` (revision `unpinned`)" in (tmp_path / "card.md").read_text()
    store.get_file("merged/model.safetensors", tmp_path / "merged.safetensors")
    merged = load_file(tmp_path / "merged.safetensors")
    base = load_file(tiny_model_dir / "model.safetensors")
    # The merged q_proj carries the merge base's +1.0 (plus the adapter's small delta), not the base's weights.
    assert (merged[name] - base[name]).mean().item() == pytest.approx(1.0, abs=0.05)

    # merge_revision without merge_base says what to set.
    proc = run_medft(*job_args(tiny_model_dir, s3_bucket, "run-mr", "--set", "model.merge_revision=main"),
                     "--dry-run", env=job_env)
    assert proc.returncode == 2 and "model.merge_revision" in proc.stderr and "merge_base" in proc.stderr
