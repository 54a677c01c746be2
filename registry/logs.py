"""Structured logging for every medft command.

JSON lines when stderr is not a terminal (containers, CI), readable coloured lines on a terminal. A
redaction processor (:func:`registry.redact.redact`: secret keys, secret values, URL credentials) runs on every
event, so secrets never reach a log whichever code logs them.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

import structlog

from registry import progress
from registry.redact import REDACTED, redact  # noqa: F401 - redact is this module's API too


def _redact_processor(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    return redact(event)


def _round(value: Any) -> Any:
    if isinstance(value, float):
        return float(f"{value:.4g}") if abs(value) < 1e4 else round(value)
    if isinstance(value, Mapping):
        return {k: _round(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_round(v) for v in value]
    return value


def _round_for_people(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    """Readable lines show 4 significant digits (eval_loss=3.214); JSON lines keep every digit."""
    return _round(event)


class _CurrentStderr(progress.LineWriter):
    """Writes to whatever ``sys.stderr`` is at each call: callers that swap it (test runners capturing
    output, tools embedding the CLI) must not leave the logger holding a closed stream. While progress bars
    are shown, whole lines go above them instead of through them."""


def configure(*, json_logs: bool | None = None, level: str | None = None) -> None:
    """Set up structlog for the process; call once from the CLI entry point.

    ``json_logs`` defaults to "stderr is not a terminal"; ``MEDFT_LOG_FORMAT=json|console`` forces
    either. ``level`` defaults to ``MEDFT_LOG_LEVEL`` or INFO. Progress bars (:mod:`registry.progress`) are
    shown when stderr is a terminal and the logs are not JSON; otherwise nothing but the events is written.
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
    progress.configure(on_terminal=not json_logs and sys.stderr.isatty())
    renderer: Any = (structlog.processors.JSONRenderer() if json_logs
                     else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            *([] if json_logs else [_round_for_people]),
            structlog.processors.format_exc_info if json_logs else structlog.dev.set_exc_info,
            _redact_processor,  # after format_exc_info: a traceback's text is redacted too
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level_name, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=_CurrentStderr()),
        cache_logger_on_first_use=False,
    )
    # Libraries log through the stdlib: their warnings become events of the same kind (JSON off a terminal,
    # redacted either way), at warning level and on stderr.
    handler = logging.StreamHandler(_CurrentStderr())
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, structlog.processors.add_log_level,
                           structlog.processors.TimeStamper(fmt="iso", utc=True), _redact_processor],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer]))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)


def route_library_logs() -> None:
    """Send transformers' log records through the handler :func:`configure` set up.

    transformers writes through a stderr handler of its own (``[transformers] ...``), which would put plain
    text between the JSON lines. Imports ``transformers.utils.logging`` (not torch): call it only from
    commands that load models.
    """
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_default_handler()
    transformers_logging.enable_propagation()


def route_stdlib_logger(name: str) -> None:
    """Send the records of the standard-library logger ``name`` (e.g. ``mlflow``, which installs a stderr handler
    of its own and stops propagation) through the handler :func:`configure` set up."""
    logger = logging.getLogger(name)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    logger.propagate = True


def get_logger(name: str | None = None) -> Any:
    return structlog.get_logger(name)
