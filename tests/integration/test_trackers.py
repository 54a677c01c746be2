"""train.report_to with real trackers: W&B offline, a real MLflow server (SQLite), TensorBoard event files.

One MLflow tracking server per module, started on 127.0.0.1 with a SQLite backend; W&B runs in offline mode and
its run file is read back with W&B's own protobuf records; TensorBoard's event files with its EventAccumulator.
Also: a tracker that is down at the start or goes down while training costs a warning and a few seconds, never
the run; a run resumed after SIGTERM continues the same MLflow run.
"""

from __future__ import annotations

import json
import signal
import struct
import subprocess
import sys
import time
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from registry.records import RunRecord
from registry.runs import read_manifest
from registry.store import open_store
from tests.conftest import _free_port
from tests.faults import Job, registry_versions
from tests.integration.conftest import ROOT, job_args, medft_cmd, run_medft

pytest.importorskip("mlflow")  # medft[tracking]; `make install` installs it
pytest.importorskip("wandb")

STEPS = 4
FAST = ("--set", f"train.max_steps={STEPS}", "--set", "train.checkpoint_every=2", "--set", "export.merge=false",
        "--set", "model.max_seq_length=384", "--set", "data.too_long=truncate")
FAKE_WANDB_KEY = "0123456789abcdef0123456789abcdef01234567"
FAKE_MLFLOW_PASSWORD = "mlflow-pass-7f3a9c1e5b"


def _start_mlflow_server(root: Path, attempts: int = 3) -> tuple[subprocess.Popen, str]:
    """A real ``mlflow server`` on 127.0.0.1 with a SQLite backend under ``root``: the process and its URI.

    The port is picked free, then bound by the server seconds later; another process may take it meanwhile,
    so a server that exits saying so is started again on another port."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        cwd=root, stdout=subprocess.DEVNULL, stderr=open(root / "server.log", "w"))  # noqa: SIM115
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                if r.status == 200:
                    return proc, uri
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            log = (root / "server.log").read_text()
            if attempts > 1 and "address already in use" in log.lower():
                proc.wait()
                return _start_mlflow_server(root, attempts - 1)
            raise AssertionError(f"mlflow server did not start: {log[-2000:]}")
        time.sleep(0.5)


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory) -> Any:
    """One MLflow server for the module's tests; its URI."""
    proc, uri = _start_mlflow_server(tmp_path_factory.mktemp("mlflow"))
    try:
        yield uri
    finally:
        _stop(proc)


def _record(store: str, run_id: str) -> RunRecord:
    return RunRecord.model_validate(read_manifest(open_store(store), run_id))


def wandb_records(run_file: Path) -> list[Any]:
    """The protobuf records of a W&B ``.wandb`` run file (a LevelDB-style log: 32 KiB blocks, 7-byte headers)."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", run_file
    records, pos, pending = [], 7, b""
    block = 32768
    while pos + 7 <= len(data):
        left_in_block = block - pos % block
        if left_in_block < 7:  # a block's tail too short for a header is padding
            pos += left_in_block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        if length == 0 and kind == 0:
            pos += left_in_block
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: one whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _wandb_logged(wandb_dir: Path) -> tuple[str, list[dict[str, Any]], dict[str, Any]]:
    """(run id, history rows, summary) from the one offline run under ``wandb_dir``."""
    (run_file,) = wandb_dir.glob("wandb/offline-run-*/run-*.wandb")
    history, summary, run_id = [], {}, None
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
        elif kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            for item in record.summary.update:
                summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return run_id, history, summary


def test_wandb_mlflow_and_tensorboard_each_hold_the_curves_and_medfts_results(
        tiny_model_dir, s3_bucket, job_env, tmp_path, mlflow_server):
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_id = "run-trackers"
    env = {**job_env, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_PROJECT": "medft-tests",
           "WANDB_API_KEY": FAKE_WANDB_KEY, "MLFLOW_TRACKING_URI": mlflow_server,
           "MLFLOW_EXPERIMENT_NAME": "medft-tests", "MLFLOW_TRACKING_PASSWORD": FAKE_MLFLOW_PASSWORD}
    done = run_medft(*job_args(tiny_model_dir, s3_bucket, run_id, *FAST,
                               "--set", "train.report_to=[wandb,mlflow,tensorboard]"), env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    record = _record(s3_bucket, run_id)
    metrics = record.metrics
    trackers = metrics.trackers
    assert {name: t.status for name, t in trackers.items()} == {"wandb": "logged", "mlflow": "logged",
                                                                 "tensorboard": "logged"}
    (version,) = registry_versions(s3_bucket)
    assert version.metrics["trackers"]["mlflow"]["run_id"] == trackers["mlflow"].run_id  # the registry links out
    run_uri = open_store(s3_bucket).child(f"runs/{run_id}").uri
    losses = [h["loss"] for h in metrics.loss_history]
    assert len(losses) == STEPS

    # MLflow: transformers' curves and medft's results in one run, found through the server's API.
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("medft-tests")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == trackers["mlflow"].run_id and run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == list(range(1, STEPS + 1))
    assert [m.value for m in history] == pytest.approx(losses, rel=1e-4)
    assert run.data.metrics["medft/eval_loss_before"] == pytest.approx(metrics.eval_loss_before)
    assert run.data.metrics["medft/eval_loss_after"] == pytest.approx(metrics.eval_loss_after)
    assert run.data.metrics["medft/data_report/rows_kept"] == record.data_report["rows_kept"]
    assert "medft/stage_seconds/train" in run.data.metrics
    assert run.data.params["medft.train.learning_rate"] == "0.005"
    assert run.data.params["medft.output.run_id"] == run_id
    assert run.data.params["learning_rate"] == "0.005"  # from transformers' MLflowCallback, same run
    assert run.data.tags["medft.registry_version"] == f"tiny:{version.version}"
    assert run.data.tags["medft.run_uri"] == run_uri
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "medft")}
    assert {"medft/config.json", "medft/data_report.json", "medft/plan.json"} <= artifacts
    assert FAKE_MLFLOW_PASSWORD not in json.dumps(run.data.params) + json.dumps(run.data.tags)

    # W&B offline: the run file holds the per-step curve and medft's summary.
    wandb_id, rows, summary = _wandb_logged(tmp_path)
    assert wandb_id == trackers["wandb"].run_id
    curve = [(r["train/global_step"], r["train/loss"]) for r in rows if "train/loss" in r]
    assert [s for s, _ in curve] == list(range(1, STEPS + 1))
    assert [v for _, v in curve] == pytest.approx(losses, rel=1e-4)
    assert summary["medft/eval_loss_after"] == pytest.approx(metrics.eval_loss_after)
    assert summary["medft.registry_version"] == f"tiny:{version.version}"
    assert summary["medft/data_report"]["rows_kept"] == record.data_report["rows_kept"]

    # TensorBoard: the event files, uploaded with the run, read back.
    events = tmp_path / "tb"
    open_store(s3_bucket).child(f"runs/{run_id}").get_dir("tensorboard", events)
    acc = EventAccumulator(str(events))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, STEPS + 1))
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx(losses, rel=1e-4)
    assert acc.Scalars("medft/eval_loss_after")[0].value == pytest.approx(metrics.eval_loss_after, rel=1e-5)
    assert run_uri in acc.Tensors("medft/links/text_summary")[0].tensor_proto.string_val[0].decode()

    # Secrets stay out of the logs and out of the stored config.
    stored_config = open_store(s3_bucket).child(f"runs/{run_id}").get_bytes("config.yaml")[0].decode()
    for secret in (FAKE_WANDB_KEY, FAKE_MLFLOW_PASSWORD):
        assert secret not in done.stderr and secret not in done.stdout and secret not in stored_config


def _events(stderr: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def test_a_tracker_that_is_down_costs_one_warning_and_seconds_not_the_run(tiny_model_dir, s3_bucket, job_env):
    """Also: the tracking URI's credentials (userinfo, a token parameter) reach neither the log, nor the
    skipped tracker's reason in metrics.json and the run record, nor the registry version."""
    # Nothing listens there.
    closed = f"http://medft-user:{FAKE_MLFLOW_PASSWORD}@127.0.0.1:{_free_port()}/mlflow?access_token={FAKE_WANDB_KEY}"
    env = {**job_env, "MLFLOW_TRACKING_URI": closed}
    done = run_medft(*job_args(tiny_model_dir, s3_bucket, "run-down", *FAST, "--set", "train.report_to=mlflow"),
                     env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    events = _events(done.stderr)
    warnings = [e for e in events if e.get("level") == "warning" and e["event"].startswith("tracker.")]
    assert [(w["event"], w["tracker"]) for w in warnings] == [("tracker.skipped", "mlflow")]
    trackers = _record(s3_bucket, "run-down").metrics.trackers
    assert trackers["mlflow"].status == "skipped" and "Connection" in trackers["mlflow"].reason
    run = open_store(s3_bucket).child("runs/run-down")
    stored = {key: run.get_bytes(key)[0].decode() for key in ("metrics.json", "MANIFEST.json", "config.yaml")}
    stored["version"] = json.dumps(registry_versions(s3_bucket)[0].to_dict())
    for secret in (FAKE_MLFLOW_PASSWORD, FAKE_WANDB_KEY):
        assert secret not in done.stderr and secret not in done.stdout
        assert not [name for name, text in stored.items() if secret in text]
    # Bounded retries: trying the tracker (its import included) costs seconds, not the library's minutes.
    assert warnings[0]["seconds"] < 5
    skipped_at = datetime.fromisoformat(warnings[0]["timestamp"])
    pull = next(e for e in events if e["event"] == "stage.start" and e["stage"] == "pull")
    assert 0 <= (datetime.fromisoformat(pull["timestamp"]) - skipped_at).total_seconds() < 1  # straight on


def test_a_tracker_that_goes_down_while_training_is_skipped_not_the_run(tiny_model_dir, s3_bucket, job_env,
                                                                       tmp_path):
    """The MLflow server is killed after step 2 (the job held with SIGSTOP meanwhile): the run trains on and
    publishes, warns once, records mlflow as skipped, and its stderr stays JSON lines (mlflow's own error
    lines included)."""
    proc, uri = _start_mlflow_server(tmp_path)
    env = {**job_env, "MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": "medft-gone"}
    job = Job(medft_cmd(*job_args(tiny_model_dir, s3_bucket, "run-gone", *FAST, "--set", "train.max_steps=6",
                                  "--set", "train.report_to=[mlflow]")), cwd=ROOT, env=env)
    try:
        job.wait_for("tracker.started", tracker="mlflow")
        job.wait_for("train.progress", step=lambda s: s >= 2)
        job.kill(signal.SIGSTOP)
    finally:
        _stop(proc)
    job.kill(signal.SIGCONT)
    assert job.wait() == 0, job.stderr[-3000:]
    warnings = [e for e in job.events if e.get("level") == "warning" and e["event"].startswith("tracker.")]
    assert [(w["event"], w["tracker"]) for w in warnings] == [("tracker.skipped", "mlflow")]
    assert warnings[0]["seconds"] < 30  # bounded retries, not the library's minutes
    record = _record(s3_bucket, "run-gone")
    assert record.metrics.steps == 6 and record.metrics.trackers["mlflow"].status == "skipped"
    assert "Connection" in record.metrics.trackers["mlflow"].reason
    assert [v.version for v in registry_versions(s3_bucket, "tiny")] == [1]
    plain = [line for line in job.stderr.splitlines() if line.strip() and not line.startswith("{")]
    assert plain == [], plain[:5]


def test_resume_after_sigterm_continues_the_same_tracker_runs(tiny_model_dir, s3_bucket, job_env, mlflow_server,
                                                               tmp_path):
    """SIGTERM after step 3, then the same run again: one MLflow run (KILLED, then FINISHED, every step once)
    and one W&B run id (offline: a second run dir with the same id, which ``wandb sync`` joins)."""
    from mlflow import MlflowClient

    steps = 6
    env = {**job_env, "MLFLOW_TRACKING_URI": mlflow_server, "MLFLOW_EXPERIMENT_NAME": "medft-resume",
           "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_PROJECT": "medft-tests"}
    args = job_args(tiny_model_dir, s3_bucket, "run-resume", *FAST, "--set", f"train.max_steps={steps}",
                    "--set", "train.report_to=[mlflow,wandb]")
    job = Job(medft_cmd(*args), cwd=ROOT, env=env)
    first = job.wait_for("tracker.started", tracker="mlflow")
    first_wandb = job.wait_for("tracker.started", tracker="wandb")
    job.wait_for("train.progress", step=lambda s: s >= 3)
    job.kill(signal.SIGTERM)
    assert job.wait() == 143, job.stderr[-3000:]
    client = MlflowClient(mlflow_server)
    assert client.get_run(first["run_id"]).info.status == "KILLED"
    ids = json.loads(open_store(s3_bucket).child("runs/run-resume").get_bytes("trackers.json")[0])
    assert ids == {"mlflow": first["run_id"], "wandb": first_wandb["run_id"]}

    done = run_medft(*args, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    started = {e["tracker"]: (e["run_id"], e["resumed"]) for e in _events(done.stderr)
               if e["event"] == "tracker.started"}
    assert started == {"mlflow": (first["run_id"], True), "wandb": (first_wandb["run_id"], True)}
    experiment = client.get_experiment_by_name("medft-resume")
    (run,) = client.search_runs([experiment.experiment_id])  # one run, not one per life
    assert run.info.run_id == first["run_id"] and run.info.status == "FINISHED"
    assert sorted({m.step for m in client.get_metric_history(run.info.run_id, "loss")}) == list(range(1, steps + 1))
    trackers = _record(s3_bucket, "run-resume").metrics.trackers
    assert trackers["mlflow"].run_id == first["run_id"] and trackers["wandb"].run_id == first_wandb["run_id"]
    run_files = sorted(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(run_files) == 2  # one per life
    lives = []
    for run_file in run_files:
        records = wandb_records(run_file)
        assert {r.run.run_id for r in records if r.WhichOneof("record_type") == "run"} == {first_wandb["run_id"]}
        lives.append(sorted(int(json.loads(i.value_json)) for r in records if r.WhichOneof("record_type") == "history"
                            for i in r.history.item if (i.key or "/".join(i.nested_key)) == "train/global_step"))
    assert lives[1][-1] == steps and set(lives[0]) | set(lives[1]) >= set(range(1, steps + 1))
