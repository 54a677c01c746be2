"""A store in a directory on a local or shared disk: whole files only, create-only and compare-and-swap writes.

* Writes go to a temp file beside the target, are fsynced and renamed into place; the sha256 of every written
  file is computed while it is copied.
* Create-only writes (``if_absent=True``) use ``link(2)`` (atomic, O_EXCL semantics); the loser gets
  :class:`PreconditionFailed`.
* Compare-and-swap (``if_match=etag``, the etag being the content sha256) takes an ``flock`` around "compare
  the current content digest, rename". A missing file fails the precondition too.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from registry.errors import ConfigError, NotFoundError
from registry.progress import Progress, Task
from registry.store.base import (
    HIDDEN,
    LOCK_SUFFIX,
    BaseStore,
    ObjectInfo,
    PreconditionFailed,
    check_key,
    tmp_beside,
    unlink_quietly,
    verify,
)
from registry.store.transfer import TransferSettings, copy_hashing, os_errors, sha256_file


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class LocalStore(BaseStore):
    """A directory on a local or shared disk. ``uri`` is the absolute path (usable directly as a path)."""

    def __init__(self, root: Path, *, transfer: TransferSettings | None = None,
                 progress: Progress | None = None) -> None:
        self.root = Path(root)
        self.transfer = transfer or TransferSettings()
        self.progress = progress
        self.uri = str(self.root).rstrip("/") or "/"

    def __repr__(self) -> str:
        return f"LocalStore({self.uri!r})"

    # paths -----------------------------------------------------------------------------------------
    def _path(self, key: str, *, allow_empty: bool = False) -> Path:
        k = check_key(key, allow_empty=allow_empty)
        if k and HIDDEN.match(k.rsplit("/", 1)[-1]):
            raise ConfigError(f"storage key {key!r} uses a name reserved for medft's temporary files")
        return self.root / k if k else self.root

    def child(self, prefix: str) -> LocalStore:
        return LocalStore(self._path(prefix, allow_empty=True), transfer=self.transfer, progress=self.progress)

    # writes ----------------------------------------------------------------------------------------
    @contextmanager
    def _key_lock(self, path: Path) -> Iterator[None]:
        lock = path.parent / f".{path.name}{LOCK_SUFFIX}"
        with os_errors(lock, "locking"):
            fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the flock

    def _write_tmp(self, dest: Path, source: Callable[[BinaryIO], tuple[int, str]]) -> tuple[Path, int, str]:
        """Write to a temp file beside ``dest`` via ``source(fileobj) -> (size, sha256)``; fsync it."""
        with os_errors(dest.parent, "creating directory"):
            dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = tmp_beside(dest)
        try:
            with os_errors(dest, "writing"), open(tmp, "xb") as f:
                size, sha = source(f)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            unlink_quietly(tmp)
            raise
        return tmp, size, sha

    def _commit(self, tmp: Path, dest: Path, key: str, *, if_absent: bool, if_match: str | None) -> None:
        try:
            with os_errors(dest, "writing"):
                if if_absent:
                    try:
                        os.link(tmp, dest)  # atomic create-only: EEXIST if present, like O_EXCL
                    except FileExistsError:
                        raise PreconditionFailed(f"{self.url(key)} already exists (create-only write)") from None
                    except OSError as e:
                        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                            raise
                        # A filesystem without hard links: claim the name with O_EXCL, then replace it.
                        try:
                            os.close(os.open(dest, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
                        except FileExistsError:
                            raise PreconditionFailed(
                                f"{self.url(key)} already exists (create-only write)") from None
                        os.replace(tmp, dest)
                elif if_match is not None:
                    with self._key_lock(dest):
                        current = self._etag_of(dest)
                        if current is None or current != if_match.strip('"'):
                            raise PreconditionFailed(
                                f"{self.url(key)} changed since it was read (etag {if_match} no longer "
                                f"matches{'; it is gone' if current is None else ''})")
                        os.replace(tmp, dest)
                else:
                    os.replace(tmp, dest)
            _fsync_dir(dest.parent)
        finally:
            unlink_quietly(tmp)

    @staticmethod
    def _etag_of(path: Path) -> str | None:
        try:
            return sha256_file(path)
        except FileNotFoundError:
            return None

    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False,
                  if_match: str | None = None) -> ObjectInfo:
        dest = self._path(key)
        sha = hashlib.sha256(data).hexdigest()

        def source(f: BinaryIO) -> tuple[int, str]:
            f.write(data)
            return len(data), sha

        tmp, size, sha = self._write_tmp(dest, source)
        self._commit(tmp, dest, key, if_absent=if_absent, if_match=if_match)
        return ObjectInfo(check_key(key), size, sha, sha)

    def put_file(self, key: str, path: Path, *, if_absent: bool = False, task: Task | None = None) -> ObjectInfo:
        dest = self._path(key)
        path = Path(path)

        if not path.is_file():
            raise NotFoundError(f"local file {path} does not exist")
        with self._reporting("upload", key, path.stat().st_size, task) as t:
            tmp, size, sha = self._write_tmp(dest, copy_hashing(path, t.advance))
        self._commit(tmp, dest, key, if_absent=if_absent, if_match=None)
        return ObjectInfo(check_key(key), size, sha, sha)

    # reads -----------------------------------------------------------------------------------------
    def get_bytes(self, key: str) -> tuple[bytes, str]:
        p = self._path(key)
        with os_errors(p, "reading"):
            try:
                data = p.read_bytes()
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                raise NotFoundError(f"not found: {self.url(key)}") from None
        return data, hashlib.sha256(data).hexdigest()

    def get_range(self, key: str, start: int, length: int) -> bytes:
        p = self._path(key)
        with os_errors(p, "reading"):
            try:
                with p.open("rb") as f:
                    f.seek(start)
                    return f.read(length)
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                raise NotFoundError(f"not found: {self.url(key)}") from None

    def sha256(self, key: str) -> str:
        p = self._path(key)
        with os_errors(p, "reading"):
            try:
                return sha256_file(p)
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                raise NotFoundError(f"not found: {self.url(key)}") from None

    def get_file(self, key: str, dest: Path, *, sha256: str | None = None, task: Task | None = None) -> ObjectInfo:
        src = self._path(key)
        dest = Path(dest)
        if not src.is_file():
            raise NotFoundError(f"not found: {self.url(key)}")

        with self._reporting("download", key, src.stat().st_size, task) as t:
            tmp, size, sha = self._write_tmp(dest, copy_hashing(src, t.advance))
        try:
            verify(sha, sha256, self.url(key))
            with os_errors(dest, "writing"):
                os.replace(tmp, dest)
        finally:
            unlink_quietly(tmp)
        return ObjectInfo(check_key(key), size, sha, sha)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def content_matches(self, key: str, sha256: str, checksum: str | None = None) -> bool:
        """Whether the file's sha256 is ``sha256``: every byte is read (a disk keeps no checksum)."""
        p = self._path(key)
        with os_errors(p, "reading"):
            try:
                return sha256_file(p) == sha256
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                raise NotFoundError(f"not found: {self.url(key)}") from None

    def stat(self, key: str) -> ObjectInfo:
        p = self._path(key)
        try:
            st = p.stat()
        except (FileNotFoundError, NotADirectoryError):
            raise NotFoundError(f"not found: {self.url(key)}") from None
        if not p.is_file():
            raise NotFoundError(f"not found: {self.url(key)} (it is a directory)")
        return ObjectInfo(check_key(key), st.st_size, None, None)

    def list_info(self, prefix: str = "") -> list[ObjectInfo]:
        base = self._path(prefix, allow_empty=True)
        pfx = check_key(prefix, allow_empty=True)
        if base.is_file():
            return [ObjectInfo(pfx, base.stat().st_size, None, None)]
        out = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            for name in filenames:
                if HIDDEN.match(name):
                    continue
                p = Path(dirpath) / name
                try:
                    st = p.stat()
                except FileNotFoundError:
                    continue
                out.append(ObjectInfo(p.relative_to(self.root).as_posix(), st.st_size, None, None))
        return sorted(out, key=lambda o: o.key)

    def delete(self, key: str) -> None:
        p = self._path(key)
        with os_errors(p, "deleting"):
            try:
                p.unlink()
            except FileNotFoundError:
                pass
