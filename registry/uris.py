"""The one parser for the locations medft is given: ``hf://``, ``ms://``, ``s3://``, ``file://``, ``pkg://`` URIs
and paths.

:func:`parse_uri` splits a location at its first ``://`` into a scheme and what follows; a location without
``://`` is a plain local path (scheme ``""``). Nothing here checks that the location exists or is allowed:
that is each source's job (:func:`registry.store.open_store`, the pull stage, the data sources); only the
shape of a ModelScope repository id is checked here (:func:`ms_repo_id`), as nothing else knows it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

#: A scheme as RFC 3986 spells it; other text before ``://`` is not a scheme any source accepts.
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*")
#: One part (owner or name) of a ModelScope repository id, e.g. ``Qwen`` or ``Qwen2.5-0.5B-Instruct``.
_MS_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")


@dataclass(frozen=True)
class Uri:
    """A location split once: ``scheme`` (``hf``, ``ms``, ``s3``, ``file``, ``pkg``...; ``""`` for a plain path) and
    ``path``, what follows ``scheme://`` (the whole text for a plain path)."""

    text: str
    scheme: str
    path: str

    @property
    def is_local(self) -> bool:
        """A plain path or a ``file://`` URI."""
        return self.scheme in ("", "file")

    @property
    def has_valid_scheme(self) -> bool:
        """Whether the text before ``://`` is a well-formed scheme (so the location cannot be a path)."""
        return bool(self.scheme) and bool(_SCHEME.fullmatch(self.scheme))

    @property
    def head(self) -> str:
        """The first segment of ``path``: the bucket of ``s3://``, the package of ``pkg://``."""
        return self.path.partition("/")[0]

    @property
    def tail(self) -> str:
        """``path`` after its first segment: the key of ``s3://``, the file of ``pkg://``."""
        return self.path.partition("/")[2]

    def local_path(self) -> Path:
        """The local path a plain path or ``file://`` URI names, ``~`` expanded (meaningful when ``is_local``)."""
        return Path(self.path if self.scheme == "file" else self.text).expanduser()


def parse_uri(text: str) -> Uri:
    """Split ``text`` at its first ``://`` (see :class:`Uri`); never raises for a string."""
    scheme, sep, path = text.partition("://")
    return Uri(text, scheme, path) if sep else Uri(text, "", text)


def is_location(ref: str) -> bool:
    """Whether ``ref`` names a location (a URI or a path: it holds ``://``, ``/`` or ``\\``) rather than a name."""
    return "://" in ref or "/" in ref or "\\" in ref


def ms_repo_id(uri: Uri) -> str:
    """The ``owner/name`` repository id of an ``ms://owner/name`` URI.

    Raises ValueError saying what is wrong when it is not exactly two parts of letters, digits, ``.``, ``_``
    and ``-`` (each starting with a letter or digit, so no ``..``), the form ModelScope gives every model and
    dataset; a trailing ``/`` is tolerated.
    """
    parts = uri.path.rstrip("/").split("/")
    if len(parts) != 2 or not all(_MS_PART.fullmatch(p) for p in parts):
        raise ValueError(f"{uri.text!r} is not ms://owner/name (two parts of letters, digits, '.', '_' and '-', "
                         "each starting with a letter or digit)")
    return "/".join(parts)


def endpoint_url(var: str, value: str) -> str:
    """``value``, the http(s) endpoint URL set in the environment variable ``var`` (S3, ModelScope).

    Raises ConfigError (exit 2: a malformed setting is not worth a retry) naming ``var`` and quoting the value
    without its credentials, when it is not ``http(s)://host[:port][/path]``: another scheme, no host, a port
    that is not a number, white space.
    """
    from urllib.parse import urlparse

    from registry.errors import ConfigError
    from registry.redact import redact_url

    try:
        parsed = urlparse(value)
        parsed.port  # noqa: B018 - raises ValueError for a port that is not a number
        ok = parsed.scheme in ("http", "https") and bool(parsed.hostname) and not re.search(r"\s", value)
    except ValueError:  # also an unclosed "[" of an IPv6 host
        ok = False
    if not ok:
        raise ConfigError(f"{var}={redact_url(value)!r} is not an endpoint URL; use http(s)://host[:port]")
    return value
