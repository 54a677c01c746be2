"""Opening a store from a URI (``s3://bucket/prefix``, ``file:///abs/path`` or a plain path), and the same
store again with other transfer settings."""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import urlparse

from registry.errors import ConfigError
from registry.store.base import Store, check_key, check_local_dir
from registry.store.local import LocalStore
from registry.store.s3 import S3Store
from registry.store.transfer import TransferSettings
from registry.uris import parse_uri


def open_store(uri: str, *, transfer: TransferSettings | None = None) -> Store:
    """Open ``s3://bucket/prefix``, ``file:///abs/path`` or a plain path. Makes no request."""
    if not isinstance(uri, str) or not uri.strip():
        raise ConfigError("store URI is empty; pass --store or set MEDFT_STORE")
    uri = uri.strip()
    transfer = transfer or TransferSettings.from_env()
    location = parse_uri(uri)
    if location.scheme == "s3":
        parsed = urlparse(uri)
        bucket = parsed.netloc
        if not re.fullmatch(r"[a-z0-9][a-z0-9.\-_]{1,254}", bucket or ""):
            raise ConfigError(f"store URI {uri!r} has no valid bucket name (expected s3://bucket/prefix)")
        prefix = check_key(parsed.path.lstrip("/"), allow_empty=True, what=f"prefix of store URI {uri!r}")
        return S3Store(bucket, prefix, transfer=transfer)
    if location.scheme == "file":
        parsed = urlparse(uri)
        if parsed.netloc not in ("", "localhost"):
            raise ConfigError(f"store URI {uri!r}: file URIs must be file:///absolute/path")
        path = parsed.path
    elif location.has_valid_scheme:
        raise ConfigError(f"unsupported store URI {uri!r}: use s3://bucket/prefix, file:///abs/path or a path")
    else:
        path = uri
    parts = re.split(r"[\\/]", path)
    if ".." in parts:
        raise ConfigError(f"store path {uri!r} must not contain '..' segments")
    root = Path(os.path.abspath(os.path.expanduser(path)))
    check_local_dir(root, "store")
    return LocalStore(root, transfer=transfer)


def with_transfer(store: Store, transfer: TransferSettings) -> Store:
    """The same store with other transfer settings (a fresh client for S3)."""
    if isinstance(store, S3Store):
        return S3Store(store.bucket, store.prefix, transfer=transfer, endpoint=store.endpoint, progress=store.progress)
    if isinstance(store, LocalStore):
        return LocalStore(store.root, transfer=transfer, progress=store.progress)
    return store
