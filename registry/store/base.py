"""The store seam: the :class:`Store` Protocol, what it returns and raises, safe keys, and :class:`BaseStore`,
which writes the behaviour both stores share (directories, URLs, listings) once over their primitives.

Keys are ``/``-separated relative paths; ``..``, ``.``, empty segments, absolute paths, backslashes and NUL
are refused, so nothing is ever written outside the root.
"""

from __future__ import annotations

import errno
import os
import re
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from registry import progress as progress_mod
from registry.errors import AccessDeniedError, ConfigError, ConflictError, DataError, MedftError, NotFoundError
from registry.progress import NO_PROGRESS, Progress, Task
from registry.store.transfer import MiB, TransferSettings, os_errors, parallel

# Names the stores leave beside files while they work; never listed, never part of a key.
TMP_MARK = ".medft-tmp."
LOCK_SUFFIX = ".medft-lock"
HIDDEN = re.compile(r"^\..*(\.medft-tmp\.|\.medft-lock$)")
# A single file smaller than this moves without a bar of its own (config files, leases: noise, not progress).
BAR_MIN_BYTES = 1 * MiB


class PreconditionFailed(ConflictError):
    """A create-only write found the key present, or an ``if_match`` etag no longer matches (exit 75)."""


class BucketNotFound(NotFoundError):
    """The S3 bucket itself does not exist (exit 4)."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    """Key relative to the root of the store that produced it."""
    size: int
    sha256: str | None
    """Hex digest; ``None`` where the store has not read the content (listings)."""
    etag: str | None
    """Opaque version token for ``if_match`` (S3 ETag without quotes; content sha256 on a local disk)."""
    checksum: str | None = None
    """S3's SHA-256 checksum of an object this process uploaded, base64 as S3 reports it (``-N`` marks the
    composite checksum of an N-part upload: the sha256 of its parts' sha256s); ``None`` on a local disk."""


@runtime_checkable
class Store(Protocol):
    uri: str
    transfer: TransferSettings

    def url(self, key: str) -> str: ...
    def child(self, prefix: str) -> Store: ...
    def put_file(self, key: str, path: Path, *, if_absent: bool = False) -> ObjectInfo: ...
    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False,
                  if_match: str | None = None) -> ObjectInfo: ...
    def get_bytes(self, key: str) -> tuple[bytes, str]: ...
    def get_range(self, key: str, start: int, length: int) -> bytes: ...
    def sha256(self, key: str) -> str: ...
    def get_file(self, key: str, dest: Path, *, sha256: str | None = None) -> ObjectInfo: ...
    def exists(self, key: str) -> bool: ...
    def stat(self, key: str) -> ObjectInfo: ...
    def list(self, prefix: str = "") -> list[str]: ...
    def list_info(self, prefix: str = "") -> list[ObjectInfo]: ...
    def delete(self, key: str) -> None: ...
    def content_matches(self, key: str, sha256: str, checksum: str | None = None) -> bool: ...
    def put_dir(self, prefix: str, local_dir: Path, *, if_absent: bool = False) -> list[ObjectInfo]: ...
    def get_dir(self, prefix: str, dest: Path, *,
                expected: dict[str, str] | None = None) -> list[ObjectInfo]: ...


# ------------------------------------------------------------------------------------------------ keys

def check_key(key: str, *, allow_empty: bool = False, what: str = "storage key",
              error: type[MedftError] = ConfigError) -> str:
    """Return ``key`` without a trailing slash if it is a safe relative key, else raise ``error``."""
    if not isinstance(key, str):
        raise error(f"{what} must be a string, got {type(key).__name__}")
    k = key[:-1] if key.endswith("/") and len(key) > 1 else key
    if k == "" or k == "/":
        if allow_empty:
            return ""
        raise error(f"{what} is empty")
    problem = None
    if "\\" in k:
        problem = "contains a backslash"
    elif "\x00" in k:
        problem = "contains a NUL byte"
    elif k.startswith("/") or re.match(r"^[A-Za-z]:", k):
        problem = "is an absolute path"
    elif any(seg in ("", ".", "..") for seg in k.split("/")):
        problem = "has an empty, '.' or '..' path segment"
    if problem:
        raise error(f"{what} {key!r} {problem}; keys are relative paths inside the store")
    return k


def join_keys(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


# ---------------------------------------------------------------------------------- local-file helpers

def tmp_beside(dest: Path) -> Path:
    return dest.parent / f".{dest.name}{TMP_MARK}{uuid.uuid4().hex[:12]}"


def unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def check_local_dir(path: Path, what: str) -> None:
    """Refuse (ConfigError, exit 2) a local directory path that is a file or lies under one."""
    for p in (Path(path), *Path(path).parents):
        if p.exists():
            if not p.is_dir():
                where = "is" if p == Path(path) else f"lies under {p}, which is"
                raise ConfigError(f"{what} {path} {where} a file, not a directory; choose a directory path")
            return


def check_writable_dir(path: Path, what: str) -> None:
    """Refuse, before anything is written, a local directory path that cannot hold files: a file in the way
    (ConfigError, exit 2, as :func:`check_local_dir`), a place no directory can be made (``/proc``: ConfigError)
    or one this process may not write (``/sys``, a read-only mount: AccessDeniedError, exit 5).

    Probes the nearest existing folder by making (and removing) an empty directory in it; creates nothing else.
    """
    import tempfile

    check_local_dir(path, what)
    existing = next(p for p in (Path(path), *Path(path).parents) if p.exists())
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".medft-probe-", dir=existing))
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise AccessDeniedError(f"{what} {path}: {existing} cannot be written ({e.strerror}); pick a "
                                    "writable path") from None
        raise ConfigError(f"{what} {path}: no folder can be made in {existing} ({e.strerror}); pick a path on a "
                          "writable disk") from None


def check_writable_file(path: Path, what: str) -> None:
    """Refuse a local output file path that is an existing directory, lies under a file, or whose folder cannot
    be written (ConfigError exit 2, AccessDeniedError exit 5), before anything is read or drawn."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a directory; give the path of a file to write")
    check_writable_dir(path.parent, f"{what} {path}: folder")


def local_files(local_dir: Path) -> list[tuple[str, Path]]:
    """(relative posix path, path) for every regular file under ``local_dir`` (file symlinks followed), sorted:
    what :meth:`BaseStore.put_dir` uploads. Raises NotFoundError when ``local_dir`` is not a directory."""
    if not local_dir.is_dir():
        raise NotFoundError(f"local directory {local_dir} does not exist")
    out = []
    for dirpath, dirnames, filenames in os.walk(local_dir):
        dirnames.sort()
        for name in sorted(filenames):
            if HIDDEN.match(name):
                continue
            p = Path(dirpath) / name
            if p.is_file():
                out.append((p.relative_to(local_dir).as_posix(), p))
    return out


def verify(sha: str, expected: str | None, uri: str) -> None:
    """Raise DataError (exit 3) when ``expected`` is given and the content's ``sha`` is not it."""
    if expected is not None and sha != expected.lower():
        raise DataError(f"checksum mismatch for {uri}: expected sha256 {expected}, got {sha}; the stored "
                        f"object is corrupt or was replaced (nothing was written)")


# ------------------------------------------------------------------------------------------- BaseStore

class BaseStore(ABC):
    """What both stores do the same way, written once over the primitives each one provides.

    A concrete store sets ``uri`` and ``transfer`` and implements the abstract single-object operations;
    ``url``, ``list``, ``put_dir`` and ``get_dir`` follow from them.

    Transfers report the bytes they move to a :class:`registry.progress.Task` (one per directory, or per
    single file of at least :data:`BAR_MIN_BYTES`) from ``progress``; a store never prints.
    """

    uri: str
    transfer: TransferSettings
    progress: Progress | None = None
    """Where transfers report progress; ``None``: the process's (:func:`registry.progress.current`)."""

    # primitives ------------------------------------------------------------------------------------
    @abstractmethod
    def child(self, prefix: str) -> BaseStore: ...
    @abstractmethod
    def put_file(self, key: str, path: Path, *, if_absent: bool = False, task: Task | None = None) -> ObjectInfo:
        """Upload ``path``; its bytes are reported to ``task`` when given (``put_dir``'s), else to a bar of
        its own when it is large."""
    @abstractmethod
    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False,
                  if_match: str | None = None) -> ObjectInfo: ...
    @abstractmethod
    def get_bytes(self, key: str) -> tuple[bytes, str]: ...
    @abstractmethod
    def get_range(self, key: str, start: int, length: int) -> bytes:
        """Up to ``length`` bytes of the object from offset ``start`` (fewer at its end); NotFoundError if none."""
    @abstractmethod
    def sha256(self, key: str) -> str:
        """The sha256 of the object's content as stored now, every byte read (whatever checksum it carries)."""
    @abstractmethod
    def get_file(self, key: str, dest: Path, *, sha256: str | None = None, task: Task | None = None) -> ObjectInfo:
        """Download to ``dest``; bytes reported as for ``put_file``."""
    @abstractmethod
    def exists(self, key: str) -> bool: ...
    @abstractmethod
    def stat(self, key: str) -> ObjectInfo: ...
    @abstractmethod
    def list_info(self, prefix: str = "") -> list[ObjectInfo]: ...
    @abstractmethod
    def delete(self, key: str) -> None: ...
    @abstractmethod
    def content_matches(self, key: str, sha256: str, checksum: str | None = None) -> bool: ...

    def _uploads_in_parts(self, path: Path) -> bool:
        """Whether ``put_file`` already moves this file in parallel parts, so ``put_dir`` sends it alone."""
        return False

    # progress --------------------------------------------------------------------------------------
    def _watch(self, description: str, total: int) -> Task:
        return (self.progress or progress_mod.current()).task(description, total=total, in_bytes=True)

    @contextmanager
    def _reporting(self, doing: str, key: str, size: int, task: Task | None) -> Iterator[Task]:
        """``task`` when the caller passed one down, else a bar for this one file when it is large."""
        if task is not None:
            yield task
        elif size < BAR_MIN_BYTES:
            yield NO_PROGRESS.task(doing, total=size)
        else:
            with self._watch(f"{doing} {key.rsplit('/', 1)[-1]}", size) as own:
                yield own

    # shared behaviour ------------------------------------------------------------------------------
    def url(self, key: str) -> str:
        k = check_key(key, allow_empty=True)
        return f"{self.uri}/{k}" if k else self.uri

    def list(self, prefix: str = "") -> list[str]:
        return [o.key for o in self.list_info(prefix)]

    def put_dir(self, prefix: str, local_dir: Path, *, if_absent: bool = False) -> list[ObjectInfo]:
        """Every file under ``local_dir`` to ``prefix/<relative path>``; the infos sorted by key.

        Files go side by side (``transfer.concurrency``), except those the store sends in parallel parts,
        which go one at a time. Raises NotFoundError when ``local_dir`` is not a directory.
        """
        pfx = check_key(prefix, allow_empty=True)
        files = local_files(Path(local_dir))
        alone = [f for f in files if self._uploads_in_parts(f[1])]
        side_by_side = [f for f in files if f not in alone]

        with os_errors(local_dir, "reading"):
            total = sum(p.stat().st_size for _, p in files)
        with self._watch(f"upload {pfx or self.uri}", total) as task:

            def put(item: tuple[str, Path]) -> ObjectInfo:
                return self.put_file(join_keys(pfx, item[0]), item[1], if_absent=if_absent, task=task)

            out = parallel(side_by_side, put, self.transfer.concurrency) + [put(f) for f in alone]
        return sorted(out, key=lambda o: o.key)

    def get_dir(self, prefix: str, dest: Path, *, expected: dict[str, str] | None = None) -> list[ObjectInfo]:
        """Every object under ``prefix`` (or exactly ``expected``: relative path -> sha256) into ``dest``.

        All or nothing: when any file fails (checksum, network, Ctrl-C or SIGTERM raised as an exception), the
        files this call wrote and the directories it created are removed before the error propagates.
        Raises NotFoundError for an expected file that is missing, DataError for one that fails its sha256 or
        has an unsafe path, ConfigError when ``dest`` is (or lies under) a file.
        """
        pfx = check_key(prefix, allow_empty=True)
        dest = Path(dest)
        sizes = self._sizes_under(pfx)
        plan = self._download_plan(pfx, sizes, expected)
        check_local_dir(dest, "download destination")
        new_dirs = {d for rel, _ in plan for d in (dest / rel).parents if not d.exists()}  # to remove on failure
        with os_errors(dest, "creating directory"):
            dest.mkdir(parents=True, exist_ok=True)
        small = [p for p in plan if sizes.get(p[0], 0) <= self.transfer.threshold]
        large = [p for p in plan if p not in small]
        written: list[Path] = []
        task = self._watch(f"download {pfx or self.uri}", sum(sizes.get(rel, 0) for rel, _ in plan))

        def one(item: tuple[str, str | None]) -> ObjectInfo:
            rel, sha = item
            info = self.get_file(join_keys(pfx, rel), dest / rel, sha256=sha, task=task)
            written.append(dest / rel)
            return info

        try:
            with task:
                # Small files side by side; large ones one at a time, each already parallel across its parts.
                out = parallel(small, one, self.transfer.concurrency) + [one(p) for p in large]
        except BaseException:
            _remove_partial(written, new_dirs)  # parallel() waited for every worker: nothing is still writing
            raise
        return sorted(out, key=lambda o: o.key)

    def _sizes_under(self, pfx: str) -> dict[str, int]:
        """{path relative to ``pfx``: size} from one listing (sizes decide which files go in parallel)."""
        sizes: dict[str, int] = {}
        for o in self.list_info(pfx):
            rel = o.key[len(pfx) + 1:] if pfx else o.key
            sizes[rel or o.key.rsplit("/", 1)[-1]] = o.size
        return sizes

    def _download_plan(self, pfx: str, sizes: dict[str, int],
                       expected: dict[str, str] | None) -> list[tuple[str, str | None]]:
        """(relative path, expected sha256 or None) per file to fetch; every expected one must be listed."""
        if expected is None:
            return [(rel, None) for rel in sorted(sizes)]
        plan: list[tuple[str, str | None]] = [
            (check_key(rel, what="file path in the expected list", error=DataError), sha)
            for rel, sha in sorted(expected.items())]
        missing = [rel for rel, _ in plan if rel not in sizes]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise NotFoundError(f"not found: {self.url(join_keys(pfx, missing[0]))}{more} (listed as expected)")
        return plan


def _remove_partial(written: list[Path], new_dirs: set[Path]) -> None:
    """Undo a failed get_dir: the files it wrote, then the directories it created (deepest first, empty only)."""
    for path in written:
        unlink_quietly(path)
    for d in sorted(new_dirs, key=lambda p: len(p.parts), reverse=True):
        try:
            d.rmdir()
        except OSError:
            pass
