"""Sharing a registered version on the Hugging Face Hub: ``medft registry push REF hf://org/name``.

One push is: check the target, the branch and ``HF_TOKEN`` (nothing is read or sent before they pass); look the
version up; on the Hub create the repo (``--create``) or check that it exists, and create the branch if it is
missing; download the artifact through the registry's verified download (every file checked against its
recorded sha256) into a temporary folder; send every file of the artifact in ONE commit with
``huggingface_hub``'s ``HfApi.create_commit``; record the repo, branch, commit sha and URL in the version record
(:meth:`registry.registry.Registry.record_push`, compare-and-swap); remove the temporary folder.

How the bytes travel is ``huggingface_hub``'s choice: small files inline in the commit, large ones ("lfs" in
the Hub's preupload answer) through Xet storage when the ``hf_xet`` package is installed (it is, with
transformers) and ``HF_HUB_DISABLE_XET`` is not set, else through the Git LFS batch API. medft adds no retries
of its own: the library retries its idempotent calls (preupload, LFS batch and uploads) a bounded number of
times and never retries the commit itself (a lost answer could mean a second commit).

``HF_TOKEN`` is read from the environment only: never a flag, never logged, never stored (the library's saved
token is not used). Failures map to :mod:`registry.errors`: no token or a refused one -> AccessDeniedError (5);
no such repo without ``--create`` -> NotFoundError (4); network errors, 429 and 5xx -> TransientError (75).
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from registry.errors import AccessDeniedError, ConfigError, ConflictError, MedftError, NotFoundError, TransientError
from registry.logs import get_logger
from registry.redact import redact_text
from registry.registry import Registry
from registry.runs import now_iso
from registry.uris import parse_uri
from registry.versions import HubPush, ModelVersion

if TYPE_CHECKING:
    from huggingface_hub import HfApi

TOKEN_VAR = "HF_TOKEN"
DEFAULT_BRANCH = "main"
# A Hub repo id part: letters, digits, '-', '_', '.', no '--' or '..', not starting or ending with '-' or '.'.
_REPO_PART = re.compile(r"^(?!.*(--|\.\.))[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?$")
# A branch name git and the Hub accept, kept simple: segments of letters, digits, '.', '_', '-' joined by '/'.
_BRANCH = re.compile(r"^(?!.*(\.\.|//|@\{))(?!refs/)[A-Za-z0-9_][A-Za-z0-9._/-]{0,199}$")

log = get_logger("medft.registry.push")


def parse_target(target: str) -> str:
    """``hf://org/name`` -> ``org/name``; ConfigError (exit 2) naming the problem for anything else."""
    uri = parse_uri(target.strip()) if isinstance(target, str) else None
    if uri is None or uri.scheme != "hf":
        raise ConfigError(f"push target {target!r} must be hf://org/name (a Hugging Face Hub model repo)")
    if "@" in uri.path:
        raise ConfigError(f"push target {target!r}: name the branch with --revision, not '@' in the URI")
    parts = uri.path.strip("/").split("/")
    if len(parts) != 2 or not all(_REPO_PART.match(p) for p in parts):
        raise ConfigError(f"push target {target!r} must be hf://org/name: two parts of letters, digits, '-', "
                          f"'_' or '.' (no '--' or '..')")
    return "/".join(parts)


def check_branch(revision: str) -> str:
    """A branch name to push to; ConfigError (exit 2) for a name the Hub would refuse (or a tag/PR ref)."""
    if not _BRANCH.match(revision) or revision.endswith((".lock", "/", ".")):
        raise ConfigError(f"--revision {revision!r} is not a branch name: use letters, digits, '.', '_', '-' and "
                          f"'/' (no '..', '//', leading 'refs/' or trailing '.lock')")
    return revision


def hub_token(env: dict[str, str] | None = None) -> str:
    """``HF_TOKEN`` from the environment; AccessDeniedError (exit 5) when unset or empty."""
    token = (os.environ if env is None else env).get(TOKEN_VAR, "").strip()
    if not token:
        raise AccessDeniedError(f"{TOKEN_VAR} is not set: export {TOKEN_VAR} with a Hugging Face token that can "
                                f"write to the target repo (https://huggingface.co/settings/tokens)")
    return token


def push(registry: Registry, ref: str, target: str, *, artifact: str = "merged", create: bool = False,
         private: bool = False, revision: str | None = None) -> tuple[ModelVersion, HubPush]:
    """Push ``ref``'s ``artifact`` to ``target`` in one commit and record it; returns the updated version and
    the push. Raises ConfigError (2), NotFoundError (4), AccessDeniedError (5), DataError (3: an artifact file
    fails its sha256, nothing is sent) or TransientError (75) as the module docstring says."""
    repo_id = parse_target(target)
    branch = check_branch(revision) if revision is not None else DEFAULT_BRANCH
    if private and not create:
        raise ConfigError("--private applies only with --create (an existing repo keeps its visibility)")
    token = hub_token()
    mv = registry.get(ref)
    if artifact not in mv.artifacts:
        raise NotFoundError(f"model version {mv.ref} has no {artifact!r} artifact (it has: "
                            f"{', '.join(sorted(mv.artifacts)) or 'none'})")
    files: dict[str, str] = mv.artifacts[artifact]["files"]
    api = _api(token)
    where = f"hf://{repo_id}"
    with hub_errors(where, create=create):
        if create:
            api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        else:
            api.repo_info(repo_id, repo_type="model")  # missing repo or refused token: stop before downloading
        if branch != DEFAULT_BRANCH:
            api.create_branch(repo_id, branch=branch, repo_type="model", exist_ok=True)
    if "README.md" not in files:
        log.warning("push.no_model_card", ref=mv.ref, artifact=artifact,
                    detail="the artifact has no README.md; the repo gets no model card from this push")
    with tempfile.TemporaryDirectory(prefix="medft-push-") as tmp:
        local = Path(tmp) / artifact
        registry.download(mv.ref, local, artifact)  # pinned to the version resolved above, every file verified
        with hub_errors(where, create=create):
            info = _commit(api, repo_id, branch, mv, artifact, local, sorted(files))
    record = HubPush(repo=repo_id, revision=branch, commit=info.oid, url=str(info.commit_url), artifact=artifact,
                     pushed_at=now_iso())
    log.info("push.committed", ref=mv.ref, artifact=artifact, repo=repo_id, revision=branch, commit=info.oid,
             files=len(files))
    try:
        updated = registry.record_push(mv.name, mv.version, record)
    except MedftError as e:
        # The commit is on the Hub; say so, so nobody pushes blind. A rerun records the same commit (the Hub
        # skips unchanged files and the library answers with the branch head).
        raise type(e)(f"pushed {mv.ref} to {where}@{branch} (commit {info.oid}) but could not record it in the "
                      f"registry: {e.message}; rerun the push to record it") from None
    return updated, record


def _api(token: str) -> HfApi:
    from huggingface_hub import HfApi

    # The endpoint is read now, not when huggingface_hub was imported: HF_ENDPOINT set later still counts.
    return HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)


def _commit(api: HfApi, repo_id: str, branch: str, mv: ModelVersion, artifact: str, local: Path,
            rels: list[str]) -> Any:
    from huggingface_hub import CommitOperationAdd

    operations = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(local / rel)) for rel in rels]
    description = (f"Registry version {mv.ref}, artifact {artifact!r}, from run {mv.run_id}. Every file was "
                   f"checked against the sha256 the registry recorded for it before upload.")
    return api.create_commit(repo_id, operations, commit_message=f"medft: {mv.ref} ({artifact})",
                             commit_description=description, repo_type="model", revision=branch)


@contextmanager
def hub_errors(where: str, *, create: bool) -> Iterator[None]:
    """Map ``huggingface_hub`` and network failures to medft errors with one line (the token never appears:
    the library's messages carry URLs and request ids, not headers)."""
    try:
        yield
    except MedftError:
        raise
    except Exception as e:  # noqa: BLE001 - mapped below or re-raised as it was (a bug: exit 1)
        mapped = _map_error(e, where, create=create)
        if mapped is None:
            raise
        raise mapped from None


def _map_error(exc: BaseException, where: str, *, create: bool) -> MedftError | None:
    import httpx
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError

    # The library wraps upload failures (``RuntimeError("Error while uploading ...") from exc``): look inside.
    chain: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    for e in chain:
        if isinstance(e, OfflineModeIsEnabled):
            return ConfigError(f"cannot push to {where}: HF_HUB_OFFLINE is set; unset it to reach the Hub")
        if isinstance(e, RepositoryNotFoundError):
            hint = "" if create else "; pass --create to create it"
            return NotFoundError(f"{where}: no such repo on the Hub, or {TOKEN_VAR} cannot see it{hint}")
        if isinstance(e, RevisionNotFoundError):
            return NotFoundError(f"{where}: the branch does not exist on the Hub ({_server_says(e)})")
        if isinstance(e, HfHubHTTPError) and e.response is not None:
            status = e.response.status_code
            said = _server_says(e)
            if status in (401, 403):
                return AccessDeniedError(f"{where}: the Hub refused {TOKEN_VAR} (HTTP {status}: {said}); use a "
                                         f"token with write access to the repo's owner")
            if status == 404:
                return NotFoundError(f"{where}: not found on the Hub (HTTP 404: {said})")
            if status == 409:
                return ConflictError(f"{where}: the Hub reports a conflict (HTTP 409: {said}); retry")
            if status in (408, 429) or status >= 500:
                return TransientError(f"{where}: the Hub answered HTTP {status} ({said}); retry later")
            return ConfigError(f"{where}: the Hub refused the push (HTTP {status}: {said})")
        if isinstance(e, httpx.TransportError):
            return TransientError(f"cannot reach the Hub for {where} ({type(e).__name__}: {e}); check the network "
                                  f"(and HF_ENDPOINT) and retry")
        if isinstance(e, ConnectionError):
            # hf_xet (Rust) reports every failure, HTTP ones included, as a builtin ConnectionError whose text
            # carries the status, e.g. "HTTP status client error (403 Forbidden), domain: .../xet-write-token/main".
            said = redact_text(str(e)).replace("\n", " ")[:300]  # redacted before the cut: its URLs carry tokens
            if re.search(r"\((401|403) ", said):
                return AccessDeniedError(f"{where}: the Hub refused {TOKEN_VAR} for the Xet upload ({said}); use a "
                                         f"token with write access to the repo's owner")
            return TransientError(f"{where}: the upload failed ({said}); retry later")
    return None


def _server_says(e: Any) -> str:
    """The server's own error message (header or JSON ``error``), else the reason phrase; one line, short."""
    response = e.response
    said = response.headers.get("X-Error-Message") or ""
    if not said:
        try:
            body = response.json()
            said = body.get("error", "") if isinstance(body, dict) else ""
        except Exception:  # noqa: BLE001 - a body that is not JSON says nothing useful
            said = ""
    said = str(said or response.reason_phrase or "no message").replace("\n", " ")
    return said[:200]
