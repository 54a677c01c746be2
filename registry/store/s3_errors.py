"""What an S3 failure means: which answers and exceptions are retried, and which medft error each other one
becomes (access denied exit 5, missing bucket or key exit 4, precondition exit 75, the rest exit 2)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from registry.errors import AccessDeniedError, ConfigError, MedftError, NotFoundError, TransientError
from registry.store.base import BucketNotFound, PreconditionFailed

if TYPE_CHECKING:
    from botocore.exceptions import ClientError

RETRY_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "RequestThrottled",
    "TooManyRequests", "TooManyRequestsException", "RequestTimeout", "RequestTimeoutException",
    "InternalError", "ServiceUnavailable", "BadDigest", "IncompleteBody", "XAmzContentSHA256Mismatch",
    "ConditionalRequestConflict", "OperationAborted", "PriorRequestNotComplete",
}
DENIED_CODES = {
    "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled", "AccountProblem",
    "ExpiredToken", "InvalidToken", "InvalidSecurity", "Forbidden", "AuthorizationHeaderMalformed",
}

Verdict = Literal["retry", "fail", "other"]
"""'retry': transient, try again; 'fail': raise the mapped error; 'other': not S3's, re-raise as a bug."""


class UploadGone(TransientError):
    """CompleteMultipartUpload answered NoSuchUpload: completed by an earlier try, or aborted."""


@dataclass
class Attempts:
    retried_after_send: bool = False
    """A retry followed an error after which the request may still have been applied."""
    last: str = ""
    count: int = 0
    errors: list[str] = field(default_factory=list)


def classify(exc: BaseException, what: str, uri: str, *, bucket: str,
             endpoint: str | None) -> tuple[Verdict, MedftError | None]:
    """(verdict, error) for an exception raised by boto3 while ``what`` ``uri``."""
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
        return _classify_answer(exc, what, uri, bucket=bucket, endpoint=endpoint)
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


def _classify_answer(exc: ClientError, what: str, uri: str, *, bucket: str,
                     endpoint: str | None) -> tuple[Verdict, MedftError]:
    """The verdict on an error answer from the server, by its code and HTTP status."""
    err = exc.response.get("Error", {}) or {}
    code = str(err.get("Code") or "")
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    msg = err.get("Message") or code or f"HTTP {status}"
    if code in DENIED_CODES or status == 403:
        return "fail", AccessDeniedError(
            f"access denied by S3 while {what} {uri} ({code or status}: {msg}); check the "
            f"credentials (AWS_ACCESS_KEY_ID/AWS_PROFILE) and their permissions on bucket {bucket!r}")
    if code == "NoSuchBucket":
        return "fail", BucketNotFound(
            f"bucket {bucket!r} does not exist (while {what} {uri}); create it or fix the store URI"
            + (f" / endpoint {endpoint}" if endpoint else ""))
    if code in ("NoSuchKey", "NotFound") or status == 404:
        return "fail", NotFoundError(f"not found: {uri}")
    if code in ("PreconditionFailed",) or status == 412:
        return "fail", PreconditionFailed(
            f"precondition failed while {what} {uri}: it already exists or changed since it was read")
    if code in RETRY_CODES or status >= 500 or status == 429:
        return "retry", TransientError(f"S3 {code or status} while {what} {uri}: {msg}")
    if code == "NoSuchUpload":
        return "fail", UploadGone(f"multipart upload vanished while {what} {uri}; retry the upload")
    return "fail", ConfigError(f"S3 refused {what} {uri} ({code or status}: {msg})")
