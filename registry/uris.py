"""The one parser for the locations medft is given: ``hf://``, ``s3://``, ``file://``, ``pkg://`` URIs
and paths.

:func:`parse_uri` splits a location at its first ``://`` into a scheme and what follows; a location without
``://`` is a plain local path (scheme ``""``). Nothing here checks that the location exists or is allowed:
that is each source's job (:func:`registry.store.open_store`, the pull stage, the data sources).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

#: A scheme as RFC 3986 spells it; other text before ``://`` is not a scheme any source accepts.
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*")


@dataclass(frozen=True)
class Uri:
    """A location split once: ``scheme`` (``hf``, ``s3``, ``file``...; ``""`` for a plain path) and ``path``,
    what follows ``scheme://`` (the whole text for a plain path)."""

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
