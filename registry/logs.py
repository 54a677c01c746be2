"""Structured logging for every medft command.

JSON lines when stderr is not a terminal (containers, CI), readable coloured lines on a terminal. A
redaction processor runs on every event, so secrets never reach a log whichever code logs them.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Mapping
from typing import Any

import structlog

# Whole words only: "hf_token" and "aws_secret_access_key" are secrets, "max_new_tokens" is not.
_SECRET_KEY = re.compile(r"(^|[_-])(token|secret|password|passwd|credentials?|api[_-]?key|access[_-]?key|"
                         r"authorization)($|[_-])", re.I)
_NOT_SECRET = {"pad_token", "eos_token", "bos_token", "unk_token", "sep_token", "cls_token", "mask_token"}
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "HF_TOKEN",
               "HUGGING_FACE_HUB_TOKEN")
REDACTED = "***"


def _is_secret_key(key: object) -> bool:
    return isinstance(key, str) and key.lower() not in _NOT_SECRET and _SECRET_KEY.search(key) is not None


def _secret_values() -> list[str]:
    values = [os.environ.get(name, "") for name in _SECRET_ENV]
    values += [v for k, v in os.environ.items() if _is_secret_key(k)]
    # Short values would blank out ordinary words; real credentials are long.
    return sorted({v for v in values if len(v) >= 8}, key=len, reverse=True)


def redact(value: Any, secrets: list[str] | None = None) -> Any:
    """Return ``value`` with secret-named keys masked and known secret values cut out of strings."""
    secrets = _secret_values() if secrets is None else secrets
    if isinstance(value, Mapping):
        return {k: (REDACTED if _is_secret_key(k) and v not in (None, "", False) else redact(v, secrets))
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v, secrets) for v in value)
    if isinstance(value, str):
        for s in secrets:
            if s in value:
                value = value.replace(s, REDACTED)
        return value
    return value


def _redact_processor(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    return redact(event)


class _CurrentStderr:
    """Writes to whatever ``sys.stderr`` is at each call: callers that swap it (test runners capturing
    output, tools embedding the CLI) must not leave the logger holding a closed stream."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure(*, json_logs: bool | None = None, level: str | None = None) -> None:
    """Set up structlog for the process; call once from the CLI entry point.

    ``json_logs`` defaults to "stderr is not a terminal"; ``MEDFT_LOG_FORMAT=json|console`` forces
    either. ``level`` defaults to ``MEDFT_LOG_LEVEL`` or INFO.
    """
    fmt = os.environ.get("MEDFT_LOG_FORMAT")
    if json_logs is None:
        json_logs = fmt == "json" if fmt in ("json", "console") else not sys.stderr.isatty()
    level_name = (level or os.environ.get("MEDFT_LOG_LEVEL") or "INFO").upper()
    if json_logs:
        # Progress bars are for people at a terminal; in a container they only garble the JSON lines.
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    renderer: Any = (structlog.processors.JSONRenderer() if json_logs
                     else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact_processor,
            structlog.processors.format_exc_info if json_logs else structlog.dev.set_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level_name, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=_CurrentStderr()),
        cache_logger_on_first_use=False,
    )
    # Libraries log through the stdlib; keep their noise at warning level and on stderr.
    logging.basicConfig(level=logging.WARNING, stream=_CurrentStderr(), format="%(name)s: %(message)s")


def get_logger(name: str | None = None) -> Any:
    return structlog.get_logger(name)
