"""Issue 14, fencing: a job that lost its run's lease stops at the next step boundary and writes nothing more.

Two real ``medft train`` jobs share a run id (one paused with SIGSTOP past its lease while the other takes the
run over and publishes), and a lease is stolen mid-training by a plain write to LEASE.json; the fault proxy
holds a checkpoint upload so the steal lands at a known moment. The fenced store itself is checked directly
against moto: create-only uploads, identical content kept, a published file never replaced.
"""

from __future__ import annotations

import hashlib
import json
import signal
import time
from pathlib import Path

import pytest

from job.checkpoints import Checkpointer
from job.config import JobConfig
from job.lifecycle import FencedStore, Lease, LeaseLost, Run
from job.publish import EarlyUploads, publish
from registry.records import RunRecord, parse_record
from registry.store import PreconditionFailed, open_store
from tests.conftest import SAMPLE_RECORD, make_s3_client
from tests.faults import FaultProxy, Job, assert_published_whole, registry_versions, wait_lease_expired
from tests.integration.conftest import ROOT, job_args, medft_cmd

FAST = ("--set", "model.max_seq_length=384", "--set", "data.too_long=truncate", "--set", "eval.enabled=false")


def _args(model_dir: Path, store: str, run_id: str, *extra: str) -> list[str]:
    return job_args(model_dir, store, run_id, *FAST, *extra)


def _bucket_state(endpoint: str, store_uri: str) -> dict[str, str]:
    """{key: ETag} of every object in the store's bucket."""
    bucket = store_uri.removeprefix("s3://").split("/")[0]
    pages = make_s3_client(endpoint).get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return {o["Key"]: o["ETag"] for page in pages for o in page.get("Contents", [])}


def _steps(job: Job) -> list[int]:
    return [e["step"] for e in job.events if e.get("event") == "train.progress"]


def test_lease_stolen_mid_training_stops_the_job_with_75_and_nothing_of_the_thief_is_touched(
        tiny_model_dir, s3_serial_server, s3_serial_bucket, job_env, tmp_path):
    # The serial server: the threaded one checks an If-Match and then writes without a lock, so the job's
    # conditional renewal could land over the thief's plain write and the steal would go unnoticed.
    s3_bucket = s3_serial_bucket
    run_id = "run-stolen"
    run = open_store(s3_bucket).child(f"runs/{run_id}")
    args = _args(tiny_model_dir, s3_bucket, run_id, "--set", "train.max_steps=12")  # a checkpoint every 2 steps
    thief_lease = json.dumps({"owner": "thief-pod:1:cafe", "expires": time.time() + 600}).encode()
    thief_files = {"checkpoints/checkpoint-4/adapter_model.safetensors": b"the thief's checkpoint",
                   "adapter/adapter_model.safetensors": b"the thief's adapter", "metrics.json": b'{"thief": 1}'}
    with FaultProxy(s3_serial_server.endpoint) as proxy:
        gate = proxy.add("hold", method="PUT", path=rf"/runs/{run_id}/checkpoints/checkpoint-2/COMPLETE\.json$")
        env = {**job_env, "MEDFT_S3_ENDPOINT_URL": proxy.endpoint, "MEDFT_LEASE_SECONDS": "2"}
        job = Job(medft_cmd(*args), cwd=ROOT, env=env)
        assert gate.wait_held(1, timeout=120), job.stderr[-3000:]
        # While the job finishes checkpoint-2, another owner takes LEASE.json and writes into the run.
        run.put_bytes("LEASE.json", thief_lease)
        for key, data in thief_files.items():
            run.put_bytes(key, data)
        job.wait_for("lease.lost", timeout=30)  # the renewal (every 0.5 s) notices
        gate.release()
        code = job.wait()
    assert code == 75, job.stderr[-3000:]
    assert "Traceback" not in job.stderr and len(job.errors) == 1, job.stderr[-3000:]
    assert "lost its lease" in job.errors[0] and "thief-pod:1:cafe" in job.errors[0], job.errors
    assert max(_steps(job)) <= 3  # stopped at the first step boundary after it knew
    assert run.get_bytes("LEASE.json")[0] == thief_lease  # not released: it is not the job's to release
    for key, data in thief_files.items():
        assert run.get_bytes(key)[0] == data, key
    assert [r.step for r in Checkpointer(run).complete()] == [2]  # written before the steal, nothing after
    assert not run.exists("MANIFEST.json") and not registry_versions(s3_bucket)


def test_a_paused_pod_past_its_lease_writes_nothing_over_the_pod_that_took_the_run(
        tiny_model_dir, s3_server, s3_bucket, job_env, tmp_path):
    """Pod A stalls (SIGSTOP: a long GC pause, a partitioned node) for longer than its lease; pod B takes the
    run over, resumes A's checkpoint and publishes. Then A wakes up mid-training."""
    run_id = "run-paused"
    args = _args(tiny_model_dir, s3_bucket, run_id)  # 6 steps, a checkpoint every 2
    env = {**job_env, "MEDFT_LEASE_SECONDS": "2"}
    pod_a = Job(medft_cmd(*args), cwd=ROOT, env=env)
    pod_a.wait_for("train.progress", step=3, timeout=180)
    pod_a.kill(signal.SIGSTOP)
    try:
        wait_lease_expired(s3_bucket, run_id)
        pod_b = Job(medft_cmd(*args), cwd=ROOT, env=env)
        assert pod_b.wait() == 0, pod_b.stderr[-3000:]
        assert pod_b.wait_for("lease.taken_over")["previous_owner"].split(":")[1] == str(pod_a.proc.pid)
        assert pod_b.wait_for("train.start")["resume_from_step"] == 2
        before = _bucket_state(s3_server, s3_bucket)
    finally:
        pod_a.kill(signal.SIGCONT)
    assert pod_a.wait() == 75, pod_a.stderr[-3000:]
    assert "Traceback" not in pod_a.stderr and len(pod_a.errors) == 1, pod_a.stderr[-3000:]
    assert "lost its lease" in pod_a.errors[0], pod_a.errors
    assert _bucket_state(s3_server, s3_bucket) == before  # not one object written, replaced or deleted
    manifest = assert_published_whole(s3_bucket, run_id, tmp_path / "published")
    assert manifest["metrics"]["steps"] == 6 and manifest["metrics"]["resumed_from_step"] == 2
    assert [(v.version, v.run_id) for v in registry_versions(s3_bucket)] == [(1, run_id)]


# --------------------------------------------------------------------------------------- the fenced store

@pytest.fixture
def lease(s3_bucket: str, tmp_path: Path):
    store = open_store(s3_bucket)
    run = Run(cfg=JobConfig(), run_id="run-f", store=store, run_store=store.child("runs/run-f"),
              work_dir=tmp_path / "work")
    held = Lease(run, ttl=60)
    held.acquire()
    yield held
    held.release()


def test_fenced_uploads_are_create_only_keep_identical_content_and_never_replace_a_published_file(
        lease: Lease, tmp_path: Path):
    rs = lease.run.run_store
    fenced = FencedStore(rs, lease)
    rs.put_bytes("adapter/same.json", b"same")
    rs.put_bytes("adapter/left.json", b"left by an earlier life")
    etag_same = rs.stat("adapter/same.json").etag
    local = tmp_path / "adapter"
    local.mkdir()
    (local / "same.json").write_bytes(b"same")
    (local / "left.json").write_bytes(b"this life's")
    (local / "new.json").write_bytes(b"new")
    infos = {i.key: i.sha256 for i in fenced.put_dir("adapter", local)}
    assert infos == {f"adapter/{n}": hashlib.sha256((local / n).read_bytes()).hexdigest()
                     for n in ("same.json", "left.json", "new.json")}
    assert rs.stat("adapter/same.json").etag == etag_same  # identical: kept, not uploaded again
    assert rs.get_bytes("adapter/left.json")[0] == b"this life's"  # unpublished leftover: replaced

    rs.put_bytes("MANIFEST.json", b"{}")  # published: nothing in it is overwritten from now on
    with pytest.raises(PreconditionFailed, match="published run run-f"):
        fenced.put_bytes("adapter/left.json", b"a third version")
    assert rs.get_bytes("adapter/left.json")[0] == b"this life's"
    fenced.put_bytes("adapter/same.json", b"same")  # identical content is still fine

    rs.put_bytes("LEASE.json", json.dumps({"owner": "other:2:beef", "expires": time.time() + 60}).encode())
    with pytest.raises(LeaseLost, match="other:2:beef") as lost:
        fenced.put_bytes("metrics.json", b"{}")
    assert lost.value.exit_code == 75 and not rs.exists("metrics.json")
    with pytest.raises(LeaseLost):
        lease.check("at step 7")
    with pytest.raises(LeaseLost):
        fenced.delete("adapter/new.json")
    assert rs.exists("adapter/new.json")


def test_early_uploads_are_fenced_listed_by_publish_and_stop_with_the_job(lease: Lease, tmp_path: Path):
    """Shards uploaded while the export still writes (publish overlapping export): publish lists them as they
    are and sends only the rest; an upload after the lease is lost fails, and nothing is written after an error."""
    rs = lease.run.run_store
    merged = tmp_path / "merged"
    merged.mkdir()
    for n in (1, 2):
        (merged / f"model-0000{n}-of-00002.safetensors").write_bytes(b"shard %d" % n)
    with EarlyUploads(lease.run, lease) as early:
        for n in (1, 2):
            early.submit("merged", merged, merged / f"model-0000{n}-of-00002.safetensors")
        done = early.uploaded()
    assert sorted(done) == ["merged/model-00001-of-00002.safetensors", "merged/model-00002-of-00002.safetensors"]
    assert rs.get_bytes("merged/model-00002-of-00002.safetensors")[0] == b"shard 2"
    etag = rs.stat("merged/model-00001-of-00002.safetensors").etag

    (merged / "config.json").write_bytes(b"{}")  # written after the shards: publish sends it
    rs.put_bytes("config.yaml", b"model: {}\n")  # stored when the run started, in a real job
    publish(lease.run, {"merged": merged}, parse_record(RunRecord, SAMPLE_RECORD, "the sample"), lease, uploaded=done)
    manifest = json.loads(rs.get_bytes("MANIFEST.json")[0])
    assert {"merged/config.json", "merged/model-00001-of-00002.safetensors"} <= set(manifest["files"])
    assert rs.stat("merged/model-00001-of-00002.safetensors").etag == etag  # listed, not sent again

    rs.put_bytes("LEASE.json", json.dumps({"owner": "other:2:beef", "expires": time.time() + 60}).encode())
    late = tmp_path / "late"
    late.mkdir()
    (late / "model.safetensors").write_bytes(b"late")
    with pytest.raises(LeaseLost, match="other:2:beef"):
        with EarlyUploads(lease.run, lease) as early:
            early.submit("gguf", late, late / "model.safetensors")
            early.uploaded()
    assert not rs.exists("gguf/model.safetensors")


def test_a_local_store_takes_nothing_early(tmp_path: Path):
    """A local store's upload is a copy onto the disks the export writes to: its files wait for publish."""
    store = open_store(str(tmp_path / "store"))
    run = Run(cfg=JobConfig(), run_id="run-l", store=store, run_store=store.child("runs/run-l"),
              work_dir=tmp_path / "work")
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "model.safetensors").write_bytes(b"shard")
    with Lease(run, ttl=60) as lease, EarlyUploads(run, lease) as early:
        early.submit("merged", tmp_path / "merged", tmp_path / "merged" / "model.safetensors")
        assert early.uploaded() == {}
    assert not run.run_store.exists("merged/model.safetensors")
