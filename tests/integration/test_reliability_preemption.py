"""Preemption: SIGTERM at random steps, SIGKILL during training, checkpoint upload, publish and registration.

Extends test_train_job.py (one SIGTERM at step >= 3, one resume): here the step is drawn from seeded RNGs, the
losses before the stop are checked to survive the resume, and SIGKILL (no grace, no checkpoint) is sent while
the fault proxy holds the job's uploads, so the store is left exactly as a pod dying at that moment leaves it.
"""

from __future__ import annotations

import random
import re
import signal
import time

from job.checkpoints import COMPLETE, Checkpointer
from registry.store import open_store
from tests.faults import (
    FaultProxy,
    Job,
    assert_published_whole,
    registry_versions,
    run_files,
    wait_lease_expired,
    wait_until,
)
from tests.integration.conftest import ROOT, job_args, medft_cmd, run_medft

FAST = ("--set", "model.max_seq_length=384", "--set", "data.too_long=truncate", "--set", "eval.enabled=false")


def _args(model_dir, store: str, run_id: str, *extra: str) -> list[str]:
    return job_args(model_dir, store, run_id, *FAST, *extra)


def _losses(job: Job) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in job.events if e.get("event") == "train.progress"}


STEPS = 21
SEEDS = (3, 17, 2024)


def test_sigterm_at_random_steps_resumes_to_the_same_steps_and_curve(tiny_model_dir, s3_bucket, job_env, tmp_path):
    """Three lives SIGTERMed at seeded random points, one per third of training, then one that finishes."""
    run_id = "run-term"
    args = _args(tiny_model_dir, s3_bucket, run_id, "--set", f"train.max_steps={STEPS}",
                 "--set", "train.checkpoint_every=5", "--set", "export.merge=false")
    run = open_store(s3_bucket).child(f"runs/{run_id}")
    checkpointer = Checkpointer(run)
    logged: dict[int, float] = {}
    stops: list[int] = []
    for i, seed in enumerate(SEEDS):
        rng = random.Random(seed)
        third = STEPS // len(SEEDS)
        low = max(i * third + 1, stops[-1] + 1 if stops else 1)
        target = rng.randint(low, max(low, (i + 1) * third - 2))
        pause = rng.uniform(0.0, 0.05)  # a step, then a random point inside the next one
        job = Job(medft_cmd(*args), cwd=ROOT, env=job_env)
        start = job.wait_for("train.start")
        assert start["resume_from_step"] == (stops[-1] if stops else None)
        job.wait_for("train.progress", step=lambda s, t=target: s >= t)
        time.sleep(pause)
        job.kill(signal.SIGTERM)
        assert job.wait() == 143, job.stderr[-3000:]
        assert "Traceback" not in job.stderr
        assert len(job.errors) == 1 and "stopped by SIGTERM at step" in job.errors[0], job.errors
        stopped_at = int(re.search(r"at step (\d+)", job.errors[0])[1])
        assert target <= stopped_at < STEPS
        latest = checkpointer.latest()
        assert latest is not None and latest.step == stopped_at
        checkpointer.restore(latest, tmp_path / f"restored-{i}")  # every file holds its sha256, passes the screen
        assert not run.exists("MANIFEST.json") and not run.exists("LEASE.json")  # unpublished; lease released
        losses = _losses(job)
        assert min(losses) == (stops[-1] + 1 if stops else 1)  # this life continued where the last one stopped
        logged.update(losses)
        stops.append(stopped_at)

    print(f"SIGTERM lives stopped at steps {stops} of {STEPS}")
    resumed = run_medft(*args, env=job_env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = assert_published_whole(s3_bucket, run_id, tmp_path / "published")["metrics"]
    assert metrics["steps"] == STEPS and metrics["resumed_from_step"] == stops[-1]
    history = metrics["loss_history"]
    assert [h["step"] for h in history] == list(range(1, STEPS + 1))  # no gap, no repeat
    for h in history[:stops[-1]]:  # the curve up to the last stop is the one the stopped lives logged
        assert abs(h["loss"] - logged[h["step"]]) < 1e-4, (h, logged[h["step"]])
    assert [(v.version, v.run_id) for v in registry_versions(s3_bucket)] == [(1, run_id)]


def test_sigkill_in_training_upload_publish_and_register_loses_nothing(tiny_model_dir, s3_server, s3_bucket,
                                                                       job_env, tmp_path):
    """Five lives of one run: killed in training, in a checkpoint upload, in publish, before registering."""
    steps, run_id = 12, "run-kill"
    args = _args(tiny_model_dir, s3_bucket, run_id, "--set", f"train.max_steps={steps}",
                 "--set", "train.checkpoint_every=4")
    run = open_store(s3_bucket).child(f"runs/{run_id}")
    checkpointer = Checkpointer(run)
    rng = random.Random(8)
    with FaultProxy(s3_server) as proxy:
        env = {**job_env, "MEDFT_S3_ENDPOINT_URL": proxy.endpoint, "MEDFT_LEASE_SECONDS": "2"}

        def life(*, hold: str, after: int = 0, kill_when: str) -> Job:
            proxy.clear()
            gate = proxy.add("hold", method="PUT", path=hold, after=after)
            job = Job(medft_cmd(*args), cwd=ROOT, env=env)
            if kill_when == "held":
                assert gate.wait_held(1, timeout=120), job.stderr[-3000:]
            else:
                job.wait_for("train.progress", step=lambda s: s >= int(kill_when))
            return job

        def kill(job: Job) -> None:
            job.kill(signal.SIGKILL)
            assert job.wait() == -signal.SIGKILL
            proxy.clear()  # whatever was parked dies with the pod: dropped, never forwarded
            wait_lease_expired(s3_bucket, run_id)

        # 1. SIGKILL mid-training, between the checkpoints at steps 4 and 8 (a hold on 8 makes sure of it).
        kill_step = rng.randint(5, 7)
        job = life(hold=rf"/runs/{run_id}/checkpoints/checkpoint-8/", kill_when=str(kill_step))
        print(f"SIGKILL in training after step {max(_losses(job))} (target {kill_step})")
        kill(job)
        assert [r.step for r in checkpointer.complete()] == [4]

        # 2. SIGKILL during the upload of checkpoint-8: three of its files land, the rest never do.
        job = life(hold=rf"/runs/{run_id}/checkpoints/checkpoint-8/", after=3, kill_when="held")
        assert job.wait_for("train.start")["resume_from_step"] == 4
        wait_until(lambda: len(run.list("checkpoints/checkpoint-8/")) == 3, what="3 files of checkpoint-8")
        kill(job)
        assert len(run.list("checkpoints/checkpoint-8/")) == 3 and not run.exists(f"checkpoints/checkpoint-8/{COMPLETE}")
        assert [r.step for r in checkpointer.complete()] == [4]

        # 3. SIGKILL during publish: the adapter is up, two merged files land, the manifest never does.
        job = life(hold=rf"/runs/{run_id}/merged/", after=2, kill_when="held")
        assert job.wait_for("train.start")["resume_from_step"] == 4  # the incomplete checkpoint-8 is ignored
        assert "checkpoint-8" in job.wait_for("checkpoint.incomplete_ignored")["checkpoints"]
        wait_until(lambda: len(run.list("merged/")) == 2, what="2 merged files")
        kill(job)
        assert not run.exists("MANIFEST.json") and run.list("adapter/") and not registry_versions(s3_bucket)
        assert [r.step for r in checkpointer.complete()] == [8, 12]
        trained_adapter = run.stat("adapter/adapter_model.safetensors").sha256  # uploaded by the life that trained

        # 4. SIGKILL after the manifest, while the registry record is being written.
        job = life(hold=r"/registry/models/tiny/versions/", kill_when="held")
        assert job.wait_for("train.start")["resume_from_step"] == 12
        kill(job)
        assert run.exists("MANIFEST.json") and not registry_versions(s3_bucket)
        published = assert_published_whole(s3_bucket, run_id, tmp_path / "after-4")

        # 5. The last life finds the run published and registers it, once.
        proxy.clear()
        last = Job(medft_cmd(*args), cwd=ROOT, env=env)
        assert last.wait() == 0, last.stderr[-3000:]
        assert "already published" in last.stdout
        # No retraining, no re-upload: one check (HEAD) per published file, a few reads and one registry record.
        # The lease's renewals (every 0.5 s at MEDFT_LEASE_SECONDS=2) grow with how slow the machine is: not counted.
        work = [r for r in proxy.requests if not r[1].endswith(f"/{run_id}/LEASE.json")]
        assert len(work) < len(published["files"]) + 25

    manifest = assert_published_whole(s3_bucket, run_id, tmp_path / "final")
    assert manifest["created_at"] == published["created_at"]  # published once, never rewritten
    metrics = manifest["metrics"]
    assert metrics["steps"] == steps and metrics["resumed_from_step"] == 12  # not 13: no step past max_steps
    assert [h["step"] for h in metrics["loss_history"]] == list(range(1, steps + 1))
    assert {"merged/model.safetensors", "adapter/adapter_model.safetensors"} <= set(manifest["files"])
    # life 4 trained nothing: it published the adapter of checkpoint-12, byte for byte the one life 3 trained
    assert manifest["files"]["adapter/adapter_model.safetensors"]["sha256"] == trained_adapter
    versions = registry_versions(s3_bucket)
    assert [(v.version, v.run_id, v.aliases) for v in versions] == [(1, run_id, ("candidate",))]
    assert not any(k.startswith("checkpoints/checkpoint-4/") for k in run_files(s3_bucket, run_id))  # pruned
