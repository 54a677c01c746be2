"""Data-parallel training under torchrun: ranks, the rows-per-step rule, one writer, agreed stops, relaunch.

``medft train`` started by ``torchrun --nproc-per-node N`` (or ``medft train --nproc-per-node N``, which
relaunches itself under ``torch.distributed.run``) trains one LoRA on N processes. Each rank loads the model,
and the trainer (transformers wraps the model in DistributedDataParallel) gives every rank its own share of
the rows of each optimizer step and averages the gradients.

The rows-per-step rule. The config's optimizer step is ``train.batch_size x train.grad_accum`` rows, and it
stays so whatever N is, so the schedule, the number of steps and the data each step sees are the config's.
transformers divides nothing by itself (``gradient_accumulation_steps`` is per rank), so each rank
accumulates::

    per-rank grad_accum = (train.batch_size x train.grad_accum) / (train.batch_size x N) = train.grad_accum / N

When that does not divide, the job refuses at start (ConfigError, exit 2, one line naming the keys and N).
With ``train.batch_size: auto`` the micro-batch may shrink instead: the largest micro-batch no bigger than
the backend's that divides ``rows / N`` is used, and only rows that do not split over N ranks are refused.

One writer. Rank 0 alone holds the run's lease and writes into the run (checkpoints, artifacts, manifest,
model cards, registry version, tracker runs); the other ranks hold a lease that refuses every write
(:class:`ReadOnlyLease`), skip evaluation, export and publishing, and end after training.

Stopping together. At every step boundary the ranks agree on a stop code (an all_reduce of each rank's
flag, :meth:`Ranks.agree_stop`): SIGTERM on any rank makes every rank save the checkpoint (rank 0 writes it)
and exit 143; a lost lease on rank 0 makes every rank exit 75 without saving. A failed checkpoint upload on
rank 0 is agreed too (:meth:`Ranks.writer_does`): every rank exits with rank 0's code.

A failure on one rank alone while the group is up cannot reach a boundary: a crash (an unexpected exception:
a bug), or a MedftError the ranks did not agree on (rank 0's download failing while the others wait for it, bad
data or a full disk on one rank). The others would wait in a collective it never joins (on nccl until torchrun
kills them, lease still held). So that rank writes its exit code and one line, ``rank R failed in step N:
Error: message`` (``in the pull stage``, ...: the stage it was in outside a training step), into torchrun's
store, then exits as it would alone: 1 with its traceback for a crash, a MedftError's one line and code. Every
rank watches the store for it (:mod:`job.rank_watch`) and, when it comes, aborts its process group (nccl:
torch's NCCL abort; gloo, which has none: its connections shut down), so the collective it waits in raises. It
then stops with that rank's exit code and line (:class:`RankStopped`, no traceback) after its usual cleanup:
rank 0 releases the lease, so a rerun resumes from the last checkpoint at once.

Resuming. Every rank restores the latest checkpoint into a work dir of its own, and the trainer skips the
batches already trained on each rank (``global_step x`` its per-rank accumulation), so a run continues at the
same step and the same rows on any number of ranks that splits its rows per step; on one that does not,
:func:`check_config` refuses it at start like a fresh run. Only rank 0's RNG state is in a checkpoint (the
other ranks start theirs from the seed; medft's LoRA dropout defaults to 0).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from job import rank_watch
from registry.errors import ConfigError, ConflictError, MedftError
from registry.logs import get_logger

if TYPE_CHECKING:
    from job.backends import TrainPlan
    from job.config import JobConfig
    from job.lifecycle import Lease, Preemption, Run

log = get_logger(__name__)

#: Stop codes the ranks agree on at a step boundary; the highest wins (a lost lease forbids the checkpoint).
GO, SIGTERM, LEASE_LOST = 0, 1, 2
_cpu_locations_loadable = False  # _load_cpu_indexed_locations ran in this process


class RankStopped(MedftError):
    """Another rank stopped the job; this rank exits with the code that rank chose (``exit_code``)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def split_rows(rows_per_step: int, micro_batch: int, world_size: int, *, micro_fixed: bool) -> tuple[int, int]:
    """The per-rank ``(micro_batch, grad_accum)`` that keeps ``rows_per_step`` rows per optimizer step on
    ``world_size`` ranks: ``grad_accum = rows_per_step / (micro_batch x world_size)``.

    ``micro_fixed`` (``train.batch_size`` set): the micro-batch stays; otherwise (``auto``) the largest one no
    bigger than ``micro_batch`` that divides ``rows_per_step / world_size`` is taken. Raises ConfigError (exit
    2) naming ``train.batch_size``, ``train.grad_accum`` and the number of ranks when the rows do not divide.
    """
    if world_size < 1 or micro_batch < 1 or rows_per_step < 1:
        raise ValueError(f"split_rows({rows_per_step}, {micro_batch}, {world_size}): every number must be >= 1")
    if not micro_fixed and rows_per_step % world_size == 0:
        per_rank = rows_per_step // world_size
        micro_batch = max(m for m in range(1, min(micro_batch, per_rank) + 1) if per_rank % m == 0)
    if rows_per_step % (micro_batch * world_size):
        raise ConfigError(
            f"train.batch_size x train.grad_accum = {rows_per_step} rows per optimizer step do not split over "
            f"{world_size} ranks (--nproc-per-node {world_size}): per-rank grad_accum = {rows_per_step} / "
            f"(micro-batch {micro_batch} x {world_size} ranks) is not whole; make train.grad_accum a multiple of "
            f"{world_size}, or use a number of ranks that divides it")
    return micro_batch, rows_per_step // (micro_batch * world_size)


def check_config(cfg: JobConfig, world_size: int) -> None:
    """Refuse (ConfigError, exit 2) a config whose rows per optimizer step do not split over ``world_size``
    ranks; nothing else. Runs at start, before anything is pulled, with the micro-batch the config sets (for
    ``auto`` the recipe's 2: a backend keeps its rows per step, ``2 x train.grad_accum``)."""
    if world_size <= 1:
        return
    from job.backends.memory_plan import recipe_setting  # the micro-batch ``auto`` starts from, the plan's own

    micro = recipe_setting(cfg).micro_batch
    split_rows(micro * cfg.train.grad_accum, micro, world_size, micro_fixed=cfg.train.batch_size != "auto")


def plan_for_ranks(plan: TrainPlan, cfg: JobConfig, world_size: int) -> TrainPlan:
    """``plan`` (one process's) with each rank's micro-batch and accumulation (:func:`split_rows`), the reason
    recorded under ``reasons['grad_accum']``; ``plan`` itself when ``world_size`` is 1. Raises ConfigError."""
    if world_size <= 1:
        return plan
    rows = plan.batch_size * plan.grad_accum
    micro, accum = split_rows(rows, plan.batch_size, world_size, micro_fixed=cfg.train.batch_size != "auto")
    why = (f"{rows} rows per optimizer step over {world_size} ranks: {micro} rows x {accum} accumulation on each "
           "rank (per-rank grad_accum = rows / (micro-batch x ranks))")
    return replace(plan, batch_size=micro, grad_accum=accum, reasons={**plan.reasons, "grad_accum": why})


def _env_int(env: dict[str, str] | os._Environ[str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} must be a whole number (set by torchrun)") from None


@dataclass
class Ranks:
    """This process's place among the job's processes, from torchrun's environment, and the collectives the
    job needs. With one process (no torchrun) every collective is a no-op and :attr:`writer` is True."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    joined: bool = False  # the process group is up (inside :meth:`group`, until :meth:`leave`)
    stopping: bool = False  # the ranks agreed to stop: they leave the group together
    step: int | None = None  # the optimizer step being trained (set by the trainer's callbacks), for a failure's line
    stage: str | None = None  # the pipeline's stage under way (set by job.pipeline), for a failure's line
    checkpoint: int | None = None  # the step of the run's last checkpoint that every rank knows of
    _watcher: rank_watch.Watcher | None = field(default=None, repr=False, compare=False)
    _gloo_sockets: dict[int, str] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Ranks:
        """``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` (torchrun's); ConfigError (exit 2) when malformed."""
        e = os.environ if env is None else env
        world, rank = _env_int(e, "WORLD_SIZE", 1), _env_int(e, "RANK", 0)
        if world < 1 or not 0 <= rank < world:
            raise ConfigError(f"RANK={rank} and WORLD_SIZE={world} do not fit together (0 <= RANK < WORLD_SIZE)")
        return cls(world_size=world, rank=rank, local_rank=_env_int(e, "LOCAL_RANK", 0))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def writer(self) -> bool:
        """Rank 0: the one process that holds the lease and writes into the run."""
        return self.rank == 0

    @property
    def _live(self) -> bool:
        return self.distributed and self.joined

    def _device(self) -> Any:
        import torch

        return torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")

    @contextmanager
    def group(self) -> Iterator[Ranks]:
        """The process group for the block (gloo on CPU, nccl on CUDA), destroyed on the way out; nothing with
        one process.

        While it is up, a failure on any rank stops every rank (:mod:`job.rank_watch`): an exception leaving the
        block on the first rank to fail, a crash or a MedftError alone, is announced to the others with its exit
        code (1 for a crash) and re-raised as it is (a crash's traceback, a MedftError's one line and code); on
        every other rank the error that follows (its collective aborted, or gloo's connection closed) leaves as
        :class:`RankStopped` with that exit code, naming the failed rank, its step or stage and its error.
        Left untouched: agreed stops (a MedftError once :attr:`stopping` is set: :meth:`agree_stop`,
        :meth:`writer_does`), RankStopped, any exception once the group is left, KeyboardInterrupt, SystemExit.
        """
        if not self.distributed:
            yield self
            return
        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            if torch.cuda.is_available():
                torch.cuda.set_device(self.local_rank)
            else:
                _load_cpu_indexed_locations()
            before = rank_watch.open_sockets()
            dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo",
                                    world_size=self.world_size, rank=self.rank)
            if dist.get_backend() == "gloo":  # it connects every pair of ranks now; an abort shuts these down
                self._gloo_sockets = {fd: link for fd, link in rank_watch.open_sockets().items()
                                      if before.get(fd) != link}
        self.joined = True
        log.info("distributed.joined", world_size=self.world_size, backend=dist.get_backend())
        store = dist.distributed_c10d._get_default_store()  # torchrun's: every rank reads and writes the same
        backend, port = str(dist.get_backend()), rank_watch.store_port(store)
        self._watcher = rank_watch.Watcher(
            store, lambda _failure: rank_watch.abort_group(backend, self._gloo_sockets, port)).start()
        try:
            yield self
        except Exception as e:
            if not self._live or isinstance(e, RankStopped) or (isinstance(e, MedftError) and self.stopping):
                raise  # rank 0 alone after training, another rank's failure already named, or an agreed stop
            stopped = self._failed(e, store)
            if stopped is None:
                raise
            raise stopped from None
        finally:
            if self.stopping:  # every rank waits for rank 0 (it releases the lease first), then all exit together
                self.barrier()
            self.leave()

    def _failed(self, error: Exception, store: Any) -> RankStopped | None:
        """None when this rank is the first to fail (it has announced ``error``: the caller re-raises it), else
        the RankStopped this rank leaves with: another rank failed first, and ``error`` follows from it."""
        if self._watcher is not None:
            self._watcher.stop()  # this rank's own announcement must not abort its group under it
        where = (f"in step {self.step}" if self.step else f"in the {self.stage} stage" if self.stage
                 else "outside a training step")
        mine = rank_watch.Failure(error.exit_code if isinstance(error, MedftError) else 1,
                                  rank_watch.failure_line(self.rank, where, error))
        first = (self._watcher.failure if self._watcher is not None else None) or rank_watch.announce(store, mine)
        if first is None or first == mine:
            return None
        return RankStopped(rank_watch.stopped_message(first, self.rank, self.checkpoint), first.exit_code)

    def leave(self) -> None:
        """Destroy the process group (after training: rank 0 goes on alone); collectives are no-ops after."""
        if not self._live:
            return
        import torch.distributed as dist

        if self._watcher is not None:
            self._watcher.stop()
        self.joined = False
        if dist.is_initialized():
            dist.destroy_process_group()

    def barrier(self) -> None:
        """Wait until every rank is here (no-op with one process or after :meth:`leave`)."""
        if self._live:
            import torch.distributed as dist

            dist.barrier()

    def _reduce(self, value: int, op: str) -> int:
        if not self._live:
            return value
        import torch
        import torch.distributed as dist

        flag = torch.tensor([value], dtype=torch.int64, device=self._device())
        dist.all_reduce(flag, op=getattr(dist.ReduceOp, op))
        value = int(flag.item())
        if self._watcher is not None and self._watcher.failure:  # nccl aborted under .item(): the value is void
            raise RuntimeError("the process group was aborted: another rank failed")  # group() names that rank
        return value

    def _max(self, value: int) -> int:
        return self._reduce(value, "MAX")

    def total(self, value: int) -> int:
        """``value`` summed over every rank (each rank must call it); ``value`` with one process."""
        return self._reduce(value, "SUM")

    @contextmanager
    def writer_first(self) -> Iterator[None]:
        """The block (downloads into the cache) one node's worth at a time: rank 0 first; then the first
        process of every other node (``LOCAL_RANK`` 0), which fills that node's own cache; then the rest, who
        find the files already there. No two processes of a node download into its cache at once. Every rank
        passes the same two barriers."""
        if self.writer:
            yield
            self.barrier()
            self.barrier()
        elif self.local_rank == 0:
            self.barrier()
            yield
            self.barrier()
        else:
            self.barrier()
            self.barrier()
            yield

    def agree_stop(self, preemption: Preemption, lease: Lease | None, where: str) -> None:
        """At a step boundary, every rank's verdict from every rank's flags (one all_reduce, MAX).

        SIGTERM on any rank sets ``preemption.requested`` on every rank (the caller saves, then stops: exit
        143). A lease lost on rank 0 raises LeaseLost there and :class:`RankStopped` (exit 75) on the others,
        before anything is saved. With one process: only the lease check.
        """
        lost = lease is not None and lease.lost.is_set()
        code = self._max(LEASE_LOST if lost else SIGTERM if preemption.requested else GO)
        self.stopping = self.stopping or code != GO
        if code == LEASE_LOST:
            if lease is not None:
                lease.check(where)
            raise RankStopped(f"rank 0 lost the run's lease {where}; rank {self.rank} stops without writing",
                              ConflictError.exit_code)
        if code == SIGTERM:
            preemption.requested = True

    def writer_does(self, action: Callable[[], object], doing: str) -> None:
        """Run ``action`` on rank 0 while the others wait; a MedftError there is agreed: rank 0 raises it and
        every other rank raises :class:`RankStopped` with its exit code. With one process: ``action()``."""
        if not self._live:
            action()
            return
        failure: MedftError | None = None
        if self.writer:
            try:
                action()
            except MedftError as e:
                failure = e
        code = self._max(failure.exit_code if failure is not None else 0)
        self.stopping = self.stopping or code != 0
        if failure is not None:
            raise failure
        if code:
            raise RankStopped(f"rank 0 failed while {doing} (exit {code}; its log says why); rank {self.rank} "
                              "stops too", code)

    def lease(self, run: Run) -> Lease | ReadOnlyLease:
        """The run's lease on rank 0; on the others a :class:`ReadOnlyLease`, which refuses every write."""
        from job.lifecycle import Lease

        return Lease(run) if self.writer else ReadOnlyLease(self.rank)


def _cpu_location(storage: Any, location: str) -> Any:
    return storage if location.startswith("cpu:") and location[4:].isdigit() else None


def _load_cpu_indexed_locations() -> None:
    """Let ``torch.load(..., map_location="cpu:0")`` load onto the CPU.

    Under torchrun on CPU, transformers' device is ``cpu:0`` and a resumed trainer loads the optimizer state
    with ``map_location`` set to it, which torch's own CPU loader refuses ("don't know how to restore data
    location"). This registers a loader for ``cpu:<index>`` (the CPU has one memory) once per process.
    """
    global _cpu_locations_loadable
    if not _cpu_locations_loadable:
        import torch.serialization

        torch.serialization.register_package(11, lambda _obj: None, _cpu_location)  # just after the CPU loader
        _cpu_locations_loadable = True


class ReadOnlyLease:
    """The lease of a rank that never writes: its checks pass (rank 0's lease is agreed at each step) and
    :meth:`confirm`, which every write into the run calls first, raises RuntimeError (a bug)."""

    def __init__(self, rank: int) -> None:
        import threading

        self.rank = rank
        self.lost = threading.Event()  # never set: rank 0 holds the lease

    def check(self, where: str) -> None:
        return None

    def confirm(self, where: str) -> None:
        raise RuntimeError(f"rank {self.rank} tried to write into the run {where}; only rank 0 writes")

    def __enter__(self) -> ReadOnlyLease:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def resolve_nproc(value: str) -> int:
    """``--nproc-per-node``: ``auto`` is the number of visible CUDA GPUs (1 without CUDA); otherwise a whole
    number from 1. Raises ConfigError (exit 2) on anything else."""
    if value.strip().lower() == "auto":
        import torch

        return max(torch.cuda.device_count(), 1) if torch.cuda.is_available() else 1
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(f"--nproc-per-node {value!r} must be 'auto' or a whole number from 1")
    return n


def under_torchrun(env: dict[str, str] | None = None) -> bool:
    """True in a process torchrun started (``WORLD_SIZE`` or ``RANK`` set)."""
    e = os.environ if env is None else env
    return "WORLD_SIZE" in e or "RANK" in e


def relaunch(nproc: int, argv: list[str]) -> int:
    """Run ``python -m job.cli ARGV`` on ``nproc`` processes of this machine under ``torch.distributed.run``
    (a local rendezvous on a free port) and wait; returns the exit code of the first rank that failed
    (128 + signal for one killed by a signal), 0 when all succeeded. Raises nothing of its own."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch
    from torch.distributed.run import config_from_args, parse_args

    args = parse_args(["--standalone", f"--nproc-per-node={nproc}", "--no-python", sys.executable,
                       "-m", "job.cli", *argv])
    args.rdzv_backend, args.rdzv_endpoint = "c10d", "localhost:0"  # what --standalone means (run.run does it)
    args.rdzv_id = f"medft-{os.getpid()}"
    config, cmd, cmd_args = config_from_args(args)
    log.info("distributed.launch", nproc_per_node=nproc)
    try:
        elastic_launch(config=config, entrypoint=cmd)(*cmd_args)
    except ChildFailedError as e:
        _, failure = e.get_first_failure()
        return failure.exitcode if failure.exitcode >= 0 else 128 - failure.exitcode
    except SignalException as e:  # this launcher was told to stop; torchrun passed the signal to every rank
        return 128 + int(e.sigval)
    return 0
