"""Resolving a REF: a registry reference or a published run's folder, to the :class:`Version` it names.

A REF is ``NAME``, ``NAME:VERSION`` or ``NAME@ALIAS`` (looked up in a registry), or a run folder (a URI or a
local path holding ``://``, ``/`` or ``\\``) read through its MANIFEST.json. A record can claim anything, so
what it says about the base model is checked before use.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from registry.errors import ConfigError, DataError, NotFoundError
from registry.logs import get_logger
from registry.records import BaseModelLineage, RunRecord, TrainPlanRecord, parse_record
from registry.uris import is_location, parse_uri

log = get_logger(__name__)

_REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,199}")


@dataclass(frozen=True)
class Version:
    """What a REF resolved to: the record's artifacts, base model, training config and training plan.

    ``label`` names it in output and errors: ``NAME:VERSION`` for a registry ref, the run URI otherwise.
    ``base_model`` and ``plan`` may be given as the dicts a record holds; they are checked into their
    typed form (DataError, exit 3, naming the version when one is malformed). Build one from a stored
    record with :meth:`from_record`.
    """

    label: str
    artifacts: dict[str, dict[str, Any]]
    base_model: BaseModelLineage = BaseModelLineage()
    config: dict[str, Any] = field(default_factory=dict)
    plan: TrainPlanRecord | None = None  # the settings training ran with (metrics.plan); None before plans
    registry_ref: bool = False  # resolved through the registry, not from a run folder named on the command line

    def __post_init__(self) -> None:
        object.__setattr__(self, "base_model", parse_record(BaseModelLineage, self.base_model,
                                                            f"{self.label}: lineage.base_model"))
        if self.plan is not None:
            object.__setattr__(self, "plan", parse_record(TrainPlanRecord, self.plan, f"{self.label}: metrics.plan"))

    @classmethod
    def from_record(cls, label: str, artifacts: dict[str, dict[str, Any]], record: RunRecord, *,
                    registry_ref: bool = False) -> Version:
        """The version a run record describes, its artifacts resolved (``artifacts_from_manifest``)."""
        return cls(label=label, artifacts=artifacts, base_model=record.base_model_lineage, config=record.config,
                   plan=record.metrics.plan, registry_ref=registry_ref)

    @property
    def trained_in_4bit(self) -> bool:
        """Whether the adapter trained against 4-bit base weights: the plan's choice, else the config's."""
        if self.plan is not None and "load_in_4bit" in self.plan.model_fields_set:
            return bool(self.plan.load_in_4bit)
        return (self.config.get("model") or {}).get("load_in_4bit") is True

    @property
    def template_name(self) -> str:
        """The template the version was trained with; records without one predate templates (default)."""
        name = (self.config.get("data") or {}).get("template")
        if not name:
            from job.config import DataConfig

            name = DataConfig().template
            log.warning("inference.template_default", ref=self.label, template=name,
                        reason="the record's config has no data.template")
        return str(name)

    def base_uri(self) -> tuple[str, str | None]:
        """(uri, revision) of the base model the version was trained from, checked as stored data is.

        NotFoundError if unrecorded; DataError (exit 3) for a URI or revision no source could mean
        (``hf://a/../b``, a revision with ``..``): a record can claim anything.
        """
        from job.config import check_uri

        model_cfg = self.config.get("model") or {}
        uri = self.base_model.uri or model_cfg.get("base")
        if not uri:
            raise NotFoundError(f"{self.label} records no base model, so it cannot be loaded as base + adapter "
                                "or compared with its base; use --artifact merged and compare with a REF")
        revision = self.base_model.revision or model_cfg.get("revision")
        try:
            check_uri(str(uri), "its base model")
        except ValueError as e:
            raise DataError(f"{self.label} records a base model that cannot be loaded: {e}") from None
        if revision is not None and not is_revision(revision):
            raise DataError(f"{self.label} records base revision {revision!r}, not a commit sha, tag or branch")
        return str(uri), revision


def is_revision(revision: object) -> bool:
    """Whether ``revision`` can name a commit sha, tag or branch (a plain name, no ``..``)."""
    return isinstance(revision, str) and _REVISION.fullmatch(revision) is not None and ".." not in revision


def is_run_uri(ref: str) -> bool:
    """A run folder (URI or path) rather than a registry reference: it holds ``://``, ``/`` or ``\\``."""
    return is_location(ref) or ref.startswith("~")


def resolve_ref(ref: str, *, store: str | None = None, registry: str | None = None) -> Version:
    """Resolve REF to a :class:`Version`.

    A registry ref is looked up in ``registry`` (a URI), else in ``<store>/registry`` (``store`` defaults
    to ``./medft-store``); a run folder is read through its MANIFEST.json. Raises NotFoundError (exit 4)
    for a malformed or unknown ref or an unpublished run, DataError (exit 3) for a corrupt record, and the
    store's errors (access refused, transient) as they are.
    """
    if not isinstance(ref, str) or not ref.strip():
        raise NotFoundError("empty model ref: give NAME, NAME:VERSION, NAME@ALIAS or a run folder URI")
    ref = ref.strip()
    if is_run_uri(ref):
        return _resolve_run(ref)
    from registry.registry import Registry

    mv = Registry.at(store, registry).get(ref)
    return Version.from_record(mv.ref, mv.artifacts, mv.run_record(), registry_ref=True)


def _resolve_run(ref: str) -> Version:
    from registry.registry import artifacts_from_manifest
    from registry.runs import MANIFEST, manifest_record, read_manifest, run_store

    # A local path may be relative or contain '..'; the store layer refuses '..', so hand it an absolute one.
    uri = ref if parse_uri(ref).scheme else os.path.abspath(os.path.expanduser(ref))
    try:
        rs, label = run_store(None, uri)
        manifest = read_manifest(None, uri)
    except ConfigError as e:
        raise NotFoundError(f"model ref {ref!r} is neither NAME, NAME:VERSION, NAME@ALIAS nor a run folder URI "
                            f"({e.message})") from None
    except NotFoundError as e:
        # Say which ref was meant: the path the store layer names may be a resolved form of it.
        raise NotFoundError(f"model ref {ref!r} names no published run: {e.message}") from None
    return Version.from_record(label, artifacts_from_manifest(manifest, rs.uri, rs.url(MANIFEST)),
                               manifest_record(manifest, rs.url(MANIFEST)))
