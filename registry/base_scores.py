"""A base model's benchmark scores recorded under a model name (``medft eval --base URI --record-as NAME``),
so ``registry compare NAME@base NAME:3`` and ``registry show NAME@base`` put the base beside its fine-tunes.

Stored in ``models/<name>/base.json``: the base model (uri, revision) and its evaluations, oldest first,
appended with compare-and-swap. Read back as a :class:`~registry.versions.ModelVersion` numbered 0 (ref
``NAME@base``) with no run and no artifacts.
"""

from __future__ import annotations

import json
import time
from typing import Any

from registry.errors import ConfigError, ConflictError, DataError, NotFoundError
from registry.names import check_name
from registry.records import EvaluationRecord, dump, parse_record
from registry.store import BucketNotFound, PreconditionFailed, Store
from registry.versions import ModelVersion

ALIAS = "base"


def _key(name: str) -> str:
    return f"models/{name}/base.json"


def _read(store: Store, name: str) -> tuple[dict[str, Any] | None, str | None]:
    key = _key(name)
    try:
        data, etag = store.get_bytes(key)
    except BucketNotFound:
        raise
    except NotFoundError:
        return None, None
    try:
        doc = json.loads(data)
        if not isinstance(doc, dict) or not isinstance(doc.get("base_model"), dict) \
                or not isinstance(doc["base_model"].get("uri"), str) or not isinstance(doc.get("evaluations"), list):
            raise ValueError("needs 'base_model' {uri, revision} and a list 'evaluations'")
    except ValueError as e:
        raise DataError(f"{store.url(key)} is corrupt ({e}); fix it by hand (it holds only {name}@base's scores)") from None
    return doc, etag


def base_version(store: Store, name: str) -> ModelVersion:
    """``NAME@base``; NotFoundError when no base scores are recorded under ``name``."""
    doc, _ = _read(store, check_name(name))
    if doc is None:
        raise NotFoundError(f"model ref '{name}@base' not found: no base model scores recorded under {name} (record "
                            f"them with `medft eval --base URI --record-as {name}`)")
    where = store.url(_key(name))
    evaluations = tuple(parse_record(EvaluationRecord, e, f"{where}: evaluations[{i}]", "the record is corrupt")
                        for i, e in enumerate(doc["evaluations"]))
    return ModelVersion(name=name, version=0, created_at=str(doc.get("created_at") or ""), run_id="", run_uri="",
                        artifacts={}, base_model=dict(doc["base_model"]), evaluations=evaluations)


def check_same_base(store: Store, name: str, uri: str, revision: str | None) -> None:
    """ConfigError (exit 2) when ``NAME@base`` already holds another base model, or the same at another revision:
    a name compares a model with one base. Called before any scoring, and again inside the write."""
    doc, _ = _read(store, check_name(name))
    if doc is not None:
        _same_base(doc, name, uri, revision)


def _same_base(doc: dict[str, Any], name: str, uri: str, revision: str | None) -> None:
    held = doc["base_model"]
    if held.get("uri") != uri or held.get("revision") != revision:
        at = f" at {held.get('revision')}" if held.get("revision") else ""
        raise ConfigError(f"{name}@base holds the scores of {held.get('uri')}{at}, not {uri}"
                          f"{f' at {revision}' if revision else ''}; record these under another name (--record-as)")


def record_base_evaluation(store: Store, name: str, uri: str, revision: str | None,
                           evaluation: EvaluationRecord) -> ModelVersion:
    """Append ``evaluation`` of the base model ``uri`` (at ``revision``) to ``NAME@base`` (compare-and-swap).

    ConfigError (exit 2) when ``NAME@base`` holds another base model (:func:`check_same_base`).
    """
    from registry.runs import now_iso

    check_name(name)
    for _ in range(200):
        doc, etag = _read(store, name)
        if doc is None:
            doc = {"format": 1, "name": name, "created_at": now_iso(), "base_model": {"uri": uri, "revision": revision},
                   "evaluations": []}
        else:
            _same_base(doc, name, uri, revision)
        doc["evaluations"] = [*doc["evaluations"], dump(evaluation)]
        data = (json.dumps(doc, indent=2) + "\n").encode()
        try:
            if etag is None:
                store.put_bytes(_key(name), data, if_absent=True)
            else:
                store.put_bytes(_key(name), data, if_match=etag)
            return base_version(store, name)
        except PreconditionFailed:
            time.sleep(0.02)
    raise ConflictError(f"could not record {name}@base's scores: too many concurrent updates; retry")
