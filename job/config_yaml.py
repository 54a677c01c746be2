"""YAML for the job configuration: the config file read into a mapping of sections, and ``--set`` values parsed
as YAML scalars. Imports no stage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from registry.errors import ConfigError


def parse_override(item: str) -> tuple[str, Any]:
    """Split ``key=value``; the value is parsed as a YAML scalar (``1e-4`` -> float, ``true`` -> bool)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: write --set section.key=value, e.g. --set train.max_steps=10")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def read_yaml_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found; pass an existing file to --config") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read config file ({e.__class__.__name__}: {e})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a mapping of sections (model:, data:, ...)")
    return data
