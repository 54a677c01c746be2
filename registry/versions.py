"""A registered model version as stored: :class:`ModelVersion` (one ``models/<name>/versions/<n>.json``) and
the entries appended to it later, :class:`HubPush` (``pushes``) and
:class:`~registry.records.EvaluationRecord` (``evaluations``). Everything read here is checked (DataError,
exit 3, naming the record and the field): a record in storage can claim anything.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from registry.errors import DataError
from registry.records import EvaluationRecord, RunRecord, dump, parse_record

FORMAT = 1
_REQUIRED = ("name", "version", "created_at", "run_id", "run_uri", "artifacts")


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: int
    created_at: str
    run_id: str
    run_uri: str
    artifacts: dict[str, dict[str, Any]]
    """``{"adapter"|"merged": {"uri": ..., "files": {relpath: sha256}}}``."""
    base_model: dict[str, Any] = field(default_factory=dict)
    """uri, revision, sha256 of its weight files."""
    dataset: dict[str, Any] = field(default_factory=dict)
    """source, subset, split, row count, content hash."""
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    """Live view from aliases.json; not stored in the version record."""
    description: str | None = None
    pushes: tuple[HubPush, ...] = ()
    """Where this version was shared on the Hub, oldest first (records older than pushes have none)."""
    evaluations: tuple[EvaluationRecord, ...] = ()
    """Benchmark scores recorded after registration (``medft eval REF --record``), oldest first."""
    alias_refusals: tuple[dict[str, Any], ...] = ()
    """Protected aliases this version was to take at registration and the gate refused (alias, stays_at,
    require, refusal, at, via), oldest first."""
    archived: bool = False
    """Live view from aliases.json (``registry archive``); not stored in the version record."""

    @property
    def ref(self) -> str:
        """``NAME:VERSION``; ``NAME@base`` for a base model's recorded scores (version 0, registry/base_scores.py)."""
        return f"{self.name}@base" if self.version == 0 else f"{self.name}:{self.version}"

    def run_record(self) -> RunRecord:
        """The run's record as registered: lineage, metrics, config and environment, typed.

        The record was checked when this version was read (:meth:`from_dict`); DataError if it was not.
        """
        return _run_record(asdict(self), self.ref)

    def to_dict(self, *, with_aliases: bool = True) -> dict[str, Any]:
        d = asdict(self)
        d["aliases"] = list(self.aliases)
        d["pushes"] = [asdict(p) for p in self.pushes]
        d["evaluations"] = [dump(e) for e in self.evaluations]
        d["alias_refusals"] = list(self.alias_refusals)
        if not with_aliases:
            del d["aliases"], d["archived"]
        return {"format": FORMAT, **d}

    @classmethod
    def from_dict(cls, d: Any, *, source: str = "record", aliases: Iterable[str] | None = None,
                  archived: bool = False) -> ModelVersion:
        if not isinstance(d, dict):
            raise DataError(f"{source} is not a JSON object; the registry record is corrupt")
        for name in _REQUIRED:
            if name not in d:
                raise DataError(f"{source} lacks the required field {name!r}; the registry record is corrupt")
        if not isinstance(d["version"], int) or isinstance(d["version"], bool) or d["version"] < 1:
            raise DataError(f"{source}: field 'version' must be a positive integer, got {d['version']!r}")
        if not isinstance(d["artifacts"], dict):
            raise DataError(f"{source}: field 'artifacts' must be an object")
        for art, spec in d["artifacts"].items():
            if (not isinstance(spec, dict) or not isinstance(spec.get("uri"), str)
                    or not isinstance(spec.get("files"), dict)):
                raise DataError(f"{source}: artifact {art!r} needs a 'uri' and a 'files' object")
            for rel, sha in spec["files"].items():
                if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
                    raise DataError(f"{source}: artifact {art!r} file {rel!r} needs a hex sha256, got {sha!r}")
        for name in ("base_model", "dataset", "config", "metrics", "environment", "tags"):
            if d.get(name) is not None and not isinstance(d[name], dict):
                raise DataError(f"{source}: field {name!r} must be an object")
        _run_record(d, source)  # the fields copied from the run's record have their types
        if not isinstance(d.get("pushes") or [], list):
            raise DataError(f"{source}: field 'pushes' must be a list")
        refusals = d.get("alias_refusals") or []
        if not isinstance(refusals, list) or not all(isinstance(r, dict) for r in refusals):
            raise DataError(f"{source}: field 'alias_refusals' must be a list of objects")
        evaluations = d.get("evaluations") or []
        if not isinstance(evaluations, list):
            raise DataError(f"{source}: field 'evaluations' must be a list")
        return cls(
            name=str(d["name"]), version=d["version"], created_at=str(d["created_at"]), run_id=str(d["run_id"]),
            run_uri=str(d["run_uri"]), artifacts=d["artifacts"], base_model=d.get("base_model") or {},
            dataset=d.get("dataset") or {}, config=d.get("config") or {}, metrics=d.get("metrics") or {},
            environment=d.get("environment") or {}, tags=d.get("tags") or {},
            aliases=tuple(sorted(aliases if aliases is not None else (d.get("aliases") or ()))),
            description=d.get("description"),
            pushes=tuple(HubPush.from_dict(p, source) for p in d.get("pushes") or []),
            evaluations=tuple(parse_record(EvaluationRecord, e, f"{source}: evaluations[{i}]",
                                           "the registry record is corrupt") for i, e in enumerate(evaluations)),
            alias_refusals=tuple(refusals), archived=archived,
        )


_PUSH_FIELDS = ("repo", "revision", "commit", "url", "artifact", "pushed_at")


@dataclass(frozen=True)
class HubPush:
    """One ``medft registry push`` of a version's artifact to a Hugging Face Hub repo (see registry/push.py)."""

    repo: str
    """``org/name`` on the Hub."""
    revision: str
    """The branch the commit went to."""
    commit: str
    """The commit's 40-hex sha on that branch."""
    url: str
    artifact: str
    pushed_at: str

    @classmethod
    def from_dict(cls, d: Any, source: str) -> HubPush:
        if not isinstance(d, dict) or not all(isinstance(d.get(k), str) for k in _PUSH_FIELDS):
            raise DataError(f"{source}: each entry of 'pushes' needs the strings {', '.join(_PUSH_FIELDS)}")
        if not re.fullmatch(r"[0-9a-f]{40}", d["commit"]):
            raise DataError(f"{source}: push commit must be a 40-hex sha, got {d['commit']!r}")
        return cls(**{k: d[k] for k in _PUSH_FIELDS})


def _run_record(d: dict[str, Any], source: str) -> RunRecord:
    """The run record inside a registry record ``d`` (its lineage is flattened into base_model, dataset)."""
    return parse_record(RunRecord, {
        "lineage": {"base_model": d.get("base_model"), "dataset": d.get("dataset")},
        "metrics": d.get("metrics"), "config": d.get("config"), "environment": d.get("environment"),
    }, source, "the registry record is corrupt")
