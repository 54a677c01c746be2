"""The rows-per-step rule of data-parallel training (job/distributed.py), its refusal, and the one-process path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest

from job import distributed, rank_watch
from job.backends import TrainPlan
from job.config import load_config
from job.distributed import Ranks, RankStopped, ReadOnlyLease, split_rows
from job.lifecycle import Preemption
from registry.errors import ConfigError
from tests.cli import error_lines, run_main


def _cfg(*overrides: str):
    return load_config(None, list(overrides), env={})


def _plan(batch: int, accum: int) -> TrainPlan:
    return TrainPlan(batch_size=batch, grad_accum=accum, packing=False, gradient_checkpointing=False,
                     load_in_4bit=False, precision="fp32", optim="adamw_torch", reasons={"optim": "kept"})


@pytest.mark.parametrize(("rows", "micro", "world", "fixed", "expected"), [
    (8, 2, 1, True, (2, 4)),  # one process: the config as it is
    (8, 2, 2, True, (2, 2)),  # 2 x 4 on 2 ranks: 2 x 2 each
    (8, 2, 4, True, (2, 1)),
    (12, 1, 3, True, (1, 4)),
    (8, 8, 2, False, (4, 1)),  # auto: the micro-batch shrinks to fit 8 / 2 rows a rank
    (12, 8, 2, False, (6, 1)),
    (12, 4, 3, False, (4, 1)),
    (6, 4, 2, False, (3, 1)),
])
def test_rows_per_step_stay_the_configs_on_every_number_of_ranks(rows, micro, world, fixed, expected):
    micro_rank, accum_rank = split_rows(rows, micro, world, micro_fixed=fixed)
    assert (micro_rank, accum_rank) == expected
    assert micro_rank * accum_rank * world == rows


@pytest.mark.parametrize(("rows", "micro", "world", "fixed"), [
    (6, 2, 2, True),  # grad_accum 3 on 2 ranks
    (8, 2, 3, True),
    (8, 4, 4, True),  # grad_accum 2 on 4 ranks
    (6, 2, 4, False),  # auto: 6 rows never split over 4 ranks
])
def test_rows_that_do_not_split_are_refused_naming_the_keys_and_the_ranks(rows, micro, world, fixed):
    with pytest.raises(ConfigError) as e:
        split_rows(rows, micro, world, micro_fixed=fixed)
    message = e.value.message
    assert e.value.exit_code == 2 and "\n" not in message
    assert "train.batch_size" in message and "train.grad_accum" in message
    assert f"{world} ranks" in message and f"--nproc-per-node {world}" in message and f"{rows} rows" in message


def test_the_config_is_checked_at_start_with_its_own_micro_batch():
    distributed.check_config(_cfg("train.batch_size=2", "train.grad_accum=3"), 1)  # one process: anything goes
    distributed.check_config(_cfg("train.batch_size=2", "train.grad_accum=4"), 4)
    with pytest.raises(ConfigError, match=r"train.grad_accum a multiple of 2"):
        distributed.check_config(_cfg("train.batch_size=2", "train.grad_accum=3"), 2)
    distributed.check_config(_cfg("train.batch_size=auto", "train.grad_accum=3"), 2)  # 6 rows: 3 x 1 a rank
    with pytest.raises(ConfigError, match=r"4 ranks"):
        distributed.check_config(_cfg("train.batch_size=auto", "train.grad_accum=3"), 4)


def test_the_plan_becomes_each_ranks_share_and_says_why():
    plan = _plan(2, 4)
    assert distributed.plan_for_ranks(plan, _cfg("train.batch_size=2", "train.grad_accum=4"), 1) is plan
    ranked = distributed.plan_for_ranks(plan, _cfg("train.batch_size=2", "train.grad_accum=4"), 2)
    assert (ranked.batch_size, ranked.grad_accum) == (2, 2)
    assert "8 rows per optimizer step over 2 ranks" in ranked.reasons["grad_accum"]
    assert ranked.reasons["optim"] == "kept" and ranked.optim == plan.optim
    auto = distributed.plan_for_ranks(_plan(8, 1), _cfg("train.batch_size=auto", "train.grad_accum=4"), 2)
    assert (auto.batch_size, auto.grad_accum) == (4, 1)


def test_ranks_come_from_torchruns_environment():
    assert Ranks.from_env({}) == Ranks(1, 0, 0)
    ranks = Ranks.from_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"})
    assert (ranks.world_size, ranks.rank, ranks.local_rank, ranks.distributed, ranks.writer) == (4, 3, 1, True, False)
    assert Ranks.from_env({"WORLD_SIZE": "2", "RANK": "0"}).writer
    with pytest.raises(ConfigError, match="RANK=2 and WORLD_SIZE=2"):
        Ranks.from_env({"WORLD_SIZE": "2", "RANK": "2"})
    with pytest.raises(ConfigError, match="WORLD_SIZE='two'"):
        Ranks.from_env({"WORLD_SIZE": "two"})
    assert distributed.under_torchrun({"WORLD_SIZE": "1"}) and not distributed.under_torchrun({})


def test_one_process_collectives_are_local():
    ranks, stop = Ranks(), Preemption()
    calls: list[str] = []
    with ranks.group():
        ranks.barrier()
        with ranks.writer_first():
            calls.append("pulled")
        ranks.agree_stop(stop, None, "at step 1")
        assert not stop.requested
        stop.requested = True
        ranks.agree_stop(stop, None, "at step 2")
        assert stop.requested
        ranks.writer_does(lambda: calls.append("uploaded"), "uploading")
    assert calls == ["pulled", "uploaded"]


def test_a_lost_lease_is_agreed_as_exit_75_before_anything_is_saved():
    class LostLease:
        lost = threading.Event()

        def check(self, where: str) -> None:
            raise RuntimeError(f"rank 0's own LeaseLost {where}")

    LostLease.lost.set()
    with pytest.raises(RuntimeError, match="rank 0's own LeaseLost at step 3"):
        Ranks().agree_stop(Preemption(), LostLease(), "at step 3")  # type: ignore[arg-type]
    follower = Ranks(world_size=2, rank=1)
    follower._max = lambda flag: max(flag, distributed.LEASE_LOST)  # rank 0's flag, as the all_reduce brings it
    with pytest.raises(RankStopped) as e:  # a rank without the lease stops with the same code
        follower.agree_stop(Preemption(), ReadOnlyLease(1), "at step 3")
    assert e.value.exit_code == 75 and "rank 0 lost the run's lease at step 3" in e.value.message


def test_a_sigterm_on_another_rank_stops_this_one_too():
    follower, stop = Ranks(world_size=2, rank=1), Preemption()
    follower._max = lambda flag: max(flag, distributed.SIGTERM)
    follower.agree_stop(stop, ReadOnlyLease(1), "at step 2")
    assert stop.requested and follower.stopping


def test_a_failed_upload_on_rank_0_stops_every_rank_with_its_code():
    follower = Ranks(world_size=2, rank=1, joined=True)
    follower._max = lambda code: max(code, 75)
    ran: list[int] = []
    with pytest.raises(RankStopped) as e:
        follower.writer_does(lambda: ran.append(1), "uploading the checkpoint of step 4")
    assert ran == [] and e.value.exit_code == 75 and "uploading the checkpoint of step 4" in e.value.message


def test_a_rank_other_than_0_never_writes_into_the_run():
    lease = ReadOnlyLease(1)
    lease.check("at step 1")
    with pytest.raises(RuntimeError, match="rank 1 tried to write"):
        lease.confirm("before writing MANIFEST.json")


@pytest.mark.parametrize(("value", "expected"), [("1", 1), ("3", 3), ("auto", 1)])
def test_nproc_per_node_is_auto_or_a_whole_number(value, expected, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.resolve_nproc(value) == expected


@pytest.mark.parametrize("value", ["0", "-2", "two", ""])
def test_a_bad_nproc_per_node_is_refused(value):
    with pytest.raises(ConfigError, match="--nproc-per-node"):
        distributed.resolve_nproc(value)


def test_medft_train_refuses_ranks_that_do_not_split_the_rows_before_starting_any(capsys, monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(distributed, "relaunch", lambda *a: pytest.fail("relaunched a config that cannot split"))
    code, _, err = run_main(["train", "--nproc-per-node", "2", "--set", "train.batch_size=2",
                             "--set", "train.grad_accum=3"], capsys)
    assert code == 2
    (line,) = error_lines(err)
    assert "train.batch_size" in line and "train.grad_accum" in line and "over 2 ranks" in line


def test_medft_train_relaunches_itself_with_its_own_arguments(capsys, monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    seen: list[tuple[int, list[str]]] = []
    monkeypatch.setattr(distributed, "relaunch", lambda n, argv: seen.append((n, argv)) or 143)
    code, _, _ = run_main(["train", "--nproc-per-node", "2", "--set", "train.grad_accum=4",
                           "--set", "output.run_id=x"], capsys)
    assert code == 143  # the ranks' exit code is the command's
    assert seen == [(2, ["train", "--set", "train.grad_accum=4", "--set", "output.run_id=x"])]


def test_log_lines_carry_the_rank_under_torchrun_only():
    code = "from registry import logs; logs.configure(); logs.get_logger('t').info('hello')"

    def line(env: dict[str, str]) -> dict:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env={"PATH": "/usr/bin", **env})
        return json.loads(proc.stderr.strip().splitlines()[-1])

    assert line({"WORLD_SIZE": "2", "RANK": "1"})["rank"] == 1
    assert "rank" not in line({}) and "rank" not in line({"WORLD_SIZE": "1", "RANK": "0"})


_PULL = """
import sys, time
from job.distributed import Ranks
rank, local_rank, log = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
ranks = Ranks(world_size=3, rank=rank, local_rank=local_rank)
with ranks.group(), ranks.writer_first():
    with open(log, "a") as f:
        f.write(f"enter {rank}\\n")
    time.sleep(0.5)
    with open(log, "a") as f:
        f.write(f"leave {rank}\\n")
"""


def test_downloads_go_one_node_at_a_time_rank_0_then_each_nodes_first_process(tmp_path):
    """Two nodes (ranks 0 | 1, 2): rank 0 fills the shared cache first, then node 2's first process fills that
    node's cache, and only then its other process, which finds the files there: no node's cache is written by
    two processes at once."""
    from tests.conftest import _free_port

    log = tmp_path / "pulls.log"
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "WORLD_SIZE": "3"}
    procs = [subprocess.Popen([sys.executable, "-c", _PULL, str(rank), str(local), str(log)],
                              env={**env, "RANK": str(rank)}, stderr=subprocess.PIPE, text=True)
             for rank, local in ((0, 0), (1, 0), (2, 1))]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors
    assert log.read_text().split("\n")[:-1] == ["enter 0", "leave 0", "enter 1", "leave 1", "enter 2", "leave 2"]


def test_a_crash_is_told_in_one_redacted_line_naming_the_rank_the_step_and_the_error():
    error = RuntimeError("CUDA error: an illegal memory access\nCompile with TORCH_USE_CUDA_DSA to debug")
    assert rank_watch.failure_line(1, "in step 5", error) == (
        "rank 1 failed in step 5: RuntimeError: CUDA error: an illegal memory access")
    assert rank_watch.failure_line(0, "outside a training step", KeyError()) == (
        "rank 0 failed outside a training step: KeyError")
    leaky = ValueError("GET https://user:hunter2@example.com/x?X-Amz-Signature=abc123 failed")
    line = rank_watch.failure_line(2, "in step 1", leaky)
    assert "hunter2" not in line and "abc123" not in line and "example.com" in line
    long = rank_watch.failure_line(0, "in step 1", ValueError("x" * 1000))
    assert len(long) < 400 and long.endswith("...")


def test_a_failure_is_stored_as_its_exit_code_and_its_line_in_one_value():
    failure = rank_watch.Failure(75, "rank 0 failed in the pull stage: TransientError: hf://x: download failed")
    assert failure.encode() == "75\trank 0 failed in the pull stage: TransientError: hf://x: download failed"
    assert rank_watch.Failure.decode(failure.encode().encode()) == failure
    tabbed = rank_watch.Failure(3, "rank 1 failed in step 2: DataError: row 7: a\tb")  # a tab in the message
    assert rank_watch.Failure.decode(tabbed.encode()) == tabbed
    # A value without a code (a line alone, from a medft that stored only that) is a crash's: exit 1.
    assert rank_watch.Failure.decode(b"rank 1 failed in step 5: ValueError: boom") == (
        1, "rank 1 failed in step 5: ValueError: boom")
    assert rank_watch.Failure.decode("x\trank 1 failed") == (1, "x\trank 1 failed")


def test_the_first_rank_to_fail_is_the_one_announced_with_its_exit_code():
    import torch.distributed as dist

    store = dist.HashStore()
    first = rank_watch.Failure(75, "rank 1 failed in the pull stage: TransientError: boom")
    assert rank_watch.announce(store, first) == first
    # A second failure (the error rank 0 gets from the first) finds the first's and does not replace it.
    assert rank_watch.announce(store, rank_watch.Failure(1, "rank 0 failed in step 5: RuntimeError: peer closed")) == (
        first)
    assert store.get(rank_watch.KEY) == b"75\trank 1 failed in the pull stage: TransientError: boom"

    class Gone:
        def compare_set(self, *args: object) -> bytes:
            raise RuntimeError("Connection reset by peer")

    assert rank_watch.announce(Gone(), first) is None


def test_the_other_ranks_are_told_how_to_go_on():
    crash = rank_watch.Failure(1, "rank 1 failed in step 5: ValueError: boom")
    assert rank_watch.stopped_message(crash, 0, 4) == (
        "rank 1 failed in step 5: ValueError: boom; rank 0 stopped with it. Rerun the same command: the run "
        "resumes from its last checkpoint (step 4)")
    transient = rank_watch.Failure(75, "rank 0 failed in the pull stage: TransientError: retry")
    assert rank_watch.stopped_message(transient, 1, None).endswith(
        "; rank 1 stopped with it. Rerun the same command: the run resumes from its last checkpoint, if it has one")
    bad_data = rank_watch.Failure(3, "rank 1 failed in the pull stage: DataError: row 7")
    assert "Rerun the same command once that is fixed: " in rank_watch.stopped_message(bad_data, 0, None)


def test_the_watcher_calls_back_once_when_a_failure_is_announced_and_never_after_it_stopped():
    import torch.distributed as dist

    store, seen, called = dist.HashStore(), [], threading.Event()
    watcher = rank_watch.Watcher(store, lambda failure: (seen.append(failure), called.set()), poll=0.05).start()
    rank_watch.announce(store, rank_watch.Failure(2, "rank 1 failed in step 3: ConfigError: boom"))
    assert called.wait(5)
    watcher.stop()
    assert seen == [(2, "rank 1 failed in step 3: ConfigError: boom")] and watcher.failure == seen[0]

    quiet = dist.HashStore()
    stopped = rank_watch.Watcher(quiet, lambda failure: seen.append(failure), poll=0.05).start()
    stopped.stop()  # the group is left before anything was announced
    rank_watch.announce(quiet, rank_watch.Failure(1, "rank 0 failed in step 9: ValueError: late"))
    stopped._thread.join(5)
    assert not stopped._thread.is_alive() and stopped.failure is None and len(seen) == 1


def test_the_watcher_ends_by_itself_when_the_store_goes_away():
    class Gone:
        def check(self, keys: list[str]) -> bool:
            raise RuntimeError("Connection refused")

    watcher = rank_watch.Watcher(Gone(), lambda line: pytest.fail("called back without a failure"), poll=0.01)
    watcher.start()._thread.join(5)
    assert not watcher._thread.is_alive() and watcher.failure is None


def test_the_stores_port_is_found_under_its_prefixes(monkeypatch):
    import torch.distributed as dist

    from tests.conftest import _free_port

    port = _free_port()
    server = dist.TCPStore("127.0.0.1", port, 1, True)
    assert rank_watch.store_port(dist.PrefixStore("default_pg", dist.PrefixStore("attempt", server))) == port
    monkeypatch.setenv("MASTER_PORT", "29511")
    assert rank_watch.store_port(dist.HashStore()) == 29511
    monkeypatch.delenv("MASTER_PORT")
    assert rank_watch.store_port(dist.HashStore()) is None


def test_shutting_the_connections_down_ends_them_for_the_peer_but_keeps_the_descriptors_and_the_store():
    import socket

    listener = socket.create_server(("127.0.0.1", 0))
    gloo_peer = socket.create_connection(listener.getsockname())
    gloo_side, _ = listener.accept()
    store_peer = socket.create_connection(listener.getsockname())
    store_side, _ = listener.accept()
    opened = {fd: link for fd, link in rank_watch.open_sockets().items()
              if fd in (listener.fileno(), gloo_side.fileno(), store_side.fileno())}
    assert len(opened) == 3
    rank_watch._shut_down(opened, keep_port=store_side.getpeername()[1])
    gloo_peer.settimeout(5)
    assert gloo_peer.recv(1) == b""  # end of stream: the peer sees the connection closed
    store_peer.sendall(b"x")
    assert store_side.recv(1) == b"x"  # the store's connection is untouched
    assert os.fstat(gloo_side.fileno())  # the descriptor is still its owner's to close
    for s in (listener, gloo_peer, gloo_side, store_peer, store_side):
        s.close()


_CRASH = """
import sys, time
import torch.distributed as dist
from job.distributed import Ranks, RankStopped
rank = int(sys.argv[1])
ranks, kept = Ranks(world_size=2, rank=rank, checkpoint=4), []
try:
    with ranks.group():
        ranks.barrier()
        ranks.step = 5
        if rank == 1:
            kept.append(dist.group.WORLD)  # its connections stay open: gloo alone would never fail rank 0
            raise ValueError("boom\\nsecond line")
        start = time.monotonic()
        ranks.total(1)  # rank 1 never comes
except RankStopped as e:
    print(f"{time.monotonic() - start:.2f} {e.exit_code} {e.message}")
except ValueError as e:
    print(repr(e))
    time.sleep(6)
"""


def test_a_crash_on_one_rank_stops_the_rank_waiting_for_it_at_once_in_one_line(tmp_path):
    """Rank 1 raises inside the group and stays alive with its connections open; rank 0, waiting in an
    all_reduce, gets RankStopped (exit 1) naming rank 1, its step and error within seconds, and rank 1 keeps
    its own exception as it was."""
    from tests.conftest import _free_port

    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2"}
    procs = [subprocess.Popen([sys.executable, "-c", _CRASH, str(rank)], env={**env, "RANK": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    (out0, err0), (out1, err1) = (p.communicate(timeout=120) for p in procs)
    assert [p.returncode for p in procs] == [0, 0], err0 + err1
    assert out1.splitlines()[-1] == "ValueError('boom\\nsecond line')"  # (unconfigured logs go to stdout)
    seconds, code, message = out0.splitlines()[-1].split(" ", 2)
    assert code == "1" and message == ("rank 1 failed in step 5: ValueError: boom; rank 0 stopped with it. Rerun "
                                       "the same command: the run resumes from its last checkpoint (step 4)")
    assert float(seconds) < 4.0  # the watcher polls once a second; rank 1 lives 6 s more


_ONE_RANK_ERROR = """
import sys
from job.distributed import Ranks, RankStopped
from registry.errors import DataError, TransientError
rank, agreed = int(sys.argv[1]), sys.argv[2] == "agreed"
ranks = Ranks(world_size=2, rank=rank)
try:
    with ranks.group():
        ranks.barrier()
        ranks.stage = "pull"
        if agreed:  # every rank raises together, as after agree_stop or writer_does
            ranks.stopping = True
            raise DataError(f"row 7 is bad (rank {rank})")
        if rank == 1:
            raise TransientError("hf://org/model: download failed (ConnectionError); retry")
        ranks.total(1)  # rank 1 never comes
except RankStopped as e:
    print(f"stopped {e.exit_code} {e.message}")
except (DataError, TransientError) as e:
    print(f"own {type(e).__name__} {e.exit_code} {e.message}")
"""


def _two_ranks(script: str, *args: str) -> list[str]:
    from tests.conftest import _free_port

    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2"}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(rank), *args], env={**env, "RANK": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    return [out.splitlines()[-1] for out, _ in outs]


def test_a_medft_error_on_one_rank_stops_the_other_with_its_exit_code_in_one_line():
    """Rank 1's TransientError is not agreed: rank 1 keeps it (exit 75), and rank 0, waiting for rank 1 in an
    all_reduce, stops with exit 75 naming rank 1, the stage and the error (not gloo's closed connection)."""
    rank0, rank1 = _two_ranks(_ONE_RANK_ERROR, "alone")
    assert rank1 == "own TransientError 75 hf://org/model: download failed (ConnectionError); retry"
    assert rank0 == ("stopped 75 rank 1 failed in the pull stage: TransientError: hf://org/model: download failed "
                     "(ConnectionError); retry; rank 0 stopped with it. Rerun the same command: the run resumes "
                     "from its last checkpoint, if it has one")


def test_an_agreed_medft_error_leaves_every_rank_as_it_is():
    assert _two_ranks(_ONE_RANK_ERROR, "agreed") == ["own DataError 3 row 7 is bad (rank 0)",
                                                     "own DataError 3 row 7 is bad (rank 1)"]


def test_a_sigterm_while_the_error_line_is_written_does_not_replace_it(capsys, monkeypatch):
    """torchrun sends SIGTERM to the ranks still running when one has failed: one already leaving with its own
    error keeps its line and exit code (the SIGTERM handler would raise Preempted into the report)."""
    import signal

    from job import cli

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    echo = cli.click.echo

    def echo_after_sigterm(message: str, **kwargs: object) -> None:
        if message.startswith("medft: error:"):
            os.kill(os.getpid(), signal.SIGTERM)  # handled at the next bytecode: while the line is written
        echo(message, **kwargs)

    monkeypatch.setattr(cli.click, "echo", echo_after_sigterm)
    monkeypatch.setattr(distributed, "relaunch", lambda *a: pytest.fail("relaunched a config that cannot split"))
    code, _, err = run_main(["train", "--nproc-per-node", "2", "--set", "train.batch_size=2",
                             "--set", "train.grad_accum=3"], capsys)
    assert code == 2 and len(error_lines(err)) == 1 and "over 2 ranks" in error_lines(err)[0]
    assert signal.getsignal(signal.SIGTERM) is cli._stop_on_sigterm  # SIGTERM stops the process again after
