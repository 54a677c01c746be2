"""``medft registry runs``: every run a store holds, finished or not, and what state it was left in.

Derived only from what the store holds under ``runs/<run_id>/`` (see :mod:`registry.runs`) and the
registry's versions; nothing read is trusted: a file that cannot be read makes that run ``corrupt``, naming
the file, and the others are still listed.

=============  ==========================================================================================
registered     MANIFEST.json, and a registry version made from it
published      MANIFEST.json, not registered (yet)
running        no manifest, LEASE.json held (not expired): a job is on it now
interrupted    no manifest, no live lease, a complete checkpoint: rerun with the same run id to resume
failed         no manifest, no live lease, no complete checkpoint: it stopped before its first checkpoint
corrupt        a manifest, lease or checkpoint marker that cannot be read
=============  ==========================================================================================
"""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from registry.errors import DataError, MedftError, NotFoundError
from registry.runs import MANIFEST, RUNS, json_object, parse_manifest
from registry.store import BucketNotFound, Store

if TYPE_CHECKING:
    from registry.registry import Registry

LEASE = "LEASE.json"
COMPLETE = "COMPLETE.json"
_CHECKPOINT = re.compile(r"^checkpoint-([0-9]+)$")


@dataclass(frozen=True)
class RunState:
    run_id: str
    state: str
    """registered, published, running, interrupted, failed or corrupt (module docstring)."""
    step: int | None
    """The last step it reached: the manifest's ``metrics.steps``, else the newest complete checkpoint's."""
    stopped: str
    """Where it stopped, in words (its manifest's time, its newest checkpoint, its lease's holder and expiry)."""
    uri: str
    versions: list[str] = field(default_factory=list)
    """Registry versions made from it (``NAME:VERSION``)."""
    has_config: bool = True
    """Whether config.yaml was stored (every run stores it when it starts)."""


def _utc(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _json(rs: Store, key: str) -> dict:
    return json_object(rs.get_bytes(key)[0], rs.url(key))


def _run_state(store: Store, run_id: str, keys: set[str], versions: list[str]) -> RunState:
    rs = store.child(f"{RUNS}/{run_id}")
    base = {"run_id": run_id, "uri": rs.uri, "versions": versions, "has_config": "config.yaml" in keys}
    checkpoints = sorted(int(m[1]) for k in keys if (parts := k.split("/")) and len(parts) == 3
                         and parts[0] == "checkpoints" and parts[2] == COMPLETE and (m := _CHECKPOINT.match(parts[1])))
    try:
        if MANIFEST in keys:
            data, _ = rs.get_bytes(MANIFEST)
            manifest = parse_manifest(data, rs.url(MANIFEST))
            steps = (manifest.get("metrics") or {}).get("steps")
            step = steps if isinstance(steps, int) else (checkpoints[-1] if checkpoints else None)
            return RunState(**base, state="registered" if versions else "published", step=step,
                            stopped=f"published {manifest['created_at']}")
        step = None
        if checkpoints:
            doc = _json(rs, f"checkpoints/checkpoint-{checkpoints[-1]}/{COMPLETE}")
            if not isinstance(doc.get("step"), int):
                raise DataError(f"{rs.url(f'checkpoints/checkpoint-{checkpoints[-1]}/{COMPLETE}')} has no integer 'step'")
            step = doc["step"]
        if LEASE in keys:
            lease = _json(rs, LEASE)
            expires = lease.get("expires")
            if not isinstance(expires, (int, float)) or isinstance(expires, bool):
                raise DataError(f"{rs.url(LEASE)} has no 'expires' time")
            if expires > time.time():
                return RunState(**base, state="running", step=step,
                                stopped=f"running: lease held by {lease.get('owner', '?')} until {_utc(expires)}")
        if step is not None:
            return RunState(**base, state="interrupted", step=step,
                            stopped=f"checkpoint-{checkpoints[-1]} (step {step}); rerun with output.run_id={run_id} "
                                    "to resume")
        return RunState(**base, state="failed", step=None, stopped="before its first checkpoint" + (
            "" if base["has_config"] else " (no config.yaml either)"))
    except BucketNotFound:
        raise
    except (DataError, NotFoundError) as e:  # NotFound: deleted between the listing and the read
        return RunState(**base, state="corrupt", step=None, stopped=e.message)


def list_runs(store: Store, registry: Registry | None = None) -> list[RunState]:
    """Every run under ``store``'s ``runs/``, by run id. Registry versions are matched by run id and run
    folder; a registry that cannot be read leaves them out (its corrupt records are named by ``registry list``)."""
    by_run: dict[str, set[str]] = {}
    for key in store.list(RUNS):
        parts = key.split("/", 2)
        if len(parts) == 3 and parts[0] == RUNS:
            by_run.setdefault(parts[1], set()).add(parts[2])
    versions: dict[str, list[str]] = {}
    if registry is not None and by_run:
        try:
            for mv in registry.scan()[0]:
                if mv.run_uri.rstrip("/").endswith(f"/{RUNS}/{mv.run_id}"):
                    versions.setdefault(mv.run_id, []).append(mv.ref)
        except MedftError:
            pass
    ids = sorted(by_run)
    if not ids:
        return []
    with ThreadPoolExecutor(max_workers=min(8, len(ids))) as ex:
        return list(ex.map(lambda r: _run_state(store, r, by_run[r], versions.get(r, [])), ids))
