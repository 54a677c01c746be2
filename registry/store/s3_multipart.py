"""Large objects on S3: multipart uploads (parts in parallel, create-only on Complete, aborted on any failure)
and ranged downloads (parallel GETs pinned to the ETag). Memory stays bounded: a window of
``concurrency + 1`` parts is in flight at a time.

Create-only is ``If-None-Match: *`` on CompleteMultipartUpload, which is why large files use these
hand-written calls rather than boto3's ``upload_file``.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from registry.errors import TransientError
from registry.logs import get_logger
from registry.store.base import ObjectInfo, PreconditionFailed, check_key
from registry.store.s3_errors import Attempts, UploadGone
from registry.store.transfer import os_errors

if TYPE_CHECKING:
    from registry.store.s3 import S3Store

S3_MAX_PARTS = 10_000


def b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


def md5_b64(data: bytes | memoryview) -> tuple[str, str]:
    """(base64, hex) MD5 of ``data``: Content-MD5 for the request, and the ETag S3 gives a single part."""
    d = hashlib.md5(data, usedforsecurity=False)
    return base64.b64encode(d.digest()).decode(), d.hexdigest()


class _Part(NamedTuple):
    entry: dict[str, Any]
    """PartNumber, ETag and ChecksumSHA256, as CompleteMultipartUpload wants them."""
    md5: bytes
    """The part's MD5 from its ETag (empty when the ETag is no MD5), for the object's expected ETag."""


class _MultipartUpload:
    """One multipart upload of a local file to ``key``: start, send the parts, complete, or abort."""

    def __init__(self, store: S3Store, key: str, size: int, on_bytes: Callable[[int], None]) -> None:
        self.store, self.key, self.size, self.on_bytes = store, key, size, on_bytes
        self.full, self.uri = store._full(key), store.url(key)
        self.part_size = max(store.transfer.part_size, -(-size // S3_MAX_PARTS))
        resp = store._call("starting multipart upload of", self.uri, lambda: store.client.create_multipart_upload(
            Bucket=store.bucket, Key=self.full, ChecksumAlgorithm="SHA256"))
        self.upload_id: str = resp["UploadId"]

    def upload_part(self, number: int, data: bytes) -> _Part:
        s = self.store
        part_checksum = b64(hashlib.sha256(data).digest())
        kw: dict[str, Any] = {"Bucket": s.bucket, "Key": self.full, "UploadId": self.upload_id,
                              "PartNumber": number, "Body": data, "ChecksumAlgorithm": "SHA256",
                              "ChecksumSHA256": part_checksum}
        if s.transfer.content_md5:
            kw["ContentMD5"] = md5_b64(data)[0]
        r = s._call(f"uploading part {number} of", self.uri, lambda: s.client.upload_part(**kw))
        self.on_bytes(len(data))
        try:
            digest = bytes.fromhex(str(r["ETag"]).strip('"'))
        except ValueError:  # not an MD5 (some servers, SSE-KMS): only the lost-answer check loses
            digest = b""
        return _Part({"PartNumber": number, "ETag": r["ETag"], "ChecksumSHA256": part_checksum}, digest)

    def send_parts(self, path: Path) -> tuple[list[_Part], str]:
        """Read ``path`` part by part and upload the parts in parallel; (parts in order, sha256 of the file)."""
        concurrency = self.store.transfer.concurrency
        h = hashlib.sha256()
        parts: list[_Part] = []
        ex = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="medft-put")
        try:
            pending: deque[Future[_Part]] = deque()
            with os_errors(path, "reading"), open(path, "rb") as f:
                number = 0
                while data := f.read(self.part_size):
                    h.update(data)
                    number += 1
                    pending.append(ex.submit(self.upload_part, number, data))
                    del data
                    while len(pending) > concurrency:  # bound memory: window of concurrency + 1 parts
                        parts.append(pending.popleft().result())
                while pending:
                    parts.append(pending.popleft().result())
        finally:
            ex.shutdown(wait=True, cancel_futures=True)
        return parts, h.hexdigest()

    def complete(self, parts: list[_Part], *, if_absent: bool) -> str:
        """CompleteMultipartUpload (create-only with ``if_absent``); the object's ETag."""
        s = self.store
        md5_of_md5s = hashlib.md5(b"".join(p.md5 for p in parts), usedforsecurity=False).hexdigest()
        expected_etag = f"{md5_of_md5s}-{len(parts)}"  # S3's ETag for a multipart object
        kw: dict[str, Any] = {"Bucket": s.bucket, "Key": self.full, "UploadId": self.upload_id,
                              "MultipartUpload": {"Parts": [p.entry for p in parts]}}
        if if_absent:
            kw["IfNoneMatch"] = "*"
        attempts = Attempts()
        try:
            r = s._call("completing multipart upload of", self.uri,
                        lambda: s.client.complete_multipart_upload(**kw), attempts)
            return str(r.get("ETag", "")).strip('"') or expected_etag
        except (PreconditionFailed, UploadGone) as e:
            # A retried Complete may find the upload already completed (NoSuchUpload) or our own
            # object in place (412): ours if the multipart etag matches.
            if not (attempts.retried_after_send and s._is_ours(self.key, expected_etag)):
                if isinstance(e, PreconditionFailed):
                    raise PreconditionFailed(f"{self.uri} already exists (create-only write)") from e
                raise
            return expected_etag

    def abort(self) -> None:
        s = self.store
        try:
            s.client.abort_multipart_upload(Bucket=s.bucket, Key=self.full, UploadId=self.upload_id)
        except Exception as e:  # noqa: BLE001 - best effort; a lifecycle rule cleans up the rest
            get_logger("medft.store").warning("multipart_abort_failed", key=self.full, upload_id=self.upload_id,
                                               error=str(e))


def composite_checksum(parts: list[_Part]) -> str:
    """S3's composite checksum of the object: the sha256 of its parts' sha256s, "-N" for N parts."""
    part_digests = b"".join(base64.b64decode(p.entry["ChecksumSHA256"]) for p in parts)
    return f"{b64(hashlib.sha256(part_digests).digest())}-{len(parts)}"


def put_multipart(store: S3Store, key: str, path: Path, size: int, *, if_absent: bool,
                  on_bytes: Callable[[int], None] = lambda n: None) -> ObjectInfo:
    """Upload ``path`` (``size`` bytes) to ``key`` in parts; aborted on any failure, Ctrl-C included.
    ``on_bytes(n)`` is told each part sent (progress).

    Raises PreconditionFailed when ``if_absent`` and the key exists, and the store's errors.
    """
    upload = _MultipartUpload(store, key, size, on_bytes)
    completed = False
    try:
        parts, sha = upload.send_parts(path)
        etag = upload.complete(parts, if_absent=if_absent)
        completed = True
        return ObjectInfo(check_key(key), size, sha, etag, composite_checksum(parts))
    finally:
        if not completed:
            upload.abort()


def get_ranged(store: S3Store, full: str, uri: str, tmp: Path, size: int, if_match: str | None,
               on_bytes: Callable[[int], None] = lambda n: None) -> str:
    """Download ``full`` (``size`` bytes) into ``tmp`` with parallel ranged GETs; the sha256 of its content.
    ``on_bytes(n)`` is told each range written (progress).

    Every range is pinned to ``if_match``: an object replaced mid-download raises TransientError (exit 75).
    """
    chunk, concurrency = store.transfer.part_size, store.transfer.concurrency
    fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        h = hashlib.sha256()
        ex = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="medft-get")
        try:
            pending: deque[Future[bytes]] = deque()
            for start in range(0, size, chunk):
                pending.append(ex.submit(_fetch_range, store, full, uri, fd, start, min(start + chunk, size) - 1,
                                         if_match, on_bytes))
                while len(pending) > concurrency:  # hash in order; bounds memory
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


def _fetch_range(store: S3Store, full: str, uri: str, fd: int, start: int, end: int, if_match: str | None,
                 on_bytes: Callable[[int], None]) -> bytes:
    """GET bytes ``start``-``end`` (inclusive) and write them at their offset in ``fd``; the bytes."""

    def fetch() -> bytes:
        r = store.client.get_object(Range=f"bytes={start}-{end}", **store._get_kw(full, if_match))
        data = r["Body"].read()
        if len(data) != end - start + 1:
            from botocore.exceptions import IncompleteReadError
            raise IncompleteReadError(actual_bytes=len(data), expected_bytes=end - start + 1)
        return data

    data = store._call(f"downloading bytes {start}-{end} of", uri, fetch)
    view = memoryview(data)
    off = 0
    while off < len(view):
        off += os.pwrite(fd, view[off:], start + off)
    on_bytes(len(data))
    return data
