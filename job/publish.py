"""The publish stage: upload every artifact, then MANIFEST.json (create-only, last), then register.

A run is published when, and only when, its manifest exists; registration happens after that and is made
idempotent per run id, so a job killed between the two registers on its rerun, and a rerun of a published run
registers nothing new. :class:`EarlyUploads` lets the upload of the merged weights overlap the export that
writes them: a shard goes up as soon as it is on disk, and :func:`publish` sends only what is left.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from concurrent.futures import Future, ThreadPoolExecutor
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import TracebackType
from typing import Any

from job.lifecycle import FencedStore, Lease, Run
from registry.logs import get_logger
from registry.records import RunRecord, dump
from registry.redact import redact_urls
from registry.registry import Registry
from registry.runs import write_manifest
from registry.store import ObjectInfo, local_files
from registry.versions import ModelVersion

log = get_logger(__name__)


def environment() -> dict[str, Any]:
    """What the run ran on, recorded for lineage."""
    import torch

    env: dict[str, Any] = {"python": platform.python_version(), "image": os.environ.get("MEDFT_IMAGE")}
    for name in ("medft", "torch", "transformers", "trl", "peft", "unsloth", "bitsandbytes"):
        try:
            env[name] = version(name)
        except PackageNotFoundError:
            env[name] = None
    env["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return env


class EarlyUploads:
    """Files of an artifact uploaded while the export is still writing the rest (publish overlapping export).

    :meth:`submit` queues a finished file for the run's store under ``<artifact>/<its path in the artifact's
    folder>``; one background thread uploads them in order, every write fenced by the lease and create-only as
    every write into the run (:class:`job.lifecycle.FencedStore`). Nothing is published by it: the manifest,
    written last by :func:`publish`, is. Leaving the context waits for the upload in progress and, after an
    error, drops those not started, so no thread writes into the run after the job stops.

    Only a store across the network (``s3://``) takes files early: there the upload waits on the network while
    the GPU merges. A local store's upload is a copy onto the disks the export is writing to; measured on an
    H200 (docs/benchmarks.md, run 8), the early copy of 16 GB only competed with the merge and its check, so
    :meth:`submit` leaves a local store's files to :func:`publish`.
    """

    def __init__(self, run: Run, lease: Lease) -> None:
        self._early = run.run_store.uri.startswith("s3://")
        self._store = FencedStore(run.run_store, lease)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="early-upload")
        self._queued: dict[str, Future[ObjectInfo]] = {}

    def submit(self, artifact: str, folder: Path, path: Path) -> None:
        """Queue ``path`` (a complete file under ``folder``, not written to again) as part of ``artifact``;
        nothing for a local store."""
        if not self._early:
            return
        key = f"{artifact}/{path.relative_to(folder).as_posix()}"
        self._queued[key] = self._pool.submit(self._store.put_file, key, path)

    def uploaded(self) -> dict[str, ObjectInfo]:
        """Every queued file's stored info (key -> info), waiting for those still going. Call it after the
        writers that submit have finished. Raises the first failed upload's error (the store's, LeaseLost)."""
        return {key: future.result() for key, future in self._queued.items()}

    def __enter__(self) -> EarlyUploads:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self._pool.shutdown(wait=True, cancel_futures=kind is not None)


def publish(run: Run, outputs: dict[str, Path], record: RunRecord, lease: Lease,
            uploaded: dict[str, ObjectInfo] | None = None) -> str:
    """Upload ``outputs`` (prefix -> local dir) plus config and metrics, then write the manifest.

    ``uploaded`` (key -> info, :meth:`EarlyUploads.uploaded`) are files already in the store, listed as they
    are; the rest of an artifact that has some goes file by file. ``record`` goes into MANIFEST.json as its JSON
    form (:func:`registry.records.dump`), its metrics into metrics.json too.

    Every write is fenced by ``lease`` (:class:`job.lifecycle.FencedStore`). Returns the run URI. Raises the
    store's errors and LeaseLost; on failure nothing is published (no manifest).
    """
    store = FencedStore(run.run_store, lease)
    uploaded = uploaded or {}
    infos = []
    for prefix, local in outputs.items():
        if any(key.startswith(prefix + "/") for key in uploaded):
            keys = [(f"{prefix}/{rel}", path) for rel, path in local_files(local)]
            artifact_infos = [uploaded.get(key) or store.put_file(key, path) for key, path in keys]
        else:
            artifact_infos = store.put_dir(prefix, local)
        infos += artifact_infos
        log.info("publish.uploaded", artifact=prefix, files=len(artifact_infos),
                 bytes=sum(info.size for info in artifact_infos),
                 during_export=sum(info.key in uploaded for info in artifact_infos))
    # config.yaml was stored create-only when the run started (resolve.record_config); list it as it is.
    raw, _ = run.run_store.get_bytes("config.yaml")
    infos.append(ObjectInfo(key="config.yaml", size=len(raw), sha256=hashlib.sha256(raw).hexdigest(), etag=None))
    infos.append(store.put_bytes("metrics.json", json.dumps(redact_urls(dump(record.metrics)), indent=2).encode()))
    lease.confirm(f"before writing {run.run_store.url('MANIFEST.json')}")
    write_manifest(run.store, run.run_id, infos, dump(record))
    log.info("publish.manifest", uri=run.uri, files=len(infos))
    return run.uri


def register(run: Run, lease: Lease | None = None) -> ModelVersion:
    """Register the published run under ``output.model_name`` once, with ``output.tags``,
    ``output.description`` and ``output.aliases``.

    A protected alias (``medft registry protect``) the version fails the gate for stays where it was: the
    registration stands, and the refusal is logged (``register.alias_refused``), recorded in the model's
    history and in the version's ``alias_refusals``, and printed by the pipeline's summary.
    With ``lease``, only while it is still held (LeaseLost otherwise).
    """
    registry = Registry.open(run.cfg.registry_uri)
    name = run.cfg.output.model_name
    existing = registry.find_by_run(name, run.run_id)
    if existing is not None:
        log.info("register.exists", name=name, version=existing.version)
        return existing
    if lease is not None:
        lease.confirm("before registering")
    output = run.cfg.output
    mv = registry.register(name, run.uri, aliases=output.aliases, tags=dict(output.tags),
                           description=output.description, via=f"job {run.run_id}",
                           reason=f"output.aliases of run {run.run_id}")
    log.info("register.done", name=name, version=mv.version, aliases=list(mv.aliases),
             refused=[r["alias"] for r in mv.alias_refusals])
    return mv
