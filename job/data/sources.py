"""Where rows come from: ``data.source`` as a hub dataset (``hf://``), a ModelScope dataset (``ms://``), an S3
object (``s3://``) or a local file, read into validated rows by :func:`load_rows`; and the dataset's identity for
lineage (:class:`DatasetIdentity`, narrowed to the rows actually trained on by :func:`used_identity`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from job.config import JobConfig
from job.data.readers import file_records
from job.data.results import FIELDS, DataReport, DatasetIdentity, PreparedData, Row
from job.data.rows import Record, canonical, check_columns, collect
from job.hub import HubKeys, hf_revision, load_hub_dataset
from registry.errors import ConfigError
from registry.logs import get_logger
from registry.uris import parse_uri

log = get_logger(__name__)


_DATA_HUB_KEYS = HubKeys(split="data.split", config="data.subset", dataset="data.source",
                         not_found_hint="check the name, data.revision and HF_TOKEN",
                         offline_hint="download it once online or point data.cache_dir at a cache holding it")


def _load_hf_dataset(name: str, cfg: JobConfig, display: str) -> Any:
    """``data.source``'s hub dataset, one split, its failures mapped onto medft's exit codes."""
    import datasets

    d = cfg.data
    ds = load_hub_dataset(name, d.subset, d.split, revision=d.revision, cache_dir=d.cache_dir,
                          display=f"data.source: {display}", keys=_DATA_HUB_KEYS)
    if not isinstance(ds, datasets.Dataset):
        raise ConfigError(f"data.split: {display}: name one split, e.g. train or train[:500]")
    return ds


def _load_ms_dataset(cfg: JobConfig, display: str) -> Any:
    """An ``ms://`` dataset repository, downloaded by :func:`job.modelscope.snapshot` and read by
    ``datasets.load_dataset`` from that folder: its card's ``configs`` (``data.subset``) and ``data.split`` as on
    the hub, with datasets' packaged readers only (code files and pickles are not even downloaded)."""
    import datasets

    from job import modelscope
    from job.weights import PICKLE_SUFFIXES

    d = cfg.data
    path = modelscope.snapshot(d.source, d.revision, repo_type="dataset", what="data.source",
                               ignore=("*.py", *(f"*{suffix}" for suffix in PICKLE_SUFFIXES)))
    try:
        ds = datasets.load_dataset(str(path), d.subset, split=d.split, cache_dir=d.cache_dir)
    except (ValueError, FileNotFoundError) as e:
        msg = " ".join(str(e).split())[:300]
        key = "data.split" if "split" in msg.lower() else "data.subset" if "config" in msg.lower() else "data.source"
        raise ConfigError(f"{key}: {display}: {msg}") from None
    if not isinstance(ds, datasets.Dataset):
        raise ConfigError(f"data.split: {display}: name one split, e.g. train or train[:500]")
    return ds


def _hf_records(ds: Any, wanted: list[str]) -> Iterator[Record]:
    ds = ds.select_columns(wanted)
    for start in range(0, len(ds), 1000):
        batch = ds[start:start + 1000]
        for i in range(len(batch[wanted[0]])):
            row = start + i + 1
            yield row, f"row {row}", {c: batch[c][i] for c in wanted}


def _s3_download(uri: str, dest_dir: Path, store_opener: Callable[[str], Any] | None) -> Path:
    parent, _, key = uri.rpartition("/")
    if not parse_uri(uri).tail or not key:
        raise ConfigError(f"data.source: {uri}: name one object, s3://bucket/key.jsonl")
    if store_opener is None:
        from registry.store import open_store

        store_opener = open_store
    dest = dest_dir / key
    store_opener(parent).get_file(key, dest)
    return dest


def check_source(cfg: JobConfig) -> None:
    """Refuse a local ``data.source`` that :func:`load_rows` would refuse, without reading a row: a missing file
    (NotFoundError, exit 4; relative paths are from the current directory), a folder (DataError, exit 3) or an
    unknown file type (ConfigError, exit 2). Remote sources are checked when they are read."""
    location = parse_uri(cfg.data.source)
    if location.is_local:
        file_records(location.local_path(), cfg.data.source, [getattr(cfg.data.columns, f) for f in FIELDS])


def load_rows(cfg: JobConfig, *, store_opener: Callable[[str], Any] | None = None
              ) -> tuple[list[Row], DatasetIdentity, DataReport]:
    """Read, validate and deduplicate ``cfg.data.source``.

    ``hf://org/name`` goes through ``datasets.load_dataset`` (``data.subset``, ``data.split``,
    ``data.revision``, ``data.cache_dir``, ``HF_TOKEN``, ``HF_HUB_OFFLINE``); ``ms://owner/name`` is
    downloaded with modelscope (``data.revision``, the variables of :mod:`job.modelscope`) and read the same
    way; ``s3://bucket/key`` is downloaded with ``store_opener(parent_uri).get_file(key, dest)`` (default
    ``registry.store.open_store``) into a temporary directory and read as a local file; anything else is a local
    .json (list), .jsonl, .parquet or .csv file, read whole (``data.subset``/``data.split`` apply to hub datasets only).

    Raises DataError (exit 3) for bad data, NotFoundError (exit 4) for a missing file or dataset,
    ConfigError (exit 2) for an unusable source or split, AccessDeniedError/TransientError from the hub (and
    NotFoundError offline with nothing cached, for ``ms://``).
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
        revision, subset, split = hf_revision(name, d.revision), d.subset, d.split
    elif location.scheme == "ms":
        display = f"{source} ({d.subset or 'default'}, {d.split})"
        ds = _load_ms_dataset(cfg, display)
        check_columns(display, list(ds.column_names), wanted)
        rows, read, dups, sha = collect(_hf_records(ds, wanted), display, d.columns)
        revision, subset, split = d.revision, d.subset, d.split
    elif location.scheme == "s3":
        with tempfile.TemporaryDirectory(prefix="medft-data-") as tmp:
            path = _s3_download(source, Path(tmp), store_opener)
            rows, read, dups, sha = collect(file_records(path, source, wanted), source, d.columns)
    elif not location.is_local:
        raise ConfigError(f"data.source: {source}: unsupported scheme; use hf://org/name, ms://owner/name, "
                          "s3://bucket/key or a local file")
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
