"""A version's artifact on local disk: downloaded once into a cache, every file checked against its sha256.

The cache entry's name is derived from the checksums the record lists, so a cached copy is always the content
the record names.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from pathlib import Path

from job.inference.refs import Version
from registry.errors import NotFoundError
from registry.logs import get_logger
from registry.names import ARTIFACTS

log = get_logger(__name__)

COMPLETE_MARKER = ".medft-complete"


def cache_key(files: dict[str, str]) -> str:
    """The cache folder name for an artifact: a hash of its ``{relpath: sha256}`` list."""
    canonical = json.dumps(sorted(files.items()), separators=(",", ":")).encode()
    return hashlib.sha256(canonical).hexdigest()[:32]


def _whole(dest: Path, files: dict[str, str]) -> bool:
    # The marker is trusted rather than re-hashing gigabytes on every call; files are only checked to exist,
    # so a cache entry someone deleted files from is fetched again instead of failing to load.
    return (dest / COMPLETE_MARKER).exists() and all((dest / rel).is_file() for rel in files)


def fetch_artifact(version: Version, artifact: str = "merged") -> Path:
    """The artifact's files on local disk: from the cache when complete, else downloaded and verified.

    A download goes to a temporary folder beside the cache entry and is renamed into place, completion
    marker inside, only after every file passed its sha256 check; so a cache entry with its marker is
    always whole and verified, and a failed or interrupted download leaves nothing behind. Raises
    NotFoundError when the version has no such artifact or a listed file is missing from the store,
    DataError (exit 3) when a file fails its checksum.
    """
    from job.paths import cache_root
    from registry.store import open_store

    if artifact not in version.artifacts:
        has = ", ".join(sorted(version.artifacts)) or "none"
        other = next((a for a in ARTIFACTS if a in version.artifacts), None)
        raise NotFoundError(f"{version.label} has no {artifact!r} artifact (it has: {has})"
                            + (f"; use --artifact {other}" if other else ""))
    spec = version.artifacts[artifact]
    files: dict[str, str] = spec["files"]
    dest = cache_root() / "models" / cache_key(files)
    if _whole(dest, files):
        log.info("model.cached", ref=version.label, artifact=artifact, path=str(dest))
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    log.info("model.download", ref=version.label, artifact=artifact, uri=spec["uri"], files=len(files))
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        open_store(spec["uri"]).get_dir("", tmp, expected=files)
        (tmp / COMPLETE_MARKER).write_text(json.dumps({"ref": version.label, "uri": spec["uri"]}) + "\n")
        # Another process may have finished the same download meanwhile; its copy is as verified as ours.
        if not _whole(dest, files):
            if dest.exists():
                shutil.rmtree(dest)  # an entry with files deleted by hand: replace it whole
            try:
                tmp.replace(dest)
            except OSError:
                if not _whole(dest, files):
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("model.downloaded", ref=version.label, artifact=artifact, path=str(dest),
             seconds=round(time.monotonic() - started, 2))
    return dest
