"""A run's life beside the stages: the :class:`Run` the resolve stage opens, its :class:`Lease`, SIGTERM as a flag
(:class:`Preemption`), and a full disk turned into a retryable exit (:func:`disk_full_is_transient`).

A run's lease (``runs/<run_id>/LEASE.json``) makes a duplicate pod with the same run id stop at once with a
clear line instead of training beside the first. The lease expires ``MEDFT_LEASE_SECONDS`` (default 120) after
its last renewal, so a pod killed without a goodbye leaves it to its replacement within that time.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from job.config import JobConfig
from registry.errors import ConflictError, MedftError, NotFoundError, Preempted, TransientError
from registry.logs import get_logger
from registry.runs import is_published
from registry.store import PreconditionFailed, Store

log = get_logger(__name__)

_DISK_FULL = re.compile(r"No space left on device|os error 28|Errno 28|Disk quota exceeded|os error 122")

_NEARLY_FULL = 1 * 2**20  # bytes free below which a failed write is taken to be a full disk



class Preemption:
    """Turns SIGTERM into a flag that the training loop and the pipeline check between units of work."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None
        self._depth = 0  # re-entrant: the pipeline holds it for the whole job, fit() for training

    def __enter__(self) -> Preemption:
        if self._depth == 0:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        self._depth += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        if self._depth == 0:
            signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, _signum: int, _frame: Any) -> None:
        # Only set a flag: the interrupted thread may hold the logger's lock, so logging here can deadlock.
        self.requested = True

    def check(self, where: str) -> None:
        if self.requested:
            raise Preempted(f"stopped by SIGTERM {where}; rerun with the same output.run_id to resume")


def _disk_full(exc: BaseException, path: Path) -> bool:
    """Whether ``exc`` comes from a full disk under ``path``.

    safetensors and the OS say so; torch.save reports ENOSPC as a RuntimeError about stream positions, so
    when the error does not say, the space left on the volume decides.
    """
    e: BaseException | None = exc
    while e is not None:
        if (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or _DISK_FULL.search(str(e)):
            return True
        e = e.__cause__ or e.__context__
    try:
        return isinstance(exc, (OSError, RuntimeError)) and shutil.disk_usage(path).free < _NEARLY_FULL
    except OSError:
        return False


@contextmanager
def disk_full_is_transient(path: Path, doing: str) -> Iterator[None]:
    """Turn a full disk under ``path`` into TransientError (exit 75) with one line; other errors pass."""
    try:
        yield
    except MedftError:
        raise
    except Exception as e:
        if not _disk_full(e, path):
            raise
        raise TransientError(f"disk full while {doing} under {path}: free space there (MEDFT_CACHE) and rerun "
                             "with the same output.run_id to resume from the last complete checkpoint") from None


@dataclass
class Run:
    cfg: JobConfig
    run_id: str
    store: Store  # the store root
    run_store: Store  # runs/<run_id>/
    work_dir: Path

    @property
    def uri(self) -> str:
        return self.run_store.uri

    def published(self) -> bool:
        return is_published(self.store, self.run_id)

    def plan(self) -> str:
        c = self.cfg
        return "\n".join([
            f"run {self.run_id}",
            f"  pull     data {c.data.source} (subset={c.data.subset}, split={c.data.split}) "
            f"and weights {c.model.base}" + (f" @ {c.model.revision}" if c.model.revision else ""),
            f"  train    backend={c.model.backend} LoRA r={c.lora.r} alpha={c.lora.alpha} on "
            f"{','.join(c.lora.target_modules)}; batch {c.train.batch_size} x {c.train.grad_accum}, "
            f"{c.train.max_steps} steps, lr {c.train.learning_rate}, checkpoint every {c.train.checkpoint_every}",
            f"  evaluate eval loss on {c.data.eval_fraction:.0%} held out, {len(c.eval.questions)} questions",
            "  export   adapter" + (f" + merged {c.export.dtype} safetensors" if c.export.merge else ""),
            f"  publish  {self.uri}",
            f"  register {c.output.model_name} in {c.registry_uri}"
            + (f" with aliases {', '.join(c.output.aliases)}" if c.output.aliases else ""),
        ])


class Lease:
    """Exclusive ownership of a run, renewed in the background while the job runs."""

    def __init__(self, run: Run, ttl: float | None = None) -> None:
        self.run = run
        self.ttl = ttl or float(os.environ.get("MEDFT_LEASE_SECONDS", "120"))
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.lost = threading.Event()
        self._etag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _doc(self) -> bytes:
        return json.dumps({"owner": self.owner, "expires": time.time() + self.ttl}).encode()

    def acquire(self) -> None:
        """Take the lease, or raise ConflictError (exit 75) when a live job holds it."""
        store = self.run.run_store
        try:
            self._etag = store.put_bytes("LEASE.json", self._doc(), if_absent=True).etag
        except PreconditionFailed:
            try:
                raw, etag = store.get_bytes("LEASE.json")
            except NotFoundError:  # released between our two calls: try once more from the top
                return self.acquire()
            held = json.loads(raw)
            if held.get("expires", 0) > time.time():
                raise ConflictError(
                    f"run {self.run.run_id} is already running in {held.get('owner')} (lease until "
                    f"{datetime.fromtimestamp(held['expires'], timezone.utc):%H:%M:%SZ}); this duplicate stops. "
                    "Rerun after it ends, or use another output.run_id") from None
            try:
                self._etag = store.put_bytes("LEASE.json", self._doc(), if_match=etag).etag
            except PreconditionFailed:
                raise ConflictError(f"run {self.run.run_id}: another job took over its expired lease first; "
                                    "this duplicate stops") from None
            log.info("lease.taken_over", previous_owner=held.get("owner"))
        self._thread = threading.Thread(target=self._renew, name="medft-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                self._etag = self.run.run_store.put_bytes("LEASE.json", self._doc(), if_match=self._etag).etag
            except PreconditionFailed:
                log.error("lease.lost", run_id=self.run.run_id)
                self.lost.set()
                return
            except Exception as e:  # noqa: BLE001 - a flaky store must not kill training; the next renewal retries
                log.warning("lease.renew_failed", error=str(e))

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        if not self.lost.is_set():
            try:
                self.run.run_store.delete("LEASE.json")
            except Exception as e:  # noqa: BLE001 - it expires by itself
                log.warning("lease.release_failed", error=str(e))

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
