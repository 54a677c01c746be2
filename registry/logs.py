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


class JsonOnly:
    """A field value for JSON logs only, e.g. the whole resolved config: written in full there, and as
    ``note`` on a readable line, where a person wants the short fields of the same event instead."""

    def __init__(self, value: Any, note: str = "(in the JSON log)") -> None:
        self.value, self.note = value, note


def _json_only_for(json_logs: bool) -> Any:
    def processor(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
        return {k: (v.value if json_logs else v.note) if isinstance(v, JsonOnly) else v for k, v in event.items()}
    return processor


def _rank_processor() -> list[Any]:
    """Under torchrun with more than one process (``WORLD_SIZE`` > 1): a processor adding ``rank`` (torchrun's
    ``RANK``) to every event, so the merged logs of all ranks tell whose line each is; otherwise none."""
    try:
        world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    except ValueError:
        return []  # job.distributed refuses malformed values with one line

    def add_rank(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
        event.setdefault("rank", rank)
        return event

    return [add_rank] if world > 1 else []


class _CurrentStderr(progress.LineWriter):
    """Writes to whatever ``sys.stderr`` is at each call: callers that swap it (test runners capturing
    output, tools embedding the CLI) must not leave the logger holding a closed stream. While progress bars
    are shown, whole lines go above them instead of through them."""


#: Longest rendering of a mapping or list on a readable line; longer ones are cut (JSON logs keep them whole).
_READABLE_VALUE_CHARS = 80


def _readable_value(value: Any) -> str:
    text = repr(value) if isinstance(value, (Mapping, list, tuple)) else str(value)
    if isinstance(value, (Mapping, list, tuple)) and len(text) > _READABLE_VALUE_CHARS:
        return text[:_READABLE_VALUE_CHARS - 1] + "…"
    return text


class _ReadableRenderer:
    """One short line per event for a person: ``12:01:02 stage.start stage=pull``; the level only when it is
    a warning or worse, colours only on a terminal. Long mappings and lists are cut (see
    :data:`_READABLE_VALUE_CHARS`)."""

    _COLOURS = {"warning": "\x1b[33m", "error": "\x1b[31m", "critical": "\x1b[31m"}

    def __init__(self, colors: bool) -> None:
        self.colors = colors

    def __call__(self, _logger: Any, _name: str, event: dict[str, Any]) -> str:
        event = dict(event)
        stamp = str(event.pop("timestamp", ""))[11:19]
        level = str(event.pop("level", "info"))
        name = str(event.pop("event", ""))
        logger = event.pop("logger", None)
        exc = event.pop("exception", None)
        head = f"{level}: " if level in self._COLOURS else ""
        if logger:
            head += f"[{logger}] "
        fields = " ".join(f"{k}={_readable_value(v)}" for k, v in event.items() if not k.startswith("_"))
        if self.colors:
            colour = self._COLOURS.get(level, "\x1b[1m")
            line = f"\x1b[2m{stamp}\x1b[0m {colour}{head}{name}\x1b[0m" + (f" \x1b[36m{fields}\x1b[0m" if fields else "")
        else:
            line = f"{stamp} {head}{name}" + (f" {fields}" if fields else "")
        return line + (f"\n{exc}" if exc else "")


# The progress-bar switch of datasets (TRL's "Truncating train dataset" and "Dropping fully masked examples" are
# datasets passes), read when it is imported, which the CLI does only inside a command. transformers' bars
# ("Loading weights") are turned off in route_library_logs; huggingface_hub's download bars stay: a person waits
# for those downloads.
_LIBRARY_BAR_SWITCHES = ("HF_DATASETS_DISABLE_PROGRESS_BARS",)
_switched_off: list[str] = []  # the ones configure() set, so --verbose can give them back
_library_handler: logging.Handler | None = None
_readable = False
_verbose = False


def _quiet_libraries(quiet: bool) -> None:
    if quiet:
        for name in _LIBRARY_BAR_SWITCHES:
            if name not in os.environ:
                os.environ[name] = "1"
                _switched_off.append(name)
    else:
        while _switched_off:
            os.environ.pop(_switched_off.pop(), None)


def readable() -> bool:
    """True when the logs are lines for a person (a terminal, or ``MEDFT_LOG_FORMAT=console``), not JSON."""
    return _readable


def verbose() -> bool:
    """Whether ``--verbose`` was given (:func:`set_verbose`)."""
    return _verbose


def set_verbose(verbose: bool) -> None:
    """``medft --verbose``: on readable logs, show library warnings and progress bars too (default: only their
    errors). JSON logs always hold every library warning, so this changes nothing off a terminal."""
    global _verbose
    _verbose = verbose
    if not _readable:
        return
    _quiet_libraries(not verbose)
    if _library_handler is not None:
        _library_handler.setLevel(logging.WARNING if verbose else logging.ERROR)


def configure(*, json_logs: bool | None = None, level: str | None = None, verbose: bool = False) -> None:
    """Set up structlog for the process; call once from the CLI entry point.

    ``json_logs`` defaults to "stderr is not a terminal"; ``MEDFT_LOG_FORMAT=json|console`` forces
    either. ``level`` defaults to ``MEDFT_LOG_LEVEL`` or INFO. Progress bars (:mod:`registry.progress`) are
    shown when stderr is a terminal and the logs are not JSON; otherwise nothing but the events is written.

    Libraries (transformers, TRL, peft, datasets, huggingface_hub, torch, boto) log through the stdlib
    ``logging`` and ``warnings`` modules; both are routed here, so their messages are events like medft's:
    in JSON logs every warning is kept; in readable logs, meant for a person, only their errors show, and their
    own progress bars are off, unless ``verbose`` (:func:`set_verbose`).
    """
    global _library_handler, _readable
    fmt = os.environ.get("MEDFT_LOG_FORMAT")
    if json_logs is None:
        json_logs = fmt == "json" if fmt in ("json", "console") else not sys.stderr.isatty()
    level_name = (level or os.environ.get("MEDFT_LOG_LEVEL") or "INFO").upper()
    if json_logs:
        # Progress bars are for people at a terminal; in a container they only garble the JSON lines.
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    rank = _rank_processor()
    # Under torchrun every rank shares the terminal: bars from rank 0 only (the others' lines still show).
    progress.configure(on_terminal=not json_logs and sys.stderr.isatty() and os.environ.get("RANK", "0") == "0")
    renderer: Any = (structlog.processors.JSONRenderer() if json_logs
                     else _ReadableRenderer(colors=sys.stderr.isatty()))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            *rank,
            _json_only_for(json_logs),
            *([] if json_logs else [_round_for_people]),
            structlog.processors.format_exc_info,
            _redact_processor,  # after format_exc_info: a traceback's text is redacted too
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level_name, logging.INFO)),
        # One write per line (PrintLogger writes the newline apart): lines of ranks sharing a pipe never merge.
        logger_factory=structlog.WriteLoggerFactory(file=_CurrentStderr()),
        cache_logger_on_first_use=False,
    )
    # Libraries log through the stdlib: their warnings become events of the same kind (JSON off a terminal,
    # redacted either way), on stderr. Python warnings (warnings.warn) join them as the "py.warnings" logger.
    handler = logging.StreamHandler(_CurrentStderr())
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, structlog.processors.add_log_level,
                           structlog.processors.TimeStamper(fmt="iso", utc=True), *rank,
                           structlog.processors.format_exc_info,  # a library's traceback is text before redaction
                           _redact_processor],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer]))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.captureWarnings(True)
    _library_handler, _readable = handler, not json_logs
    set_verbose(verbose)


def route_library_logs() -> None:
    """Send transformers' log records through the handler :func:`configure` set up, and on readable logs (unless
    ``--verbose``) turn its progress bars off.

    transformers writes through a stderr handler of its own (``[transformers] ...``), which would put plain
    text between the JSON lines. Imports ``transformers.utils.logging`` (not torch): call it only from
    commands that load models.
    """
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_default_handler()
    transformers_logging.enable_propagation()
    if _readable and not _verbose and hasattr(transformers_logging, "set_tqdm_hook"):
        # Its own bars ("Loading weights") only, not huggingface_hub's, which disable_progress_bar() would stop too.
        transformers_logging.set_tqdm_hook(lambda factory, args, kwargs: factory(*args, **{**kwargs, "disable": True}))


def route_stdlib_logger(name: str) -> None:
    """Send the records of the standard-library logger ``name`` (e.g. ``mlflow``, which installs a stderr handler
    of its own and stops propagation) through the handler :func:`configure` set up."""
    logger = logging.getLogger(name)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    logger.propagate = True


def get_logger(name: str | None = None) -> Any:
    return structlog.get_logger(name)
