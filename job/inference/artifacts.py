"""A version's artifact on local disk: downloaded once into a cache, every file checked against its sha256.

The cache entry's name is derived from the checksums the record lists, so a cached copy is always the content
the record names; it is checked again on every use (see :mod:`job.cache`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from pathlib import Path

from job.cache import MARKER
from job.inference.refs import Version
from registry.errors import NotFoundError
from registry.logs import get_logger
from registry.names import ARTIFACTS, LOADABLE_ARTIFACTS  # noqa: F401 - ARTIFACTS re-exported by job.inference

log = get_logger(__name__)

COMPLETE_MARKER = MARKER  # the one completion marker of every medft cache entry (job/cache.py)


def cache_key(files: dict[str, str]) -> str:
    """The cache folder name for an artifact: a hash of its ``{relpath: sha256}`` list."""
    canonical = json.dumps(sorted(files.items()), separators=(",", ":")).encode()
    return hashlib.sha256(canonical).hexdigest()[:32]


def fetch_artifact(version: Version, artifact: str = "merged") -> Path:
    """The artifact's files on local disk: from the cache when it checks out, else downloaded and verified.

    A download goes to a temporary folder beside the cache entry and is renamed into place, completion
    marker inside, only after every file passed its sha256 check; a failed or interrupted download leaves
    nothing behind. Each use checks the entry again (:func:`job.cache.verified`: a stamp per file, a full
    sha256 where it changed); an entry that fails is discarded and downloaded again. Raises NotFoundError
    when the version has no such artifact or a listed file is missing from the store, DataError (exit 3)
    when a file fails its checksum.
    """
    from job.cache import mark_complete, verified
    from job.paths import cache_root
    from registry.store import open_store

    if artifact not in version.artifacts:
        has = ", ".join(sorted(version.artifacts)) or "none"
        other = next((a for a in LOADABLE_ARTIFACTS if a in version.artifacts), None)
        raise NotFoundError(f"{version.label} has no {artifact!r} artifact (it has: {has})"
                            + (f"; use --artifact {other}" if other else ""))
    spec = version.artifacts[artifact]
    files: dict[str, str] = spec["files"]
    dest = cache_root() / "models" / cache_key(files)
    if verified(dest, files):
        log.info("model.cached", ref=version.label, artifact=artifact, path=str(dest))
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    log.info("model.download", ref=version.label, artifact=artifact, uri=spec["uri"], files=len(files))
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        open_store(spec["uri"]).get_dir("", tmp, expected=files)
        mark_complete(tmp, files, ref=version.label, uri=spec["uri"])
        # Another process may have finished the same download meanwhile; its copy is as verified as ours.
        if not verified(dest, files):
            if dest.exists():
                shutil.rmtree(dest)  # an entry that failed its check or lost files: replace it whole
            try:
                tmp.replace(dest)
            except OSError:
                if not verified(dest, files):
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("model.downloaded", ref=version.label, artifact=artifact, path=str(dest),
             seconds=round(time.monotonic() - started, 2))
    return dest
