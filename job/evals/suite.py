"""Several benchmarks scored with one model, as ``medft eval`` and the job's evaluate stage both do.

:func:`load_suite` reads every benchmark's questions first (so a bad name, a missing column or an unreachable
dataset fails before any weights load); :func:`score_suite` asks one loaded model all of them and returns
each benchmark's :class:`ScoredBenchmark`: its :class:`~registry.records.BenchmarkScore` (the typed form
metrics, the registry and the model card keep, with the protocol it was scored under) and its answers file
(:mod:`registry.answers`), which the caller keeps somewhere and names in the score
(:meth:`ScoredBenchmark.kept_at`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from job.evals.runner import BenchmarkRun, EvalSettings, run_benchmark
from job.evals.sources import BenchmarkData, load_questions
from job.inference.loading import Loaded
from job.medical_benchmarks import BenchmarkOverride, get_benchmark
from registry import answers
from registry.progress import Progress, Task, current
from registry.records import AnswersFile, BenchmarkScore, dump


@dataclass(frozen=True)
class BenchmarkChoice:
    """Where one benchmark's questions come from: spec ``override`` (None: the spec's own) and a local ``file``
    (None: the hub)."""

    override: BenchmarkOverride | None = None
    file: str | None = None


def load_suite(names: Sequence[str], choices: Mapping[str, BenchmarkChoice] | None = None, *,
               limit: int | None = None, seed: int = 0, cache_dir: str | None = None) -> list[BenchmarkData]:
    """The questions of every benchmark in ``names``, in order. Raises what :func:`get_benchmark` and
    :func:`load_questions` raise (ConfigError for an unknown name, DataError for a missing column, ...)."""
    choices = choices or {}
    out = []
    for name in names:
        choice = choices.get(name, BenchmarkChoice())
        spec = get_benchmark(name, choice.override)
        out.append(load_questions(spec, path=choice.file, limit=limit, seed=seed, cache_dir=cache_dir))
    return out


@dataclass(frozen=True)
class ScoredBenchmark:
    """One benchmark as scored: ``score`` (naming no answers file yet) and ``answers``, the bytes of its answers
    file (every answer, one JSON line each)."""

    score: BenchmarkScore
    answers: bytes

    def kept_at(self, where: AnswersFile) -> BenchmarkScore:
        """The score naming its answers file as kept at ``where`` (path, sha256, size)."""
        return BenchmarkScore.model_validate({**dump(self.score), "answers_file": dump(where)})


def to_score(data: BenchmarkData, run: BenchmarkRun, settings: EvalSettings) -> BenchmarkScore:
    """``run``'s result with what it was scored on (questions and protocol), as recorded."""
    r = run.result
    sampled = settings.sampled
    return BenchmarkScore(
        benchmark=r.benchmark, accuracy=r.accuracy, interval=list(r.interval), correct=r.correct, scored=r.scored,
        no_answer_share=r.no_answer_share, hit_limit_share=r.hit_limit_share,
        median_reasoning_tokens=r.median_reasoning_tokens, source=data.source, revision=data.revision,
        rows=data.rows, limit=data.limit, seed=data.seed, content_sha256=data.content_sha256,
        max_new_tokens=settings.sampling.max_new_tokens, temperature=settings.sampling.temperature,
        top_p=settings.sampling.top_p if sampled else None, samples=settings.samples, seconds=run.seconds)


def _advancing(task: Task) -> Callable[[int, int], None]:
    """The engine's ``progress(done, total)`` callback, advancing ``task`` by the answers newly generated."""
    answered = 0

    def advance(done: int, total: int) -> None:
        nonlocal answered
        task.advance(done - answered)
        answered = done

    return advance


def score_suite(loaded: Loaded, suite: Sequence[BenchmarkData], settings: EvalSettings, *,
                progress: Progress | None = None) -> dict[str, ScoredBenchmark]:
    """Every benchmark of ``suite`` asked of ``loaded``, by name. Each benchmark is a task of ``progress``
    (default: the process's own, bars on a terminal and nothing elsewhere) counting answers generated. The
    model is switched to eval mode for the run and back; sampled answers are seeded from ``settings.sampling.seed``."""
    progress = progress or current()
    model = loaded.model
    was_training = bool(getattr(model, "training", False))
    model.eval()
    try:
        scores = {}
        for data in suite:
            name = data.spec.name
            total = len(data.questions) * settings.samples
            with progress.task(f"{name} ({loaded.label})", total=total, unit="answer") as task:
                run = run_benchmark(loaded, name, data.questions, settings, progress=_advancing(task))
            scores[name] = ScoredBenchmark(score=to_score(data, run, settings),
                                           answers=answers.encode(item.to_row(name) for item in run.items))
        return scores
    finally:
        model.train(was_training)
