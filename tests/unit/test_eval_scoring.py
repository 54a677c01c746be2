"""Scoring (job/evals/scoring.py): the Wilson interval against known values, per-benchmark results, comparison."""

from __future__ import annotations

import pytest

from job.evals.scoring import ItemResult, compare, score, wilson_interval
from registry.errors import ConfigError


def item(n: int, *, gold: str = "A", choice: str | None = "A", stopped: bool = True, reasoning: int = 10) -> ItemResult:
    return ItemResult(id=f"q{n}", gold=gold, choice=choice, completion="...", prompt_tokens=20,
                      completion_tokens=reasoning + 5, reasoning_tokens=reasoning, stopped=stopped)


@pytest.mark.parametrize(("k", "n", "lo", "hi"), [
    (50, 100, 0.4038, 0.5962),   # the textbook value
    (0, 10, 0.0, 0.2775),        # no successes: the lower end is 0, the upper end is not
    (10, 10, 0.7225, 1.0),       # the mirror image
    (1, 1, 0.2065, 1.0),
    (81, 263, 0.2553, 0.3662),   # Newcombe (1998), example table: 81/263
])
def test_wilson_interval_known_values(k: int, n: int, lo: float, hi: float) -> None:
    got = wilson_interval(k, n)
    assert got == pytest.approx((lo, hi), abs=5e-5)


def test_wilson_interval_is_symmetric_and_inside_unit_interval() -> None:
    for n in (1, 7, 50):
        for k in range(n + 1):
            lo, hi = wilson_interval(k, n)
            assert 0.0 <= lo <= k / n <= hi <= 1.0
            mlo, mhi = wilson_interval(n - k, n)
            assert (lo, hi) == pytest.approx((1 - mhi, 1 - mlo), abs=1e-12)


@pytest.mark.parametrize(("k", "n"), [(0, 0), (5, 4), (-1, 3)])
def test_wilson_interval_refuses_impossible_counts(k: int, n: int) -> None:
    with pytest.raises(ConfigError):
        wilson_interval(k, n)


def test_score_counts_every_share() -> None:
    items = [item(0), item(1), item(2, choice="B"), item(3, choice=None), item(4, choice=None, stopped=False, reasoning=90),
             item(5, gold="C", choice="C", reasoning=30), item(6, stopped=False, reasoning=70), item(7, choice="D")]
    result = score("medqa", items)
    assert (result.correct, result.scored) == (4, 8)
    assert result.accuracy == 0.5
    assert result.interval == wilson_interval(4, 8)
    assert result.no_answer_share == 2 / 8
    assert result.hit_limit_share == 2 / 8
    assert result.median_reasoning_tokens == 10.0  # 10,10,10,10,90,30,70,10 -> median 10
    data = result.to_dict()
    assert data["interval"] == list(result.interval) and data["benchmark"] == "medqa"


def test_no_answer_is_wrong_even_when_gold_is_none_like() -> None:
    assert not item(0, choice=None).correct
    assert score("pubmedqa", [item(0, choice=None)]).accuracy == 0.0


def test_score_refuses_no_items() -> None:
    with pytest.raises(ConfigError, match="no questions"):
        score("medqa", [])


def test_compare_difference_and_overlap() -> None:
    low = score("medqa", [item(i, choice="A" if i < 30 else "B") for i in range(100)])      # 30%
    close = score("medqa", [item(i, choice="A" if i < 36 else "B") for i in range(100)])    # 36%
    high = score("medqa", [item(i, choice="A" if i < 70 else "B") for i in range(100)])     # 70%
    near = compare(low, close)
    assert near.difference == pytest.approx(0.06) and near.overlap
    far = compare(low, high)
    assert far.difference == pytest.approx(0.40) and not far.overlap
    assert compare(high, low).difference == pytest.approx(-0.40)


def test_compare_refuses_different_benchmarks() -> None:
    with pytest.raises(ConfigError, match="different benchmarks"):
        compare(score("medqa", [item(0)]), score("pubmedqa", [item(0)]))
