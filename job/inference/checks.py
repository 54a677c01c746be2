"""Checks on what a model version's record names, before anything loads from it.

A record (a registry version or a run's MANIFEST.json) can claim anything: its files pass their sha256 and
still be hostile. So before ``medft generate``/``chat`` loads an artifact or the base model it names, the folder
is checked here: safetensors weights only (no pickle beside them, an index naming present safetensors, every
header true) and no code to run (``auto_map`` entries, ``.py`` files). Remote code runs only when the command
line says so (``--trust-remote-code SHA``), for a run folder pinned to that commit, never for a registry ref.
Refusals are DataError (exit 3) for the folder, ConfigError (exit 2) for a flag that cannot be honoured.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from registry.artifact_checks import check_artifact_folder, refuse_code  # noqa: F401 - refuse_code: loading's
from registry.errors import ConfigError
from registry.logs import get_logger

if TYPE_CHECKING:
    from job.inference.refs import Version

log = get_logger(__name__)

_COMMIT_SHA = re.compile(r"[0-9a-f]{40}")


def remote_code_trust(version: Version, sha: str | None) -> bool:
    """Whether ``--trust-remote-code SHA`` lets ``version``'s folders run their own code; False without it.

    Never taken from a record. The flag is refused (ConfigError, exit 2) for a registry ref, whose record and
    aliases anyone with write access can change, for a value that is not a 40-hex commit sha, and when the
    run folder's recorded base revision is not that sha. The code that then runs is the code in the run
    folder, verified against its manifest's sha256; pass the flag only for a run you trust.
    """
    if sha is None:
        return False
    if version.registry_ref:
        raise ConfigError(f"--trust-remote-code is refused for the registry ref {version.label}: give the run folder "
                          "URI (medft registry show prints it) together with its base model's commit sha")
    if not _COMMIT_SHA.fullmatch(sha):
        raise ConfigError(f"--trust-remote-code {sha!r}: give the 40-hex commit sha the run's base was pinned to")
    uri, revision = version.base_uri()
    if revision != sha:
        raise ConfigError(f"--trust-remote-code {sha}: {version.label} was trained from {uri} at revision "
                          f"{revision or '(none recorded)'}, not {sha}; its code is not the code you pinned")
    log.warning("inference.remote_code_trusted", ref=version.label, revision=sha)
    return True


def check_artifact(path: Path, version: Version, artifact: str, *, trust_remote_code: bool = False) -> None:
    """Refuse a fetched artifact before anything loads from it (DataError, exit 3, naming the file): the checks
    of :func:`registry.artifact_checks.check_artifact_folder`, the same ones ``medft registry register`` runs."""
    check_artifact_folder(path, f"{version.label} {artifact} artifact", artifact, trust_remote_code=trust_remote_code)
