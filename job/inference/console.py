"""Terminal streaming: completion text shown under ``Reasoning:`` and ``Answer:`` headings as tokens arrive."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from typing import Any, TextIO

from job.templates import THINK_CLOSE
from registry import progress

CUT_OFF = "(none: --max-new-tokens ran out while the model was still reasoning; raise it for an answer)"


class SectionWriter:
    """Writes completion text as it streams under ``Reasoning:`` and ``Answer:`` headings.

    Whatever the chunking, the output is exactly :meth:`Answer.to_text` plus a newline. ``</think>`` may
    arrive split across chunks, so text that could be its start is held back until the next chunk decides;
    whitespace at the end of what has arrived is held back too, since each section is shown stripped.

    From :meth:`open` to :meth:`close` (or leaving the ``with`` block, which an interrupted answer does) log
    lines are held back (:func:`registry.progress.hold_lines`) and written after the answer: a library
    warning at the first decode must not land between ``Reasoning:`` and the text.
    """

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.reasoning = True
        self.held = ""  # arrived but not shown: trailing whitespace, maybe the start of </think>
        self.started = False  # the current section has shown text
        self._holding = ExitStack()

    def __enter__(self) -> SectionWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._holding.close()

    def _write(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.out.flush()

    def _show(self, text: str) -> None:
        """Show ``text`` in the current section, but not its trailing whitespace (kept in ``held``)."""
        if not self.started:
            text = text.lstrip()
        body = text.rstrip()
        self._write(body)
        self.started = self.started or bool(body)
        self.held = text[len(body):]

    def open(self) -> None:
        self._holding.enter_context(progress.hold_lines())
        self._write("Reasoning:\n")

    def feed(self, text: str) -> None:
        buf, self.held = self.held + text, ""
        if not self.reasoning:
            self._show(buf)
            return
        at = buf.find(THINK_CLOSE)
        if at >= 0:
            self._show(buf[:at])
            self._write("\n\nAnswer:\n")
            self.reasoning, self.started, self.held = False, False, ""
            self._show(buf[at + len(THINK_CLOSE):])
            return
        partial = next((n for n in range(min(len(buf), len(THINK_CLOSE) - 1), 0, -1)
                        if THINK_CLOSE.startswith(buf[-n:])), 0)
        self._show(buf[:len(buf) - partial])
        self.held += buf[len(buf) - partial:]

    def close(self, finish_reason: str = "stop") -> None:
        """Flush what was held and end the output, noting a reasoning cut off as :meth:`Answer.to_text` does."""
        if self.reasoning:
            rest = self.held.rstrip() if self.started else self.held.strip()
            self._write(rest)
            self._write("\n\nAnswer:\n" + (CUT_OFF if finish_reason == "length" else ""))
        elif not self.started and finish_reason == "length":
            self._write(CUT_OFF)
        self.held = ""
        self._write("\n")
        self._holding.close()


class TokenStream:
    """A transformers streamer (``put`` token ids, ``end``) feeding decoded text to a :class:`SectionWriter`.

    The first ``put`` is the prompt and is skipped. Each step decodes the ids since the last newline (as
    transformers' TextStreamer does), which keeps the cost linear in the answer's length; a trailing U+FFFD
    means a multi-byte character is still incomplete, so it waits for the next token. ``end`` flushes what
    is left; the caller closes the sink, knowing why generation stopped.
    """

    def __init__(self, decode: Callable[[list[int]], str], sink: SectionWriter) -> None:
        self.decode = decode
        self.sink = sink
        self.ids: list[int] = []
        self.shown = 0
        self.prompt_seen = False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.ids.extend(int(i) for i in value.reshape(-1).tolist())
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):
            return
        self.sink.feed(text[self.shown:])
        self.shown = len(text)
        if text.endswith("\n"):
            self.ids, self.shown = [], 0

    def end(self) -> None:
        self.sink.feed(self.decode(self.ids)[self.shown:])
        self.ids, self.shown = [], 0
