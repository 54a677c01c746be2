"""Where rows come from: a hub dataset (``hf://``), an object in S3 (``s3://``) or a local file, read into
validated, deduplicated rows (:func:`load_rows`), and the identity of what was used for lineage
(:func:`used_identity`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from job.config import JobConfig
from job.data.readers import file_records
from job.data.results import FIELDS, DataReport, DatasetIdentity, PreparedData, Row
from job.data.rows import Record, canonical, check_columns, collect
from registry.errors import AccessDeniedError, ConfigError, MedftError, NotFoundError, TransientError
from registry.logs import get_logger
from registry.uris import parse_uri

log = get_logger(__name__)


def _hf_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _load_hf_dataset(name: str, cfg: JobConfig, display: str) -> Any:
    """``datasets.load_dataset`` with its failures mapped onto medft's exit codes."""
    import datasets

    d = cfg.data
    try:
        ds = datasets.load_dataset(name, d.subset, split=d.split, revision=d.revision, cache_dir=d.cache_dir,
                                   token=os.environ.get("HF_TOKEN") or None)
    except MedftError:
        raise
    except Exception as e:  # datasets raises many types; each is mapped below
        msg = " ".join(str(e).split())[:300]
        etype = type(e).__name__
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403) or "gated" in msg.lower() or re.search(r"\b40[13] Client Error", msg):
            raise AccessDeniedError(f"data.source: {display}: access refused ({msg}); accept the dataset's "
                                    "terms on the hub and set HF_TOKEN") from None
        if etype in ("DatasetNotFoundError", "FileNotFoundError", "RepositoryNotFoundError",
                     "EntryNotFoundError", "RevisionNotFoundError"):
            raise NotFoundError(f"data.source: {display}: dataset not found ({msg}); check the name, "
                                "data.revision and HF_TOKEN") from None
        if isinstance(e, ConnectionError) or "OfflineModeIsEnabled" in msg or etype in ("LocalEntryNotFoundError",):
            if _hf_offline():
                raise NotFoundError(f"data.source: {display}: not in the local cache and HF_HUB_OFFLINE is set; "
                                    "download it once online or point data.cache_dir at a cache holding "
                                    "it") from None
            raise TransientError(f"data.source: {display}: cannot reach the Hugging Face hub ({msg}); retry "
                                 "later or set HF_HUB_OFFLINE=1 with a filled cache") from None
        if isinstance(e, ValueError):
            key = "data.split" if "split" in msg.lower() else "data.subset" if "config" in msg.lower() else (
                "data.source")
            raise ConfigError(f"{key}: {display}: {msg}") from None
        raise
    if not isinstance(ds, datasets.Dataset):
        raise ConfigError(f"data.split: {display}: name one split, e.g. train or train[:500]")
    return ds


def _hf_revision(name: str, revision: str | None) -> str | None:
    """The commit the hub resolves ``revision`` to (best effort, skipped offline); else ``revision``."""
    if _hf_offline():
        return revision
    try:
        from huggingface_hub import HfApi

        info = HfApi().dataset_info(name, revision=revision, token=os.environ.get("HF_TOKEN") or None,
                                    timeout=10)
        return info.sha or revision
    except Exception as e:  # noqa: BLE001 - lineage detail only; the content hash identifies the data
        log.warning("data.revision_unresolved", dataset=name, error=str(e)[:200])
        return revision


def _hf_records(ds: Any, wanted: list[str]) -> Iterator[Record]:
    ds = ds.select_columns(wanted)
    for start in range(0, len(ds), 1000):
        batch = ds[start:start + 1000]
        for i in range(len(batch[wanted[0]])):
            row = start + i + 1
            yield row, f"row {row}", {c: batch[c][i] for c in wanted}


def _s3_download(uri: str, dest_dir: Path, store_opener: Callable[[str], Any] | None) -> Path:
    rest = uri[len("s3://"):]
    parent, _, key = uri.rpartition("/")
    if "/" not in rest or not key:
        raise ConfigError(f"data.source: {uri}: name one object, s3://bucket/key.jsonl")
    if store_opener is None:
        from registry.store import open_store

        store_opener = open_store
    dest = dest_dir / key
    store_opener(parent).get_file(key, dest)
    return dest


def load_rows(cfg: JobConfig, *, store_opener: Callable[[str], Any] | None = None
              ) -> tuple[list[Row], DatasetIdentity, DataReport]:
    """Read, validate and deduplicate ``cfg.data.source``.

    ``hf://org/name`` goes through ``datasets.load_dataset`` (``data.subset``, ``data.split``,
    ``data.revision``, ``data.cache_dir``, ``HF_TOKEN``, ``HF_HUB_OFFLINE``); ``s3://bucket/key`` is
    downloaded with ``store_opener(parent_uri).get_file(key, dest)`` (default ``registry.store.open_store``)
    into a temporary directory and read as a local file; anything else is a local .json (list), .jsonl,
    .parquet or .csv file, read whole (``data.subset``/``data.split`` apply to hub datasets only).

    Raises DataError (exit 3) for bad data, NotFoundError (exit 4) for a missing file or dataset,
    ConfigError (exit 2) for an unusable source or split, AccessDeniedError/TransientError from the hub.
    """
    d = cfg.data
    source = d.source
    wanted = [getattr(d.columns, f) for f in FIELDS]
    started = time.monotonic()
    revision, subset, split = None, None, None
    location = parse_uri(source)
    if location.scheme == "hf":
        name = location.path.strip("/")
        if name.count("/") != 1:
            raise ConfigError(f"data.source: {source}: write hf://org/name")
        display = f"{source} ({d.subset or 'default'}, {d.split})"
        ds = _load_hf_dataset(name, cfg, display)
        check_columns(display, list(ds.column_names), wanted)
        rows, read, dups, sha = collect(_hf_records(ds, wanted), display, d.columns)
        revision, subset, split = _hf_revision(name, d.revision), d.subset, d.split
    elif location.scheme == "s3":
        with tempfile.TemporaryDirectory(prefix="medft-data-") as tmp:
            path = _s3_download(source, Path(tmp), store_opener)
            rows, read, dups, sha = collect(file_records(path, source, wanted), source, d.columns)
    elif not location.is_local:
        raise ConfigError(f"data.source: {source}: unsupported scheme; use hf://org/name, s3://bucket/key or a "
                          "local file")
    else:
        path = location.local_path()
        rows, read, dups, sha = collect(file_records(path, source, wanted), source, d.columns)
    identity = DatasetIdentity(source=source, revision=revision, subset=subset, split=split, rows=len(rows),
                               content_sha256=sha)
    report = DataReport(source=source, rows_read=read, rows_kept=len(rows), content_sha256=sha)
    report.dropped["duplicate"] = dups
    log.info("data.loaded", source=source, rows_read=read, rows=len(rows), duplicates=dups,
             content_sha256=sha, seconds=round(time.monotonic() - started, 2))
    return rows, identity, report


def used_identity(identity: DatasetIdentity, prepared: PreparedData) -> DatasetIdentity:
    """``identity`` narrowed to the rows ``prepare`` kept (train and eval), hashed as ``load_rows`` hashes.

    The loaded count and hash stay beside it, so an auditor can tie the used rows to the source file.
    """
    content = hashlib.sha256()
    for row in prepared.used_rows:
        content.update(canonical(row) + b"\n")
    return dataclasses.replace(identity, rows=len(prepared.used_rows), content_sha256=content.hexdigest(),
                               loaded_rows=identity.rows, loaded_sha256=identity.content_sha256)
