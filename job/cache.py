"""Cache entries under ``MEDFT_CACHE`` that are checked every time they are used, not only when downloaded.

An entry is a folder of files with known sha256s and a marker file, written last, that records for every
file a stamp taken right after its download was verified: size, mtime, ctime and inode. On use, a file whose
stamp is unchanged is trusted; any other file is hashed in full and compared with its sha256 (and, when it
matches, re-stamped). Writing into a file or replacing it changes its stamp, even when the writer resets
the mtime (``utime`` cannot set the ctime), so a tampered or damaged file is never used unchecked.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from registry.logs import get_logger
from registry.store import sha256_file

log = get_logger(__name__)

MARKER = ".medft-complete"


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _write_marker(entry: Path, doc: dict[str, Any]) -> None:
    tmp = entry / f".{MARKER}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(doc) + "\n")
    tmp.replace(entry / MARKER)


def mark_complete(entry: Path, files: dict[str, str], **info: Any) -> None:
    """Record ``entry`` as holding ``files`` (``{relpath: sha256}``, already verified), with ``info``."""
    _write_marker(entry, {**info, "stamps": {rel: _stamp(entry / rel) for rel in files}})


def verified(entry: Path, files: dict[str, str]) -> bool:
    """Whether ``entry`` is complete and every file still has its sha256 (see the module docstring).

    False, with a warning naming the file, when the marker or a file is missing or a file's content changed.
    """
    try:
        doc = json.loads((entry / MARKER).read_text())
        stamps = doc.get("stamps") if isinstance(doc, dict) else None
    except (OSError, ValueError):
        return False
    stamps = dict(stamps) if isinstance(stamps, dict) else {}  # an entry from before stamps: hash it all once
    changed = False
    for rel, sha256 in sorted(files.items()):
        path = entry / rel
        try:
            if stamps.get(rel) == _stamp(path):
                continue
            ok = sha256_file(path) == sha256
        except OSError:
            ok = False
        if not ok:
            log.warning("cache.file_changed", path=str(path), action="discarding the cached copy")
            return False
        stamps[rel] = _stamp(path)
        changed = True
    if changed:
        try:
            _write_marker(entry, {**doc, "stamps": stamps})
        except OSError as e:  # a read-only cache is still verified; it is re-hashed next time too
            log.warning("cache.stamp_not_saved", path=str(entry), error=str(e))
    return True
