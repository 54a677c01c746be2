"""The publish stage: upload every artifact, then MANIFEST.json (create-only, last), then register.

A run is published when, and only when, its manifest exists; registration happens after that and is made
idempotent per run id, so a job killed between the two registers on its rerun, and a rerun of a published run
registers nothing new.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from job.lifecycle import FencedStore, Lease, Run
from registry.logs import get_logger
from registry.records import RunRecord, dump
from registry.redact import redact_urls
from registry.registry import Registry
from registry.runs import write_manifest
from registry.store import ObjectInfo
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


def publish(run: Run, outputs: dict[str, Path], record: RunRecord, lease: Lease) -> str:
    """Upload ``outputs`` (prefix -> local dir) plus config and metrics, then write the manifest.

    ``record`` goes into MANIFEST.json as its JSON form (:func:`registry.records.dump`), its metrics into
    metrics.json too.

    Every write is fenced by ``lease`` (:class:`job.lifecycle.FencedStore`). Returns the run URI. Raises the
    store's errors and LeaseLost; on failure nothing is published (no manifest).
    """
    store = FencedStore(run.run_store, lease)
    infos = []
    for prefix, local in outputs.items():
        uploaded = store.put_dir(prefix, local)
        infos += uploaded
        log.info("publish.uploaded", artifact=prefix, files=len(uploaded),
                 bytes=sum(info.size for info in uploaded))
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
