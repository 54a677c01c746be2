"""Per-item records to one benchmark's result, and the comparison of two results.

:class:`ItemResult` is what the runner records per question; :func:`score` turns a benchmark's items into a
:class:`BenchmarkResult`:

* ``accuracy``: correct / scored; an item with no extractable answer counts as wrong;
* ``interval``: the Wilson score interval for that proportion at 95% (:func:`wilson_interval`), which,
  unlike the normal approximation, stays inside [0, 1] and is sensible at 0 or n successes;
* ``no_answer_share``: items whose completion had no extractable answer;
* ``hit_limit_share``: items that never stopped (cut off at ``max_new_tokens``);
* ``median_reasoning_tokens``: the median number of completion tokens before the last ``</think>`` (all of
  them when there is none).

:func:`compare` gives the difference between two results on one benchmark and whether their intervals
overlap, for the alias gate ("does version B score at least as well as version A?").
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from registry.errors import ConfigError

#: The standard normal quantile for a two-sided 95% interval.
Z_95 = 1.959963984540054


@dataclass(frozen=True)
class ItemResult:
    """One question as answered: the completion, its token counts, how it ended and what it chose.

    ``stopped``: the model ended with a stop token (EOS); False means it hit ``max_new_tokens``.
    ``choice``: the extracted letter (None: no extractable answer). ``reasoning_tokens``: completion tokens
    before the last ``</think>`` (all of them without one).
    """

    id: str
    gold: str
    choice: str | None
    completion: str
    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    stopped: bool

    @property
    def correct(self) -> bool:
        return self.choice is not None and self.choice == self.gold

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "correct": self.correct}


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
    p = successes / n
    z2 = z * z
    denominator = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denominator
    # At 0/n and n/n the ends are exactly 0 and 1; floating point would leave them a hair off.
    lower = 0.0 if successes == 0 else max(0.0, centre - half)
    upper = 1.0 if successes == n else min(1.0, centre + half)
    return lower, upper


def score(benchmark: str, items: Sequence[ItemResult]) -> BenchmarkResult:
    """The result of ``benchmark`` over ``items``; ConfigError when there are none."""
    n = len(items)
    if n == 0:
        raise ConfigError(f"benchmark {benchmark}: no questions were scored")
    correct = sum(item.correct for item in items)
    return BenchmarkResult(
        benchmark=benchmark, accuracy=correct / n, interval=wilson_interval(correct, n), correct=correct, scored=n,
        no_answer_share=sum(item.choice is None for item in items) / n,
        hit_limit_share=sum(not item.stopped for item in items) / n,
        median_reasoning_tokens=float(statistics.median(item.reasoning_tokens for item in items)))


def compare(reference: BenchmarkResult, candidate: BenchmarkResult) -> Comparison:
    """How ``candidate`` scores against ``reference``; ConfigError when they are different benchmarks."""
    if reference.benchmark != candidate.benchmark:
        raise ConfigError(f"cannot compare {reference.benchmark} with {candidate.benchmark}: different benchmarks")
    (ref_lo, ref_hi), (cand_lo, cand_hi) = reference.interval, candidate.interval
    return Comparison(benchmark=reference.benchmark, reference=reference.accuracy, candidate=candidate.accuracy,
                      difference=candidate.accuracy - reference.accuracy,
                      overlap=cand_lo <= ref_hi and ref_lo <= cand_hi)
