"""Hugging Face hub datasets, shared by the training data (:mod:`job.data.sources`) and the benchmarks
(:mod:`job.evals.sources`): whether the hub is offline, the commit a revision resolves to, the one mapping of
``datasets``' many failure types onto medft's exit codes (:func:`hub_dataset_error`), and the load that
applies it (:func:`load_hub_dataset`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from registry.errors import AccessDeniedError, ConfigError, MedftError, NotFoundError, TransientError
from registry.logs import get_logger
from registry.redact import redact_text

log = get_logger(__name__)

_NOT_FOUND_TYPES = ("DatasetNotFoundError", "FileNotFoundError", "RepositoryNotFoundError", "EntryNotFoundError",
                    "RevisionNotFoundError")


def hf_offline() -> bool:
    """``HF_HUB_OFFLINE`` is set to a true value: only the local cache may be read."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hf_token() -> str | None:
    return os.environ.get("HF_TOKEN") or None


def hf_revision(name: str, revision: str | None) -> str | None:
    """The commit the hub resolves ``revision`` of dataset ``name`` to (best effort, skipped offline); else
    ``revision``. Lineage detail only: the content hash identifies the data."""
    if hf_offline():
        return revision
    try:
        from huggingface_hub import HfApi

        info = HfApi().dataset_info(name, revision=revision, token=hf_token(), timeout=10)
        return info.sha or revision
    except Exception as e:  # noqa: BLE001 - lineage detail only; the content hash identifies the data
        log.warning("data.revision_unresolved", dataset=name, error=redact_text(str(e))[:200])
        return revision


@dataclass(frozen=True)
class HubKeys:
    """How the caller names what to fix: the key (or word) for a bad split, config and dataset, and the hint
    ending a not-found and an offline-and-not-cached message."""

    split: str
    config: str
    dataset: str
    not_found_hint: str
    offline_hint: str


def hub_dataset_error(e: Exception, display: str, keys: HubKeys) -> MedftError | None:
    """``e``, raised by ``datasets.load_dataset`` for ``display``, as a medft error; None for anything
    unexpected (a bug, to be re-raised).

    401/403 or gated: AccessDeniedError (5); a missing dataset, file or revision: NotFoundError (4); no
    connection: TransientError (75), or NotFoundError when ``HF_HUB_OFFLINE`` is set (the cache lacks it); a
    ValueError (unknown split or config): ConfigError (2) naming ``keys.split``/``config``/``dataset``.
    """
    msg = " ".join(str(e).split())[:300]
    etype = type(e).__name__
    status = getattr(getattr(e, "response", None), "status_code", None)
    if status in (401, 403) or "gated" in msg.lower() or re.search(r"\b40[13] Client Error", msg):
        return AccessDeniedError(f"{display}: access refused ({msg}); accept the dataset's terms on the hub and "
                                 "set HF_TOKEN")
    if etype in _NOT_FOUND_TYPES:
        return NotFoundError(f"{display}: dataset not found ({msg}); {keys.not_found_hint}")
    if isinstance(e, ConnectionError) or "OfflineModeIsEnabled" in msg or etype == "LocalEntryNotFoundError":
        if hf_offline():
            return NotFoundError(f"{display}: not in the local cache and HF_HUB_OFFLINE is set; {keys.offline_hint}")
        return TransientError(f"{display}: cannot reach the Hugging Face hub ({msg}); retry later or set "
                              "HF_HUB_OFFLINE=1 with a filled cache")
    if isinstance(e, ValueError):
        lowered = msg.lower()
        key = keys.split if "split" in lowered else keys.config if "config" in lowered else keys.dataset
        return ConfigError(f"{key}: {display}: {msg}")
    return None


def load_hub_dataset(name: str, subset: str | None, split: str, *, revision: str | None, cache_dir: str | None,
                     display: str, keys: HubKeys) -> Any:
    """``datasets.load_dataset(name, subset, split=..., revision=..., cache_dir=..., token=$HF_TOKEN)``, its
    failures raised as :func:`hub_dataset_error` maps them for ``display``; an unexpected one as it was (a bug).
    Returns what ``load_dataset`` returns: the caller checks it is one split."""
    import datasets

    try:
        return datasets.load_dataset(name, subset, split=split, revision=revision, cache_dir=cache_dir,
                                     token=hf_token())
    except MedftError:
        raise
    except Exception as e:  # datasets raises many types; the expected ones are mapped
        mapped = hub_dataset_error(e, display, keys)
        if mapped is None:
            raise
        raise mapped from None
