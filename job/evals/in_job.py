"""Benchmark scoring inside ``medft train``: the questions of ``eval.benchmarks`` read in the pull stage (before
any weights move), and the model being trained scored on them before and after training (``job/pipeline.py``).
"""

from __future__ import annotations

from typing import Any

from job.config import JobConfig
from job.evals.runner import EvalSettings
from job.evals.suite import BenchmarkChoice, load_suite, score_suite
from job.inference.generate import Sampling
from job.inference.loading import Loaded
from job.templates import get_template
from registry.logs import get_logger

log = get_logger(__name__)


def load_job_benchmarks(cfg: JobConfig) -> list[Any]:
    """The questions of ``eval.benchmarks`` (none: an empty list), read before any weights move so a bad
    source fails first; raises what :func:`job.evals.suite.load_suite` raises."""
    if not cfg.eval.benchmarks:
        return []
    e = cfg.eval
    choices = {name: BenchmarkChoice(override=source.override(), file=source.file)
               for name, source in e.benchmark_sources.items()}
    return load_suite(e.benchmarks, choices, limit=e.benchmark_limit, seed=e.benchmark_seed,
                      cache_dir=cfg.data.cache_dir)


def score_job_benchmarks(model: Any, tokenizer: Any, cfg: JobConfig, suite: list[Any], label: str) -> dict[str, Any] | None:
    """``suite`` scored with the model being trained (greedy, ``eval.benchmark_max_new_tokens``), by benchmark
    name as :class:`registry.records.BenchmarkScore`; None when no benchmark is configured."""
    if not suite:
        return None
    settings = EvalSettings(sampling=Sampling(max_new_tokens=cfg.eval.benchmark_max_new_tokens, temperature=0.0),
                            batch_size=cfg.eval.benchmark_batch_size)
    loaded = Loaded(label=f"{label} training", model=model, tokenizer=tokenizer,
                    template=get_template(cfg.data.template), backend="job")
    scores = score_suite(loaded, suite, settings)
    log.info("eval.benchmarks", when=label, **{name: round(float(s.accuracy or 0), 4) for name, s in scores.items()})
    return scores
