"""Object storage: one small interface (:class:`Store`), a local-directory and an S3 (boto3) implementation.

* :mod:`registry.store.base`: the Protocol, :class:`ObjectInfo`, the store errors, safe keys, and
  :class:`BaseStore`, which writes directories, URLs and listings once over each store's primitives.
* :mod:`registry.store.transfer`: :class:`TransferSettings` (and their ``MEDFT_S3_*`` variables), parallel
  transfers, hashing copies.
* :mod:`registry.store.local` (:class:`LocalStore`), :mod:`registry.store.s3` (:class:`S3Store`, with
  :mod:`~registry.store.s3_multipart` and :mod:`~registry.store.s3_errors`).
* :mod:`registry.store.open`: :func:`open_store` from a URI.

Guarantees both implementations give:

* Whole objects only: local writes go to a temp file beside the target and are renamed into place; S3
  writes are single PUTs or multipart uploads that are aborted on any failure (including Ctrl-C).
* sha256 of every written file is computed while it is read and returned in :class:`ObjectInfo`;
  ``get_file``/``get_dir`` verify it when told the expected digest and never leave a bad file at ``dest``;
  a ``get_dir`` that fails removes every file it wrote. S3 uploads also send ``ChecksumSHA256`` (per part
  for multipart), so S3 refuses a damaged body and keeps a checksum that ``content_matches`` compares later.
* Create-only writes (``if_absent=True``): ``If-None-Match: *`` on S3 (on the PUT, or on
  CompleteMultipartUpload), ``link(2)`` (atomic, O_EXCL semantics) on a local disk. The loser gets
  :class:`PreconditionFailed`.
* Compare-and-swap (``if_match=etag``): ``If-Match`` on S3; on a local disk an ``flock`` around
  "compare the current content digest, rename". A missing key fails the precondition too, whether the
  server answers 404 or 412.
* Keys are ``/``-separated relative paths; ``..``, ``.``, empty segments, absolute paths, backslashes and
  NUL are refused, so nothing is ever written outside the root.

Memory: a transfer holds at most ``(concurrency + 1) * part_size`` bytes in flight (576 MiB by default).
"""

from registry.store.base import (
    BaseStore,
    BucketNotFound,
    ObjectInfo,
    PreconditionFailed,
    Store,
    check_key,
    check_local_dir,
    check_writable_dir,
    check_writable_file,
    local_files,
)
from registry.store.local import LocalStore
from registry.store.open import open_store, with_transfer
from registry.store.s3 import S3Store
from registry.store.transfer import MiB, TransferSettings, sha256_file

__all__ = [
    "BaseStore",
    "BucketNotFound",
    "LocalStore",
    "MiB",
    "ObjectInfo",
    "PreconditionFailed",
    "S3Store",
    "Store",
    "TransferSettings",
    "check_key",
    "check_local_dir",
    "check_writable_dir",
    "check_writable_file",
    "local_files",
    "open_store",
    "sha256_file",
    "with_transfer",
]
