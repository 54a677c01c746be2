"""``medft eval``: score a registered version, a run folder or a base model on the medical benchmarks.

Everything that can be checked is checked before any weights load: the benchmark names, the ``--data``
files, every benchmark's questions (read and mapped, so a missing column or an unreachable dataset fails
first), the ``--samples-out`` destination and the ref. Then one model loads, answers every benchmark
(``--samples`` answers per question, sampled at ``--temperature``/``--top-p`` with per-answer seeds, or
greedy at temperature 0) and is freed. Output: a table per model (accuracy with its 95% interval, questions
scored, the share with no extractable answer, the share that hit the token limit, the median reasoning
length), or ``--json``; ``--samples-out FILE`` keeps every answer (JSONL, :mod:`registry.answers`).

``--record`` then stores each benchmark's answers file beside the registered version (create-only) and
appends the scores, each naming its file by path, sha256 and size, to the version's ``evaluations``
(compare-and-swap), where ``registry compare`` and the alias gate read them and recompute them from the
files: a version can be scored, or re-scored the same way as another, without training it again. The scores
are printed and ``--samples-out`` written first, so a failed write loses none of them.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from job.evals.runner import DEFAULT_BATCH_SIZE, DEFAULT_EVAL_MAX_NEW_TOKENS, EvalSettings
from job.evals.suite import BenchmarkChoice, ScoredBenchmark, load_suite, score_suite
from job.inference.generate import DEFAULT_TEMPERATURE, DEFAULT_TOP_P, Sampling
from job.medical_benchmarks import BENCHMARKS, known_names, parse_benchmarks
from registry.compare import format_score, text_table
from registry.errors import ConfigError
from registry.logs import get_logger
from registry.records import BaseModelLineage, BenchmarkScore, EvaluationRecord, dump
from registry.store import check_writable_file
from registry.store.transfer import os_errors, write_whole

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
    if base is not None:  # typed by the user: a usage error (exit 2) saying what is wrong, before any download
        from job.config import check_uri
        from job.inference.refs import is_revision

        try:
            check_uri(base, "--base")
            if base_revision is not None and not is_revision(base_revision):
                raise ValueError(f"--base-revision {base_revision!r} is not a commit sha, tag or branch")
        except ValueError as e:
            raise ConfigError(f"{e}; give --base as hf://org/name, ms://owner/name, s3://bucket/prefix or a local "
                              "folder, and --base-revision as a commit sha, tag or branch") from None
    if record and ref is not None and is_run_uri(ref):
        raise ConfigError(f"--record writes the scores into a registered version, and {ref} is a run folder; "
                          "register it with `medft registry register NAME RUN_URI` and give NAME:VERSION")


def check_samples_out(path: str) -> Path:
    """The ``--samples-out`` destination, checked before any question is read: ConfigError (exit 2) when it is
    a folder, its folder does not exist or no file can be made there (``/proc``), AccessDeniedError (exit 5)
    when this process may not write there."""
    dest = Path(path)
    if dest.is_dir():
        raise ConfigError(f"--samples-out {path}: is a folder; give a file name, e.g. {dest / 'answers.jsonl'}")
    if not dest.parent.is_dir():
        raise ConfigError(f"--samples-out {path}: folder {dest.parent} does not exist; create it or pick another path")
    check_writable_file(dest, "--samples-out")
    return dest


def describe_protocol(settings: EvalSettings) -> str:
    """``greedy`` or ``temperature 0.6, top-p 0.95, 4 samples per question``, for the output's first line."""
    s = settings.sampling
    if not settings.sampled:
        return "greedy"
    return (f"temperature {s.temperature:g}, top-p {s.top_p:g}, {settings.samples} sample"
            f"{'s' if settings.samples > 1 else ''} per question")


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
                 temperature: float = DEFAULT_TEMPERATURE, top_p: float = DEFAULT_TOP_P, samples: int = 1,
                 samples_out: str | None = None,
                 batch_size: int = DEFAULT_BATCH_SIZE, data_files: Sequence[str] = (), artifact: str = "merged",
                 store: str | None = None, registry: str | None = None, as_json: bool = False,
                 record: bool = False, cache_dir: str | None = None,
                 out: TextIO | None = None, record_as: str | None = None) -> dict[str, BenchmarkScore]:
    """``medft eval``: score REF (a registry ref or run folder) or, with ``base``, a base model (any
    ``model.base`` URI, asked with ``template``, default ``r1-medical``) on ``benchmarks``, ``samples`` answers
    per question at ``temperature``/``top_p`` (0: greedy), seeded from ``seed``; returns the scores by
    benchmark. ``samples_out``: write every answer there (JSONL). With ``record``, REF must be a registry ref:
    the answers files are stored beside that version and the scores appended to its ``evaluations``, and the
    output says so. With ``record_as`` (``base`` only), the base's scores and answers files are recorded as
    ``NAME@base`` (:meth:`registry.registry.Registry.record_base_evaluation`).

    Raises ConfigError (exit 2) for bad usage (REF and ``--base`` both or neither, ``template`` or
    ``base_revision`` with REF, an unknown benchmark or template, a bad or repeated ``--data`` item,
    ``record`` without a registry ref, several samples of greedy decoding, a bad temperature or top-p, a
    ``samples_out`` that is a folder or in none), and what loading questions (DataError 3, NotFoundError 4,
    AccessDeniedError 5, TransientError 75), resolving the ref, loading the weights and writing the record
    (ConflictError 75, the store's errors) raise; the scores are printed before a failed write's error.
    """
    from job.inference.loading import check_loadable, load, load_base, unload
    from job.inference.refs import Version, resolve_ref

    out = out or sys.stdout
    _check_model_args(ref, base, template, base_revision, record)
    check_loadable(artifact)  # before any question or weight is downloaded
    if record_as is not None:  # the base's scores under a model name: NAME@base (registry/base_scores.py)
        from registry.names import check_name

        if base is None:
            raise ConfigError("--record-as NAME records a base model's scores (with --base URI); a REF is recorded "
                              "with --record")
        check_name(record_as, "--record-as model name")
        from registry.base_scores import check_same_base
        from registry.registry import Registry

        check_same_base(Registry.at(store, registry).store, record_as, base, base_revision)  # before any scoring
    names = parse_benchmarks(benchmarks)
    choices = parse_data_files(data_files)
    unused = sorted(set(choices) - set(names))
    if unused:
        raise ConfigError(f"--data {unused[0]}=...: {unused[0]} is not in --benchmarks {','.join(names)}")
    settings = EvalSettings(sampling=Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                              seed=seed), batch_size=batch_size, samples=samples)
    dest = check_samples_out(samples_out) if samples_out is not None else None
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
        scored = score_suite(loaded, suite, settings)
    finally:
        label = loaded.label
        unload(loaded)
    scores = {name: s.score for name, s in scored.items()}
    log.info("eval.done", ref=label, benchmarks=list(scores))
    payload: dict[str, Any] = {"ref": label, "max_new_tokens": max_new_tokens, "limit": limit, "seed": seed,
                               "temperature": temperature, "top_p": top_p if settings.sampled else None,
                               "samples": samples, "benchmarks": {n: dump(s) for n, s in scores.items()}}
    if not as_json:
        out.write(f"{label}: {describe_protocol(settings)}, max {max_new_tokens} new tokens"
                  + (f", {limit} questions per benchmark" if limit else "")
                  + (f" (seed {seed})" if limit or settings.sampled else "") + "\n")
        out.write(score_table(scores) + "\n")
        out.flush()
    try:
        if dest is not None:
            with os_errors(dest, "writing"):  # a disk that fills while the answers are written: one line
                answers = b"".join(s.answers for s in scored.values())
                write_whole(dest, lambda path: path.write_bytes(answers))
            payload["samples_out"] = str(dest)
            if not as_json:
                out.write(f"every answer written to {dest}\n")
        if record_as is not None and base is not None:
            payload["recorded"] = _record_base(record_as, base, base_revision, scored, store, registry)
            if not as_json:
                out.write(f"recorded as {record_as}@base (compare it: medft registry compare {record_as}@base ...)\n")
        if record:
            payload["recorded"] = _record(label, scored, artifact, store, registry)
            scores = payload["recorded"].pop("scores")
            payload["benchmarks"] = {n: dump(s) for n, s in scores.items()}
            if not as_json:
                out.write(f"recorded as evaluation {payload['recorded']['evaluation']} of {label}; answers kept at "
                          + ", ".join(payload["recorded"]["answers"].values()) + "\n")
    finally:  # the scores are printed even when the record could not be written
        if as_json:
            out.write(json.dumps(payload, indent=2) + "\n")
        out.flush()
    return scores


def _record_base(name: str, base: str, revision: str | None, scored: dict[str, ScoredBenchmark], store: str | None,
                 registry: str | None) -> dict[str, Any]:
    """Store the base's answers files (as version 0 of ``name``: ``models/<name>/answers/0/``), then record its
    scores, each naming its file, as ``NAME@base``; returns ``{"ref": "NAME@base", "answers": {benchmark: URL}}``."""
    from registry.answers import put_answers
    from registry.registry import Registry, current_user
    from registry.runs import now_iso

    reg = Registry.at(store, registry)
    scores = {bench: s.kept_at(put_answers(reg.store, name, 0, bench, s.answers)) for bench, s in scored.items()}
    reg.record_base_evaluation(name, base, revision, EvaluationRecord(
        benchmarks=scores, artifact="base", evaluated_at=now_iso(), by=current_user()))
    log.info("eval.recorded", ref=f"{name}@base", benchmarks=list(scores))
    return {"ref": f"{name}@base",
            "answers": {bench: reg.store.url(str(s.answers_file.path)) for bench, s in scores.items() if s.answers_file}}


def _record(label: str, scored: dict[str, ScoredBenchmark], artifact: str, store: str | None,
            registry: str | None) -> dict[str, Any]:
    """Store each benchmark's answers file beside the registered version ``label`` (``NAME:VERSION``, the
    version the ref resolved to before scoring, even if an alias has moved since; create-only, under
    ``models/<name>/answers/<version>/`` in the registry), then append the scores, each naming its file, to
    its ``evaluations``; returns where they went: ``{"ref": label, "evaluation": n, "answers": {benchmark:
    the answers file's URL}, "scores": {benchmark: score as recorded}}`` (n is 1 for the first)."""
    from registry.answers import put_answers
    from registry.registry import Registry, current_user, parse_ref
    from registry.runs import now_iso

    name, number, _ = parse_ref(label)
    assert number is not None, label  # a registry ref resolves to NAME:VERSION
    reg = Registry.at(store, registry)
    # The files first: a record never names an answers file that is not there.
    scores = {bench: s.kept_at(put_answers(reg.store, name, number, bench, s.answers)) for bench, s in scored.items()}
    evaluation = EvaluationRecord(benchmarks=scores, artifact=artifact, evaluated_at=now_iso(), by=current_user())
    stored = reg.record_evaluation(name, number, evaluation)
    # Its place in the list as written (another may have been appended right after it).
    position = [dump(e) for e in stored.evaluations].index(dump(evaluation)) + 1
    log.info("eval.recorded", ref=label, benchmarks=list(scores), evaluation=position)
    answers = {bench: reg.store.url(str(s.answers_file.path)) for bench, s in scores.items() if s.answers_file}
    return {"ref": label, "evaluation": position, "answers": answers, "scores": scores}
