"""Make another registry client move an alias between our read of ``aliases.json`` and our write of it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from registry.registry import Registry
from registry.store import PreconditionFailed


def move_alias_before_our_write(reg: Registry, monkeypatch: pytest.MonkeyPatch,
                                move: Callable[[], Any]) -> list[str]:
    """Run ``move`` (another client's alias change) just before ``reg``'s first write of an ``aliases.json``.

    Returns the keys of ``reg``'s writes the store refused as stale (PreconditionFailed); a registry that
    moves aliases by compare-and-swap has exactly one, after which it reads again and retries.
    """
    real_put = reg.store.put_bytes
    conflicts: list[str] = []
    moved: list[bool] = []

    def put_bytes(key: str, data: bytes, **kw: Any) -> Any:
        if key.endswith("aliases.json") and not moved:
            moved.append(True)
            move()
        try:
            return real_put(key, data, **kw)
        except PreconditionFailed:
            conflicts.append(key)
            raise

    monkeypatch.setattr(reg.store, "put_bytes", put_bytes)
    return conflicts
