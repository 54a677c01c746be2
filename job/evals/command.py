"""``medft eval``: score a registered version, a run folder or a base model on the medical benchmarks.

Everything that can be checked is checked before any weights load: the benchmark names, the ``--data``
files, every benchmark's questions (read and mapped, so a missing column or an unreachable dataset fails
first) and the ref. Then one model loads, answers every benchmark (batched, greedy by default) and is freed.
Output: a table per model (accuracy with its Wilson 95% interval, questions scored, the share with no
extractable answer, the share that hit the token limit, the median reasoning length), or ``--json``.

``--record`` then appends the scores to the registered version's ``evaluations`` (compare-and-swap), where
``registry compare`` and the alias gate read them: a version can be scored, or re-scored the same way as
another, without training it again. The scores are printed first, so a failed write loses none of them.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from job.evals.runner import DEFAULT_BATCH_SIZE, DEFAULT_EVAL_MAX_NEW_TOKENS, EvalSettings
from job.evals.suite import BenchmarkChoice, load_suite, score_suite
from job.inference.generate import Sampling
from job.medical_benchmarks import BENCHMARKS, known_names, parse_benchmarks
from registry.compare import format_score, text_table
from registry.errors import ConfigError
from registry.logs import get_logger
from registry.records import BaseModelLineage, BenchmarkScore, EvaluationRecord, dump

log = get_logger(__name__)

DEFAULT_BENCHMARKS = "medqa,medmcqa,pubmedqa"


def parse_data_files(items: Sequence[str]) -> dict[str, BenchmarkChoice]:
    """``("medqa=path.jsonl", ...)`` -> {name: choice with that file}; ConfigError for a bad or repeated item."""
    out: dict[str, BenchmarkChoice] = {}
    for item in items:
        name, sep, path = item.partition("=")
        name = name.strip().lower()
        if not sep or not path.strip():
            raise ConfigError(f"--data {item!r}: write BENCHMARK=FILE, e.g. --data medqa=medqa-test.jsonl")
        if name not in BENCHMARKS:
            raise ConfigError(f"--data {item!r}: unknown benchmark {name!r}; use one of {known_names()}")
        if name in out:
            raise ConfigError(f"--data {item!r}: {name} is given twice; give one file per benchmark")
        out[name] = BenchmarkChoice(file=path.strip())
    return out


def _check_model_args(ref: str | None, base: str | None, template: str | None, base_revision: str | None,
                      record: bool) -> None:
    """ConfigError (exit 2) unless exactly one model is named, with only the options that apply to it."""
    from job.inference.refs import is_run_uri

    if ref is None and base is None:
        raise ConfigError("give a model to score: REF (NAME, NAME:VERSION, NAME@ALIAS or a run folder) or "
                          "--base URI (a base model)")
    if ref is not None and base is not None:
        raise ConfigError(f"give REF ({ref}) or --base URI ({base}), not both")
    if ref is not None and (template is not None or base_revision is not None):
        option = "--template" if template is not None else "--base-revision"
        raise ConfigError(f"{option} applies to --base only: REF {ref} is asked with the template it was trained "
                          "with, and loads the base revision its record names")
    if record and base is not None:
        raise ConfigError("--record writes the scores into a registered version, and --base names none; give "
                          "REF as NAME, NAME:VERSION or NAME@ALIAS")
    if record and ref is not None and is_run_uri(ref):
        raise ConfigError(f"--record writes the scores into a registered version, and {ref} is a run folder; "
                          "register it with `medft registry register NAME RUN_URI` and give NAME:VERSION")


def score_table(scores: dict[str, BenchmarkScore]) -> str:
    """One row per benchmark: accuracy [95% interval], scored, no-answer share, hit-limit share, median
    reasoning tokens."""
    rows = [[name, format_score(dump(s)), str(s.scored), f"{s.no_answer_share:.1%}", f"{s.hit_limit_share:.1%}",
             f"{s.median_reasoning_tokens:g}"] for name, s in scores.items()]
    return text_table(rows, ["BENCHMARK", "ACCURACY [95% CI]", "SCORED", "NO ANSWER", "HIT LIMIT",
                             "MEDIAN REASONING TOKENS"])


def eval_command(ref: str | None, *, base: str | None = None, base_revision: str | None = None,
                 template: str | None = None, benchmarks: str = DEFAULT_BENCHMARKS, limit: int | None = None,
                 seed: int = 0, max_new_tokens: int = DEFAULT_EVAL_MAX_NEW_TOKENS,
                 batch_size: int = DEFAULT_BATCH_SIZE, data_files: Sequence[str] = (), artifact: str = "merged",
                 store: str | None = None, registry: str | None = None, as_json: bool = False,
                 record: bool = False, cache_dir: str | None = None,
                 out: TextIO | None = None) -> dict[str, BenchmarkScore]:
    """``medft eval``: score REF (a registry ref or run folder) or, with ``base``, a base model (any
    ``model.base`` URI, asked with ``template``, default ``r1-medical``) on ``benchmarks``; returns the scores
    by benchmark. With ``record``, REF must be a registry ref: the scores are appended to that version's
    ``evaluations``, and the output says so.

    Raises ConfigError (exit 2) for bad usage (REF and ``--base`` both or neither, ``template`` or
    ``base_revision`` with REF, an unknown benchmark or template, a bad or repeated ``--data`` item,
    ``record`` without a registry ref), and what loading questions (DataError 3, NotFoundError 4,
    AccessDeniedError 5, TransientError 75), resolving the ref, loading the weights and writing the record
    (ConflictError 75, the store's errors) raise; the scores are printed before a failed write's error.
    """
    from job.inference.loading import check_loadable, load, load_base, unload
    from job.inference.refs import Version, resolve_ref

    out = out or sys.stdout
    _check_model_args(ref, base, template, base_revision, record)
    check_loadable(artifact)  # before any question or weight is downloaded
    names = parse_benchmarks(benchmarks)
    choices = parse_data_files(data_files)
    unused = sorted(set(choices) - set(names))
    if unused:
        raise ConfigError(f"--data {unused[0]}=...: {unused[0]} is not in --benchmarks {','.join(names)}")
    settings = EvalSettings(sampling=Sampling(max_new_tokens=max_new_tokens, temperature=0.0),
                            batch_size=batch_size)
    if base is not None:
        from job.templates import TEMPLATES

        template = template or "r1-medical"
        if template not in TEMPLATES:  # before any download
            raise ConfigError(f"--template {template!r}: unknown template; use one of {', '.join(sorted(TEMPLATES))}")
    suite = load_suite(names, choices, limit=limit, seed=seed, cache_dir=cache_dir)
    if base is not None:
        version = Version(label=f"base {base}", artifacts={},
                          base_model=BaseModelLineage(uri=base, revision=base_revision),
                          config={"data": {"template": template}})
        version.base_uri()  # a URI no source could mean fails here, before any download
        loaded = load_base(version)
    else:
        version = resolve_ref(str(ref), store=store, registry=registry)
        loaded = load(version, artifact)
    try:
        scores = score_suite(loaded, suite, settings)
    finally:
        label = loaded.label
        unload(loaded)
    log.info("eval.done", ref=label, benchmarks=list(scores))
    payload: dict[str, Any] = {"ref": label, "max_new_tokens": max_new_tokens, "limit": limit, "seed": seed,
                               "benchmarks": {n: dump(s) for n, s in scores.items()}}
    if not as_json:
        out.write(f"{label}: greedy, max {max_new_tokens} new tokens"
                  + (f", {limit} questions per benchmark (seed {seed})" if limit else "") + "\n")
        out.write(score_table(scores) + "\n")
        out.flush()
    try:
        if record:
            payload["recorded"] = _record(label, scores, artifact, store, registry)
            if not as_json:
                out.write(f"recorded as evaluation {payload['recorded']['evaluation']} of {label}\n")
    finally:  # the scores are printed even when the record could not be written
        if as_json:
            out.write(json.dumps(payload, indent=2) + "\n")
        out.flush()
    return scores


def _record(label: str, scores: dict[str, BenchmarkScore], artifact: str, store: str | None,
            registry: str | None) -> dict[str, Any]:
    """Append ``scores`` to the ``evaluations`` of the registered version ``label`` (``NAME:VERSION``, the
    version the ref resolved to before scoring, even if an alias has moved since); returns where they went:
    ``{"ref": label, "evaluation": n}`` (1 for the first)."""
    from registry.registry import Registry, current_user, parse_ref
    from registry.runs import now_iso

    name, number, _ = parse_ref(label)
    assert number is not None, label  # a registry ref resolves to NAME:VERSION
    evaluation = EvaluationRecord(benchmarks=scores, artifact=artifact, evaluated_at=now_iso(), by=current_user())
    stored = Registry.at(store, registry).record_evaluation(name, number, evaluation)
    # Its place in the list as written (another may have been appended right after it).
    position = [dump(e) for e in stored.evaluations].index(dump(evaluation)) + 1
    log.info("eval.recorded", ref=label, benchmarks=list(scores), evaluation=position)
    return {"ref": label, "evaluation": position}
