"""``medft generate`` and ``medft chat``: the command bodies the CLI calls, reading questions and printing answers.

Each resolves its refs before any weights load, loads one model at a time and frees it after its answers.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from typing import Any, TextIO

from job.inference.checks import remote_code_trust
from job.inference.generate import Answer, Sampling, generate
from job.inference.loading import Loaded, load, load_base, unload
from job.inference.refs import resolve_ref
from registry.errors import ConfigError
from registry.logs import get_logger

log = get_logger(__name__)

#: ``--compare base``: the compared version's own base model, as the tutorials ask it before fine-tuning.
BASE_REF = "base"
CHAT_STOP_WORDS = ("stop", "exit")


def check_text(text: str, where: str) -> str:
    """``text`` as given, refused (ConfigError, exit 2) when it cannot be UTF-8: undecodable bytes reach Python
    as lone surrogates (from argv) and would fail inside the tokenizer."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"U+{code:04X}"
        raise ConfigError(f"{where} is not valid UTF-8 ({what} at character {e.start + 1}); pass UTF-8 text") from None
    return text


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _header(label: str) -> str:
    return f"=== {label} ==="


def generate_command(ref: str, question: str, *, sampling: Sampling, artifact: str = "merged",
                     compare: str | None = None, store: str | None = None, registry: str | None = None,
                     as_json: bool = False, out: TextIO | None = None,
                     trust_remote_code: str | None = None) -> list[Answer]:
    """``medft generate``: answer ``question`` with REF (and with ``compare`` after it, one model at a time).

    ``trust_remote_code``: the ``--trust-remote-code SHA`` value (see :func:`remote_code_trust`); a question
    that is not UTF-8 is a ConfigError, before any lookup.

    Prints the reasoning and the answer (streamed when ``out`` is a terminal), or with ``as_json`` one JSON
    object (a list of two with ``compare``). ``compare`` is another REF, or ``base`` for REF's base model.
    Both refs are resolved before any weights load, so a bad second ref fails at once.
    """
    out = out or sys.stdout
    if not question or not question.strip():
        raise ConfigError("--question is empty; ask something, e.g. --question \"What causes anemia?\"")
    check_text(question, "--question")
    version = resolve_ref(ref, store=store, registry=registry)
    other = None if compare is None or compare == BASE_REF else resolve_ref(compare, store=store, registry=registry)
    if compare == BASE_REF:
        version.base_uri()  # refuse now, not after the first answer, when no base is recorded
    trust = remote_code_trust(version, trust_remote_code)
    trust_other = remote_code_trust(other, trust_remote_code) if other is not None else False
    stream = out if _is_tty(out) and not as_json else None
    results: list[Answer] = []
    loaders: list[Callable[[], Loaded]] = [lambda: load(version, artifact, trust_remote_code=trust)]
    if compare == BASE_REF:
        loaders.append(lambda: load_base(version, trust_remote_code=trust))
    elif other is not None:
        loaders.append(lambda: load(other, artifact, trust_remote_code=trust_other))
    for n, make in enumerate(loaders):
        loaded = make()
        if compare is not None and not as_json:
            out.write(("\n" if n else "") + _header(loaded.label) + "\n")
            out.flush()
        try:
            result = generate(loaded, question, sampling, stream=stream)
        finally:
            unload(loaded)
        results.append(result)
        if not as_json and stream is None:
            out.write(result.to_text() + "\n")
            out.flush()
    if as_json:
        payload: Any = [r.to_dict() for r in results] if compare is not None else results[0].to_dict()
        out.write(json.dumps(payload, ensure_ascii=False, indent=2) + "\n")
        out.flush()
    return results


def _check_stdin(stdin: TextIO | None) -> TextIO:
    if stdin is None or getattr(stdin, "closed", False):  # Python sets sys.stdin to None when fd 0 is closed
        raise ConfigError("chat reads one question a line from standard input, which is closed; run it at a "
                          "terminal, pipe questions in, or use medft generate --question")
    return stdin


def questions(stdin: TextIO, prompt: TextIO | None = None) -> Iterable[str]:
    """Non-blank lines of ``stdin``, stripped, until a stop word, end of input (Ctrl-D) or Ctrl-C at the prompt.

    ``prompt``: where to ask for each question (stderr at a terminal, so stdout holds only answers). A line
    that is not UTF-8, or standard input closing under it, is a ConfigError naming the line.
    """
    # Lines are read as bytes and decoded one by one where the stream allows, so a bad byte names its own line
    # (a text layer decodes whole chunks and would fail on the lines before it too).
    binary = getattr(stdin, "buffer", None)
    number = 0
    while True:
        number += 1
        try:
            if prompt is not None:
                prompt.write("\nQuestion (stop, exit or Ctrl-D to end)> ")
                prompt.flush()
            line = binary.readline().decode("utf-8") if binary is not None else stdin.readline()
        except KeyboardInterrupt:
            return
        except UnicodeDecodeError as e:
            raise ConfigError(f"standard input line {number} is not valid UTF-8 (byte 0x{e.object[e.start]:02x}); "
                              "pass UTF-8 text") from None
        except (ValueError, OSError) as e:  # closed or unreadable under us
            raise ConfigError(f"standard input cannot be read at line {number} ({e}); chat reads one question a "
                              "line from it") from None
        if not line:  # end of input
            return
        question = check_text(line, f"standard input line {number}").strip()
        if question.lower() in CHAT_STOP_WORDS:
            return
        if question:
            yield question


def chat_command(ref: str, *, sampling: Sampling, artifact: str = "merged", store: str | None = None,
                 registry: str | None = None, as_json: bool = False, stdin: TextIO | None = None,
                 out: TextIO | None = None, trust_remote_code: str | None = None) -> list[Answer]:
    """``medft chat``: load REF once, then answer each line read from ``stdin`` as a fresh question.

    The loop ends at ``stop``, ``exit`` or end of input (Ctrl-D). Each turn is a single-question prompt,
    since the model was trained single-turn. Output per turn is text (streamed on a terminal) or, with
    ``as_json``, one JSON object per line. Ctrl-C during an answer abandons that answer only.
    """
    stdin, out = _check_stdin(stdin or sys.stdin), out or sys.stdout  # before any download
    version = resolve_ref(ref, store=store, registry=registry)
    loaded = load(version, artifact, trust_remote_code=remote_code_trust(version, trust_remote_code))
    stream = out if _is_tty(out) and not as_json else None
    prompt = sys.stderr if _is_tty(stdin) else None
    if prompt is not None:
        prompt.write(f"Chatting with {loaded.label}; each question is asked on its own, as the model was trained.\n")
    answers: list[Answer] = []
    try:
        for question in questions(stdin, prompt):
            try:
                result = generate(loaded, question, sampling, stream=stream)
            except KeyboardInterrupt:
                out.write("\n(answer interrupted)\n")
                out.flush()
                continue
            answers.append(result)
            if as_json:
                out.write(json.dumps(result.to_dict(), ensure_ascii=False) + "\n")
            elif stream is None:
                out.write(result.to_text() + "\n\n")
            out.flush()
    finally:
        unload(loaded)
    log.info("chat.done", ref=loaded.label, questions=len(answers))
    return answers
