"""Per-answer records to one benchmark's result, and the comparison of two results.

:class:`ItemResult` is what the runner records per answer (K per question with ``--samples K``); :func:`score`
turns a benchmark's items into a :class:`BenchmarkResult` through :func:`registry.answers.summarize`, the
same computation that checks a recorded score against its answers file:

* ``accuracy``: correct answers / all answers; an answer with nothing extractable counts as wrong;
* ``interval``: at 95%, the Wilson score interval (:func:`wilson_interval`; it stays inside [0, 1] and is
  sensible at 0 or n successes) over the questions, at the effective number of answers when each question
  was answered K > 1 times (their answers are correlated; see :mod:`registry.answers`);
* ``no_answer_share``: answers with no extractable choice;
* ``hit_limit_share``: answers that never stopped (cut off at ``max_new_tokens``);
* ``median_reasoning_tokens``: the median number of completion tokens before the last ``</think>`` (all of
  them when there is none).

:func:`compare` gives the difference between two results on one benchmark and whether their intervals
overlap, for the alias gate ("does version B score at least as well as version A?").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from registry.answers import Z_95, AnswerRow, summarize, wilson
from registry.errors import ConfigError, DataError


@dataclass(frozen=True)
class ItemResult:
    """One answer to a question: the completion, its token counts, how it ended and what it chose.

    ``stopped``: the model ended with a stop token (EOS); False means it hit ``max_new_tokens``.
    ``choice``: the extracted letter (None: no extractable answer). ``reasoning_tokens``: completion tokens
    before the last ``</think>`` (all of them without one). ``sample``: which of the question's answers
    (0..K-1); ``seed``: its sampling seed (None when greedy).
    """

    id: str
    gold: str
    choice: str | None
    completion: str
    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    stopped: bool
    sample: int = 0
    seed: int | None = None

    @property
    def correct(self) -> bool:
        return self.choice is not None and self.choice == self.gold

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "correct": self.correct}

    def to_row(self, benchmark: str) -> AnswerRow:
        """The answer as the answers file keeps it (:class:`registry.answers.AnswerRow`)."""
        return AnswerRow(benchmark=benchmark, question_id=self.id, sample=self.sample, seed=self.seed,
                         prompt_tokens=self.prompt_tokens, completion=self.completion,
                         completion_tokens=self.completion_tokens, reasoning_tokens=self.reasoning_tokens,
                         choice=self.choice, gold=self.gold, correct=self.correct,
                         stop="stop" if self.stopped else "length")


@dataclass(frozen=True)
class BenchmarkResult:
    """One benchmark's score (see the module docstring); ``to_dict`` is what metrics and the registry keep."""

    benchmark: str
    accuracy: float
    interval: tuple[float, float]
    correct: int
    scored: int
    no_answer_share: float
    hit_limit_share: float
    median_reasoning_tokens: float
    samples: int = 1

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["interval"] = list(self.interval)
        return data


@dataclass(frozen=True)
class Comparison:
    """``candidate`` minus ``reference`` on one benchmark; ``overlap``: their 95% intervals overlap, so the
    difference may be noise."""

    benchmark: str
    reference: float
    candidate: float
    difference: float
    overlap: bool


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of ``successes`` out of ``n``; ConfigError when the counts are impossible.

    ``(p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)`` with ``p = successes / n``.
    """
    if n < 1 or not 0 <= successes <= n:
        raise ConfigError(f"a Wilson interval needs 0 <= successes <= n and n >= 1, got {successes}/{n}")
    return wilson(successes / n, n, z)


def score(benchmark: str, items: Sequence[ItemResult]) -> BenchmarkResult:
    """The result of ``benchmark`` over ``items`` (every answer, K per question); ConfigError when there are
    none or the questions were not all answered K times."""
    if not items:
        raise ConfigError(f"benchmark {benchmark}: no questions were scored")
    try:
        s = summarize([item.to_row(benchmark) for item in items], f"benchmark {benchmark}")
    except DataError as e:
        raise ConfigError(e.message) from None
    return BenchmarkResult(
        benchmark=benchmark, accuracy=s.accuracy, interval=s.interval, correct=s.correct, scored=s.scored,
        no_answer_share=s.no_answer_share, hit_limit_share=s.hit_limit_share,
        median_reasoning_tokens=s.median_reasoning_tokens, samples=s.samples)


def compare(reference: BenchmarkResult, candidate: BenchmarkResult) -> Comparison:
    """How ``candidate`` scores against ``reference``; ConfigError when they are different benchmarks."""
    if reference.benchmark != candidate.benchmark:
        raise ConfigError(f"cannot compare {reference.benchmark} with {candidate.benchmark}: different benchmarks")
    (ref_lo, ref_hi), (cand_lo, cand_hi) = reference.interval, candidate.interval
    return Comparison(benchmark=reference.benchmark, reference=reference.accuracy, candidate=candidate.accuracy,
                      difference=candidate.accuracy - reference.accuracy,
                      overlap=cand_lo <= ref_hi and ref_lo <= cand_hi)
