"""Resolving a REF: a registry reference or a published run's folder, to the :class:`Version` it names.

A REF is ``NAME``, ``NAME:VERSION`` or ``NAME@ALIAS`` (looked up in a registry), or a run folder (a URI or a
local path holding ``://``, ``/`` or ``\\``) read through its MANIFEST.json, whose run record is read typed
(:class:`registry.records.RunRecord`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from registry.errors import ConfigError, NotFoundError
from registry.logs import get_logger
from registry.names import DEFAULT_STORE
from registry.records import dump
from registry.uris import is_location

log = get_logger(__name__)


@dataclass(frozen=True)
class Version:
    """What a REF resolved to: the record's artifacts, base model and training config.

    ``label`` names it in output and errors: ``NAME:VERSION`` for a registry ref, the run URI otherwise.
    """

    label: str
    artifacts: dict[str, dict[str, Any]]
    base_model: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    plan: dict[str, Any] = field(default_factory=dict)  # the settings training ran with (metrics.plan)

    @property
    def trained_in_4bit(self) -> bool:
        """Whether the adapter trained against 4-bit base weights: the plan's choice, else the config's."""
        if "load_in_4bit" in self.plan:
            return bool(self.plan["load_in_4bit"])
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

    @property
    def trust_remote_code(self) -> bool:
        return bool((self.config.get("model") or {}).get("trust_remote_code", False))

    def base_uri(self) -> tuple[str, str | None]:
        """(uri, revision) of the base model the version was trained from; NotFoundError if unrecorded."""
        model_cfg = self.config.get("model") or {}
        uri = self.base_model.get("uri") or model_cfg.get("base")
        if not uri:
            raise NotFoundError(f"{self.label} records no base model, so it cannot be loaded as base + adapter "
                                "or compared with its base; use --artifact merged and compare with a REF")
        return str(uri), self.base_model.get("revision") or model_cfg.get("revision")


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
    from registry.store import open_store

    reg = Registry.open(registry) if registry else Registry(open_store(store or DEFAULT_STORE).child("registry"))
    mv = reg.get(ref)
    return Version(label=mv.ref, artifacts=mv.artifacts, base_model=mv.base_model, config=mv.config,
                   plan=(mv.metrics or {}).get("plan") or {})


def _resolve_run(ref: str) -> Version:
    from registry.registry import artifacts_from_manifest
    from registry.runs import MANIFEST, manifest_record, read_manifest, run_store

    # A local path may be relative or contain '..'; the store layer refuses '..', so hand it an absolute one.
    uri = ref if "://" in ref else os.path.abspath(os.path.expanduser(ref))
    try:
        rs, label = run_store(None, uri)
        manifest = read_manifest(None, uri)
    except ConfigError as e:
        raise NotFoundError(f"model ref {ref!r} is neither NAME, NAME:VERSION, NAME@ALIAS nor a run folder URI "
                            f"({e.message})") from None
    except NotFoundError as e:
        # Say which ref was meant: the path the store layer names may be a resolved form of it.
        raise NotFoundError(f"model ref {ref!r} names no published run: {e.message}") from None
    record = manifest_record(manifest, rs.url(MANIFEST))
    plan = record.metrics.plan
    return Version(label=label, artifacts=artifacts_from_manifest(manifest, rs.uri, rs.url(MANIFEST)),
                   base_model=dump(record.base_model_lineage), config=record.config,
                   plan=dump(plan) if plan is not None else {})
