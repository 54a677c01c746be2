"""A model registry that needs no server: JSON records in a store, written create-only.

Layout under the registry URI (by default ``<store>/registry``)::

    models/<name>/versions/<n>.json    one record per version, created with put_if_absent
    models/<name>/aliases.json         the model's state: aliases, protected aliases, archived and deleted
                                       versions, history (registry/model_state.py), moved with compare-and-swap
    models/<name>/history/<n>.json     older history entries (create-only pages)
    models/<name>/base.json            NAME@base: a base model's recorded scores (registry/base_scores.py)
    config.json                        the registry's webhook URLs (registry/webhooks.py)

A version record never changes after it is created, except by compare-and-swap of: two appended lists,
``pushes`` (where the version was shared on the Hugging Face Hub, :meth:`Registry.record_push`) and
``evaluations`` (benchmark scores taken after registration, :meth:`Registry.record_evaluation`), plus
``alias_refusals`` (protected aliases the gate kept from it at registration), and its ``tags`` and
``description`` (:meth:`Registry.set_metadata`). Alias moves, protection, archive and delete are in
:class:`registry.changes.ModelChanges`.
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
import re
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

from registry import base_scores, webhooks
from registry.artifact_checks import StoreFolder, check_artifact_folder
from registry.changes import CAS_ATTEMPTS, ModelChanges, jitter
from registry.errors import ConflictError, DataError, NotFoundError
from registry.logs import get_logger
from registry.model_state import ModelState, current_user  # noqa: F401 - re-exported (job.evals)
from registry.names import ARTIFACTS, DEFAULT_STORE, NAME, check_alias, check_name
from registry.promotion import gated_move
from registry.records import EvaluationRecord, dump
from registry.redact import redact_urls
from registry.runs import MANIFEST, manifest_record, now_iso, read_manifest, run_store, verify_run
from registry.store import BucketNotFound, PreconditionFailed, Store, check_writable_dir, open_store
from registry.versions import HubPush, ModelVersion

log = get_logger(__name__)
_REF_RE = re.compile(rf"^(?P<name>{NAME})(?::(?P<version>[0-9]+)|@(?P<alias>{NAME}))?$")
_VERSION_FILE = re.compile(r"^([1-9][0-9]*)\.json$")
_REGISTER_ATTEMPTS = 10_000


def parse_ref(ref: str) -> tuple[str, int | None, str | None]:
    """``NAME`` | ``NAME:VERSION`` | ``NAME@ALIAS`` -> (name, version, alias); NotFoundError if malformed."""
    if not isinstance(ref, str) or "/" in ref or "\\" in ref or ".." in ref:
        raise NotFoundError(f"no model version matches ref {ref!r}: refs are NAME, NAME:VERSION or NAME@ALIAS "
                            f"(no '/', '\\' or '..')")
    m = _REF_RE.match(ref.strip())
    if not m or (m["version"] is not None and int(m["version"]) < 1):
        raise NotFoundError(f"no model version matches ref {ref!r}: refs are NAME, NAME:VERSION or NAME@ALIAS")
    return m["name"], int(m["version"]) if m["version"] else None, m["alias"]


class Registry(ModelChanges):
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
        state = self.state(name)
        return state.aliases, state.etag

    def state(self, name: str) -> ModelState:
        """The model's ``aliases.json`` (:mod:`registry.model_state`); empty with etag None when absent,
        DataError (exit 3) naming it when it is corrupt."""
        key = self._aliases_key(name)
        try:
            data, etag = self.store.get_bytes(key)
        except BucketNotFound:
            raise
        except NotFoundError:
            return ModelState(name=name, where=self.store.url(key))
        return ModelState.parse(name, data, etag, self.store.url(key))

    def gate_overrides(self, name: str) -> list[dict[str, Any]]:
        """Every alias move forced past the benchmark gate (``--force``), oldest first."""
        return self.state(check_name(name)).gate_overrides

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

    def _read(self, name: str, version: int, state: ModelState | None = None) -> ModelVersion:
        doc, _, where = self._read_doc(name, version)
        if state is None:
            state = self.state(name)
        if version in state.deleted:
            raise NotFoundError(f"model version {name}:{version} was deleted from registry {self.uri}")
        mv = ModelVersion.from_dict(doc, source=where, aliases=[a for a, v in state.aliases.items() if v == version],
                                    archived=version in state.archived)
        if mv.name != name or mv.version != version:
            raise DataError(f"{where} says it is {mv.name}:{mv.version}; the registry record is misplaced")
        return mv

    # reads -----------------------------------------------------------------------------------------
    def get(self, ref: str) -> ModelVersion:
        name, version, alias = parse_ref(ref)
        if alias == base_scores.ALIAS:
            return base_scores.base_version(self.store, name)
        state = self.state(name)
        aliases = state.aliases
        if alias is not None and alias != "latest":
            if alias not in aliases:
                raise NotFoundError(f"model ref {ref!r} not found: {name} has no alias {alias!r} in registry "
                                    f"{self.uri}" + (f" (aliases: {', '.join(sorted(aliases))})" if aliases else ""))
            version = aliases[alias]
        if version is None:
            versions = [v for v in self._versions(name) if v not in state.deleted]
            if not versions:
                raise NotFoundError(f"model ref {ref!r} not found: no model named {name!r} in registry {self.uri}")
            version = versions[-1]
        try:
            return self._read(name, version, state)
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
        jobs: list[tuple[str, int, ModelState]] = []
        corrupt: list[DataError] = []
        for n in names:
            try:
                state = self.state(n)
            except DataError as e:
                corrupt.append(e)
                continue
            jobs += [(n, v, state) for v in self._versions(n) if v not in state.deleted]
        if not jobs:
            return [], corrupt

        def read(job: tuple[str, int, ModelState]) -> ModelVersion | DataError:
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
        check_writable_dir(dest, "download destination")
        mv = self.get(ref)
        art = self._artifact(mv, artifact)
        src = open_store(art["uri"], transfer=self.store.transfer)
        src.get_dir("", dest, expected=art["files"])  # all or nothing: a failure removes what it wrote
        return dest

    # writes ----------------------------------------------------------------------------------------
    def register(self, name: str, run_uri: str, *, aliases: Iterable[str] = (), tags: dict[str, str] | None = None,
                 description: str | None = None, store: Store | None = None, via: str = "register",
                 reason: str | None = None) -> ModelVersion:
        """Create the next version of ``name`` from a published run (its folder URI, or an id in ``store``),
        then, in one compare-and-swap of the model's state, record it in the history and point ``aliases`` at
        it, each through the gate when the alias is protected (:meth:`protect`); then send the events.

        A protected alias the version fails the gate for stays where it was: the refusal is recorded in the
        history (``refused``) and in the version's ``alias_refusals``, and logged; the registration stands.
        Refuses a run without MANIFEST.json (NotFoundError, exit 4) or with a bad one (DataError, exit 3), and
        one whose adapter or merged artifact loading would refuse (:func:`check_loadable`: DataError naming the
        file). Never overwrites a version, nor reuses a deleted one's number.
        """
        check_name(name)
        aliases = [check_alias(a) for a in aliases]
        tags = {str(k): str(v) for k, v in (tags or {}).items()}
        hooks = webhooks.targets(self.store)
        manifest = read_manifest(store, run_uri)
        rs, _ = run_store(store, run_uri)
        verify_run(store, run_uri, manifest=manifest)
        artifacts = artifacts_from_manifest(manifest, rs.uri, rs.url(MANIFEST))
        check_loadable(rs, manifest, artifacts)
        record = manifest_record(manifest, rs.url(MANIFEST))
        base = {
            "name": name, "created_at": now_iso(), "run_id": manifest["run_id"], "run_uri": rs.uri,
            "artifacts": artifacts, "base_model": dump(record.base_model_lineage),
            "dataset": dump(record.dataset_lineage), "config": record.config, "metrics": dump(record.metrics),
            "environment": record.environment, "tags": tags, "description": description,
        }
        base = redact_urls(base)  # a hand-written manifest may quote URLs with credentials: never stored again
        versions = self._versions(name)  # listed before the state is read: a deleted number is in one or the other
        version = max([0, *versions, *self.state(name).deleted]) + 1
        for attempt in range(_REGISTER_ATTEMPTS):
            mv = ModelVersion.from_dict({**base, "version": version}, source="new record")
            data = (json.dumps(mv.to_dict(with_aliases=False), indent=2) + "\n").encode()
            try:
                self.store.put_bytes(self._version_key(name, version), data, if_absent=True)
                break
            except PreconditionFailed:
                version += 1  # someone took it; every number below is taken too, so no gaps
                if attempt % 8 == 7:
                    jitter(attempt // 8)
        else:
            raise ConflictError(f"could not register {name}: {_REGISTER_ATTEMPTS} versions taken in a row; retry")
        refusals: list[dict[str, Any]] = []

        def change(state: ModelState) -> list[dict[str, Any]]:
            refusals.clear()
            entries: list[dict[str, Any]] = [{"action": "register", "after": version, "via": via, "reason": reason}]
            for alias in aliases:
                entry, refusal = gated_move(self, state, name, version, alias, (), force=False, reason=reason, via=via)
                entries += [entry] if entry is not None else []
                if refusal is not None and entry is not None:
                    refusals.append({"alias": alias, "stays_at": entry["before"], "require": entry["gate"]["require"],
                                     "refusal": refusal, "at": now_iso(), "via": via})
            return entries

        _, entries = self._cas_state(name, change)
        for refusal in refusals:
            log.warning("register.alias_refused", ref=f"{name}:{version}", **refusal)
            self._append(name, version, "alias_refusals", refusal)
        self._announce(name, entries, hooks)
        return self.get(f"{name}:{version}")

    def record_base_evaluation(self, name: str, uri: str, revision: str | None,
                               evaluation: EvaluationRecord) -> ModelVersion:
        """Record a base model's scores as ``NAME@base``; see :mod:`registry.base_scores`."""
        return base_scores.record_base_evaluation(self.store, name, uri, revision, evaluation)

    def record_push(self, name: str, version: int, push: HubPush) -> ModelVersion:
        """Append ``push`` to the ``pushes`` of ``name:version``; see :meth:`_append`."""
        return self._append(name, version, "pushes", asdict(push))

    def record_evaluation(self, name: str, version: int, evaluation: EvaluationRecord) -> ModelVersion:
        """Append ``evaluation`` to the ``evaluations`` of ``name:version``; see :meth:`_append`."""
        return self._append(name, version, "evaluations", dump(evaluation))

    def _append(self, name: str, version: int, field: str, entry: dict[str, Any]) -> ModelVersion:
        """Append ``entry`` to the list ``field`` of the record of ``name:version``; see :meth:`_edit`."""
        def change(doc: dict[str, Any]) -> None:
            doc[field] = [*(doc.get(field) or []), entry]

        return self._edit(name, version, field, change)

    def set_metadata(self, name: str, version: int, *, tags: dict[str, str] | None = None,
                     remove_tags: Sequence[str] = (), description: str | None = None) -> ModelVersion:
        """Set (or, with ``remove_tags``, drop) tags and replace the description of ``name:version``; see
        :meth:`_edit`. NotFoundError for a tag to remove that it does not have."""
        def change(doc: dict[str, Any]) -> None:
            current = dict(doc.get("tags") or {})
            for key in remove_tags:
                if key not in current:
                    raise NotFoundError(f"{name}:{version} has no tag {key!r} (tags: {', '.join(sorted(current)) or 'none'})")
                del current[key]
            current.update({str(k): str(v) for k, v in (tags or {}).items()})
            doc["tags"] = current
            if description is not None:
                doc["description"] = description

        return self._edit(name, version, "tags and description", change)

    def _edit(self, name: str, version: int, what: str, change: Callable[[dict[str, Any]], None]) -> ModelVersion:
        """Apply ``change`` to the record of ``name:version`` as stored and write it with compare-and-swap,
        re-read and retried on a concurrent update; every other field is written back as read. Returns the
        version as stored then. NotFoundError when the version is gone, DataError when its record is corrupt
        (it is not changed), ConflictError after too many concurrent updates."""
        key = self._version_key(check_name(name), int(version))
        for attempt in range(CAS_ATTEMPTS):
            doc, etag, where = self._read_doc(name, int(version))
            ModelVersion.from_dict(doc, source=where)
            change(doc)
            ModelVersion.from_dict(doc, source=f"the new {what} of {name}:{version}")
            try:
                self.store.put_bytes(key, (json.dumps(doc, indent=2) + "\n").encode(), if_match=etag)
                return self.get(f"{name}:{version}")
            except PreconditionFailed:
                jitter(attempt)  # another update landed first: re-read and apply ours after it
        raise ConflictError(f"could not update {what} of {name}:{version}: {CAS_ATTEMPTS} concurrent updates "
                            f"won; retry")


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


def check_loadable(rs: Store, manifest: dict[str, Any], artifacts: dict[str, dict[str, Any]]) -> None:
    """The checks ``generate``/``eval`` run before loading an artifact (:func:`check_artifact_folder`: no pickle,
    no code, an index naming present safetensors, true headers), on the stored files the manifest lists.

    Reads config files and safetensors headers only (ranged reads), never the weights. Raises DataError (exit 3)
    naming the file. Other artifacts (none that medft loads) are not checked.
    """
    for art, spec in artifacts.items():
        if art not in ARTIFACTS:
            continue
        folder = spec["uri"][len(rs.uri) + 1:]
        sizes = {rel: manifest["files"][f"{folder}/{rel}"]["size"] for rel in spec["files"]}
        check_artifact_folder(StoreFolder(rs.child(folder), sizes), f"{spec['uri']} ({art} artifact)", art)
