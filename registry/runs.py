"""The run layout in a store and its MANIFEST.json.

::

    <store>/runs/<run_id>/config.yaml        resolved config
    <store>/runs/<run_id>/checkpoints/...    resumable training state
    <store>/runs/<run_id>/adapter/...        PEFT adapter
    <store>/runs/<run_id>/merged/...         merged weights, config, tokenizer, model card
    <store>/runs/<run_id>/metrics.json
    <store>/runs/<run_id>/MANIFEST.json      every file with size and sha256; written last, create-only

A run is published when, and only when, its MANIFEST.json exists; nothing reads a run without one.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from registry.errors import ConfigError, DataError, NotFoundError
from registry.names import LOADABLE_ARTIFACTS, NAME_RE
from registry.records import RunRecord, parse_record
from registry.redact import redact_urls
from registry.store import (
    BucketNotFound,
    ObjectInfo,
    PreconditionFailed,
    Store,
    check_key,
    open_store,
)
from registry.uris import is_location

MANIFEST = "MANIFEST.json"
FORMAT = 1
RUNS = "runs"
_RESERVED = ("format", "run_id", "created_at", "files")
REQUIRED_FIELDS = ("format", "run_id", "created_at", "files")
DEFAULT_ARTIFACTS = {name: name for name in sorted(LOADABLE_ARTIFACTS)}  # adapter, merged


def check_run_id(run_id: str) -> str:
    if not isinstance(run_id, str) or not NAME_RE.match(run_id) or ".." in run_id:
        raise ConfigError(f"invalid run id {run_id!r}: use 1-128 letters, digits, '.', '_' or '-', "
                          f"starting with a letter or digit")
    return run_id


def run_prefix(run_id: str) -> str:
    """``runs/<run_id>``: the run's folder, relative to the store root."""
    return f"{RUNS}/{check_run_id(run_id)}"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def run_store(store: Store | None, run_uri_or_id: str) -> tuple[Store, str]:
    """(store rooted at the run's folder, label) for a run id inside ``store`` or a run folder URI/path."""
    if not isinstance(run_uri_or_id, str) or not run_uri_or_id.strip():
        raise ConfigError("run URI or id is empty")
    ref = run_uri_or_id.strip().rstrip("/")
    if is_location(ref):
        rs = open_store(ref, transfer=store.transfer if store is not None else None)
        return rs, rs.uri
    if store is None:
        raise ConfigError(f"run {ref!r} is a bare run id; give its folder URI (e.g. s3://bucket/prefix/runs/{ref})")
    rs = store.child(run_prefix(ref))
    return rs, rs.uri


def manifest_files(files: list[ObjectInfo], run_id: str) -> dict[str, dict[str, Any]]:
    """``{relpath: {size, sha256}}`` with keys made relative to the run folder, MANIFEST.json excluded.

    Keys may be relative to the store root (``runs/<id>/adapter/x``) or to the run folder (``adapter/x``).
    """
    prefix = run_prefix(run_id) + "/"
    out: dict[str, dict[str, Any]] = {}
    for f in files:
        rel = f.key.removeprefix(prefix)
        rel = check_key(rel, what="manifest file path")
        if rel == MANIFEST:
            continue
        if not f.sha256:
            raise DataError(f"no sha256 for {f.key}: every file in a manifest needs one (upload it with put_file)")
        out[rel] = {"size": int(f.size), "sha256": f.sha256}
        if f.checksum:  # S3's own checksum of the upload, compared at registration (verify_run)
            out[rel]["checksum_sha256"] = f.checksum
    return dict(sorted(out.items()))


def write_manifest(store: Store, run_id: str, files: list[ObjectInfo], record: dict[str, Any]) -> str:
    """Write ``runs/<run_id>/MANIFEST.json`` last and create-only; return its URI.

    Raises :class:`PreconditionFailed` (exit 75) if the run is already published.
    """
    clash = [k for k in record if k in _RESERVED]
    if clash:
        raise ConfigError(f"manifest record must not set {', '.join(clash)} (write_manifest fills them in)")
    doc: dict[str, Any] = {"format": FORMAT, "run_id": check_run_id(run_id), "created_at": now_iso(),
                           "files": manifest_files(files, run_id)}
    doc.update(record)
    doc.setdefault("artifacts", dict(DEFAULT_ARTIFACTS))
    # The record quotes URIs (base model, data, trackers, store): stored without their credentials.
    data = (json.dumps(redact_urls(doc), indent=2, sort_keys=False, default=str) + "\n").encode()
    key = f"{run_prefix(run_id)}/{MANIFEST}"
    try:
        store.put_bytes(key, data, if_absent=True)
    except PreconditionFailed as e:
        raise PreconditionFailed(f"run {run_id} is already published ({store.url(key)} exists); "
                                 f"use a new run id") from e
    return store.url(key)


def json_object(data: bytes, where: str, consequence: str = "") -> dict[str, Any]:
    """``data`` as one JSON object; DataError naming ``where`` (then ``consequence``, e.g. "; the run is
    corrupt") when it is not valid JSON or not an object."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{where} is not valid JSON ({e}){consequence}") from None
    if not isinstance(doc, dict):
        raise DataError(f"{where} is not a JSON object{consequence}")
    return doc


def parse_manifest(data: bytes, where: str) -> dict[str, Any]:
    doc = json_object(data, where, "; the run is corrupt")
    for name in REQUIRED_FIELDS:
        if name not in doc:
            raise DataError(f"{where} lacks the required field {name!r}; the run is corrupt")
    if not isinstance(doc["format"], int) or doc["format"] > FORMAT:
        raise DataError(f"{where} has format {doc['format']!r}; this medft reads format {FORMAT} "
                        f"(upgrade medft)")
    files = doc["files"]
    if not isinstance(files, dict):
        raise DataError(f"{where}: field 'files' must be an object of {{path: {{size, sha256}}}}")
    for rel, meta in files.items():
        check_key(rel, what=f"file path in {where}", error=DataError)
        if (not isinstance(meta, dict) or not isinstance(meta.get("size"), int)
                or not isinstance(meta.get("sha256"), str) or not re.fullmatch(r"[0-9a-f]{64}", meta["sha256"])
                or not isinstance(meta.get("checksum_sha256", ""), str)):
            raise DataError(f"{where}: entry for {rel!r} needs an integer 'size' and a hex 'sha256'")
    manifest_record(doc, where)  # the record's fields have their types, or the run is corrupt
    return doc


def manifest_record(manifest: dict[str, Any], where: str) -> RunRecord:
    """The run record a manifest holds (everything but the manifest's own fields), typed.

    Raises DataError (exit 3) naming ``where`` and the field when one has the wrong type.
    """
    return parse_record(RunRecord, {k: v for k, v in manifest.items() if k not in _RESERVED}, where)


def read_manifest(store: Store | None, run_uri_or_id: str) -> dict[str, Any]:
    """The run's manifest; :class:`NotFoundError` naming the run when it is not published."""
    rs, label = run_store(store, run_uri_or_id)
    try:
        data, _ = rs.get_bytes(MANIFEST)
    except BucketNotFound:
        raise
    except NotFoundError:
        raise NotFoundError(f"run {label} is not published: it has no {MANIFEST} (unfinished, interrupted "
                            f"or never written)") from None
    return parse_manifest(data, rs.url(MANIFEST))


def is_published(store: Store, run_id: str) -> bool:
    return store.exists(f"{run_prefix(run_id)}/{MANIFEST}")


def verify_run(store: Store | None, run_id: str, *, manifest: dict[str, Any] | None = None) -> None:
    """Every manifest file exists with its size and its sha256.

    The content check is the store's (:meth:`Store.content_matches`): every byte on a local disk; on S3 the
    SHA-256 checksum S3 recorded at upload, compared with the one in the manifest, and a full read where the
    server keeps none. ``run_id`` may also be a run folder URI. Raises :class:`DataError` (exit 3) naming
    the first bad file.
    """
    from concurrent.futures import ThreadPoolExecutor

    rs, label = run_store(store, run_id)
    doc = manifest if manifest is not None else read_manifest(store, run_id)
    present = {o.key: o.size for o in rs.list_info("")}
    for rel, meta in doc["files"].items():
        if rel not in present:
            raise DataError(f"run {label} is incomplete: {rs.url(rel)} is listed in {MANIFEST} but missing")
        if present[rel] != meta["size"]:
            raise DataError(f"run {label} is corrupt: {rs.url(rel)} has {present[rel]} bytes, "
                            f"{MANIFEST} says {meta['size']}")

    def matches(item: tuple[str, dict[str, Any]]) -> bool:
        rel, meta = item
        return rs.content_matches(rel, meta["sha256"], meta.get("checksum_sha256"))

    items = sorted(doc["files"].items())
    with ThreadPoolExecutor(max_workers=max(1, min(rs.transfer.concurrency, len(items) or 1))) as ex:
        for (rel, _), ok in zip(items, ex.map(matches, items), strict=True):
            if not ok:
                raise DataError(f"run {label} is corrupt: {rs.url(rel)} fails its sha256 check (its content "
                                f"changed after it was published); republish the run")


def publish_dir(store: Store, run_id: str, local_dir: Path, record: dict[str, Any]) -> str:
    """Upload every file under ``local_dir`` to ``runs/<run_id>/``, then write the manifest (last).

    A convenience for jobs whose whole run folder is on local disk; returns the manifest URI.
    """
    prefix = run_prefix(run_id)
    if (Path(local_dir) / MANIFEST).exists():
        raise ConfigError(f"{Path(local_dir) / MANIFEST} exists; publish_dir writes the manifest itself, last")
    if store.exists(f"{prefix}/{MANIFEST}"):
        raise PreconditionFailed(f"run {run_id} is already published ({store.url(prefix + '/' + MANIFEST)})")
    return write_manifest(store, run_id, store.put_dir(prefix, Path(local_dir)), record)
