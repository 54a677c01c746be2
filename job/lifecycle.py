"""A run's life: who it is (:class:`Run`), its exclusive lease, fenced writes, and the two ways it stops early.

Imports no stage: resolve, train, export and publish all use these.

A run's lease (``runs/<run_id>/LEASE.json``) makes a duplicate pod with the same run id stop at once with a
clear line instead of training beside the first. The lease expires ``MEDFT_LEASE_SECONDS`` (default 120) after
its last renewal, so a pod killed without a goodbye leaves it to its replacement within that time.

Fencing: a job that loses its lease (a pause longer than the lease, a hand edit) stops at the next step
boundary with :class:`LeaseLost` (exit 75) and writes nothing more. Every write into the run goes through
:class:`FencedStore`, which first renews the lease with compare-and-swap on LEASE.json's etag (so it fails
once another job took it) and uploads create-only, so a stale job cannot overwrite what the holder wrote. S3
has no write conditional on another object, so one gap remains: a job paused for longer than the lease
between its renewal and its upload. Create-only uploads keep even that from replacing a published file.

Stopping early: SIGTERM becomes a flag (:class:`Preemption`) checked between units of work (exit 143 after a
checkpoint), and a full disk becomes a one-line TransientError (:func:`disk_full_is_transient`, exit 75).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from job.config import JobConfig
from registry.errors import ConfigError, ConflictError, DataError, MedftError, NotFoundError, Preempted, TransientError
from registry.logs import get_logger
from registry.runs import MANIFEST, is_published
from registry.store import ObjectInfo, PreconditionFailed, Store, sha256_file

log = get_logger(__name__)

_DISK_FULL = re.compile(r"No space left on device|os error 28|Errno 28|Disk quota exceeded|os error 122")
_NEARLY_FULL = 1 * 2**20  # bytes free below which a failed write is taken to be a full disk
LEASE = "LEASE.json"
DEFAULT_LEASE_SECONDS = 120.0
#: Below 2 s the renewals (every quarter of the lease) become a busy loop; above a day a killed pod's lease
#: blocks its replacement for longer than any Job would wait.
LEASE_SECONDS_RANGE = (2.0, 86400.0)


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


def lease_seconds(env: dict[str, str] | None = None) -> float:
    """``MEDFT_LEASE_SECONDS`` (default 120); ConfigError naming the variable unless it is 2 to 86400."""
    raw = (os.environ if env is None else env).get("MEDFT_LEASE_SECONDS", "").strip()
    if not raw:
        return DEFAULT_LEASE_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    low, high = LEASE_SECONDS_RANGE
    if not low <= value <= high:  # also refuses nan and inf
        raise ConfigError(f"MEDFT_LEASE_SECONDS={raw!r} must be a number of seconds from {low:g} to {high:g} "
                          f"(default {DEFAULT_LEASE_SECONDS:g})")
    return value


@dataclass
class Run:
    """One run of the job: its id, the store it publishes into, its folder there and its local work dir."""

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

    def describe(self) -> str:
        """What the run will do, stage by stage (``medft train --dry-run`` prints it)."""
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


class LeaseLost(ConflictError):
    """Another job holds the run's lease now; this one stops without writing (exit 75)."""


class Lease:
    """Exclusive ownership of a run, renewed in the background while the job runs.

    :meth:`check` (at step boundaries) and :meth:`confirm` (before every write into the run) raise
    :class:`LeaseLost` once the lease names another owner.
    """

    def __init__(self, run: Run, ttl: float | None = None) -> None:
        self.run = run
        self.ttl = ttl or lease_seconds()
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.lost = threading.Event()
        self._etag: str | None = None
        self._cas = threading.Lock()  # the renewer and confirm() must not race each other's etag
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _doc(self) -> bytes:
        return json.dumps({"owner": self.owner, "expires": time.time() + self.ttl}).encode()

    def _read_held(self) -> tuple[dict[str, Any], str]:
        """LEASE.json as stored, with its etag; DataError (exit 3) naming it when it is not a lease."""
        raw, etag = self.run.run_store.get_bytes(LEASE)
        try:
            held = json.loads(raw)
            if not isinstance(held, dict) or not isinstance(held.get("owner"), str):
                raise ValueError("no 'owner'")
            expires = held.get("expires")
            if isinstance(expires, bool) or not isinstance(expires, (int, float)) or not 0 <= expires < 1e11:
                raise ValueError("'expires' is not a time in seconds")
        except (ValueError, UnicodeDecodeError) as e:
            raise DataError(f"{self.run.run_store.url(LEASE)} is corrupt ({str(e).splitlines()[0][:80]}); make "
                            "sure no job runs this run, then delete it") from None
        return held, etag

    def acquire(self) -> None:
        """Take the lease, or raise ConflictError (exit 75) when a live job holds it."""
        store = self.run.run_store
        try:
            self._etag = store.put_bytes(LEASE, self._doc(), if_absent=True).etag
        except PreconditionFailed:
            try:
                held, etag = self._read_held()
            except NotFoundError:  # released between our two calls: try once more from the top
                return self.acquire()
            if held["expires"] > time.time():
                raise ConflictError(
                    f"run {self.run.run_id} is already running in {held.get('owner')} (lease until "
                    f"{datetime.fromtimestamp(held['expires'], timezone.utc):%H:%M:%SZ}); this duplicate stops. "
                    "Rerun after it ends, or use another output.run_id") from None
            try:
                self._etag = store.put_bytes(LEASE, self._doc(), if_match=etag).etag
            except PreconditionFailed:
                raise ConflictError(f"run {self.run.run_id}: another job took over its expired lease first; "
                                    "this duplicate stops") from None
            log.info("lease.taken_over", previous_owner=held.get("owner"))
        self._thread = threading.Thread(target=self._renew, name="medft-lease", daemon=True)
        self._thread.start()

    def _renew_once(self) -> None:
        """Extend the lease by compare-and-swap on its etag; PreconditionFailed when it changed hands."""
        with self._cas:
            if self.lost.is_set():
                raise PreconditionFailed("lease already lost")
            self._etag = self.run.run_store.put_bytes(LEASE, self._doc(), if_match=self._etag).etag

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                self._renew_once()
            except PreconditionFailed:
                self._mark_lost()
                return
            except Exception as e:  # noqa: BLE001 - a flaky store must not kill training; the next renewal retries
                log.warning("lease.renew_failed", error=str(e))

    def _mark_lost(self) -> None:
        if not self.lost.is_set():
            self.lost.set()
            log.error("lease.lost", run_id=self.run.run_id, action="stopping without writing")

    def _lost_error(self, where: str) -> LeaseLost:
        try:
            holder = f"now held by {self._read_held()[0]['owner']}"
        except Exception:  # noqa: BLE001 - the message names the holder when it can be read, nothing more
            holder = "taken over or removed"
        return LeaseLost(f"run {self.run.run_id} lost its lease ({LEASE} {holder}) {where}; this job stops without "
                         "writing to the run. Another job owns it now; rerun only after that one has ended")

    def check(self, where: str) -> None:
        """Raise LeaseLost when a renewal found the lease in another job's hands (a step boundary)."""
        if self.lost.is_set():
            raise self._lost_error(where)

    def confirm(self, where: str) -> None:
        """Renew the lease now, before a write: LeaseLost when another job holds it (the write fence)."""
        try:
            self._renew_once()
        except PreconditionFailed:
            self._mark_lost()
            raise self._lost_error(where) from None

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        if not self.lost.is_set():
            try:
                self.run.run_store.delete(LEASE)
            except Exception as e:  # noqa: BLE001 - it expires by itself
                log.warning("lease.release_failed", error=str(e))

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class FencedStore:
    """A run's store whose writes land only while ``lease`` is held, and never over a published file.

    Every write first renews the lease (:meth:`Lease.confirm`, compare-and-swap), then uploads create-only.
    When the key exists already: identical content (by S3's recorded sha256) is kept as it is; otherwise the
    file was left by an earlier life of this run that died before publishing, and it is replaced after the
    lease is confirmed once more, unless the run is published (then PreconditionFailed, exit 75: a
    published file is never overwritten). Reads pass through.
    """

    def __init__(self, inner: Store, lease: Lease) -> None:
        self.inner = inner
        self.lease = lease
        self.uri = inner.uri

    def __getattr__(self, name: str) -> Any:  # reads: url, get_bytes, get_file, exists, stat, list, get_dir...
        return getattr(self.inner, name)

    def child(self, prefix: str) -> Store:
        raise NotImplementedError("a fenced store is not split further; fence the child store instead")

    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False,
                  if_match: str | None = None) -> ObjectInfo:
        self.lease.confirm(f"before writing {self.inner.url(key)}")
        if if_match is not None:  # compare-and-swap is safe as it is
            return self.inner.put_bytes(key, data, if_match=if_match)
        try:
            return self.inner.put_bytes(key, data, if_absent=True)
        except PreconditionFailed:
            if if_absent:
                raise
        return self._replace(key, hashlib.sha256(data).hexdigest(), lambda: self.inner.put_bytes(key, data))

    def put_file(self, key: str, path: Path, *, if_absent: bool = False) -> ObjectInfo:
        self.lease.confirm(f"before writing {self.inner.url(key)}")
        return self._put_file(key, Path(path), if_absent=if_absent)

    def _put_file(self, key: str, path: Path, *, if_absent: bool = False) -> ObjectInfo:
        try:
            return self.inner.put_file(key, path, if_absent=True)
        except PreconditionFailed:
            if if_absent:
                raise
        return self._replace(key, sha256_file(path), lambda: self.inner.put_file(key, path))

    def put_dir(self, prefix: str, local_dir: Path, *, if_absent: bool = False) -> list[ObjectInfo]:
        self.lease.confirm(f"before uploading {self.inner.url(prefix)}/")
        try:
            return self.inner.put_dir(prefix, local_dir, if_absent=True)
        except PreconditionFailed:
            if if_absent:
                raise
        # An earlier life of this run left some of these files: file by file, keeping or replacing each.
        files = sorted(p for p in Path(local_dir).rglob("*") if p.is_file())
        return [self._put_file("/".join(filter(None, (prefix.strip("/"), p.relative_to(local_dir).as_posix()))), p)
                for p in files]

    def delete(self, key: str) -> None:
        self.lease.confirm(f"before deleting {self.inner.url(key)}")
        self.inner.delete(key)

    def _replace(self, key: str, sha256: str, write: Callable[[], ObjectInfo]) -> ObjectInfo:
        current = self.inner.stat(key)
        if current.sha256 == sha256:
            return ObjectInfo(current.key, current.size, sha256, current.etag)
        if self.inner.exists(MANIFEST):
            raise PreconditionFailed(f"{self.inner.url(key)} belongs to the published run {self.lease.run.run_id} "
                                     "and is never overwritten; this job stops")
        self.lease.confirm(f"before replacing {self.inner.url(key)}")
        log.info("fence.replaced_unpublished", key=key, reason="left by an earlier life of this run")
        return write()
