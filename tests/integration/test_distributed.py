"""Data-parallel ``medft train`` on two CPU ranks (gloo): the same steps as one rank, one writer, agreed stops.

Two ranks start through ``python -m torch.distributed.run --nproc-per-node 2`` (torchrun; its c10d rendezvous
takes a free port) or through ``medft train --nproc-per-node 2``, which relaunches itself the same way. The
tiny model and the sample data keep every life to a few seconds of training; ``OMP_NUM_THREADS=1`` keeps two
ranks on two cores from fighting over threads (and the one-rank runs compared with them use it too).
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from datetime import datetime
from pathlib import Path

from job.checkpoints import Checkpointer
from registry.runs import read_manifest
from registry.store import open_store
from tests.faults import Job, assert_published_whole, registry_versions
from tests.integration.conftest import ROOT, job_args, medft_cmd, run_medft

STEPS = 8
# 1 row x 2 accumulation = 2 rows per optimizer step: on 2 ranks, 1 x 1 each. 36 training rows: one epoch.
SHAPE = ("--set", "train.batch_size=1", "--set", "train.grad_accum=2", "--set", "model.max_seq_length=384",
         "--set", "data.too_long=truncate", "--set", "eval.enabled=false", "--set", "export.merge=false",
         "--set", "train.learning_rate=0.001")
# Loss agreement between 2 ranks and 1 rank with the same rows per step. Every step sees the same rows (with a
# learning rate of 1e-9 all steps agree to 1e-4), so the first step's loss is equal up to float summation order.
# Adam's updates are sign-like on LoRA weights whose gradients are near zero, so summation-order differences of
# 1e-9 move those weights by up to the learning rate and later losses drift apart (measured at lr 0.005: up to
# 0.008 over 8 steps, so lr 0.001 here: about a fifth), where a different split of the rows (2 rows a rank,
# or another order) moves a step's loss by 0.01 to 0.03 whatever the learning rate.
FIRST_STEP_TOLERANCE = 1e-4
LOSS_TOLERANCE = 0.005


def _env(job_env: dict[str, str]) -> dict[str, str]:
    return {**job_env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _args(model_dir: Path, store: str, run_id: str, steps: int = STEPS, *extra: str) -> list[str]:
    return job_args(model_dir, store, run_id, *SHAPE, "--set", f"train.max_steps={steps}", *extra)


def torchrun_cmd(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "-m", "job.cli", *args]


def _rank_pid(launcher_pid: int, rank: int) -> int:
    """The pid of torchrun's worker whose environment says ``RANK=<rank>`` (its direct child)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == launcher_pid and f"RANK={rank}".encode() in environ:
            return int(entry)
    raise AssertionError(f"no rank {rank} under torchrun {launcher_pid}")


def _losses(metrics: dict) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in metrics["loss_history"]}


def _events(stderr: str, event: str) -> list[dict]:
    return [doc for line in stderr.splitlines() if line.startswith("{") and f'"{event}"' in line
            for doc in [json.loads(line)] if doc.get("event") == event]


def test_two_ranks_train_one_ranks_steps_and_publish_one_run_and_version(tiny_model_dir, job_env, tmp_path):
    env = _env(job_env)
    one_store, two_store = str(tmp_path / "one"), str(tmp_path / "two")
    one = run_medft(*_args(tiny_model_dir, one_store, "run-one"), env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_medft(*_args(tiny_model_dir, two_store, "run-two", STEPS, "--set", "train.report_to=tensorboard"),
                    "--nproc-per-node", "2", env=env)
    assert two.returncode == 0, two.stderr[-3000:]

    m1 = assert_published_whole(one_store, "run-one", tmp_path / "p1")["metrics"]
    m2 = read_manifest(open_store(two_store), "run-two")["metrics"]  # the tracker's files sit beside the manifest
    assert m1["steps"] == m2["steps"] == STEPS
    # Tokens are counted over both ranks (one rank's count would be about half); each rank's data loader reads
    # one batch ahead, so the counts differ by a row or two.
    assert 0.9 * m1["trained_tokens"] <= m2["trained_tokens"] <= 1.1 * m1["trained_tokens"]
    assert (m1["plan"]["batch_size"], m1["plan"]["grad_accum"]) == (1, 2)
    assert (m2["plan"]["batch_size"], m2["plan"]["grad_accum"]) == (1, 1)  # each rank's share of 2 rows
    l1, l2 = _losses(m1), _losses(m2)
    assert sorted(l1) == sorted(l2) == list(range(1, STEPS + 1))
    assert abs(l1[1] - l2[1]) <= FIRST_STEP_TOLERANCE, (l1[1], l2[1])
    drift = max(abs(l1[s] - l2[s]) for s in l1)
    print(f"largest per-step loss difference, 2 ranks vs 1: {drift:.5f} (tolerance {LOSS_TOLERANCE})")
    assert drift <= LOSS_TOLERANCE, (l1, l2)

    # One writer: one published run, one registry version, and rank 1 never evaluated, exported or published.
    runs = {key.split("/")[1] for key in open_store(two_store).list("runs/")}
    assert runs == {"run-two"}
    assert [(v.version, v.run_id) for v in registry_versions(two_store)] == [(1, "run-two")]
    ended = {(e["rank"], e["stage"]) for e in _events(two.stderr, "stage.end")}
    assert (1, "train") in ended and (0, "publish") in ended
    assert not {(1, s) for s in ("eval_after", "export", "publish")} & ended
    assert [e["rank"] for e in _events(two.stderr, "run.done")] == [0]
    assert all("rank" in e for e in _events(two.stderr, "stage.start"))  # every line names its rank
    assert two.stdout.count("Published run run-two") == 1
    assert [e["rank"] for e in _events(two.stderr, "tracker.started")] == [0]  # trackers log on rank 0 only


def test_sigterm_on_one_rank_stops_both_after_a_checkpoint_and_the_run_resumes_on_one_rank_then_two(
        tiny_model_dir, job_env, tmp_path):
    env = _env(job_env)
    store = str(tmp_path / "store")
    steps, run_id = 14, "run-ddp-term"
    args = _args(tiny_model_dir, store, run_id, steps)
    checkpointer = Checkpointer(open_store(store).child(f"runs/{run_id}"))

    # Life 1: two ranks under torchrun; SIGTERM reaches rank 1 only.
    job = Job(torchrun_cmd(2, *args), cwd=ROOT, env=env)
    job.wait_for("train.progress", rank=1, step=lambda s: s >= 2)
    os.kill(_rank_pid(job.proc.pid, 1), signal.SIGTERM)
    assert job.wait() != 0  # torchrun reports the ranks' failure
    failed = {e["rank"]: e for e in job.events if e.get("event") == "failed"}
    assert sorted(failed) == [0, 1], job.stderr[-3000:]
    assert {e["exit_code"] for e in failed.values()} == {143}
    stops = {int(re.search(r"at step (\d+)", e["error"])[1]) for e in failed.values()}
    assert len(stops) == 1  # both ranks stopped at the same step boundary
    first_stop = stops.pop()
    assert 2 <= first_stop < steps
    # torchrun's account: the first rank to end ended 143; torchrun sends SIGTERM to a rank still on its way out
    # (after its own exit 143 above), and then reports -15 for it.
    report = job.stderr[job.stderr.index("Root Cause"):]
    assert re.findall(r"exitcode\s*: (-?\d+)", report) == ["143"], report
    assert job.stderr.count("Traceback") == 1  # torchrun's own, raising ChildFailedError: no rank crashed
    latest = checkpointer.latest()
    assert latest is not None and latest.step == first_stop  # rank 0 wrote it
    run = open_store(store).child(f"runs/{run_id}")
    assert not run.exists("MANIFEST.json") and not run.exists("LEASE.json")  # nothing published; lease released

    # Life 2: one rank resumes at that step; SIGTERM again a few steps on.
    job = Job(medft_cmd(*args), cwd=ROOT, env=env)
    assert job.wait_for("train.start")["resume_from_step"] == first_stop
    job.wait_for("train.progress", step=lambda s: s >= first_stop + 2)
    job.kill(signal.SIGTERM)
    assert job.wait() == 143, job.stderr[-3000:]
    second_stop = int(re.search(r"at step (\d+)", job.errors[0])[1])
    assert first_stop + 2 <= second_stop < steps and checkpointer.latest().step == second_stop
    logged = {e["step"] for e in job.events if e.get("event") == "train.progress"}
    assert min(logged) == first_stop + 1  # continued where the two ranks stopped

    # Life 3: two ranks again (medft's own relaunch) resume from the one-rank checkpoint and finish.
    last = run_medft(*args, "--nproc-per-node", "2", env=env)
    assert last.returncode == 0, last.stderr[-3000:]
    starts = {e["rank"]: e["resume_from_step"] for e in _events(last.stderr, "train.start")}
    assert starts == {0: second_stop, 1: second_stop}
    metrics = assert_published_whole(store, run_id, tmp_path / "published")["metrics"]
    assert metrics["steps"] == steps and metrics["resumed_from_step"] == second_stop
    assert [h["step"] for h in metrics["loss_history"]] == list(range(1, steps + 1))  # no gap, no repeat
    assert [(v.version, v.run_id) for v in registry_versions(store)] == [(1, run_id)]


def test_ranks_that_do_not_split_the_rows_are_refused_before_any_starts(tiny_model_dir, job_env, tmp_path):
    env = _env(job_env)
    args = _args(tiny_model_dir, str(tmp_path / "store"), "run-three", STEPS)
    proc = run_medft(*args, "--nproc-per-node", "3", env=env)
    assert proc.returncode == 2
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("medft: error:")]
    assert "train.batch_size" in line and "train.grad_accum" in line and "over 3 ranks" in line
    assert not (tmp_path / "store").exists()  # refused before any process started or anything was written


def test_a_lease_lost_on_rank_0_stops_both_ranks_with_75_and_nothing_saved_after_it(tiny_model_dir, job_env,
                                                                                     tmp_path):
    env = {**_env(job_env), "MEDFT_LEASE_SECONDS": "2"}  # renewed every 0.5 s
    store, run_id = str(tmp_path / "store"), "run-ddp-stolen"
    run = open_store(store).child(f"runs/{run_id}")
    thief = json.dumps({"owner": "thief-pod:1:cafe", "expires": time.time() + 600}).encode()
    job = Job(medft_cmd(*_args(tiny_model_dir, store, run_id, 16), "--nproc-per-node", "2"), cwd=ROOT, env=env)
    job.wait_for("stage.start", stage="load", rank=0)
    run.put_bytes("LEASE.json", thief)  # another owner takes the run before the first training step
    assert job.wait() == 75, job.stderr[-3000:]
    failed = {e["rank"]: e for e in job.events if e.get("event") == "failed"}
    assert sorted(failed) == [0, 1] and {e["exit_code"] for e in failed.values()} == {75}, job.stderr[-3000:]
    assert "thief-pod:1:cafe" in failed[0]["error"] and "rank 0 lost the run's lease" in failed[1]["error"]
    assert not [e for e in job.events if e.get("event") == "checkpoint.uploaded"]
    assert run.get_bytes("LEASE.json")[0] == thief and not run.exists("MANIFEST.json")


# The start of each sitecustomize.py below: ``_after_import(name, patch)`` calls ``patch(module)`` once ``name`` is
# imported, in the rank named by the environment variable ``rank_var`` only.
_AFTER_IMPORT = '''
import importlib.abc, importlib.machinery, os, sys


class _AfterImport(importlib.abc.MetaPathFinder):
    def __init__(self, name, patch):
        self.name, self.patch = name, patch

    def find_spec(self, name, path, target=None):
        if name != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            self.patch(module)

        spec.loader.exec_module = exec_module
        return spec


def _after_import(rank_var, name, patch):
    if os.environ.get("RANK") is not None and os.environ.get("RANK") == os.environ.get(rank_var):
        sys.meta_path.insert(0, _AfterImport(name, patch))
'''

# Put first on the ranks' PYTHONPATH: on the rank named by CRASH_RANK, the trainer's training_step raises at the
# start of step CRASH_STEP (before its forward pass) and writes the time it did into CRASH_STAMP. With
# CRASH_LINGER_S the crashed rank then holds its process group (so its connections stay open, as a rank that
# nothing unblocks) and stays alive that long after its traceback, deaf to torchrun's SIGTERM.
_CRASH_INJECTOR = _AFTER_IMPORT + '''
import atexit, signal, time

_kept = []


def _linger(seconds):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(seconds)


def _patch(trainer):
    original, step = trainer.training_step, int(os.environ["CRASH_STEP"])

    def training_step(self, *args, **kwargs):
        if self.state.global_step + 1 == step:
            with open(os.environ["CRASH_STAMP"], "w") as f:
                f.write(repr(time.time()))
            linger = float(os.environ.get("CRASH_LINGER_S", "0"))
            if linger:
                import torch.distributed as dist

                _kept.append(dist.group.WORLD)
                atexit.register(_linger, linger)
            raise RuntimeError(f"injected crash on rank {os.environ['RANK']} at step {step}")
        return original(self, *args, **kwargs)

    trainer.training_step = training_step


_after_import("CRASH_RANK", "transformers.trainer", lambda module: _patch(module.Trainer))
'''
CRASH_STEP = 5  # checkpoints every 2 steps: the last one before the crash is step 4


def _crash_env(env: dict[str, str], tmp_path: Path, rank: int, linger: float = 0) -> dict[str, str]:
    inject = tmp_path / "inject"
    inject.mkdir(exist_ok=True)
    (inject / "sitecustomize.py").write_text(_CRASH_INJECTOR)
    return {**env, "PYTHONPATH": f"{inject}{os.pathsep}{env['PYTHONPATH']}", "CRASH_RANK": str(rank),
            "CRASH_STEP": str(CRASH_STEP), "CRASH_STAMP": str(tmp_path / "crashed-at"),
            "CRASH_LINGER_S": str(linger)}


def _assert_stopped_for_rank_1(job: Job, run) -> dict:
    """Rank 0's one ``failed`` event (exit 1, naming rank 1, its step and its error) and no traceback of its own;
    rank 1's traceback is the injected error; nothing left in the run but checkpoints."""
    failed = [e for e in job.events if e.get("event") == "failed"]
    assert [e["rank"] for e in failed] == [0], job.stderr[-4000:]
    stopped = failed[0]
    assert stopped["exit_code"] == 1
    assert stopped["error"].startswith(f"rank 1 failed in step {CRASH_STEP}: RuntimeError: injected crash on rank "
                                       f"1 at step {CRASH_STEP}; rank 0 stopped with it"), stopped
    assert f"resumes from its last checkpoint (step {CRASH_STEP - 1})" in stopped["error"]
    assert job.errors == [f"medft: error: {stopped['error']}"]
    assert "[rank0]: Traceback" not in job.stderr and "Connection closed by peer" not in job.stderr
    assert "[rank1]: Traceback (most recent call last)" in job.stderr
    assert f"[rank1]: RuntimeError: injected crash on rank 1 at step {CRASH_STEP}" in job.stderr
    assert not run.exists("LEASE.json") and not run.exists("MANIFEST.json")
    return stopped


def test_a_crash_in_a_step_on_one_rank_stops_the_other_in_one_line_and_a_rerun_resumes_at_once(
        tiny_model_dir, job_env, tmp_path):
    env = {**_env(job_env), "MEDFT_LEASE_SECONDS": "600"}  # a lease left behind would refuse the rerun for 10 min
    store, run_id, steps = str(tmp_path / "store"), "run-ddp-crash", 8
    args = _args(tiny_model_dir, store, run_id, steps)
    run = open_store(store).child(f"runs/{run_id}")
    checkpointer = Checkpointer(run)

    job = Job(medft_cmd(*args, "--nproc-per-node", "2"), cwd=ROOT, env=_crash_env(env, tmp_path, rank=1))
    assert job.wait() == 1, job.stderr[-4000:]  # the first rank to fail: both exit 1
    _assert_stopped_for_rank_1(job, run)
    assert checkpointer.latest().step == CRASH_STEP - 1  # the last periodic checkpoint before the crash
    assert registry_versions(store) == []

    # The same command, on one rank now: it resumes from that checkpoint at once (the lease was released).
    rerun = run_medft(*args, env=env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert [e["resume_from_step"] for e in _events(rerun.stderr, "train.start")] == [CRASH_STEP - 1]
    metrics = assert_published_whole(store, run_id, tmp_path / "published")["metrics"]
    assert metrics["resumed_from_step"] == CRASH_STEP - 1
    assert [h["step"] for h in metrics["loss_history"]] == list(range(1, steps + 1))
    assert [(v.version, v.run_id) for v in registry_versions(store)] == [(1, run_id)]


def _time(event: dict) -> float:
    return datetime.fromisoformat(event["timestamp"]).timestamp()


def test_the_other_ranks_stop_at_once_while_the_crashed_rank_still_lives(tiny_model_dir, job_env, tmp_path):
    """The crashed rank keeps its connections open for a while (as on nccl, where nothing tells the others):
    rank 0's watcher reads the failure from the store and aborts its group, and rank 0 stops, releases the lease
    and exits long before the crashed rank does."""
    env = {**_env(job_env), "MEDFT_LEASE_SECONDS": "600"}
    store, run_id, steps, linger = str(tmp_path / "store"), "run-ddp-crash-linger", 8, 12.0
    args = _args(tiny_model_dir, store, run_id, steps)
    run = open_store(store).child(f"runs/{run_id}")

    job = Job(torchrun_cmd(2, *args), cwd=ROOT, env=_crash_env(env, tmp_path, rank=1, linger=linger))
    stopped = job.wait_for("failed", rank=0, timeout=180)
    crashed_at = float((tmp_path / "crashed-at").read_text())
    assert not run.exists("LEASE.json")  # released while the crashed rank still lives
    assert job.proc.poll() is None  # torchrun still waits for the crashed rank
    assert job.wait() == 1, job.stderr[-4000:]
    assert _assert_stopped_for_rank_1(job, run) == stopped
    (watched,) = [e for e in job.events if e.get("event") == "distributed.peer_failed"]
    assert watched["rank"] == 0 and watched["failure"] == stopped["error"].split("; rank 0 stopped")[0]
    print(f"rank 0 stopped {_time(stopped) - crashed_at:.2f} s after rank 1 crashed (it lingers {linger} s)")
    assert 0 < _time(watched) - crashed_at <= _time(stopped) - crashed_at <= 5.0
    assert Checkpointer(run).latest().step == CRASH_STEP - 1

    # Two ranks again, through medft's own relaunch: they resume from that checkpoint at once and finish.
    rerun = run_medft(*args, "--nproc-per-node", "2", env=env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    starts = {e["rank"]: e["resume_from_step"] for e in _events(rerun.stderr, "train.start")}
    assert starts == {0: CRASH_STEP - 1, 1: CRASH_STEP - 1}
    metrics = assert_published_whole(store, run_id, tmp_path / "published")["metrics"]
    assert [h["step"] for h in metrics["loss_history"]] == list(range(1, steps + 1))
    assert [(v.version, v.run_id) for v in registry_versions(store)] == [(1, run_id)]


# Put first on the ranks' PYTHONPATH: on the rank named by FAIL_RANK, the pull stage's download of the base model
# (job.model.pull_weights) fails as a hub download does when the network drops: TransientError, exit 75.
_PULL_FAILS = _AFTER_IMPORT + '''

def pull_weights(uri, revision):
    from registry.errors import TransientError

    raise TransientError("hf://org/tiny-llama: download failed (ConnectionError); retry")


_after_import("FAIL_RANK", "job.model", lambda module: setattr(module, "pull_weights", pull_weights))
'''


def test_a_medft_error_on_one_rank_alone_stops_the_other_with_its_exit_code_and_a_rerun_publishes(
        tiny_model_dir, job_env, tmp_path):
    """Rank 1's download fails (TransientError, exit 75) while rank 0, done pulling, waits for it at the boundary
    after the pull: rank 1 prints its own line; rank 0 stops with exit 75 naming rank 1, the stage and the error,
    and releases the lease; nothing is published, and the same command then trains and publishes."""
    env = {**_env(job_env), "MEDFT_LEASE_SECONDS": "600"}  # a lease left behind would refuse the rerun for 10 min
    store, run_id, steps = str(tmp_path / "store"), "run-ddp-pull-fails", 4
    args = _args(tiny_model_dir, store, run_id, steps)
    run = open_store(store).child(f"runs/{run_id}")
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(_PULL_FAILS)
    failing = {**env, "PYTHONPATH": f"{inject}{os.pathsep}{env['PYTHONPATH']}", "FAIL_RANK": "1"}

    job = Job(medft_cmd(*args, "--nproc-per-node", "2"), cwd=ROOT, env=failing)
    assert job.wait() == 75, job.stderr[-4000:]
    failed = {}
    for event in (e for e in job.events if e.get("event") == "failed"):
        assert event["rank"] not in failed, job.stderr[-4000:]  # one failed event a rank
        failed[event["rank"]] = event
    assert sorted(failed) == [0, 1], job.stderr[-4000:]
    own = "hf://org/tiny-llama: download failed (ConnectionError); retry"
    assert failed[1]["error"] == own and failed[1]["exit_code"] == 75
    assert failed[0]["exit_code"] == 75
    assert failed[0]["error"] == (f"rank 1 failed in the pull stage: TransientError: {own}; rank 0 stopped with it. "
                                  "Rerun the same command: the run resumes from its last checkpoint, if it has one")
    assert sorted(job.errors) == sorted(f"medft: error: {e['error']}" for e in failed.values())
    assert "Traceback" not in job.stderr and "Connection closed by peer" not in job.stderr, job.stderr[-4000:]
    assert not run.exists("LEASE.json") and not run.exists("MANIFEST.json")
    assert not [e for e in job.events if e.get("event") == "train.start"]

    rerun = run_medft(*args, env=env)  # the same command, the network back (one rank: the quickest proof)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    metrics = assert_published_whole(store, run_id, tmp_path / "published")["metrics"]
    assert metrics["steps"] == steps
    assert [(v.version, v.run_id) for v in registry_versions(store)] == [(1, run_id)]
