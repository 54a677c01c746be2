"""The resolve stage: run id, store, registry and the run's lease, decided before any heavy work.

A run's lease (``runs/<run_id>/LEASE.json``) makes a duplicate pod with the same run id stop at once with a
clear line instead of training beside the first. The lease expires ``MEDFT_LEASE_SECONDS`` (default 120) after
its last renewal, so a pod killed without a goodbye leaves it to its replacement within that time.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import yaml

from job.config import JobConfig
from job.model import cache_root
from registry.errors import ConfigError, ConflictError, NotFoundError
from registry.logs import get_logger
from registry.runs import is_published, run_prefix
from registry.store import PreconditionFailed, Store, open_store

log = get_logger(__name__)

#: Sections that define what is trained; a resumed run must keep them. Export and output may change.
TRAINING_SECTIONS = ("model", "data", "lora", "train")


def new_run_id(cfg: JobConfig) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{cfg.output.model_name}-{stamp}-{secrets.token_hex(3)}"


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


def resolve(cfg: JobConfig) -> Run:
    """Fix the run id and open the store (no network call). Raises ConfigError for a bad store URI."""
    run_id = cfg.output.run_id or new_run_id(cfg)
    store = open_store(cfg.output.store)
    work_dir = cache_root() / "work" / run_id
    return Run(cfg=cfg, run_id=run_id, store=store, run_store=store.child(run_prefix(run_id)), work_dir=work_dir)


def record_config(run: Run) -> None:
    """Store the resolved config with the run; a restart must train the same thing.

    Raises ConfigError naming the first differing key when the run was started with another config.
    """
    text = run.cfg.to_yaml().encode()
    try:
        run.run_store.put_bytes("config.yaml", text, if_absent=True)
        return
    except PreconditionFailed:
        pass
    stored = yaml.safe_load(run.run_store.get_bytes("config.yaml")[0])
    current = run.cfg.to_dict()
    for section in TRAINING_SECTIONS:
        for key, value in current[section].items():
            old = stored.get(section, {}).get(key)
            if old != value and not (isinstance(old, list) and tuple(old) == tuple(value or ())):
                raise ConfigError(f"{section}.{key}: run {run.run_id} was started with {old!r}, not {value!r}; "
                                  "keep the original config to resume, or set a new output.run_id")


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
