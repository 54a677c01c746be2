"""A store in an S3 bucket (boto3): any S3-compatible server, retried with backoff, verified end to end.

The endpoint comes from ``MEDFT_S3_ENDPOINT_URL`` or ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (in that
order; path-style addressing when one is set, as MinIO, Ceph and R2 want), credentials and region from the
usual AWS variables. Opening a store makes no request; a missing bucket surfaces at first use as
:class:`BucketNotFound` (exit 4), a refusal as AccessDeniedError (exit 5). Throttling, 5xx and connection
errors are retried with exponential backoff and full jitter; after ``max_attempts`` they raise
TransientError (exit 75).

Writes are single PUTs or multipart uploads (:mod:`registry.store.s3_multipart`) that are aborted on any
failure. Every upload sends ``ChecksumSHA256`` (per part for multipart), so S3 refuses a damaged body and keeps
a checksum that ``content_matches`` compares later. Create-only writes send ``If-None-Match: *``,
compare-and-swap ``If-Match``; a missing key fails the precondition too, whether the server answers 404 or 412.
"""

from __future__ import annotations

import hashlib
import os
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from registry.errors import MedftError, NotFoundError, TransientError
from registry.progress import Progress, Task
from registry.store.base import (
    BaseStore,
    BucketNotFound,
    ObjectInfo,
    PreconditionFailed,
    check_key,
    join_keys,
    tmp_beside,
    unlink_quietly,
    verify,
)
from registry.store.s3_errors import Attempts, Verdict, classify
from registry.store.s3_multipart import b64, get_ranged, md5_b64, put_multipart
from registry.store.transfer import MiB, TransferSettings, os_errors
from registry.uris import endpoint_url

_CHUNK = 1 * MiB

T = TypeVar("T")


def _endpoint_from_env() -> str | None:
    """The S3 endpoint URL from the first variable set; ConfigError naming it when it is no http(s) URL."""
    for var in ("MEDFT_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        value = os.environ.get(var, "").strip()
        if value:
            return endpoint_url(var, value)
    return None


class S3Store(BaseStore):
    """An S3 bucket and prefix. ``uri`` is ``s3://bucket/prefix``."""

    def __init__(self, bucket: str, prefix: str = "", *, transfer: TransferSettings | None = None,
                 client: Any = None, endpoint: str | None = None, _shared: dict[str, Any] | None = None,
                 progress: Progress | None = None) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.transfer = transfer or TransferSettings()
        self.progress = progress
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
        return join_keys(self.prefix, check_key(key, allow_empty=allow_empty))

    def _rel(self, full: str) -> str:
        return full[len(self.prefix) + 1:] if self.prefix else full

    def child(self, prefix: str) -> S3Store:
        return S3Store(self.bucket, self._full(prefix, allow_empty=True), transfer=self.transfer,
                       endpoint=self.endpoint, _shared=self._shared, progress=self.progress)

    # errors and retries ----------------------------------------------------------------------------
    def _classify(self, exc: BaseException, what: str, uri: str) -> tuple[Verdict, MedftError | None]:
        return classify(exc, what, uri, bucket=self.bucket, endpoint=self.endpoint)

    def _backoff(self, attempt: int) -> None:
        t = self.transfer
        time.sleep(random.uniform(0, min(t.backoff_max, t.backoff_base * (2 ** (attempt - 1)))))

    def _call(self, what: str, uri: str, fn: Callable[[], T], attempts: Attempts | None = None) -> T:
        """Run ``fn`` with retries on throttling/5xx/connection errors; map the rest to medft errors."""
        attempts = attempts if attempts is not None else Attempts()
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

    def content_matches(self, key: str, sha256: str, checksum: str | None = None) -> bool:
        """Whether the object's sha256 is ``sha256``.

        S3 keeps the SHA-256 checksum it verified when the object was uploaded, and any later write makes a
        new object with its own (or none): so when the server reports one, it is compared with ``checksum``
        (what the upload recorded; a composite ``...-N`` for multipart) or, for a single-part object, with
        ``sha256`` itself. A server that reports none, or a mismatch against a checksum derived rather than
        recorded, is settled by reading every byte.
        """
        full = self._full(key)
        try:
            head = self._call("reading", self.url(key), lambda: self.client.head_object(
                Bucket=self.bucket, Key=full, ChecksumMode="ENABLED"))
        except NotFoundError as e:
            raise self._not_found(e, key) from None
        reported = str(head.get("ChecksumSHA256") or "").split("-")[0]  # AWS appends "-N" to composites
        if reported and reported == (checksum or b64(bytes.fromhex(sha256))).split("-")[0]:
            return True
        if reported and checksum:
            return False
        return self._read_sha256(full, self.url(key)) == sha256

    def _read_sha256(self, full: str, uri: str) -> str:
        def read() -> str:
            h = hashlib.sha256()
            for chunk in self.client.get_object(Bucket=self.bucket, Key=full)["Body"].iter_chunks(_CHUNK):
                h.update(chunk)
            return h.hexdigest()

        return self._call("reading", uri, read)

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
        content_md5, md5_hex = md5_b64(data)
        checksum = b64(bytes.fromhex(sha))
        # S3 checks the body against ChecksumSHA256 and keeps it: verify_run compares it at registration.
        kw: dict[str, Any] = {"Bucket": self.bucket, "Key": full, "Body": data, "Metadata": {"sha256": sha},
                              "ChecksumAlgorithm": "SHA256", "ChecksumSHA256": checksum}
        if self.transfer.content_md5:
            kw["ContentMD5"] = content_md5
        if if_absent:
            kw["IfNoneMatch"] = "*"
        if if_match is not None:
            kw["IfMatch"] = f'"{if_match.strip(chr(34))}"'
        attempts = Attempts()
        try:
            resp = self._call("writing", self.url(key), lambda: self.client.put_object(**kw), attempts)
        except PreconditionFailed as e:
            if attempts.retried_after_send and self._is_ours(key, md5_hex):
                return ObjectInfo(check_key(key), len(data), sha, md5_hex, checksum)
            raise PreconditionFailed(f"{self.url(key)} " + ("already exists (create-only write)" if if_absent
                                     else "changed since it was read (etag no longer matches)")) from e
        except BucketNotFound:
            raise
        except NotFoundError as e:
            if if_match is not None:  # a missing key: servers answer 404 or 412 here
                raise PreconditionFailed(f"{self.url(key)} is gone; it changed since it was read") from e
            raise
        return ObjectInfo(check_key(key), len(data), sha, str(resp.get("ETag", "")).strip('"') or md5_hex, checksum)

    def put_file(self, key: str, path: Path, *, if_absent: bool = False, task: Task | None = None) -> ObjectInfo:
        path = Path(path)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise NotFoundError(f"local file {path} does not exist") from None
        with self._reporting("upload", key, size, task) as t:
            if size <= self.transfer.threshold:
                with os_errors(path, "reading"):
                    data = path.read_bytes()
                info = self.put_bytes(key, data, if_absent=if_absent)
                t.advance(size)
                return info
            return put_multipart(self, key, path, size, if_absent=if_absent, on_bytes=t.advance)

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

    def get_range(self, key: str, start: int, length: int) -> bytes:
        full = self._full(key)
        if length <= 0:
            return b""

        def fetch() -> bytes:
            r = self.client.get_object(Bucket=self.bucket, Key=full, Range=f"bytes={start}-{start + length - 1}")
            return r["Body"].read()

        try:
            return self._call("reading", self.url(key), fetch)
        except NotFoundError as e:
            raise self._not_found(e, key) from None

    def sha256(self, key: str) -> str:
        try:
            return self._read_sha256(self._full(key), self.url(key))
        except NotFoundError as e:
            raise self._not_found(e, key) from None

    def get_file(self, key: str, dest: Path, *, sha256: str | None = None, task: Task | None = None) -> ObjectInfo:
        info = self.stat(key)
        with self._reporting("download", key, info.size, task) as t:
            return self._get_file(key, Path(dest), sha256, info, t.advance)

    def _get_file(self, key: str, dest: Path, sha256: str | None, info: ObjectInfo,
                  on_bytes: Callable[[int], None]) -> ObjectInfo:
        full, uri = self._full(key), self.url(key)
        expected = sha256 or info.sha256  # our uploads carry their sha256 in metadata
        with os_errors(dest.parent, "creating directory"):
            dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = tmp_beside(dest)
        if_match = f'"{info.etag}"' if info.etag else None
        try:
            with os_errors(dest, "writing"):
                if info.size <= self.transfer.threshold:
                    sha = self._get_single(full, uri, tmp, if_match, on_bytes)
                else:
                    sha = get_ranged(self, full, uri, tmp, info.size, if_match, on_bytes)
            verify(sha, expected, uri)
            with os_errors(dest, "writing"):
                os.replace(tmp, dest)
        finally:
            unlink_quietly(tmp)
        return ObjectInfo(check_key(key), info.size, sha, info.etag)

    def _get_kw(self, full: str, if_match: str | None) -> dict[str, Any]:
        kw: dict[str, Any] = {"Bucket": self.bucket, "Key": full}
        if if_match:
            kw["IfMatch"] = if_match
        return kw

    def _get_single(self, full: str, uri: str, tmp: Path, if_match: str | None,
                    on_bytes: Callable[[int], None]) -> str:
        def fetch() -> str:
            h, got = hashlib.sha256(), 0
            try:
                r = self.client.get_object(**self._get_kw(full, if_match))
                with open(tmp, "wb") as f:
                    for chunk in r["Body"].iter_chunks(_CHUNK):
                        h.update(chunk)
                        f.write(chunk)
                        got += len(chunk)
                        on_bytes(len(chunk))
                    f.flush()
                    os.fsync(f.fileno())
            except BaseException:
                on_bytes(-got)  # a retried attempt starts over: so does its share of the bar
                raise
            return h.hexdigest()

        try:
            return self._call("downloading", uri, fetch)
        except PreconditionFailed as e:
            raise TransientError(f"{uri} was replaced while it was being downloaded; retry") from e

    # directories -----------------------------------------------------------------------------------
    def _uploads_in_parts(self, path: Path) -> bool:
        return path.stat().st_size > self.transfer.threshold
