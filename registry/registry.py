"""A model registry that needs no server: JSON records in a store, written create-only.

Layout under the registry URI (by default ``<store>/registry``)::

    models/<name>/versions/<n>.json    one immutable record per version, created with put_if_absent
    models/<name>/aliases.json         {"aliases": {alias: version}}, moved with compare-and-swap

A version record never changes after it is created, except two lists appended to with compare-and-swap:
``pushes`` (where the version was shared on the Hugging Face Hub, :meth:`Registry.record_push`) and
``evaluations`` (benchmark scores taken after registration, :meth:`Registry.record_evaluation`).
The record's type, :class:`~registry.versions.ModelVersion`, lives in :mod:`registry.versions`.

Concurrent registrations of one name each try ``max + 1`` create-only and, on losing, the next number, so
they get distinct versions 1, 2, 3... with no gaps or duplicates. ``latest`` is implicit: the highest
version. References: ``NAME`` (latest), ``NAME:VERSION``, ``NAME@ALIAS``.

Records are modelled on MLflow's ``ModelVersion`` (name, version, creation time, source run, description,
tags, aliases), plus what a fine-tune needs for lineage: the artifacts with every file's sha256, the base
model, the dataset, the resolved config, metrics and the environment.
"""

from __future__ import annotations

import json
import random
import re
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

from registry.errors import ConfigError, ConflictError, DataError, NotFoundError
from registry.names import ARTIFACTS, DEFAULT_STORE, NAME, NAME_RE
from registry.records import EvaluationRecord, dump
from registry.runs import MANIFEST, manifest_record, now_iso, read_manifest, run_store, verify_run
from registry.store import BucketNotFound, PreconditionFailed, Store, check_local_dir, open_store
from registry.versions import FORMAT, HubPush, ModelVersion

_REF_RE = re.compile(rf"^(?P<name>{NAME})(?::(?P<version>[0-9]+)|@(?P<alias>{NAME}))?$")
_VERSION_FILE = re.compile(r"^([1-9][0-9]*)\.json$")
_CAS_ATTEMPTS = 200
_REGISTER_ATTEMPTS = 10_000


def check_name(name: str, what: str = "model name") -> str:
    if not isinstance(name, str) or not NAME_RE.match(name) or ".." in name:
        raise ConfigError(f"invalid {what} {name!r}: use 1-128 letters, digits, '.', '_' or '-', starting "
                          f"with a letter or digit")
    return name


def check_alias(alias: str) -> str:
    check_name(alias, "alias")
    if alias == "latest" or alias.isdigit() or re.fullmatch(r"v[0-9]+", alias):
        raise ConfigError(f"alias {alias!r} is reserved ('latest' is always the highest version; aliases "
                          f"must not look like version numbers)")
    return alias


def parse_ref(ref: str) -> tuple[str, int | None, str | None]:
    """``NAME`` | ``NAME:VERSION`` | ``NAME@ALIAS`` -> (name, version, alias); NotFoundError if malformed."""
    if not isinstance(ref, str) or "/" in ref or "\\" in ref or ".." in ref:
        raise NotFoundError(f"no model version matches ref {ref!r}: refs are NAME, NAME:VERSION or NAME@ALIAS "
                            f"(no '/', '\\' or '..')")
    m = _REF_RE.match(ref.strip())
    if not m or (m["version"] is not None and int(m["version"]) < 1):
        raise NotFoundError(f"no model version matches ref {ref!r}: refs are NAME, NAME:VERSION or NAME@ALIAS")
    return m["name"], int(m["version"]) if m["version"] else None, m["alias"]


def current_user() -> str | None:
    """Who is running this (who forced an alias move, who recorded an evaluation), as the operating system
    names them (best effort)."""
    import getpass

    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return None


def _jitter(attempt: int) -> None:
    time.sleep(random.uniform(0, min(0.5, 0.005 * 2 ** min(attempt, 10))))


class Registry:
    """Model versions and aliases in a store; see the module docstring for the layout."""

    def __init__(self, store: Store) -> None:
        self.store = store

    @classmethod
    def open(cls, uri: str) -> Registry:
        return cls(open_store(uri))

    @classmethod
    def at(cls, store: str | Store | None, registry: str | None) -> Registry:
        """The registry at the URI ``registry``, else under ``<store>/registry`` (``store`` a URI, defaulting
        to ``./medft-store``, or a store already open): what ``--store`` and ``--registry`` name on every
        command."""
        if registry:
            return cls.open(registry)
        opened = open_store(store or DEFAULT_STORE) if store is None or isinstance(store, str) else store
        return cls(opened.child("registry"))

    @property
    def uri(self) -> str:
        return self.store.uri

    def __repr__(self) -> str:
        return f"Registry({self.uri!r})"

    # keys ------------------------------------------------------------------------------------------
    @staticmethod
    def _version_key(name: str, version: int) -> str:
        return f"models/{name}/versions/{version}.json"

    @staticmethod
    def _aliases_key(name: str) -> str:
        return f"models/{name}/aliases.json"

    def _versions(self, name: str) -> list[int]:
        out = []
        for key in self.store.list(f"models/{name}/versions"):
            m = _VERSION_FILE.match(key.rsplit("/", 1)[-1])
            if m:
                out.append(int(m[1]))
        return sorted(out)

    def names(self) -> list[str]:
        names = set()
        for key in self.store.list("models"):
            parts = key.split("/")
            if len(parts) == 4 and parts[2] == "versions" and _VERSION_FILE.match(parts[3]):
                names.add(parts[1])
        return sorted(names)

    def _aliases(self, name: str) -> tuple[dict[str, int], str | None]:
        aliases, _, etag = self._alias_doc(name)
        return aliases, etag

    def _alias_doc(self, name: str) -> tuple[dict[str, int], list[dict[str, Any]], str | None]:
        """(aliases, gate overrides recorded so far, etag) of ``aliases.json``; empty and None when absent."""
        key = self._aliases_key(name)
        try:
            data, etag = self.store.get_bytes(key)
        except BucketNotFound:
            raise
        except NotFoundError:
            return {}, [], None
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict):
                raise ValueError("not a JSON object")
            aliases = doc["aliases"]
            if not isinstance(aliases, dict) or not all(isinstance(v, int) for v in aliases.values()):
                raise ValueError("'aliases' must map alias -> integer version")
            overrides = doc.get("gate_overrides") or []
            if not isinstance(overrides, list) or not all(isinstance(o, dict) for o in overrides):
                raise ValueError("'gate_overrides' must be a list of objects")
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{self.store.url(key)} is corrupt ({e}); fix it by hand (deleting it drops every alias "
                            f"of {name} and its record of forced moves)") from None
        return dict(aliases), list(overrides), etag

    def gate_overrides(self, name: str) -> list[dict[str, Any]]:
        """Every alias move forced past the benchmark gate (``--force``), oldest first."""
        return self._alias_doc(check_name(name))[1]

    def _read_doc(self, name: str, version: int) -> tuple[dict[str, Any], str | None, str]:
        """The version record as stored: (its JSON, its etag, its URL). NotFoundError when there is none,
        DataError when it is not JSON."""
        key = self._version_key(name, version)
        try:
            data, etag = self.store.get_bytes(key)
        except BucketNotFound:
            raise
        except NotFoundError:
            raise NotFoundError(f"model version {name}:{version} not found in registry {self.uri}") from None
        where = self.store.url(key)
        try:
            return json.loads(data), etag, where
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{where} is not valid JSON ({e}); the registry record is corrupt") from None

    def _read(self, name: str, version: int, aliases: dict[str, int] | None = None) -> ModelVersion:
        doc, _, where = self._read_doc(name, version)
        if aliases is None:
            aliases, _ = self._aliases(name)
        mv = ModelVersion.from_dict(doc, source=where, aliases=[a for a, v in aliases.items() if v == version])
        if mv.name != name or mv.version != version:
            raise DataError(f"{where} says it is {mv.name}:{mv.version}; the registry record is misplaced")
        return mv

    # reads -----------------------------------------------------------------------------------------
    def get(self, ref: str) -> ModelVersion:
        name, version, alias = parse_ref(ref)
        aliases, _ = self._aliases(name)
        if alias is not None and alias != "latest":
            if alias not in aliases:
                raise NotFoundError(f"model ref {ref!r} not found: {name} has no alias {alias!r} in registry "
                                    f"{self.uri}" + (f" (aliases: {', '.join(sorted(aliases))})" if aliases else ""))
            version = aliases[alias]
        if version is None:
            versions = self._versions(name)
            if not versions:
                raise NotFoundError(f"model ref {ref!r} not found: no model named {name!r} in registry {self.uri}")
            version = versions[-1]
        try:
            return self._read(name, version, aliases)
        except NotFoundError as e:
            if isinstance(e, BucketNotFound):
                raise
            raise NotFoundError(f"model ref {ref!r} not found: no version {version} of {name!r} in registry "
                                f"{self.uri}") from None

    def list(self, name: str | None = None) -> list[ModelVersion]:
        """Every version (of ``name``, or of every model), in order; DataError for the first corrupt record."""
        versions, corrupt = self.scan(name)
        if corrupt:
            raise corrupt[0]
        return versions

    def scan(self, name: str | None = None) -> tuple[list[ModelVersion], list[DataError]]:
        """Every readable version (of ``name``, or of every model), in order, and the DataError of each record
        that is corrupt (a model whose aliases.json is corrupt counts once, its versions left out): one bad
        record does not hide the rest of a shared registry."""
        names = [check_name(name)] if name is not None else self.names()
        jobs: list[tuple[str, int, dict[str, int]]] = []
        corrupt: list[DataError] = []
        for n in names:
            try:
                aliases, _ = self._aliases(n)
            except DataError as e:
                corrupt.append(e)
                continue
            jobs += [(n, v, aliases) for v in self._versions(n)]
        if not jobs:
            return [], corrupt

        def read(job: tuple[str, int, dict[str, int]]) -> ModelVersion | DataError:
            try:
                return self._read(*job)
            except DataError as e:
                return e

        with ThreadPoolExecutor(max_workers=min(8, len(jobs))) as ex:
            results = list(ex.map(read, jobs))
        return ([r for r in results if isinstance(r, ModelVersion)],
                corrupt + [r for r in results if isinstance(r, DataError)])

    def find_by_run(self, name: str, run_id: str) -> ModelVersion | None:
        """The first version of ``name`` registered from ``run_id``, if any (lets a job register once)."""
        for mv in self.list(check_name(name)):
            if mv.run_id == run_id:
                return mv
        return None

    def artifact_uri(self, ref: str, artifact: str = "merged") -> str:
        """The URI of ``ref``'s ``artifact`` (``medft registry resolve``); NotFoundError when it has none."""
        return self._artifact(self.get(ref), artifact)["uri"]

    def _artifact(self, mv: ModelVersion, artifact: str) -> dict[str, Any]:
        if artifact not in mv.artifacts:
            has = ", ".join(sorted(mv.artifacts)) or "none"
            raise NotFoundError(f"model version {mv.ref} has no {artifact!r} artifact (it has: {has})")
        return mv.artifacts[artifact]

    def download(self, ref: str, dest: str | Path, artifact: str = "merged") -> Path:
        """Fetch an artifact's files into ``dest``, each verified against its recorded sha256.

        Raises ConfigError when ``dest`` is (or lies under) a file, DataError when a file fails its sha256;
        a failed download leaves none of its files behind.
        """
        dest = Path(dest)
        check_local_dir(dest, "download destination")
        mv = self.get(ref)
        art = self._artifact(mv, artifact)
        src = open_store(art["uri"], transfer=self.store.transfer)
        src.get_dir("", dest, expected=art["files"])  # all or nothing: a failure removes what it wrote
        return dest

    # writes ----------------------------------------------------------------------------------------
    def register(self, name: str, run_uri: str, *, aliases: Iterable[str] = (), tags: dict[str, str] | None = None,
                 description: str | None = None, store: Store | None = None) -> ModelVersion:
        """Create the next version of ``name`` from a published run (its folder URI, or an id in ``store``).

        Refuses a run without MANIFEST.json (NotFoundError, exit 4) or with a bad one (DataError, exit 3).
        Never overwrites a version.
        """
        check_name(name)
        aliases = [check_alias(a) for a in aliases]
        tags = {str(k): str(v) for k, v in (tags or {}).items()}
        manifest = read_manifest(store, run_uri)
        rs, _ = run_store(store, run_uri)
        verify_run(store, run_uri, manifest=manifest)
        artifacts = artifacts_from_manifest(manifest, rs.uri, rs.url(MANIFEST))
        record = manifest_record(manifest, rs.url(MANIFEST))
        base = {
            "name": name, "created_at": now_iso(), "run_id": manifest["run_id"], "run_uri": rs.uri,
            "artifacts": artifacts, "base_model": dump(record.base_model_lineage),
            "dataset": dump(record.dataset_lineage), "config": record.config, "metrics": dump(record.metrics),
            "environment": record.environment, "tags": tags, "description": description,
        }
        versions = self._versions(name)
        version = (versions[-1] if versions else 0) + 1
        for attempt in range(_REGISTER_ATTEMPTS):
            mv = ModelVersion.from_dict({**base, "version": version}, source="new record")
            data = (json.dumps(mv.to_dict(with_aliases=False), indent=2) + "\n").encode()
            try:
                self.store.put_bytes(self._version_key(name, version), data, if_absent=True)
                break
            except PreconditionFailed:
                version += 1  # someone took it; every number below is taken too, so no gaps
                if attempt % 8 == 7:
                    _jitter(attempt // 8)
        else:
            raise ConflictError(f"could not register {name}: {_REGISTER_ATTEMPTS} versions taken in a row; retry")
        for alias in aliases:
            self.set_alias(name, version, alias)
        return self.get(f"{name}:{version}")

    def _cas_aliases(self, name: str, change: Callable[[dict[str, int]], tuple[dict[str, int], dict[str, Any] | None]]
                     ) -> dict[str, int]:
        """Apply ``change`` to the current aliases and write the result with compare-and-swap, re-reading and
        re-applying it when a concurrent update won. ``change`` returns the new aliases and, for a move forced
        past the gate, the override to record beside them (in the same write)."""
        key = self._aliases_key(name)
        for attempt in range(_CAS_ATTEMPTS):
            current, overrides, etag = self._alias_doc(name)
            new, override = change(dict(current))
            doc: dict[str, Any] = {"format": FORMAT, "name": name, "aliases": dict(sorted(new.items())),
                                   "updated_at": now_iso()}
            if overrides or override:
                doc["gate_overrides"] = [*overrides, *([override] if override else [])]
            data = (json.dumps(doc, indent=2) + "\n").encode()
            try:
                if etag is None:
                    self.store.put_bytes(key, data, if_absent=True)
                else:
                    self.store.put_bytes(key, data, if_match=etag)
                return new
            except PreconditionFailed:
                _jitter(attempt)  # a concurrent update won: re-read and apply ours on top of it
        raise ConflictError(f"could not update aliases of {name}: {_CAS_ATTEMPTS} concurrent updates won; retry")

    def set_alias(self, name: str, version: int, alias: str, *, require: Sequence[str] = (),
                  force: bool = False) -> ModelVersion:
        """Point ``name@alias`` at ``version`` (compare-and-swap, retried on a concurrent update).

        ``require``: benchmark names gating the move (:func:`registry.compare.gate_refusal`; an empty or unknown
        name is a ConfigError): refused with
        ConfigError (exit 2, nothing written) when ``version`` has no score on one, or scores lower than the
        version the alias points at when the swap is made (checked again on every CAS attempt, so a concurrent
        move is gated too). ``force`` moves it anyway and records the override, with the refusal it overrode,
        in ``aliases.json`` (``gate_overrides``) in the same write.
        """
        from registry.compare import gate_refusal, required_benchmarks

        check_name(name)
        check_alias(alias)
        version = int(version)
        if version < 1 or not self.store.exists(self._version_key(name, version)):
            raise NotFoundError(f"model version {name}:{version} not found in registry {self.uri}")
        require = required_benchmarks(require)

        def change(aliases: dict[str, int]) -> tuple[dict[str, int], dict[str, Any] | None]:
            override = None
            if require:  # both records read again on every attempt: an evaluation may have been appended
                candidate = self._read(name, version, {})
                previous = aliases.get(alias)
                current = self._read(name, previous, {}) if previous is not None and previous != version else None
                refusal = gate_refusal(candidate, current, require, alias, self.uri)
                if refusal is not None and not force:
                    raise ConfigError(f"refused to move {name}@{alias}: {refusal}; or pass --force to move it "
                                      "anyway; nothing changed")
                if refusal is not None:
                    override = {"alias": alias, "version": version, "previous": previous, "require": list(require),
                                "refusal": refusal, "at": now_iso(), "by": current_user()}
            aliases[alias] = version
            return aliases, override

        self._cas_aliases(name, change)
        return self.get(f"{name}:{version}")

    def record_push(self, name: str, version: int, push: HubPush) -> ModelVersion:
        """Append ``push`` to the ``pushes`` of ``name:version``; see :meth:`_append`."""
        return self._append(name, version, "pushes", asdict(push))

    def record_evaluation(self, name: str, version: int, evaluation: EvaluationRecord) -> ModelVersion:
        """Append ``evaluation`` to the ``evaluations`` of ``name:version``; see :meth:`_append`."""
        return self._append(name, version, "evaluations", dump(evaluation))

    def _append(self, name: str, version: int, field: str, entry: dict[str, Any]) -> ModelVersion:
        """Append ``entry`` to the list ``field`` of the record of ``name:version`` with compare-and-swap,
        re-read and retried on a concurrent update; every other field is written back as read. Returns the
        version as stored then. NotFoundError when the version is gone, DataError when its record is corrupt
        (it is not extended), ConflictError after too many concurrent updates."""
        key = self._version_key(check_name(name), int(version))
        for attempt in range(_CAS_ATTEMPTS):
            doc, etag, where = self._read_doc(name, int(version))
            ModelVersion.from_dict(doc, source=where)
            doc[field] = [*(doc.get(field) or []), entry]
            try:
                self.store.put_bytes(key, (json.dumps(doc, indent=2) + "\n").encode(), if_match=etag)
                return self.get(f"{name}:{version}")
            except PreconditionFailed:
                _jitter(attempt)  # another update landed first: re-read and append ours after it
        raise ConflictError(f"could not update {field} of {name}:{version}: {_CAS_ATTEMPTS} concurrent updates "
                            f"won; retry")

    def delete_alias(self, name: str, alias: str) -> None:
        check_name(name)
        check_name(alias, "alias")

        def change(aliases: dict[str, int]) -> tuple[dict[str, int], None]:
            if alias not in aliases:
                raise NotFoundError(f"model ref '{name}@{alias}' not found: no such alias in registry {self.uri}")
            del aliases[alias]
            return aliases, None

        self._cas_aliases(name, change)


def artifacts_from_manifest(manifest: dict[str, Any], run_uri: str, where: str) -> dict[str, dict[str, Any]]:
    files: dict[str, dict[str, Any]] = manifest["files"]
    declared = manifest.get("artifacts")
    if declared is None:
        declared = {a: a for a in ARTIFACTS if any(rel.startswith(a + "/") for rel in files)}
    if not isinstance(declared, dict):
        raise DataError(f"{where}: field 'artifacts' must map artifact name -> folder")
    out: dict[str, dict[str, Any]] = {}
    for art, folder in declared.items():
        if folder is None:
            continue
        folder = str(folder).strip("/")
        inside = {rel[len(folder) + 1:]: meta["sha256"] for rel, meta in sorted(files.items())
                  if rel.startswith(folder + "/")}
        if not inside:
            raise DataError(f"{where} declares artifact {art!r} in {folder}/ but lists no files there")
        out[art] = {"uri": f"{run_uri}/{folder}", "files": inside}
    if not out:
        raise DataError(f"{where} lists no artifact (adapter/, merged/ or gguf/); nothing to register")
    return out
