"""Every answer of a benchmark run, kept as JSONL, and the score computed (or recomputed) from it.

An answers file holds one JSON object per line, one line per answer (:class:`AnswerRow`): the benchmark,
the question id, the sample index ``k`` (0..K-1) and its sampling seed (None when greedy), the prompt and
completion token counts, the completion text, the reasoning length, the extracted choice (None: no
extractable answer), the gold letter, whether it is correct, and how it ended (``stop``: a stop token;
``length``: ``max_new_tokens`` cut it off). It is what ``medft eval --samples-out`` writes, what a training
run publishes beside its scores and what ``--record`` stores beside the version; a score names it by path,
sha256 and size (:class:`~registry.records.AnswersFile`).

:func:`summarize` is the one computation of a score from answers, used when scoring and when checking a
recorded score (:func:`recompute`), so the two cannot drift apart:

* ``accuracy``: correct answers / all answers (K per question, N questions), the mean of the per-question
  mean correctness;
* ``interval`` (95%): with K = 1, the Wilson score interval of ``correct`` out of N. With K > 1 the K answers
  to one question are correlated (an easy question is answered right K times), so they are not N·K
  independent trials. The variance of the accuracy is estimated from the per-question means ``m_q``:
  ``Var = mean((m_q - p)^2) / N`` (the plug-in estimate, as Wilson's ``p(1-p)/n``); the Wilson interval is
  then taken at the effective number of answers ``n_eff = p(1-p) / Var`` (Kish's design effect). Since
  ``m_q`` lies in [0, 1], ``n_eff >= N`` always (K answers tell at least as much as one), and it is capped
  at N·K (independent answers); with K = 1 it equals N exactly, so the interval is the plain Wilson one. An
  accuracy of exactly 0 or 1 leaves no spread to estimate from and counts N.
* shares with no extractable answer and that hit the token limit, over all answers; the median reasoning
  length over all answers.

:func:`check_answers` recomputes a recorded score from its answers file in a store (the alias gate and
``registry compare`` call it); :func:`put_answers` stores a ``medft eval --record``'s file in the registry.
Nothing read here is trusted: a malformed line, a repeated (question, sample), a row whose ``correct``
disagrees with its choice and gold, or a question with a different number
of samples is a DataError (exit 3) naming the file and line.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from registry.errors import DataError, NotFoundError
from registry.records import AnswersFile, BenchmarkScore, dump
from registry.store import BucketNotFound, PreconditionFailed, Store, check_key, open_store

#: The standard normal quantile for a two-sided 95% interval.
Z_95 = 1.959963984540054
#: How close a recorded number must be to the recomputed one (JSON keeps a float's every digit).
TOLERANCE = 1e-9


class AnswerRow(BaseModel):
    """One answer as the answers file holds it (see the module docstring)."""

    model_config = ConfigDict(frozen=True, extra="ignore", strict=True)

    benchmark: str
    question_id: str
    sample: int = Field(ge=0)
    seed: int | None = Field(default=None, ge=0)
    prompt_tokens: int = Field(ge=0)
    completion: str
    completion_tokens: int = Field(ge=0)
    reasoning_tokens: int = Field(ge=0)
    choice: str | None
    gold: str
    correct: bool
    stop: Literal["stop", "length"]


@dataclass(frozen=True)
class Summary:
    """A score computed from answers (see the module docstring); ``scored`` counts questions, ``samples`` the
    answers per question, ``correct`` the correct answers (0..scored·samples)."""

    accuracy: float
    interval: tuple[float, float]
    correct: int
    scored: int
    samples: int
    no_answer_share: float
    hit_limit_share: float
    median_reasoning_tokens: float


def wilson(p: float, n: float, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``p`` observed over ``n`` trials (``n`` may be fractional:
    an effective number); ValueError unless 0 <= p <= 1 and n > 0.

    ``(p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)``.
    """
    if not (0 <= p <= 1 and n > 0):
        raise ValueError(f"a Wilson interval needs 0 <= p <= 1 and n > 0, got p={p}, n={n}")
    z2 = z * z
    denominator = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denominator
    # At p = 0 and p = 1 the ends are exactly 0 and 1; floating point would leave them a hair off.
    lower = 0.0 if p == 0 else max(0.0, centre - half)
    upper = 1.0 if p == 1 else min(1.0, centre + half)
    return lower, upper


def effective_answers(question_means: Sequence[float], samples: int) -> float:
    """How many independent answers ``question_means`` (each question's mean correctness over ``samples``
    answers) are worth for the interval: N with one sample, else ``p(1-p) / Var`` within [N, N·samples]."""
    n = len(question_means)
    if n < 1 or samples < 1:
        raise ValueError(f"need at least one question and one sample, got {n} and {samples}")
    p = sum(question_means) / n
    if samples == 1 or p in (0.0, 1.0):
        return float(n)
    variance = sum((m - p) ** 2 for m in question_means) / n / n
    if variance <= 0:
        return float(n * samples)
    return min(float(n * samples), max(float(n), p * (1 - p) / variance))


def interval(question_means: Sequence[float], samples: int) -> tuple[float, float]:
    """The 95% interval of the accuracy (the mean of ``question_means``), as the module docstring says."""
    p = sum(question_means) / len(question_means) if question_means else -1.0
    return wilson(min(1.0, max(0.0, p)), effective_answers(question_means, samples))


def summarize(rows: Sequence[AnswerRow], where: str = "answers") -> Summary:
    """The score of ``rows``; DataError naming ``where`` when there are none, a (question, sample) repeats or
    the questions were not all answered the same number of times (0..K-1 each)."""
    if not rows:
        raise DataError(f"{where}: no answers")
    by_question: dict[str, list[AnswerRow]] = defaultdict(list)
    for row in rows:
        by_question[row.question_id].append(row)
    samples = len(next(iter(by_question.values())))
    for qid, answers in by_question.items():
        if sorted(a.sample for a in answers) != list(range(samples)):
            raise DataError(f"{where}: question {qid!r} has samples {sorted(a.sample for a in answers)}, expected "
                            f"0..{samples - 1} like every other question")
    means = [sum(a.correct for a in answers) / samples for answers in by_question.values()]
    correct = sum(row.correct for row in rows)
    total = len(rows)
    low, high = interval(means, samples)
    return Summary(accuracy=correct / total, interval=(low, high), correct=correct, scored=len(by_question),
                   samples=samples, no_answer_share=sum(row.choice is None for row in rows) / total,
                   hit_limit_share=sum(row.stop == "length" for row in rows) / total,
                   median_reasoning_tokens=float(statistics.median(row.reasoning_tokens for row in rows)))


def encode(rows: Iterable[AnswerRow]) -> bytes:
    """The answers file's bytes: one compact JSON object per line, in order, UTF-8."""
    return b"".join(json.dumps(row.model_dump(mode="json"), ensure_ascii=False).encode() + b"\n" for row in rows)


def parse(data: bytes, where: str) -> list[AnswerRow]:
    """The rows of an answers file; DataError naming ``where`` and the line for anything malformed."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not UTF-8 ({e}); the answers file is corrupt") from None
    rows: list[AnswerRow] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = AnswerRow.model_validate(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: line {number} is not JSON ({e.msg}); the answers file is corrupt") from None
        except ValidationError as e:
            err = e.errors()[0]
            field = ".".join(str(p) for p in err["loc"]) or "the line"
            raise DataError(f"{where}: line {number}: {field} {err['msg'].lower()} (got {err['input']!r:.60}); the "
                            "answers file is corrupt") from None
        if row.correct != (row.choice is not None and row.choice == row.gold):
            raise DataError(f"{where}: line {number} says correct={str(row.correct).lower()} for choice "
                            f"{row.choice!r} and gold {row.gold!r}; the answers file is corrupt")
        if row.reasoning_tokens > row.completion_tokens:
            raise DataError(f"{where}: line {number} has more reasoning tokens than completion tokens; the answers "
                            "file is corrupt")
        rows.append(row)
    seen: set[tuple[str, int]] = set()
    for row in rows:
        if (row.question_id, row.sample) in seen:
            raise DataError(f"{where}: question {row.question_id!r} sample {row.sample} appears twice; the answers "
                            "file is corrupt")
        seen.add((row.question_id, row.sample))
    return rows


def differences(recorded: dict[str, object], summary: Summary) -> list[str]:
    """How a recorded score (its JSON form) differs from ``summary``: ``["accuracy recorded 1.0, recomputed
    0.55", ...]``; empty when every recorded number matches."""
    out = []
    for field in ("accuracy", "correct", "scored", "no_answer_share", "hit_limit_share", "median_reasoning_tokens"):
        got, want = recorded.get(field), getattr(summary, field)
        if got is None and field == "median_reasoning_tokens":
            continue
        if not isinstance(got, (int, float)) or isinstance(got, bool) or not math.isclose(got, want, rel_tol=TOLERANCE,
                                                                                         abs_tol=TOLERANCE):
            out.append(f"{field} recorded {got!r}, recomputed {want!r}")
    if recorded.get("samples", 1) != summary.samples:
        out.append(f"samples recorded {recorded.get('samples', 1)!r}, the file has {summary.samples}")
    got_interval = recorded.get("interval")
    if not (isinstance(got_interval, list) and len(got_interval) == 2
            and all(math.isclose(g, w, rel_tol=TOLERANCE, abs_tol=TOLERANCE)
                    for g, w in zip(got_interval, summary.interval))):
        out.append(f"interval recorded {got_interval!r}, recomputed {list(summary.interval)!r}")
    return out


class RunStores:
    """Run folders opened for reading answers files, those in one S3 bucket as children of one store so they
    share its client (building an S3 client takes about as long as reading a file)."""

    def __init__(self) -> None:
        self._buckets: dict[str, Store] = {}

    def open(self, uri: str) -> Store:
        if not uri.startswith("s3://"):
            return open_store(uri)
        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        if bucket not in self._buckets:
            self._buckets[bucket] = open_store(f"s3://{bucket}")
        root = self._buckets[bucket]
        return root.child(prefix) if prefix.strip("/") else root


def check_answers(ref: str, run_uri: str, name: str, score: BenchmarkScore, origin: str, registry_store: Store,
                  runs: RunStores | None = None) -> bool:
    """Recompute version ``ref``'s ``name`` score (scored by ``origin``: ``training`` or ``medft eval <time>``)
    from its answers file; False when it names none (recorded by an older medft), True when every recorded
    number matches the file.

    The file lies in the run folder ``run_uri`` for a training score, in ``registry_store`` for a recorded
    evaluation.
    Raises DataError (exit 3) naming the version when the file is missing, its size or sha256 differ from the
    record's, it is malformed, or the recorded accuracy, counts, shares or interval differ from the file's.
    """
    kept = score.answers_file
    if kept is None or kept.is_empty():
        return False
    where = f"{ref}'s {name} score ({origin})"
    if kept.path is None or kept.sha256 is None or kept.size is None:
        raise DataError(f"{where} names an answers file without its path, sha256 and size; the registry record is "
                        "corrupt")
    path = check_key(kept.path, what=f"{where}: answers file path", error=DataError)
    store = (runs or RunStores()).open(run_uri) if origin == "training" else registry_store
    url = store.url(path)
    try:
        size = store.stat(path).size  # before reading: a record cannot make us read more than it claims
        data = store.get_bytes(path)[0] if size == kept.size else b""
    except BucketNotFound:
        raise
    except NotFoundError:
        raise DataError(f"{where}: its answers file {url} is missing, so the score cannot be checked and is not "
                        f"used; re-score {ref} with `medft eval ... --record`") from None
    if size != kept.size or len(data) != kept.size or hashlib.sha256(data).hexdigest() != kept.sha256:
        raise DataError(f"{where}: its answers file {url} does not match the record (size {size}, recorded "
                        f"{kept.size}; or a different sha256): the file or the record was edited")
    rows = parse(data, url)
    others = sorted({row.benchmark for row in rows} - {name})
    if others:
        raise DataError(f"{where}: its answers file {url} holds answers to {others[0]}; the record is corrupt")
    differs = differences(dump(score), summarize(rows, url))
    if differs:
        raise DataError(f"{where} does not match its answers file {url}: {'; '.join(differs)}; the record was "
                        "edited or is corrupt")
    return True


def put_answers(registry_store: Store, name: str, version: int, benchmark: str, data: bytes) -> AnswersFile:
    """Store the answers file of ``name:version``'s evaluation on ``benchmark`` in the registry, create-only, at
    ``models/<name>/answers/<version>/<benchmark>-<sha256>.jsonl`` (registry-relative), and return what a
    score records of it. The name holds the content's hash, so storing the same answers twice is one file;
    DataError when a file of that name holds other bytes (a store that was tampered with)."""
    sha = hashlib.sha256(data).hexdigest()
    key = check_key(f"models/{name}/answers/{int(version)}/{benchmark}-{sha}.jsonl", what="answers file key")
    try:
        registry_store.put_bytes(key, data, if_absent=True)
    except PreconditionFailed:
        if not registry_store.content_matches(key, sha):
            raise DataError(f"{registry_store.url(key)} exists with other content than its name's sha256; the "
                            "registry store was tampered with") from None
    return AnswersFile(path=key, sha256=sha, size=len(data))
