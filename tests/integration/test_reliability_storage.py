"""Storage faults under a whole ``medft train`` job: a flaky S3, permanent refusals, a full disk, a duplicate pod.

Every fault is real: the job talks HTTP to :class:`tests.faults.FaultProxy`, which forwards to a moto server on
127.0.0.1 and answers 5xx/throttling, drops connections, loses answers after the write, cuts bodies short and
delays answers; the disk is a small tmpfs filled to the last byte while the job runs. The store's own unit
tests (test_store_s3.py) prove single calls; these prove the job around them loses nothing.
"""

from __future__ import annotations

import uuid

import pytest

from job.checkpoints import Checkpointer
from registry.store import open_store
from tests.conftest import make_s3_client
from tests.faults import FaultProxy, Job, SmallDisk, assert_published_whole, registry_versions
from tests.integration.conftest import ROOT, job_args, medft_cmd

FAST = ("--set", "model.max_seq_length=384", "--set", "data.too_long=truncate", "--set", "eval.enabled=false")


def _args(model_dir, store: str, run_id: str, *extra: str) -> list[str]:
    return job_args(model_dir, store, run_id, *FAST, *extra)


def _bucket_keys(endpoint: str, store_uri: str) -> list[str]:
    bucket = store_uri.removeprefix("s3://").split("/")[0]
    pages = make_s3_client(endpoint).get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_flaky_s3_job_still_publishes_a_whole_run(tiny_model_dir, s3_server, s3_bucket, job_env, tmp_path):
    run_id = "run-flaky"
    with FaultProxy(s3_server, seed=7) as proxy:
        # Certain faults at the riskiest moments: create-only writes that land while their answer is lost
        # (a retry then finds the object present and must recognise it as its own, or the run would be
        # "already published" or registered twice), and each other kind at least once...
        certain = [proxy.add("drop_after", method="PUT", path=r"/MANIFEST\.json$", times=1),
                   proxy.add("drop_after", method="PUT", path=r"/registry/models/tiny/versions/", times=1),
                   proxy.add("drop_after", method="PUT", path=r"/COMPLETE\.json$", times=1),
                   proxy.add("truncate", method="GET", path=r"/config\.yaml$", times=1),
                   proxy.add("drop", method="PUT", path=r"/merged/", times=1),
                   proxy.add("delay", seconds=0.3, method="GET", times=1)]
        # ...then a seeded fraction of every request.
        proxy.add("error", status=503, code="SlowDown", rate=0.07)
        proxy.add("error", status=500, code="InternalError", rate=0.03)
        proxy.add("drop", rate=0.03)  # connection closed before any answer
        proxy.add("drop_after", rate=0.04)  # the request landed, its answer was lost
        proxy.add("truncate", method="GET", rate=0.15)  # half a body, then the connection closes
        proxy.add("delay", seconds=0.3, rate=0.06)  # a slow answer
        env = {**job_env, "MEDFT_S3_ENDPOINT_URL": proxy.endpoint}
        job = Job(medft_cmd(*_args(tiny_model_dir, s3_bucket, run_id)), cwd=ROOT, env=env)
        code = job.wait()
        counts = {a: proxy.count(a) for a in ("error", "drop", "drop_after", "truncate", "delay")}
        total, tally = len(proxy.requests), proxy.tally()
    print(f"flaky S3: {total} requests, {sum(counts.values())} faults injected: {tally}")
    assert code == 0, job.stderr[-3000:]
    assert [rule.hits for rule in certain] == [1] * len(certain)
    assert sum(counts.values()) >= 15 and all(counts.values()), counts  # every kind of fault, many times
    manifest = assert_published_whole(s3_bucket, run_id, tmp_path / "published")  # every checksum holds
    assert manifest["metrics"]["steps"] == 6
    assert {"merged/model.safetensors", "adapter/adapter_model.safetensors"} <= set(manifest["files"])
    assert [(v.version, v.run_id) for v in registry_versions(s3_bucket)] == [(1, run_id)]
    checkpointer = Checkpointer(open_store(s3_bucket).child(f"runs/{run_id}"))
    assert [r.step for r in checkpointer.complete()] == [4, 6]
    checkpointer.restore(checkpointer.latest(), tmp_path / "ckpt")  # the checkpoints made it whole too


WRONG_SECRET = "wrong-secret-key-1234567890"


@pytest.mark.parametrize("case, code, needle, max_requests", [
    ("403 AccessDenied", 5, "access denied by S3", 1),
    ("403 SignatureDoesNotMatch (a wrong secret key)", 5, "SignatureDoesNotMatch", 1),
    ("missing bucket", 4, "does not exist", 2),
    ("503 SlowDown on every request", 75, "gave up after 3 attempts", 3),
])
def test_permanent_errors_stop_at_once_without_a_retry_storm(case, code, needle, max_requests, tiny_model_dir,
                                                             s3_server, s3_bucket, job_env):
    store, env = s3_bucket, dict(job_env)
    with FaultProxy(s3_server) as proxy:
        env["MEDFT_S3_ENDPOINT_URL"] = proxy.endpoint
        if case.startswith("403 AccessDenied"):
            proxy.add("error", status=403, code="AccessDenied")
        elif case.startswith("403 SignatureDoesNotMatch"):
            proxy.add("error", status=403, code="SignatureDoesNotMatch")
            env["AWS_SECRET_ACCESS_KEY"] = WRONG_SECRET
        elif case == "missing bucket":
            store = f"s3://medft-missing-{uuid.uuid4().hex[:10]}/medft"
        else:
            proxy.add("error", status=503, code="SlowDown")
            env["MEDFT_S3_MAX_ATTEMPTS"] = "3"
        job = Job(medft_cmd(*_args(tiny_model_dir, store, "run-refused")), cwd=ROOT, env=env)
        assert job.wait() == code, job.stderr[-3000:]
        requests = len(proxy.requests)
    assert "Traceback" not in job.stderr and WRONG_SECRET not in job.stderr
    assert len(job.errors) == 1 and needle in job.errors[0], job.errors
    assert store.split("/")[2] in job.errors[0]  # the line names the bucket
    print(f"{case}: exit {code} after {requests} request(s)")
    assert requests <= max_requests, f"{case}: {requests} requests"  # refused once, not retried
    assert not any(e.get("event") == "stage.start" for e in job.events)  # stopped before any work
    if case != "missing bucket":
        assert _bucket_keys(s3_server, s3_bucket) == []  # nothing written


def test_disk_full_in_a_checkpoint_then_in_the_merge_exits_75_and_keeps_the_last_checkpoint(
        tiny_model_dir, s3_server, s3_bucket, job_env, tmp_path):
    run_id = "run-full"
    args = _args(tiny_model_dir, s3_bucket, run_id)  # 6 steps, a checkpoint every 2, merged shards
    run = open_store(s3_bucket).child(f"runs/{run_id}")
    checkpointer = Checkpointer(run)
    with SmallDisk(tmp_path / "cache", size_mb=16) as disk, FaultProxy(s3_server) as proxy:
        env = {**job_env, "MEDFT_CACHE": str(disk.path), "MEDFT_S3_ENDPOINT_URL": proxy.endpoint}

        def life_filled_after(step: int) -> Job:
            """A job whose disk fills up while checkpoint-<step> is being marked complete in the store."""
            proxy.clear()
            gate = proxy.add("hold", method="PUT", path=rf"/runs/{run_id}/checkpoints/checkpoint-{step}/COMPLETE")
            job = Job(disk.command(medft_cmd(*args)), cwd=ROOT, env=env)
            assert gate.wait_held(1, timeout=120), job.stderr[-3000:]
            assert disk.fill(job) > 0
            gate.release()
            assert job.wait() == 75, job.stderr[-3000:]
            assert "Traceback" not in job.stderr and len(job.errors) == 1, job.stderr[-3000:]
            assert checkpointer.latest().step == step  # the checkpoint before the failure is complete...
            checkpointer.restore(checkpointer.latest(), tmp_path / f"ckpt-{step}")  # ...and every byte holds
            assert not run.exists("MANIFEST.json") and not run.exists("LEASE.json")
            disk.free(job)
            return job

        # 1. Full while trainer checkpoint-4 is written to local disk: checkpoint-2 stays the latest, intact.
        job = life_filled_after(2)
        assert "disk full while saving a checkpoint" in job.errors[0] and "rerun" in job.errors[0]
        # 2. The rerun resumes from 2 (a retry works), trains to 6; full while the adapter and merged shards
        #    are written: checkpoint-6 is complete, so the next rerun only exports and publishes (as the
        #    SIGKILL test's fourth life shows).
        job = life_filled_after(6)
        assert job.wait_for("train.start")["resume_from_step"] == 2
        assert "disk full while writing the adapter and merged weights" in job.errors[0]
        assert not registry_versions(s3_bucket)
        assert [h for h in job.events if h.get("event") == "train.progress"][0]["step"] == 3


def test_duplicate_pod_started_at_the_same_time_one_wins_one_stops(tiny_model_dir, s3_serial_server,
                                                                   s3_serial_bucket, job_env, tmp_path):
    run_id = "run-dup"
    args = _args(tiny_model_dir, s3_serial_bucket, run_id)
    # The serial server applies one request at a time, so its create-only check is a real race; the proxy
    # holds both jobs' first lease write until both have sent it, then lets them go together.
    with FaultProxy(s3_serial_server.endpoint) as proxy:
        gate = proxy.add("hold", method="PUT", path=rf"/runs/{run_id}/LEASE\.json$", barrier=2, times=2)
        env = {**job_env, "MEDFT_S3_ENDPOINT_URL": proxy.endpoint}
        pods = [Job(medft_cmd(*args), cwd=ROOT, env=env) for _ in range(2)]
        assert gate.wait_held(2, timeout=120), pods[0].stderr[-2000:] + pods[1].stderr[-2000:]
        codes = [p.wait() for p in pods]
    assert sorted(codes) == [0, 75], [p.stderr[-2000:] for p in pods]
    winner, loser = pods if codes[0] == 0 else pods[::-1]
    assert "Traceback" not in loser.stderr and len(loser.errors) == 1
    line = loser.errors[0]
    assert f"run {run_id} is already running in" in line and f":{winner.proc.pid}:" in line  # names the holder
    assert not any(e.get("event") == "stage.start" for e in loser.events)  # the duplicate did no work
    manifest = assert_published_whole(s3_serial_bucket, run_id, tmp_path / "published")
    assert manifest["metrics"]["steps"] == 6 and manifest["metrics"]["resumed_from_step"] is None
    assert [(v.version, v.run_id) for v in registry_versions(s3_serial_bucket)] == [(1, run_id)]
