"""Repositories on ModelScope (``ms://owner/name``): one snapshot download, shared by the weight pull
(:mod:`job.model`) and the data sources (:mod:`job.data.sources`), with modelscope's failures mapped onto
medft's exit codes.

Settings are modelscope's own environment variables, plus one of medft's:

* ``MODELSCOPE_ENDPOINT``: the hub to talk to (default ``https://modelscope.cn``; modelscope then also tries
  ``https://modelscope.ai`` for a repository the first does not have). ``MODELSCOPE_DOMAIN`` is its
  deprecated older name.
* ``MODELSCOPE_API_TOKEN``: the token for private repositories (modelscope also reads a token saved by
  ``modelscope login`` under ``MODELSCOPE_HOME``, default ``~/.modelscope``).
* ``MODELSCOPE_CACHE``: where snapshots are kept; default ``$MEDFT_CACHE/ms``. The layout is modelscope's,
  ``{models,datasets}/<owner>--<name>/snapshots/<revision>/``: a snapshot is keyed by the revision *name*
  asked for, so only a commit id pins what a cached copy holds.
* ``MEDFT_MODELSCOPE_OFFLINE=1``: send no request at all and use what the cache holds (modelscope has no
  variable of its own for this). Without it a hub that cannot be reached (connection refused, timeout, 5xx)
  falls back to the cached snapshot of the same revision when there is one, with a warning.

Online, every pull lists the repository at its revision and re-downloads any cached file whose size or sha256
no longer matches the listing; the weight checks and sha256 of :mod:`job.weights` apply to the result as to any
other source.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from job.paths import cache_root
from registry.errors import AccessDeniedError, ConfigError, NotFoundError, TransientError
from registry.logs import get_logger
from registry.uris import endpoint_url, ms_repo_id, parse_uri

log = get_logger(__name__)

OFFLINE_ENV = "MEDFT_MODELSCOPE_OFFLINE"


def offline() -> bool:
    """Whether ``MEDFT_MODELSCOPE_OFFLINE`` asks for no request to ModelScope."""
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def cache_dir() -> Path:
    """``MODELSCOPE_CACHE`` when set, else ``$MEDFT_CACHE/ms``."""
    return Path(os.environ.get("MODELSCOPE_CACHE") or cache_root() / "ms")


def _configured_endpoint() -> str | None:
    """``MODELSCOPE_ENDPOINT`` (or the older ``MODELSCOPE_DOMAIN``) as set now, or None; ConfigError (exit 2)
    naming the variable when it is not an http(s) URL or host name."""
    value = (os.environ.get("MODELSCOPE_ENDPOINT") or os.environ.get("MODELSCOPE_DOMAIN") or "").strip()
    if value and "://" not in value:  # modelscope takes a bare host name as https
        value = f"https://{value}"
    var = "MODELSCOPE_ENDPOINT" if os.environ.get("MODELSCOPE_ENDPOINT") else "MODELSCOPE_DOMAIN"
    return endpoint_url(var, value) if value else None


def _endpoint() -> str:
    return _configured_endpoint() or "https://modelscope.cn"


def snapshot(uri: str, revision: str | None, *, repo_type: Literal["model", "dataset"], what: str,
             allow: Sequence[str] | None = None, ignore: Sequence[str] | None = None) -> Path:
    """The files of ``uri`` (``ms://owner/name``) at ``revision`` (default ``master``) in a local directory.

    ``allow``/``ignore`` are glob patterns on the repository paths; ``what`` names the config key in messages.
    Raises ConfigError for a malformed URI or a request the hub calls invalid (exit 2), NotFoundError for a
    repository or revision the hub does not have, or nothing cached while offline (exit 4),
    AccessDeniedError for a refused or missing token (exit 5), TransientError when the hub cannot be reached
    or fails and nothing usable is cached (exit 75).
    """
    try:
        repo = ms_repo_id(parse_uri(uri))
    except ValueError as e:
        raise ConfigError(f"{what}: {e}") from None
    at = f"{uri} (revision {revision or 'master'})"
    if offline():
        return _cached(repo, revision, repo_type, what, at, reason=f"{OFFLINE_ENV} is set")
    endpoint = _configured_endpoint()  # a malformed one is exit 2 here, not a "hub unreachable" 75 below
    import requests
    from modelscope.hub.snapshot_download import snapshot_download
    from modelscope_hub.errors import (
        AuthenticationError,
        CacheNotFound,
        HubError,
        InvalidParameter,
        NotExistError,
        PermissionDeniedError,
    )

    try:
        # Endpoint and token are passed as read now: modelscope would keep the first values it saw per process.
        return Path(snapshot_download(repo_id=repo, repo_type=repo_type, revision=revision,
                                      cache_dir=cache_dir(), allow_patterns=list(allow) if allow else None,
                                      ignore_patterns=list(ignore) if ignore else None,
                                      endpoint=endpoint,
                                      token=os.environ.get("MODELSCOPE_API_TOKEN") or None))
    except (requests.HTTPError, HubError) as e:
        # modelscope re-raises 401/403/404 as requests.HTTPError from the hub's own error (its __cause__).
        cause = e.__cause__ if isinstance(e, requests.HTTPError) and isinstance(e.__cause__, HubError) else e
        detail = " ".join(str(cause).split())[:200]
        if isinstance(cause, NotExistError):
            raise NotFoundError(f"{what}: {at}: not found on ModelScope ({_endpoint()}); check the owner/name and "
                                "revision (a private repository also answers this without MODELSCOPE_API_TOKEN)"
                                ) from None
        if isinstance(cause, (AuthenticationError, PermissionDeniedError)):
            raise AccessDeniedError(f"{what}: {at}: access refused by ModelScope ({detail}); set "
                                    "MODELSCOPE_API_TOKEN to a token that can read it") from None
        if isinstance(cause, InvalidParameter):
            raise ConfigError(f"{what}: {at}: ModelScope refused the request ({detail}); check the name and "
                              "the revision") from None
        if isinstance(cause, CacheNotFound):
            raise NotFoundError(f"{what}: {at}: not in the cache {cache_dir()} ({detail})") from None
        failure = f"{cause.__class__.__name__}: {detail}"
    except (requests.RequestException, OSError) as e:
        failure = f"{e.__class__.__name__}: {' '.join(str(e).split())[:200]}"
    log.warning("modelscope.unreachable", uri=uri, revision=revision, endpoint=_endpoint(), error=failure,
                action="trying the cache")
    return _cached(repo, revision, repo_type, what, at, reason=f"ModelScope at {_endpoint()} failed ({failure})",
                   transient=True)


def _cached(repo: str, revision: str | None, repo_type: str, what: str, at: str, *, reason: str,
            transient: bool = False) -> Path:
    """The cached snapshot, without a request; NotFoundError (or TransientError when ``transient``) if none.

    What the snapshot must hold is checked by the caller (the weight checks; the dataset's files).
    """
    from modelscope.hub.snapshot_download import snapshot_download
    from modelscope_hub.errors import CacheNotFound

    try:
        path = Path(snapshot_download(repo_id=repo, repo_type=repo_type, revision=revision, cache_dir=cache_dir(),
                                      local_files_only=True))
    except CacheNotFound:
        if transient:
            raise TransientError(f"{what}: {at}: {reason}, and nothing is cached under {cache_dir()}; retry "
                                 "later") from None
        raise NotFoundError(f"{what}: {at}: not in the cache {cache_dir()} and {reason}; pull it once with "
                            f"network access (or set MODELSCOPE_CACHE to a cache holding it), or unset "
                            f"{OFFLINE_ENV}") from None
    log.warning("modelscope.cached_copy", repo=repo, revision=revision, path=str(path), reason=reason)
    return path
