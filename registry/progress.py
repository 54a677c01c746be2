"""Progress a person can watch: bars on a terminal, nothing at all anywhere else.

Code that does long work (the store's transfer loops, training, evaluation, the merge) reports to a
:class:`Task` it gets from a :class:`Progress`; it never prints. Which :class:`Progress` that is gets decided
once per process by :func:`registry.logs.configure`: :class:`TerminalProgress` (tqdm bars on stderr) when
stderr is a terminal and logs are readable lines, else :data:`NO_PROGRESS`, which does nothing, so the JSON
event stream off a terminal stays exactly what it was. Callers that want another one (tests, embedding
tools) pass their own :class:`Progress` down instead of :func:`current`.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Task(Protocol):
    """One piece of work being watched. Thread-safe: transfer workers advance the same task."""

    def advance(self, amount: float = 1) -> None:
        """``amount`` more units are done (bytes for a transfer, steps, rows, shards)."""
        ...

    def set_fields(self, **fields: Any) -> None:
        """Show these values beside the bar (loss, tokens/s); numbers are shown rounded for people."""
        ...

    def close(self) -> None: ...

    def __enter__(self) -> Task: ...

    def __exit__(self, *exc: object) -> None: ...


@runtime_checkable
class Progress(Protocol):
    """Opens :class:`Task` objects; the one seam between work and whatever shows it."""

    def task(self, description: str, *, total: float | None, unit: str = "it", done: float = 0,
             in_bytes: bool = False) -> Task:
        """A task of ``total`` units (None: unknown), ``done`` of them already done (a resumed run);
        ``in_bytes`` shows the amounts and the rate as KiB/MiB/GiB."""
        ...


class _NoTask:
    def advance(self, amount: float = 1) -> None:
        pass

    def set_fields(self, **fields: Any) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _NoTask:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class NoProgress:
    """Shows nothing: the progress of every process whose stderr is not a terminal."""

    def task(self, description: str, *, total: float | None, unit: str = "it", done: float = 0,
             in_bytes: bool = False) -> Task:
        return _NoTask()


NO_PROGRESS = NoProgress()


def _for_people(value: Any) -> Any:
    """Floats rounded to 4 significant digits (3.214, 1203 tokens/s), big ones to whole numbers; logs keep full values."""
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return value


class _TqdmTask:
    def __init__(self, bar: Any) -> None:
        self._bar = bar
        self._lock = threading.Lock()  # parallel transfer workers advance one bar

    def advance(self, amount: float = 1) -> None:
        with self._lock:
            self._bar.update(amount)

    def set_fields(self, **fields: Any) -> None:
        with self._lock:
            self._bar.set_postfix({k: _for_people(v) for k, v in fields.items()}, refresh=True)

    def close(self) -> None:
        with self._lock:
            self._bar.close()

    def __enter__(self) -> _TqdmTask:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TerminalProgress:
    """tqdm bars on stderr. A bar opened while another is open (a checkpoint upload during training) sits
    below it and is cleared when done; a top-level bar stays as a record of what happened."""

    def task(self, description: str, *, total: float | None, unit: str = "it", done: float = 0,
             in_bytes: bool = False) -> Task:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=done, desc=description, unit="B" if in_bytes else unit,
                   unit_scale=in_bytes, unit_divisor=1024 if in_bytes else 1000, file=sys.stderr,
                   dynamic_ncols=True, mininterval=0.2, leave=None)
        return _TqdmTask(bar)

    @staticmethod
    def write_line(line: str) -> None:
        """Print a whole line (a log event) above the open bars without tearing them."""
        from tqdm import tqdm

        tqdm.write(line, file=sys.stderr)


_current: Progress = NO_PROGRESS


def configure(*, on_terminal: bool) -> None:
    """Pick the process's progress: bars when ``on_terminal``, else nothing (called by ``logs.configure``)."""
    global _current
    _current = TerminalProgress() if on_terminal else NO_PROGRESS


def current() -> Progress:
    """The process's progress, as :func:`configure` chose it (:data:`NO_PROGRESS` until then)."""
    return _current


_held: list[str] | None = None  # log text kept back while streamed text is on the terminal
_held_lock = threading.Lock()


@contextmanager
def hold_lines() -> Iterator[None]:
    """Keep log lines back while the body runs (a model's answer streaming to the terminal), then write them.

    Whatever a library logs in the middle of a streamed answer (a warning at the first decode, say) would
    otherwise land inside the text; held, it comes after it, whole. Nested holds release at the outermost.
    """
    global _held
    with _held_lock:
        outer = _held is None
        if outer:
            _held = []
    try:
        yield
    finally:
        if outer:
            with _held_lock:
                text, _held = "".join(_held or ()), None
            if text:
                LineWriter().write(text)


class LineWriter:
    """A text stream for log lines that keeps them from tearing the bars: whole lines go through
    :meth:`TerminalProgress.write_line` while bars are shown, straight to ``sys.stderr`` otherwise; kept back
    while :func:`hold_lines` holds them."""

    def __init__(self) -> None:
        self._pending = ""
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        with _held_lock:
            if _held is not None:
                _held.append(text)
                return len(text)
        if not isinstance(_current, TerminalProgress):
            return sys.stderr.write(text)
        with self._lock:
            self._pending += text
            *lines, self._pending = self._pending.split("\n")
        for line in lines:
            TerminalProgress.write_line(line)
        return len(text)

    def flush(self) -> None:
        sys.stderr.flush()
