"""Benchmark scoring inside ``medft train``: the questions of ``eval.benchmarks`` read in the pull stage (before
any weights move), and the model being trained scored on them before and after training (``job/pipeline.py``).

Each benchmark's answers file is written to ``<answers_dir>/<before|after>/<benchmark>.jsonl``; the pipeline
publishes ``answers_dir`` in the run folder as ``benchmarks/`` (listed in MANIFEST.json like every file), and
each score names its file by that run-relative path, sha256 and size.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from job.config import JobConfig
from job.evals.runner import EvalSettings
from job.evals.suite import BenchmarkChoice, load_suite, score_suite
from job.inference.generate import Sampling
from job.inference.loading import Loaded
from job.templates import get_template
from registry.logs import get_logger
from registry.records import AnswersFile

#: The folder of the run that holds the answers files of its benchmark scores.
RUN_FOLDER = "benchmarks"

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


def score_job_benchmarks(model: Any, tokenizer: Any, cfg: JobConfig, suite: list[Any], label: str,
                         answers_dir: Path) -> dict[str, Any] | None:
    """``suite`` scored with the model being trained (``eval.benchmark_*``: token limit, temperature, top-p,
    samples, seed), by benchmark name as :class:`registry.records.BenchmarkScore`, each answers file written to
    ``answers_dir/label/<benchmark>.jsonl`` and named in its score as ``benchmarks/label/<benchmark>.jsonl``;
    None when no benchmark is configured."""
    if not suite:
        return None
    e = cfg.eval
    settings = EvalSettings(sampling=Sampling(max_new_tokens=e.benchmark_max_new_tokens, temperature=e.benchmark_temperature,
                                              top_p=e.benchmark_top_p, seed=e.benchmark_seed),
                            batch_size=e.benchmark_batch_size, samples=e.benchmark_samples)
    loaded = Loaded(label=f"{label} training", model=model, tokenizer=tokenizer,
                    template=get_template(cfg.data.template), backend="job")
    scores = {}
    folder = answers_dir / label
    folder.mkdir(parents=True, exist_ok=True)
    for name, scored in score_suite(loaded, suite, settings).items():
        (folder / f"{name}.jsonl").write_bytes(scored.answers)
        scores[name] = scored.kept_at(AnswersFile(path=f"{RUN_FOLDER}/{label}/{name}.jsonl",
                                                  sha256=hashlib.sha256(scored.answers).hexdigest(),
                                                  size=len(scored.answers)))
    log.info("eval.benchmarks", when=label, **{name: round(float(s.accuracy or 0), 4) for name, s in scores.items()})
    return scores
