"""The evaluation protocol's records and statistics: property-based (hypothesis) and a few worked examples.

* a benchmark score round-trips through its JSON form, and an impossible count (negative, more correct
  answers than answered, more questions than there are, a count that is not an integer) is refused naming
  the field;
* the interval contains the accuracy, shrinks when there are more questions answered alike, equals the plain
  Wilson interval with one sample, and is never narrower than that of N questions nor than N·K independent
  answers allow;
* the answers file round-trips, and every recorded number is recomputed from it;
* sample seeds are stable and distinct, and several greedy samples are refused.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from job.evals.runner import EvalSettings, answer_seed
from job.evals.scoring import wilson_interval
from job.inference.generate import Sampling
from registry import answers
from registry.errors import ConfigError, DataError
from registry.records import BenchmarkScore, EvaluationRecord, dump, parse_record
from tests.eval_factory import answers_and_score

PROPERTY = settings(max_examples=40, deadline=None, derandomize=True, database=None)

# Each question's correct answers out of K: the per-question means the interval is built from.
RUNS = st.integers(min_value=1, max_value=6).flatmap(
    lambda k: st.tuples(st.just(k), st.lists(st.integers(min_value=0, max_value=k), min_size=1, max_size=60)))


def _means(k: int, rights: list[int]) -> list[float]:
    return [r / k for r in rights]


@PROPERTY
@given(run=RUNS)
def test_the_interval_contains_the_accuracy_and_lies_between_the_bounds(run: tuple[int, list[int]]) -> None:
    k, rights = run
    means = _means(k, rights)
    p = sum(rights) / (k * len(rights))
    low, high = answers.interval(means, k)
    assert 0 <= low <= p + 1e-12 and p - 1e-12 <= high <= 1
    # Never narrower than N·K independent answers, never wider than N questions answered once.
    n = len(rights)
    wide, narrow = answers.wilson(p, n), answers.wilson(p, n * k)
    assert wide[0] - 1e-12 <= low <= narrow[0] + 1e-12 and narrow[1] - 1e-12 <= high <= wide[1] + 1e-12


@PROPERTY
@given(run=RUNS)
def test_the_interval_shrinks_with_more_questions(run: tuple[int, list[int]]) -> None:
    """The same questions answered the same way, twice as many of them: the interval can only narrow."""
    k, rights = run
    low, high = answers.interval(_means(k, rights), k)
    low2, high2 = answers.interval(_means(k, rights * 2), k)
    assert high2 - low2 <= high - low + 1e-12
    if 0 < sum(rights) < k * len(rights):
        assert high2 - low2 < high - low


@PROPERTY
@given(rights=st.lists(st.booleans(), min_size=1, max_size=80))
def test_one_sample_is_the_plain_wilson_interval(rights: list[bool]) -> None:
    means = [float(r) for r in rights]
    assert answers.interval(means, 1) == wilson_interval(sum(rights), len(rights))
    assert answers.effective_answers(means, 1) == len(rights)


def test_correlated_samples_count_as_fewer_answers() -> None:
    """Half the questions always right, half always wrong: K samples tell no more than one (n_eff = N); every
    question right half the time: the samples are as good as independent (n_eff = N·K)."""
    assert answers.effective_answers([1.0, 0.0] * 50, 4) == 100
    assert answers.effective_answers([0.5] * 100, 4) == 400
    assert answers.interval([1.0, 0.0] * 50, 4) == wilson_interval(50, 100)
    assert answers.interval([0.5] * 100, 4) == wilson_interval(200, 400)


SCORES = st.builds(
    lambda scored, k, frac, temperature: {
        "benchmark": "medqa", "scored": scored, "samples": k, "correct": round(frac * scored * k),
        "accuracy": round(frac * scored * k) / (scored * k), "interval": [0.0, 1.0], "rows": scored + 3,
        "limit": scored, "seed": 7, "max_new_tokens": 2048, "temperature": temperature,
        "top_p": 0.95, "no_answer_share": 0.0, "hit_limit_share": 0.5, "future_key": {"kept": True},
        "answers_file": {"path": "benchmarks/after/medqa.jsonl", "sha256": "a" * 64, "size": 10}},
    st.integers(1, 2000), st.integers(1, 64), st.floats(0, 1), st.sampled_from([0.6, 1.0, 0.25]))


@PROPERTY
@given(score=SCORES)
def test_a_score_round_trips_through_its_json_form(score: dict) -> None:
    record = parse_record(EvaluationRecord, {"benchmarks": {"medqa": score}}, "v.json")
    assert dump(record) == {"benchmarks": {"medqa": score}}  # unknown keys kept, nothing added
    typed = record.benchmarks["medqa"]
    assert typed.protocol() == {"max_new_tokens": 2048, "temperature": score["temperature"], "top_p": 0.95,
                                "samples": score["samples"], "seed": 7}


@PROPERTY
@given(score=SCORES, field=st.sampled_from(["scored", "correct", "samples", "rows", "limit"]),
       bad=st.sampled_from([-5, -1, 2.5, "3", True, 10**9]))
def test_an_impossible_count_is_refused_naming_it(score: dict, field: str, bad: object) -> None:
    edited = {**score, field: bad}
    possible = (isinstance(bad, int) and not isinstance(bad, bool) and bad >= (1 if field in ("samples", "limit")
                                                                              else 0)
                and edited["correct"] <= edited["scored"] * edited["samples"]
                and edited["scored"] <= min(edited["rows"], edited["limit"]))
    if possible:
        parse_record(EvaluationRecord, {"benchmarks": {"medqa": edited}}, "v.json")
        return
    with pytest.raises(DataError, match=r"^v.json: field 'benchmarks.medqa(\.\w+)?' is invalid: ") as refused:
        parse_record(EvaluationRecord, {"benchmarks": {"medqa": edited}}, "v.json")
    assert field in refused.value.message


def test_an_old_record_reads_as_greedy_with_one_sample() -> None:
    old = BenchmarkScore.model_validate({"accuracy": 0.5, "scored": 10, "correct": 5, "seed": 3,
                                         "max_new_tokens": 1024})
    assert old.protocol() == {"max_new_tokens": 1024, "temperature": 0, "top_p": None, "samples": 1, "seed": None}
    assert dump(old) == {"accuracy": 0.5, "scored": 10, "correct": 5, "seed": 3, "max_new_tokens": 1024}


@PROPERTY
@given(accuracy=st.floats(0, 1), scored=st.integers(1, 40), samples=st.integers(1, 5))
def test_every_recorded_number_is_recomputed_from_the_answers_file(accuracy: float, scored: int, samples: int) -> None:
    data, score = answers_and_score(accuracy, scored, samples=samples)
    rows = answers.parse(data, "a.jsonl")
    assert answers.encode(rows) == data
    summary = answers.summarize(rows, "a.jsonl")
    assert answers.differences(score, summary) == []
    assert summary.samples == samples and summary.scored == scored
    forged = {**score, "accuracy": abs(score["accuracy"] - 0.01)}
    assert [d.split()[0] for d in answers.differences(forged, summary)] == ["accuracy"]


@pytest.mark.parametrize(("line", "problem"), [
    (b"not json\n", "line 1 is not JSON"),
    (b'{"benchmark": "medqa"}\n', "line 1: question_id field required"),
    (b'{"benchmark": "medqa", "question_id": "q", "sample": -1, "prompt_tokens": 1, "completion": "", '
     b'"completion_tokens": 1, "reasoning_tokens": 1, "choice": "A", "gold": "A", "correct": true, "stop": "stop"}\n',
     "line 1: sample input should be greater than or equal to 0"),
    (b'{"benchmark": "medqa", "question_id": "q", "sample": 0, "prompt_tokens": 1, "completion": "", '
     b'"completion_tokens": 1, "reasoning_tokens": 1, "choice": "B", "gold": "A", "correct": true, "stop": "stop"}\n',
     "line 1 says correct=true for choice 'B' and gold 'A'"),
])
def test_a_malformed_answers_file_is_refused_naming_the_line(line: bytes, problem: str) -> None:
    with pytest.raises(DataError, match=f"^a.jsonl: {problem}"):
        answers.parse(line, "a.jsonl")


def test_questions_answered_unequally_often_are_refused() -> None:
    data, _ = answers_and_score(0.5, 4, samples=2)
    rows = answers.parse(data, "a.jsonl")
    with pytest.raises(DataError, match="question 'q3' has samples \\[0\\], expected 0..1"):
        answers.summarize(rows[:-1], "a.jsonl")
    with pytest.raises(DataError, match="question 'q0' sample 0 appears twice"):
        answers.parse(data + answers.encode(rows[:1]), "a.jsonl")


def test_sample_seeds_are_stable_distinct_and_32_bit() -> None:
    seeds = {answer_seed(0, f"q{q}", k) for q in range(50) for k in range(4)}
    assert len(seeds) == 200 and all(0 <= s < 2**32 for s in seeds)
    assert answer_seed(0, "q1", 2) == answer_seed(0, "q1", 2) != answer_seed(1, "q1", 2)
    assert answer_seed(0, "q1", 2) == int.from_bytes(__import__("hashlib").sha256(b"0\x00q1\x002").digest()[:4], "big")


def test_several_greedy_samples_are_refused() -> None:
    with pytest.raises(ConfigError, match="--samples 4 with --temperature 0: greedy decoding gives the same answer"):
        EvalSettings(sampling=Sampling(temperature=0.0), samples=4)
    assert EvalSettings(sampling=Sampling(temperature=0.6), samples=4).sampled
    assert math.isclose(EvalSettings().sampling.temperature, 0.0)


def test_the_job_config_takes_the_protocol_and_refuses_several_greedy_samples() -> None:
    from job.config import load_config

    cfg = load_config(None, ["eval.benchmark_samples=4", "eval.benchmark_temperature=0.7"], env={})
    assert (cfg.eval.benchmark_samples, cfg.eval.benchmark_temperature, cfg.eval.benchmark_top_p,
            cfg.eval.benchmark_max_new_tokens) == (4, 0.7, 0.95, 2048)
    for bad, needle in [(["eval.benchmark_samples=4", "eval.benchmark_temperature=0"], "greedy decoding gives the same"),
                        (["eval.benchmark_top_p=0"], "eval.benchmark_top_p"),
                        (["eval.benchmark_temperature=nan"], "eval.benchmark_temperature")]:
        with pytest.raises(ConfigError, match=needle):
            load_config(None, bad, env={})
