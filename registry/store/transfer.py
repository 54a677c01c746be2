"""How bytes move: transfer settings (and their environment variables), the parallel executor, and copying
that hashes as it goes. The lowest layer of the store package: it knows nothing of stores.

Memory: a transfer holds at most ``(concurrency + 1) * part_size`` bytes in flight (576 MiB by default).
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from registry.errors import AccessDeniedError, ConfigError, MedftError, TransientError

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
    verify_small: int = 1 * MiB
    """verify_run re-hashes files up to this size; larger ones are checked by size."""

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
        raise


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MiB):
            h.update(chunk)
    return h.hexdigest()


def copy_hashing(path: Path) -> Callable[[Any], tuple[int, str]]:
    """A writer for ``LocalStore._write_tmp`` that copies ``path`` into the open file, returning (bytes, sha256)."""

    def source(f: Any) -> tuple[int, str]:
        h, n = hashlib.sha256(), 0
        with os_errors(path, "reading"), open(path, "rb") as src:
            while chunk := src.read(8 * MiB):
                h.update(chunk)
                f.write(chunk)
                n += len(chunk)
        return n, h.hexdigest()

    return source
