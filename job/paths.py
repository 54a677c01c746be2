"""Where things are on local disk: the cache root, and the local path a ``pkg://``, ``file://`` or plain location
names; plus what a base model's name says about its weights. Imports no stage."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from registry.errors import ConfigError, NotFoundError
from registry.uris import parse_uri


def cache_root() -> Path:
    """``MEDFT_CACHE`` (default ``~/.cache/medft``), created; ConfigError naming the variable when it cannot be."""
    root = Path(os.environ.get("MEDFT_CACHE") or Path.home() / ".cache" / "medft")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ConfigError(f"MEDFT_CACHE={str(root)!r} is (or lies under) a file, not a directory; point it at a "
                          "directory") from None
    return root


def resolve_local(uri: str) -> Path:
    """Map ``pkg://package/file``, ``file://`` and plain paths to a local path (no download)."""
    location = parse_uri(uri)
    if location.scheme == "pkg":
        package, rel = location.head, location.tail
        # find_spec locates the package without running its __init__ (which may import what is absent).
        spec = importlib.util.find_spec(package) if package.isidentifier() else None
        if spec is None or not spec.submodule_search_locations:
            raise NotFoundError(f"{uri}: package {package!r} is not installed (make install installs it)")
        return Path(next(iter(spec.submodule_search_locations))) / rel
    return location.local_path()


def is_prequantized(uri: str) -> bool:
    """A base already quantized to 4 bits cannot be the merge target (its 16-bit weights are gone)."""
    name = uri.rstrip("/").lower()
    return any(tag in name for tag in ("bnb-4bit", "-4bit", "gptq", "awq"))
