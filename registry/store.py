"""Object storage: one small interface, a local-directory and an S3 (boto3) implementation.

URIs: ``s3://bucket/prefix``, ``file:///abs/path`` or a plain path. For S3 the endpoint comes from
``MEDFT_S3_ENDPOINT_URL`` or ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (in that order; path-style
addressing when one is set, as MinIO, Ceph and R2 want), credentials and region from the usual AWS
variables. Opening a store makes no request; a missing bucket surfaces at first use as
:class:`NotFoundError` (exit 4), a refusal as :class:`AccessDeniedError` (exit 5). Throttling, 5xx and
connection errors are retried with exponential backoff and full jitter; after ``max_attempts`` they raise
:class:`TransientError` (exit 75).

Guarantees both implementations give:

* Whole objects only: local writes go to a temp file beside the target and are renamed into place; S3
  writes are single PUTs or multipart uploads that are aborted on any failure (including Ctrl-C).
* sha256 of every written file is computed while it is read and returned in :class:`ObjectInfo`;
  ``get_file``/``get_dir`` verify it when told the expected digest and never leave a bad file at ``dest``.
* Create-only writes (``if_absent=True``): ``If-None-Match: *`` on S3 (on the PUT, or on
  CompleteMultipartUpload, which is why large files use hand-written multipart calls rather than boto3's
  ``upload_file``), ``link(2)`` (atomic, O_EXCL semantics) on a local disk. The loser gets
  :class:`PreconditionFailed`.
* Compare-and-swap (``if_match=etag``): ``If-Match`` on S3; on a local disk an ``flock`` around
  "compare the current content digest, rename". A missing key fails the precondition too, whether the
  server answers 404 or 412.
* Keys are ``/``-separated relative paths; ``..``, ``.``, empty segments, absolute paths, backslashes and
  NUL are refused, so nothing is ever written outside the root.

Memory: a transfer holds at most ``(concurrency + 1) * part_size`` bytes in flight (576 MiB by default).
"""

from __future__ import annotations

import base64
import errno
import fcntl
import hashlib
import os
import random
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable
from urllib.parse import urlparse

from registry.errors import (
    AccessDeniedError,
    ConfigError,
    ConflictError,
    DataError,
    MedftError,
    NotFoundError,
    TransientError,
)
from registry.logs import get_logger

__all__ = [
    "LocalStore",
    "MiB",
    "ObjectInfo",
    "PreconditionFailed",
    "S3Store",
    "Store",
    "TransferSettings",
    "check_key",
    "open_store",
    "sha256_file",
]

MiB = 1024**2
_CHUNK = 1 * MiB
_S3_MIN_PART = 5 * MiB
_S3_MAX_PARTS = 10_000
# Names this module leaves beside files while it works; never listed, never part of a key.
_TMP_MARK = ".medft-tmp."
_LOCK_SUFFIX = ".medft-lock"
_HIDDEN = re.compile(r"^\..*(\.medft-tmp\.|\.medft-lock$)")

T = TypeVar("T")


class PreconditionFailed(ConflictError):
    """A create-only write found the key present, or an ``if_match`` etag no longer matches (exit 75)."""


class BucketNotFound(NotFoundError):
    """The S3 bucket itself does not exist (exit 4)."""


class _UploadGone(TransientError):
    """CompleteMultipartUpload answered NoSuchUpload: completed by an earlier try, or aborted."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    """Key relative to the root of the store that produced it."""
    size: int
    sha256: str | None
    """Hex digest; ``None`` where the store has not read the content (listings)."""
    etag: str | None
    """Opaque version token for ``if_match`` (S3 ETag without quotes; content sha256 on a local disk)."""


@dataclass(frozen=True)
class TransferSettings:
    part_size: int = 64 * MiB
    """Multipart part size and ranged-download chunk size (raised automatically for >10,000 parts)."""
    concurrency: int = 8
    """Parallel parts per file, and parallel small files in put_dir/get_dir."""
    max_attempts: int = 8
    """Attempts per request (first try included) on throttling, 5xx and connection errors."""
    multipart_threshold: int | None = None
    """Files larger than this go multipart / ranged; ``None`` means ``part_size``."""
    backoff_base: float = 0.25
    """First backoff cap in seconds; doubles per attempt, full jitter."""
    backoff_max: float = 20.0
    connect_timeout: float = 10.0
    read_timeout: float = 120.0
    content_md5: bool = True
    """Send Content-MD5 with every PUT/part so the server refuses a body damaged in transit (retried)."""
    verify_small: int = 1 * MiB
    """verify_run re-hashes files up to this size; larger ones are checked by size."""

    def __post_init__(self) -> None:
        if self.part_size < _S3_MIN_PART:
            raise ConfigError(f"transfer part_size must be at least 5 MiB (S3's minimum), got {self.part_size}")
        if self.concurrency < 1 or self.max_attempts < 1:
            raise ConfigError("transfer concurrency and max_attempts must be at least 1")

    @property
    def threshold(self) -> int:
        return self.part_size if self.multipart_threshold is None else self.multipart_threshold

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> TransferSettings:
        """Defaults, overridden by ``MEDFT_S3_PART_SIZE_MB``, ``MEDFT_S3_CONCURRENCY``, ``MEDFT_S3_MAX_ATTEMPTS``,
        ``MEDFT_S3_CONTENT_MD5`` (0 to skip the per-part MD5)."""
        env = dict(os.environ) if env is None else env
        kw: dict[str, Any] = {}
        for var, name, conv in (("MEDFT_S3_PART_SIZE_MB", "part_size", lambda v: int(float(v) * MiB)),
                                ("MEDFT_S3_CONCURRENCY", "concurrency", int),
                                ("MEDFT_S3_MAX_ATTEMPTS", "max_attempts", int),
                                ("MEDFT_S3_CONTENT_MD5", "content_md5", lambda v: v.lower() not in ("0", "false", "no"))):
            if env.get(var):
                try:
                    kw[name] = conv(env[var])
                except ValueError:
                    raise ConfigError(f"{var}={env[var]!r} is not a number") from None
        return cls(**kw)


@runtime_checkable
class Store(Protocol):
    uri: str

    def url(self, key: str) -> str: ...
    def child(self, prefix: str) -> Store: ...
    def put_file(self, key: str, path: Path, *, if_absent: bool = False) -> ObjectInfo: ...
    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False,
                  if_match: str | None = None) -> ObjectInfo: ...
    def get_bytes(self, key: str) -> tuple[bytes, str]: ...
    def get_file(self, key: str, dest: Path, *, sha256: str | None = None) -> ObjectInfo: ...
    def exists(self, key: str) -> bool: ...
    def stat(self, key: str) -> ObjectInfo: ...
    def list(self, prefix: str = "") -> list[str]: ...
    def list_info(self, prefix: str = "") -> list[ObjectInfo]: ...
    def delete(self, key: str) -> None: ...
    def put_dir(self, prefix: str, local_dir: Path) -> list[ObjectInfo]: ...
    def get_dir(self, prefix: str, dest: Path, *,
                expected: dict[str, str] | None = None) -> list[ObjectInfo]: ...


# --------------------------------------------------------------------------------------------- helpers

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


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MiB):
            h.update(chunk)
    return h.hexdigest()


@contextmanager
def _os_errors(path: Path | str, doing: str) -> Iterator[None]:
    """Map the OS errors a user can fix to medft errors with one clear line."""
    try:
        yield
    except MedftError:
        raise
    except OSError as e:
        if e.errno == errno.ENOSPC or e.errno == errno.EDQUOT:
            raise TransientError(f"disk full while {doing} {path}: free space on that volume (or use a bigger "
                                 f"one) and retry") from e
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise AccessDeniedError(f"permission denied while {doing} {path}: {e.strerror}") from e
        if e.errno == errno.EIO:
            raise TransientError(f"I/O error while {doing} {path}: {e.strerror}") from e
        raise


def _copy_hashing(path: Path) -> Callable[[Any], tuple[int, str]]:
    """A writer for ``_write_tmp`` that copies ``path`` into the open file, returning (bytes, sha256)."""

    def source(f: Any) -> tuple[int, str]:
        h, n = hashlib.sha256(), 0
        with _os_errors(path, "reading"), open(path, "rb") as src:
            while chunk := src.read(8 * MiB):
                h.update(chunk)
                f.write(chunk)
                n += len(chunk)
        return n, h.hexdigest()

    return source


def _tmp_beside(dest: Path) -> Path:
    return dest.parent / f".{dest.name}{_TMP_MARK}{uuid.uuid4().hex[:12]}"


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


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


def _local_files(local_dir: Path) -> list[tuple[str, Path]]:
    """(relative posix path, path) for every regular file under ``local_dir`` (file symlinks followed)."""
    if not local_dir.is_dir():
        raise NotFoundError(f"local directory {local_dir} does not exist")
    out = []
    for dirpath, dirnames, filenames in os.walk(local_dir):
        dirnames.sort()
        for name in sorted(filenames):
            if _HIDDEN.match(name):
                continue
            p = Path(dirpath) / name
            if p.is_file():
                out.append((p.relative_to(local_dir).as_posix(), p))
    return out


def _verify(sha: str, expected: str | None, uri: str) -> None:
    if expected is not None and sha != expected.lower():
        raise DataError(f"checksum mismatch for {uri}: expected sha256 {expected}, got {sha}; the stored "
                        f"object is corrupt or was replaced (nothing was written)")


def _parallel(items: list[T], fn: Callable[[T], Any], workers: int) -> list[Any]:
    """Run ``fn`` over ``items`` with ``workers`` threads, in order; the first failure cancels the rest."""
    if not items:
        return []
    if workers <= 1 or len(items) == 1:
        return [fn(i) for i in items]
    ex = ThreadPoolExecutor(max_workers=min(workers, len(items)), thread_name_prefix="medft-store")
    try:
        futures = [ex.submit(fn, i) for i in items]
        return [f.result() for f in futures]
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


# ------------------------------------------------------------------------------------------ open_store

def open_store(uri: str, *, transfer: TransferSettings | None = None) -> Store:
    """Open ``s3://bucket/prefix``, ``file:///abs/path`` or a plain path. Makes no request."""
    if not isinstance(uri, str) or not uri.strip():
        raise ConfigError("store URI is empty; pass --store or set MEDFT_STORE")
    uri = uri.strip()
    transfer = transfer or TransferSettings.from_env()
    if uri.startswith("s3://"):
        parsed = urlparse(uri)
        bucket = parsed.netloc
        if not re.fullmatch(r"[a-z0-9][a-z0-9.\-_]{1,254}", bucket or ""):
            raise ConfigError(f"store URI {uri!r} has no valid bucket name (expected s3://bucket/prefix)")
        prefix = check_key(parsed.path.lstrip("/"), allow_empty=True, what=f"prefix of store URI {uri!r}")
        return S3Store(bucket, prefix, transfer=transfer)
    if uri.startswith("file://"):
        parsed = urlparse(uri)
        if parsed.netloc not in ("", "localhost"):
            raise ConfigError(f"store URI {uri!r}: file URIs must be file:///absolute/path")
        path = parsed.path
    elif re.match(r"^[A-Za-z][A-Za-z0-9+.\-]*://", uri):
        raise ConfigError(f"unsupported store URI {uri!r}: use s3://bucket/prefix, file:///abs/path or a path")
    else:
        path = uri
    parts = re.split(r"[\\/]", path)
    if ".." in parts:
        raise ConfigError(f"store path {uri!r} must not contain '..' segments")
    return LocalStore(Path(os.path.abspath(os.path.expanduser(path))), transfer=transfer)


# ------------------------------------------------------------------------------------------ LocalStore

class LocalStore:
    """A directory on a local or shared disk. ``uri`` is the absolute path (usable directly as a path)."""

    def __init__(self, root: Path, *, transfer: TransferSettings | None = None) -> None:
        self.root = Path(root)
        self.transfer = transfer or TransferSettings()
        self.uri = str(self.root).rstrip("/") or "/"

    def __repr__(self) -> str:
        return f"LocalStore({self.uri!r})"

    # paths -----------------------------------------------------------------------------------------
    def _path(self, key: str, *, allow_empty: bool = False) -> Path:
        k = check_key(key, allow_empty=allow_empty)
        if k and _HIDDEN.match(k.rsplit("/", 1)[-1]):
            raise ConfigError(f"storage key {key!r} uses a name reserved for medft's temporary files")
        return self.root / k if k else self.root

    def url(self, key: str) -> str:
        k = check_key(key, allow_empty=True)
        return f"{self.uri}/{k}" if k else self.uri

    def child(self, prefix: str) -> LocalStore:
        return LocalStore(self._path(prefix, allow_empty=True), transfer=self.transfer)

    # writes ----------------------------------------------------------------------------------------
    @contextmanager
    def _key_lock(self, path: Path) -> Iterator[None]:
        lock = path.parent / f".{path.name}{_LOCK_SUFFIX}"
        with _os_errors(lock, "locking"):
            fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the flock

    def _write_tmp(self, dest: Path, source: Callable[[Any], tuple[int, str]]) -> tuple[Path, int, str]:
        """Write to a temp file beside ``dest`` via ``source(fileobj) -> (size, sha256)``; fsync it."""
        with _os_errors(dest.parent, "creating directory"):
            dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = _tmp_beside(dest)
        try:
            with _os_errors(dest, "writing"), open(tmp, "xb") as f:
                size, sha = source(f)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            _unlink_quietly(tmp)
            raise
        return tmp, size, sha

    def _commit(self, tmp: Path, dest: Path, key: str, *, if_absent: bool, if_match: str | None) -> None:
        try:
            with _os_errors(dest, "writing"):
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
            _unlink_quietly(tmp)

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

        def source(f: Any) -> tuple[int, str]:
            f.write(data)
            return len(data), sha

        tmp, size, sha = self._write_tmp(dest, source)
        self._commit(tmp, dest, key, if_absent=if_absent, if_match=if_match)
        return ObjectInfo(check_key(key), size, sha, sha)

    def put_file(self, key: str, path: Path, *, if_absent: bool = False) -> ObjectInfo:
        dest = self._path(key)
        path = Path(path)

        if not path.is_file():
            raise NotFoundError(f"local file {path} does not exist")
        tmp, size, sha = self._write_tmp(dest, _copy_hashing(path))
        self._commit(tmp, dest, key, if_absent=if_absent, if_match=None)
        return ObjectInfo(check_key(key), size, sha, sha)

    # reads -----------------------------------------------------------------------------------------
    def get_bytes(self, key: str) -> tuple[bytes, str]:
        p = self._path(key)
        try:
            with _os_errors(p, "reading"):
                data = p.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFoundError(f"not found: {self.url(key)}") from None
        return data, hashlib.sha256(data).hexdigest()

    def get_file(self, key: str, dest: Path, *, sha256: str | None = None) -> ObjectInfo:
        src = self._path(key)
        dest = Path(dest)
        if not src.is_file():
            raise NotFoundError(f"not found: {self.url(key)}")

        tmp, size, sha = self._write_tmp(dest, _copy_hashing(src))
        try:
            _verify(sha, sha256, self.url(key))
            with _os_errors(dest, "writing"):
                os.replace(tmp, dest)
        finally:
            _unlink_quietly(tmp)
        return ObjectInfo(check_key(key), size, sha, sha)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def stat(self, key: str) -> ObjectInfo:
        p = self._path(key)
        try:
            st = p.stat()
        except (FileNotFoundError, NotADirectoryError):
            raise NotFoundError(f"not found: {self.url(key)}") from None
        if not p.is_file():
            raise NotFoundError(f"not found: {self.url(key)} (it is a directory)")
        return ObjectInfo(check_key(key), st.st_size, None, None)

    def list(self, prefix: str = "") -> list[str]:
        return [o.key for o in self.list_info(prefix)]

    def list_info(self, prefix: str = "") -> list[ObjectInfo]:
        base = self._path(prefix, allow_empty=True)
        pfx = check_key(prefix, allow_empty=True)
        if base.is_file():
            return [ObjectInfo(pfx, base.stat().st_size, None, None)]
        out = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            for name in filenames:
                if _HIDDEN.match(name):
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
        with _os_errors(p, "deleting"):
            try:
                p.unlink()
            except FileNotFoundError:
                pass

    # directories -----------------------------------------------------------------------------------
    def put_dir(self, prefix: str, local_dir: Path) -> list[ObjectInfo]:
        pfx = check_key(prefix, allow_empty=True)
        files = _local_files(Path(local_dir))
        return _parallel(files, lambda f: self.put_file(_join(pfx, f[0]), f[1]), self.transfer.concurrency)

    def get_dir(self, prefix: str, dest: Path, *, expected: dict[str, str] | None = None) -> list[ObjectInfo]:
        return _get_dir(self, prefix, Path(dest), expected)


def _get_dir(store: Any, prefix: str, dest: Path, expected: dict[str, str] | None) -> list[ObjectInfo]:
    """Shared get_dir: every object under ``prefix`` (or exactly ``expected``) into ``dest``."""
    pfx = check_key(prefix, allow_empty=True)
    sizes: dict[str, int] = {}
    for o in store.list_info(pfx):  # one listing: sizes decide which files go in parallel
        rel = o.key[len(pfx) + 1:] if pfx else o.key
        sizes[rel or o.key.rsplit("/", 1)[-1]] = o.size
    if expected is None:
        plan: list[tuple[str, str | None]] = [(rel, None) for rel in sorted(sizes)]
    else:
        plan = [(check_key(rel, what="file path in the expected list", error=DataError), sha)
                for rel, sha in sorted(expected.items())]
        missing = [rel for rel, _ in plan if rel not in sizes]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise NotFoundError(f"not found: {store.url(_join(pfx, missing[0]))}{more} (listed as expected)")
    with _os_errors(dest, "creating directory"):
        dest.mkdir(parents=True, exist_ok=True)
    small = [p for p in plan if sizes.get(p[0], 0) <= store.transfer.threshold]
    large = [p for p in plan if p not in small]

    def one(item: tuple[str, str | None]) -> ObjectInfo:
        rel, sha = item
        return store.get_file(_join(pfx, rel), dest / rel, sha256=sha)

    # Small files side by side; large ones one at a time, each already parallel across its parts.
    out = _parallel(small, one, store.transfer.concurrency) + [one(p) for p in large]
    return sorted(out, key=lambda o: o.key)


# --------------------------------------------------------------------------------------------- S3Store

_RETRY_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "RequestThrottled",
    "TooManyRequests", "TooManyRequestsException", "RequestTimeout", "RequestTimeoutException",
    "InternalError", "ServiceUnavailable", "BadDigest", "IncompleteBody", "XAmzContentSHA256Mismatch",
    "ConditionalRequestConflict", "OperationAborted", "PriorRequestNotComplete",
}
_DENIED_CODES = {
    "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled", "AccountProblem",
    "ExpiredToken", "InvalidToken", "InvalidSecurity", "Forbidden", "AuthorizationHeaderMalformed",
}


@dataclass
class _Attempts:
    retried_after_send: bool = False
    """A retry followed an error after which the request may still have been applied."""
    last: str = ""
    count: int = 0
    errors: list[str] = field(default_factory=list)


def _endpoint_from_env() -> str | None:
    for var in ("MEDFT_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if os.environ.get(var):
            return os.environ[var]
    return None


def _md5_b64(data: bytes | memoryview) -> tuple[str, str]:
    d = hashlib.md5(data, usedforsecurity=False)
    return base64.b64encode(d.digest()).decode(), d.hexdigest()


class S3Store:
    """An S3 bucket and prefix. ``uri`` is ``s3://bucket/prefix``."""

    def __init__(self, bucket: str, prefix: str = "", *, transfer: TransferSettings | None = None,
                 client: Any = None, endpoint: str | None = None, _shared: dict[str, Any] | None = None) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.transfer = transfer or TransferSettings()
        self.endpoint = endpoint if endpoint is not None else _endpoint_from_env()
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self._client = client
        # state shared with child stores: the lazily built client, the bucket check
        self._shared = _shared if _shared is not None else {"lock": threading.Lock(), "bucket_ok": False}
        if client is not None:
            self._shared["client"] = client

    def __repr__(self) -> str:
        return f"S3Store({self.uri!r}, endpoint={self.endpoint!r})"

    # client ----------------------------------------------------------------------------------------
    @property
    def client(self) -> Any:
        c = self._shared.get("client")
        if c is None:
            with self._shared["lock"]:
                c = self._shared.get("client")
                if c is None:
                    c = self._shared["client"] = self._make_client()
        return c

    def _make_client(self) -> Any:
        import boto3
        from botocore.config import Config

        t = self.transfer
        cfg = Config(
            retries={"total_max_attempts": 1, "mode": "standard"},  # we retry ourselves, with backoff
            max_pool_connections=max(10, 2 * t.concurrency + 2),
            connect_timeout=t.connect_timeout,
            read_timeout=t.read_timeout,
            # Content-MD5 on every PUT already guards the body; skip SigV4's extra sha256 pass over it
            # (botocore otherwise hashes every body on plain-http endpoints such as in-cluster MinIO).
            s3={"payload_signing_enabled": not t.content_md5,
                **({"addressing_style": "path"} if self.endpoint else {})},
            # S3-compatible servers differ on flexible checksums; we send Content-MD5 and check sha256.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if not region and self.endpoint:
            region = "us-east-1"
        session = boto3.session.Session()
        return session.client("s3", endpoint_url=self.endpoint, region_name=region, config=cfg)

    # keys ------------------------------------------------------------------------------------------
    def _full(self, key: str, *, allow_empty: bool = False) -> str:
        return _join(self.prefix, check_key(key, allow_empty=allow_empty))

    def _rel(self, full: str) -> str:
        return full[len(self.prefix) + 1:] if self.prefix else full

    def url(self, key: str) -> str:
        k = check_key(key, allow_empty=True)
        return f"{self.uri}/{k}" if k else self.uri

    def child(self, prefix: str) -> S3Store:
        return S3Store(self.bucket, self._full(prefix, allow_empty=True), transfer=self.transfer,
                       endpoint=self.endpoint, _shared=self._shared)

    # errors and retries ----------------------------------------------------------------------------
    def _classify(self, exc: BaseException, what: str, uri: str) -> tuple[str, MedftError | None]:
        """('retry' | 'fail' | 'other', error). 'other' means re-raise as a bug."""
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            HTTPClientError,
            IncompleteReadError,
            NoCredentialsError,
            PartialCredentialsError,
        )
        from botocore.exceptions import (
            ConnectionError as BotoConnectionError,
        )

        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {}) or {}
            code = str(err.get("Code") or "")
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            msg = err.get("Message") or code or f"HTTP {status}"
            if code in _DENIED_CODES or status == 403:
                return "fail", AccessDeniedError(
                    f"access denied by S3 while {what} {uri} ({code or status}: {msg}); check the "
                    f"credentials (AWS_ACCESS_KEY_ID/AWS_PROFILE) and their permissions on bucket {self.bucket!r}")
            if code == "NoSuchBucket":
                return "fail", BucketNotFound(
                    f"bucket {self.bucket!r} does not exist (while {what} {uri}); create it or fix the store URI"
                    + (f" / endpoint {self.endpoint}" if self.endpoint else ""))
            if code in ("NoSuchKey", "NotFound") or status == 404:
                return "fail", NotFoundError(f"not found: {uri}")
            if code in ("PreconditionFailed",) or status == 412:
                return "fail", PreconditionFailed(
                    f"precondition failed while {what} {uri}: it already exists or changed since it was read")
            if code in _RETRY_CODES or status >= 500 or status == 429:
                return "retry", TransientError(f"S3 {code or status} while {what} {uri}: {msg}")
            if code == "NoSuchUpload":
                return "fail", _UploadGone(f"multipart upload vanished while {what} {uri}; retry the upload")
            return "fail", ConfigError(f"S3 refused {what} {uri} ({code or status}: {msg})")
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            return "fail", AccessDeniedError(
                f"no usable AWS credentials for {uri}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                f"(or AWS_PROFILE / an instance role)")
        if isinstance(exc, (BotoConnectionError, HTTPClientError, IncompleteReadError)):
            return "retry", TransientError(f"connection to S3 failed while {what} {uri}: {exc}")
        if isinstance(exc, BotoCoreError):
            return "fail", ConfigError(f"S3 client error while {what} {uri}: {exc}")
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return "retry", TransientError(f"connection to S3 failed while {what} {uri}: {exc}")
        return "other", None

    def _backoff(self, attempt: int) -> None:
        t = self.transfer
        time.sleep(random.uniform(0, min(t.backoff_max, t.backoff_base * (2 ** (attempt - 1)))))

    def _call(self, what: str, uri: str, fn: Callable[[], T], attempts: _Attempts | None = None) -> T:
        """Run ``fn`` with retries on throttling/5xx/connection errors; map the rest to medft errors."""
        attempts = attempts if attempts is not None else _Attempts()
        max_attempts = self.transfer.max_attempts
        while True:
            attempts.count += 1
            try:
                return fn()
            except MedftError:
                raise
            except Exception as exc:
                kind, err = self._classify(exc, what, uri)
                if kind == "other" or err is None:
                    raise
                if kind == "fail":
                    raise err from exc
                attempts.retried_after_send = True
                attempts.errors.append(err.message)
                if attempts.count >= max_attempts:
                    raise TransientError(f"{err.message} (gave up after {attempts.count} attempts; "
                                         f"retry later)") from exc
                self._backoff(attempts.count)

    def _check_bucket(self) -> None:
        """HEAD answers 404 with no code for a missing bucket and a missing key alike: tell them apart once."""
        if self._shared.get("bucket_ok"):
            return
        try:
            self._call("checking bucket", f"s3://{self.bucket}",
                       lambda: self.client.head_bucket(Bucket=self.bucket))
        except BucketNotFound:
            raise
        except NotFoundError as e:  # HEAD bucket: a bare 404
            raise BucketNotFound(
                f"bucket {self.bucket!r} does not exist ({self.uri}); create it or fix the store URI"
                + (f" / endpoint {self.endpoint}" if self.endpoint else "")) from e
        self._shared["bucket_ok"] = True

    def _not_found(self, exc: NotFoundError, key: str) -> NotFoundError:
        try:
            self._check_bucket()
        except NotFoundError as bucket_missing:
            return bucket_missing
        return exc

    # metadata --------------------------------------------------------------------------------------
    def _head(self, key: str) -> dict[str, Any]:
        full = self._full(key)
        try:
            return self._call("reading", self.url(key),
                              lambda: self.client.head_object(Bucket=self.bucket, Key=full))
        except NotFoundError as e:
            raise self._not_found(e, key) from None

    def stat(self, key: str) -> ObjectInfo:
        h = self._head(key)
        meta = {k.lower(): v for k, v in (h.get("Metadata") or {}).items()}
        return ObjectInfo(check_key(key), int(h["ContentLength"]), meta.get("sha256"),
                          str(h.get("ETag", "")).strip('"') or None)

    def exists(self, key: str) -> bool:
        try:
            self._head(key)
            return True
        except BucketNotFound:
            raise
        except NotFoundError:
            return False

    def list(self, prefix: str = "") -> list[str]:
        return [o.key for o in self.list_info(prefix)]

    def list_info(self, prefix: str = "") -> list[ObjectInfo]:
        pfx = self._full(prefix, allow_empty=True)
        exact = pfx if prefix.strip("/") else None
        s3_prefix = pfx + "/" if pfx else ""
        out: list[ObjectInfo] = []

        def page_through() -> list[ObjectInfo]:
            got: list[ObjectInfo] = []
            token = None
            while True:
                kw: dict[str, Any] = {"Bucket": self.bucket, "Prefix": s3_prefix}
                if token:
                    kw["ContinuationToken"] = token
                resp = self.client.list_objects_v2(**kw)
                for o in resp.get("Contents", []) or []:
                    got.append(ObjectInfo(self._rel(o["Key"]), int(o["Size"]), None,
                                          str(o.get("ETag", "")).strip('"') or None))
                if not resp.get("IsTruncated"):
                    return got
                token = resp.get("NextContinuationToken")

        out = self._call("listing", self.url(prefix), page_through)
        if exact is not None and not out:
            # the prefix may name one object
            try:
                return [self.stat(check_key(prefix))]
            except BucketNotFound:
                raise
            except NotFoundError:
                return []
        return sorted(out, key=lambda o: o.key)

    def delete(self, key: str) -> None:
        full = self._full(key)
        try:
            self._call("deleting", self.url(key), lambda: self.client.delete_object(Bucket=self.bucket, Key=full))
        except BucketNotFound:
            raise
        except NotFoundError:
            pass

    # writes ----------------------------------------------------------------------------------------
    def _is_ours(self, key: str, expected_etag: str) -> bool:
        """After a retried conditional write fails its condition, did an earlier try land after all?"""
        try:
            return self.stat(key).etag == expected_etag
        except NotFoundError:
            return False

    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False,
                  if_match: str | None = None) -> ObjectInfo:
        full = self._full(key)
        sha = hashlib.sha256(data).hexdigest()
        md5_b64, md5_hex = _md5_b64(data)
        kw: dict[str, Any] = {"Bucket": self.bucket, "Key": full, "Body": data, "Metadata": {"sha256": sha}}
        if self.transfer.content_md5:
            kw["ContentMD5"] = md5_b64
        if if_absent:
            kw["IfNoneMatch"] = "*"
        if if_match is not None:
            kw["IfMatch"] = f'"{if_match.strip(chr(34))}"'
        attempts = _Attempts()
        try:
            resp = self._call("writing", self.url(key), lambda: self.client.put_object(**kw), attempts)
        except PreconditionFailed as e:
            if attempts.retried_after_send and self._is_ours(key, md5_hex):
                return ObjectInfo(check_key(key), len(data), sha, md5_hex)
            raise PreconditionFailed(f"{self.url(key)} " + ("already exists (create-only write)" if if_absent
                                     else "changed since it was read (etag no longer matches)")) from e
        except BucketNotFound:
            raise
        except NotFoundError as e:
            if if_match is not None:  # a missing key: servers answer 404 or 412 here
                raise PreconditionFailed(f"{self.url(key)} is gone; it changed since it was read") from e
            raise
        return ObjectInfo(check_key(key), len(data), sha, str(resp.get("ETag", "")).strip('"') or md5_hex)

    def put_file(self, key: str, path: Path, *, if_absent: bool = False) -> ObjectInfo:
        path = Path(path)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise NotFoundError(f"local file {path} does not exist") from None
        if size <= self.transfer.threshold:
            with _os_errors(path, "reading"):
                data = path.read_bytes()
            return self.put_bytes(key, data, if_absent=if_absent)
        return self._put_multipart(key, path, size, if_absent=if_absent)

    def _put_multipart(self, key: str, path: Path, size: int, *, if_absent: bool) -> ObjectInfo:
        full, uri = self._full(key), self.url(key)
        t = self.transfer
        part_size = max(t.part_size, -(-size // _S3_MAX_PARTS))
        resp = self._call("starting multipart upload of", uri, lambda: self.client.create_multipart_upload(
            Bucket=self.bucket, Key=full))
        upload_id = resp["UploadId"]
        h = hashlib.sha256()
        parts: list[dict[str, Any]] = []
        md5s: list[bytes] = []

        def upload_part(number: int, data: bytes) -> tuple[dict[str, Any], bytes]:
            kw: dict[str, Any] = {"Bucket": self.bucket, "Key": full, "UploadId": upload_id,
                                  "PartNumber": number, "Body": data}
            if self.transfer.content_md5:
                kw["ContentMD5"] = _md5_b64(data)[0]
            r = self._call(f"uploading part {number} of", uri, lambda: self.client.upload_part(**kw))
            try:
                digest = bytes.fromhex(str(r["ETag"]).strip('"'))
            except ValueError:  # not an MD5 (some servers, SSE-KMS): only the lost-answer check loses
                digest = b""
            return {"PartNumber": number, "ETag": r["ETag"]}, digest

        ex = ThreadPoolExecutor(max_workers=t.concurrency, thread_name_prefix="medft-put")
        completed = False
        try:
            pending: deque[Future[tuple[dict[str, Any], bytes]]] = deque()
            with _os_errors(path, "reading"), open(path, "rb") as f:
                number = 0
                while True:
                    data = f.read(part_size)
                    if not data:
                        break
                    h.update(data)
                    number += 1
                    pending.append(ex.submit(upload_part, number, data))
                    del data
                    while len(pending) > t.concurrency:  # bound memory: window of concurrency + 1 parts
                        p, m = pending.popleft().result()
                        parts.append(p)
                        md5s.append(m)
                while pending:
                    p, m = pending.popleft().result()
                    parts.append(p)
                    md5s.append(m)
            expected_etag = f"{hashlib.md5(b''.join(md5s), usedforsecurity=False).hexdigest()}-{len(parts)}"
            kw: dict[str, Any] = {"Bucket": self.bucket, "Key": full, "UploadId": upload_id,
                                  "MultipartUpload": {"Parts": parts}}
            if if_absent:
                kw["IfNoneMatch"] = "*"
            attempts = _Attempts()
            try:
                r = self._call("completing multipart upload of", uri,
                               lambda: self.client.complete_multipart_upload(**kw), attempts)
                etag = str(r.get("ETag", "")).strip('"') or expected_etag
            except (PreconditionFailed, _UploadGone) as e:
                # A retried Complete may find the upload already completed (NoSuchUpload) or our own
                # object in place (412): ours if the multipart etag matches.
                if not (attempts.retried_after_send and self._is_ours(key, expected_etag)):
                    if isinstance(e, PreconditionFailed):
                        raise PreconditionFailed(f"{uri} already exists (create-only write)") from e
                    raise
                etag = expected_etag
            completed = True
            return ObjectInfo(check_key(key), size, h.hexdigest(), etag)
        finally:
            ex.shutdown(wait=True, cancel_futures=True)
            if not completed:
                self._abort(full, upload_id)

    def _abort(self, full: str, upload_id: str) -> None:
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id)
        except Exception as e:  # noqa: BLE001 - best effort; a lifecycle rule cleans up the rest
            get_logger("medft.store").warning("multipart_abort_failed", key=full, upload_id=upload_id,
                                               error=str(e))

    # reads -----------------------------------------------------------------------------------------
    def get_bytes(self, key: str) -> tuple[bytes, str]:
        full = self._full(key)

        def fetch() -> tuple[bytes, str]:
            r = self.client.get_object(Bucket=self.bucket, Key=full)
            return r["Body"].read(), str(r.get("ETag", "")).strip('"')

        try:
            return self._call("reading", self.url(key), fetch)
        except NotFoundError as e:
            raise self._not_found(e, key) from None

    def get_file(self, key: str, dest: Path, *, sha256: str | None = None) -> ObjectInfo:
        info = self.stat(key)
        return self._get_file(key, Path(dest), sha256, info)

    def _get_file(self, key: str, dest: Path, sha256: str | None, info: ObjectInfo) -> ObjectInfo:
        full, uri = self._full(key), self.url(key)
        expected = sha256 or info.sha256  # our uploads carry their sha256 in metadata
        with _os_errors(dest.parent, "creating directory"):
            dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = _tmp_beside(dest)
        if_match = f'"{info.etag}"' if info.etag else None
        try:
            with _os_errors(dest, "writing"):
                if info.size <= self.transfer.threshold:
                    sha = self._get_single(full, uri, tmp, if_match)
                else:
                    sha = self._get_ranged(full, uri, tmp, info.size, if_match)
            _verify(sha, expected, uri)
            with _os_errors(dest, "writing"):
                os.replace(tmp, dest)
        finally:
            _unlink_quietly(tmp)
        return ObjectInfo(check_key(key), info.size, sha, info.etag)

    def _get_kw(self, full: str, if_match: str | None) -> dict[str, Any]:
        kw: dict[str, Any] = {"Bucket": self.bucket, "Key": full}
        if if_match:
            kw["IfMatch"] = if_match
        return kw

    def _get_single(self, full: str, uri: str, tmp: Path, if_match: str | None) -> str:
        def fetch() -> str:
            h = hashlib.sha256()
            r = self.client.get_object(**self._get_kw(full, if_match))
            with open(tmp, "wb") as f:
                for chunk in r["Body"].iter_chunks(_CHUNK):
                    h.update(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            return h.hexdigest()

        try:
            return self._call("downloading", uri, fetch)
        except PreconditionFailed as e:
            raise TransientError(f"{uri} was replaced while it was being downloaded; retry") from e

    def _get_ranged(self, full: str, uri: str, tmp: Path, size: int, if_match: str | None) -> str:
        t = self.transfer
        chunk = t.part_size
        fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, size)

            def fetch_range(start: int) -> bytes:
                end = min(start + chunk, size) - 1

                def fetch() -> bytes:
                    r = self.client.get_object(Range=f"bytes={start}-{end}", **self._get_kw(full, if_match))
                    data = r["Body"].read()
                    if len(data) != end - start + 1:
                        from botocore.exceptions import IncompleteReadError
                        raise IncompleteReadError(actual_bytes=len(data), expected_bytes=end - start + 1)
                    return data

                data = self._call(f"downloading bytes {start}-{end} of", uri, fetch)
                view = memoryview(data)
                off = 0
                while off < len(view):
                    off += os.pwrite(fd, view[off:], start + off)
                return data

            h = hashlib.sha256()
            ex = ThreadPoolExecutor(max_workers=t.concurrency, thread_name_prefix="medft-get")
            try:
                pending: deque[Future[bytes]] = deque()
                for start in range(0, size, chunk):
                    pending.append(ex.submit(fetch_range, start))
                    while len(pending) > t.concurrency:  # hash in order; bounds memory
                        h.update(pending.popleft().result())
                while pending:
                    h.update(pending.popleft().result())
            except PreconditionFailed as e:
                raise TransientError(f"{uri} was replaced while it was being downloaded; retry") from e
            finally:
                ex.shutdown(wait=True, cancel_futures=True)
            os.fsync(fd)
            return h.hexdigest()
        finally:
            os.close(fd)

    # directories -----------------------------------------------------------------------------------
    def put_dir(self, prefix: str, local_dir: Path) -> list[ObjectInfo]:
        pfx = check_key(prefix, allow_empty=True)
        files = _local_files(Path(local_dir))
        threshold = self.transfer.threshold
        small = [f for f in files if f[1].stat().st_size <= threshold]
        large = [f for f in files if f not in small]
        out = _parallel(small, lambda f: self.put_file(_join(pfx, f[0]), f[1]), self.transfer.concurrency)
        out += [self.put_file(_join(pfx, rel), p) for rel, p in large]
        return sorted(out, key=lambda o: o.key)

    def get_dir(self, prefix: str, dest: Path, *, expected: dict[str, str] | None = None) -> list[ObjectInfo]:
        return _get_dir(self, prefix, Path(dest), expected)


def with_transfer(store: Store, transfer: TransferSettings) -> Store:
    """The same store with other transfer settings (a fresh client for S3)."""
    if isinstance(store, S3Store):
        return S3Store(store.bucket, store.prefix, transfer=transfer, endpoint=store.endpoint)
    if isinstance(store, LocalStore):
        return LocalStore(store.root, transfer=transfer)
    return store

