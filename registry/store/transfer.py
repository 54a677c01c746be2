"""How bytes move: transfer settings (and their environment variables), the parallel executor, and copying
that hashes as it goes. The lowest layer of the store package: it knows nothing of stores.

Memory: a transfer holds at most ``(concurrency + 1) * part_size`` bytes in flight (576 MiB by default).
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from registry.errors import AccessDeniedError, ConfigError, DataError, MedftError, TransientError

MiB = 1024**2
S3_MIN_PART = 5 * MiB

T = TypeVar("T")


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

    def __post_init__(self) -> None:
        if self.part_size < S3_MIN_PART:
            raise ConfigError(f"transfer part_size must be at least 5 MiB (S3's minimum), got {self.part_size}")
        if self.concurrency < 1 or self.max_attempts < 1:
            raise ConfigError("transfer concurrency and max_attempts must be at least 1")

    @property
    def threshold(self) -> int:
        return self.part_size if self.multipart_threshold is None else self.multipart_threshold

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> TransferSettings:
        """Defaults, overridden by ``MEDFT_S3_PART_SIZE_MB``, ``MEDFT_S3_CONCURRENCY``, ``MEDFT_S3_MAX_ATTEMPTS``,
        ``MEDFT_S3_CONTENT_MD5`` (0 to skip the per-part MD5). Raises ConfigError naming the variable."""
        env = dict(os.environ) if env is None else env
        kw: dict[str, Any] = {}
        for var, name, parse in (("MEDFT_S3_PART_SIZE_MB", "part_size", _part_size_mb),
                                 ("MEDFT_S3_CONCURRENCY", "concurrency", lambda v: _int_between(v, 1, 64)),
                                 ("MEDFT_S3_MAX_ATTEMPTS", "max_attempts", lambda v: _int_between(v, 1, 100)),
                                 ("MEDFT_S3_CONTENT_MD5", "content_md5", _flag)):
            if env.get(var, "").strip():
                try:
                    kw[name] = parse(env[var].strip())
                except ValueError as e:
                    raise ConfigError(f"{var}={env[var]!r} {e}") from None
        return cls(**kw)


def _part_size_mb(value: str) -> int:
    mib = float(value) if re.fullmatch(r"[0-9]+(\.[0-9]+)?", value) else -1.0  # no inf, nan, sign or text
    if not 5 <= mib <= 5 * 1024:
        raise ValueError("must be a number of MiB from 5 to 5120 (S3's part size limits)")
    return int(mib * MiB)


def _int_between(value: str, low: int, high: int) -> int:
    if not re.fullmatch(r"[0-9]+", value) or not low <= int(value) <= high:
        raise ValueError(f"must be a whole number from {low} to {high}")
    return int(value)


def _flag(value: str) -> bool:
    if value.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
        raise ValueError("must be 1 or 0 (true/false, yes/no, on/off)")
    return value.lower() in ("1", "true", "yes", "on")


def parallel(items: list[T], fn: Callable[[T], Any], workers: int) -> list[Any]:
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


def write_whole(dest: Path, write: Callable[[Path], None]) -> None:
    """``write(path)`` into a hidden file beside ``dest``, then renamed over it: ``dest`` is whole or untouched,
    and nothing partial is left behind, whatever ``write`` raises."""
    partial = dest.with_name(f".{dest.name}.partial")
    try:
        write(partial)
        os.replace(partial, dest)
    finally:
        partial.unlink(missing_ok=True)


@contextmanager
def os_errors(path: Path | str, doing: str) -> Iterator[None]:
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
        if e.errno == errno.ENOENT and doing in ("creating directory", "writing") and Path(e.filename or path).parent.is_dir():
            # The folder above is there, yet nothing can be made in it: a virtual file system such as /proc.
            raise ConfigError(f"cannot create {e.filename or path} while {doing} ({e.strerror}): that folder cannot "
                              "hold files; pick a path on a writable disk") from e
        if e.errno in (errno.EISDIR, errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG):
            # Something else stands where a file or folder is needed (a folder, a file, a link loop, a name too long).
            raise DataError(f"{e.strerror} while {doing} {e.filename or path}: something else stands there, or "
                            "the path cannot be used; move it away or pick another path and retry") from e
        raise


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MiB):
            h.update(chunk)
    return h.hexdigest()


def copy_hashing(path: Path, on_bytes: Callable[[int], None] | None = None) -> Callable[[BinaryIO], tuple[int, str]]:
    """A writer for ``LocalStore._write_tmp`` that copies ``path`` into the open file, returning (bytes, sha256);
    ``on_bytes(n)`` is told each chunk copied (progress)."""

    def source(f: BinaryIO) -> tuple[int, str]:
        h, n = hashlib.sha256(), 0
        with os_errors(path, "reading"), open(path, "rb") as src:
            while chunk := src.read(8 * MiB):
                h.update(chunk)
                f.write(chunk)
                n += len(chunk)
                if on_bytes is not None:
                    on_bytes(len(chunk))
        return n, h.hexdigest()

    return source
