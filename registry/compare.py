"""Versions side by side (``medft registry compare``) and the benchmark gate on alias moves.

A version's score on a benchmark (:class:`~registry.records.BenchmarkScore`) is the latest one recorded
for it by ``medft eval REF --record`` (the record's ``evaluations``), else the training job's
(``metrics.benchmarks_after``). :func:`comparison` puts several versions in one table: each
benchmark's accuracy with its 95% interval, eval loss, the data (dataset URI, revision, rows), the base
model, and every config setting whose value differs between them. :func:`draw_scores` draws the benchmark
columns of that table as a picture. :func:`gate_refusal` says why an alias may not move to a version under
``--require``; each side of it is a :class:`Contender`, a registered version or a job's run before it is
published.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from registry.answers import RunStores, check_answers
from registry.errors import ConfigError, DataError
from registry.names import BENCHMARK_NAMES
from registry.records import BenchmarkScore, RunMetrics, dotted
from registry.redact import printable
from registry.store import Store, open_store
from registry.store.transfer import write_whole

if TYPE_CHECKING:  # registry.registry imports this module for the gate
    from registry.versions import ModelVersion

#: Per version ref, per benchmark: whether its score was recomputed from its answers file (False: it has none).
Verified = dict[str, dict[str, bool]]

# Settings that differ between any two runs by construction, so they say nothing about how they differ.
_ALWAYS_DIFFERENT = ("output.run_id",)


def text_table(rows: list[list[str]], header: list[str]) -> str:
    """Left-aligned columns separated by two spaces, header first."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths, strict=True)).rstrip()]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def format_score(score: dict[str, Any] | None) -> str:
    """``61.3% [55.2%, 67.0%]`` (accuracy and its 95% interval), or ``-`` when there is no score."""
    if not score or not isinstance(score.get("accuracy"), (int, float)):
        return "-"
    interval = score.get("interval") or []
    if len(interval) == 2:
        return f"{score['accuracy']:.1%} [{interval[0]:.1%}, {interval[1]:.1%}]"
    return f"{score['accuracy']:.1%}"


def scored_by(mv: ModelVersion) -> dict[str, tuple[BenchmarkScore, str]]:
    """The version's score on each benchmark and where it comes from (``training`` or ``medft eval <when>``);
    empty for a version scored on none. A recorded evaluation replaces the job's score, a later one an
    earlier one."""
    metrics: RunMetrics = mv.run_record().metrics
    out = {name: (score, "training") for name, score in (metrics.benchmarks_after or {}).items()}
    for evaluation in mv.evaluations:  # oldest first
        out.update({name: (score, f"medft eval {evaluation.evaluated_at or '?'}")
                    for name, score in (evaluation.benchmarks or {}).items()
                    if score.accuracy is not None})  # an entry without one replaces nothing
    return out


def benchmark_scores(mv: ModelVersion) -> dict[str, BenchmarkScore]:
    """The version's score on each benchmark (:func:`scored_by` without where it comes from)."""
    return {name: score for name, (score, _) in scored_by(mv).items()}


def answers_files(mv: ModelVersion) -> list[str]:
    """Each answers file ``mv``'s scores name, for ``registry show``: ``medqa after training: <run>/benchmarks/
    after/medqa.jsonl (sha256 ...)``; a recorded evaluation's file is registry-relative."""
    metrics = mv.run_record().metrics
    named = [(f"{name} {when} training", score, f"{mv.run_uri}/")
             for when, scores in (("before", metrics.benchmarks_before), ("after", metrics.benchmarks_after))
             for name, score in (scores or {}).items()]
    named += [(f"{name} medft eval {e.evaluated_at or '?'}", score, "registry: ")
              for e in mv.evaluations for name, score in (e.benchmarks or {}).items()]
    return [f"{what}: {root}{score.answers_file.path} (sha256 {score.answers_file.sha256}, {score.answers_file.size} "
            "bytes)" for what, score, root in named if score.answers_file is not None and score.answers_file.path]


def verify_scores(versions: Sequence[ModelVersion], registry_store: Store,
                  names: Sequence[str] | None = None) -> Verified:
    """:func:`check_answers` for every score (of ``names``, default all) of every version: per ref, per
    benchmark, whether it was verified (False: no answers file). Raises its DataError for the first bad one."""
    out: Verified = {}
    runs = RunStores()
    for mv in versions:
        out[mv.ref] = {name: check_answers(mv.ref, mv.run_uri, name, score, origin, registry_store, runs)
                       for name, (score, origin) in scored_by(mv).items() if names is None or name in names}
    return out


def protocol_text(score: dict[str, Any] | None) -> str:
    """How a score's answers were generated, for people: ``greedy`` or ``T 0.6, top-p 0.95, seed 0``, then
    ``, 4 samples`` when there are several; ``-`` without a score."""
    if not score:
        return "-"
    p = BenchmarkScore.model_validate(score).protocol()
    text = "greedy" if not p["temperature"] else f"T {p['temperature']}, top-p {p['top_p']}, seed {p['seed']}"
    return text + (f", {p['samples']} samples" if p["samples"] > 1 else "")


def differing_settings(versions: Sequence[ModelVersion]) -> dict[str, list[Any]]:
    """Config keys (dotted) whose values are not the same in every version, each with its values in order."""
    flat = [dotted(mv.config) for mv in versions]
    keys = sorted(set().union(*flat)) if flat else []
    return {k: [f.get(k) for f in flat] for k in keys
            if k not in _ALWAYS_DIFFERENT and any(f.get(k) != flat[0].get(k) for f in flat)}


def comparison(versions: Sequence[ModelVersion], verified: Verified | None = None) -> dict[str, Any]:
    """What ``medft registry compare --json`` prints: per version its ref, base, data, eval losses and
    benchmark scores (with, given ``verified`` from :func:`verify_scores`, whether each was recomputed from its
    answers file), and the settings that differ."""
    out = []
    for mv in versions:
        scores = scored_by(mv)
        metrics = mv.run_record().metrics
        data = mv.run_record().dataset_lineage
        out.append({
            "ref": mv.ref, "aliases": list(mv.aliases), "run_id": mv.run_id,
            "base_model": {"uri": mv.base_model.get("uri"), "revision": mv.base_model.get("revision")},
            "dataset": {"source": data.source, "revision": data.revision, "rows": data.rows},
            "eval_loss_before": metrics.eval_loss_before, "eval_loss_after": metrics.eval_loss_after,
            "benchmarks": {n: s.model_dump(mode="json", exclude_unset=True) for n, (s, _) in scores.items()},
            "benchmarks_scored_by": {n: origin for n, (_, origin) in scores.items()},
            **({"benchmarks_verified": verified.get(mv.ref, {})} if verified is not None else {}),
        })
    return {"versions": out, "settings_that_differ": differing_settings(versions)}


def _short(value: Any, width: int = 48) -> str:
    text = "-" if value is None else printable(value)  # stored text: no control characters reach the terminal
    return text if len(text) <= width else text[:width - 3] + "..."


def _scored_by_text(entry: dict[str, Any], name: str) -> str:
    origin = entry["benchmarks_scored_by"].get(name)
    if origin is not None and entry.get("benchmarks_verified", {}).get(name) is False:
        origin += " (unverified: no answers file)"
    return _short(origin, 64)


def comparison_text(versions: Sequence[ModelVersion], verified: Verified | None = None) -> str:
    """One table: a row per measure or setting, a column per version; a score that ``verified`` says has no
    answers file is marked unverified."""
    data = comparison(versions, verified)
    entries = data["versions"]
    header = ["", *[e["ref"] + (f" @{','.join(e['aliases'])}" if e["aliases"] else "") for e in entries]]
    rows: list[list[str]] = []
    names = sorted({n for e in entries for n in e["benchmarks"]})
    for name in names:
        rows.append([name, *[format_score(e["benchmarks"].get(name)) for e in entries]])
        rows.append([f"{name} questions", *[_short((e["benchmarks"].get(name) or {}).get("scored")) for e in entries]])
        rows.append([f"{name} max new tokens",
                     *[_short((e["benchmarks"].get(name) or {}).get("max_new_tokens")) for e in entries]])
        rows.append([f"{name} protocol", *[protocol_text(e["benchmarks"].get(name)) for e in entries]])
        rows.append([f"{name} scored by", *[_scored_by_text(e, name) for e in entries]])
    for key in ("eval_loss_before", "eval_loss_after"):
        rows.append([key.replace("_", " "), *[f"{e[key]:.4g}" if isinstance(e[key], (int, float)) else "-"
                                              for e in entries]])
    rows.append(["base model", *[_short(e["base_model"]["uri"]) for e in entries]])
    rows.append(["base revision", *[_short(e["base_model"]["revision"]) for e in entries]])
    rows.append(["dataset", *[_short(e["dataset"]["source"]) for e in entries]])
    rows.append(["dataset revision", *[_short(e["dataset"]["revision"]) for e in entries]])
    rows.append(["dataset rows", *[_short(e["dataset"]["rows"]) for e in entries]])
    for key, values in data["settings_that_differ"].items():
        rows.append([key, *[_short(v) for v in values]])
    if not data["settings_that_differ"]:
        rows.append(["settings", *["same" for _ in entries]])
    return text_table(rows, header)


IMAGE_FORMATS = (".png", ".svg")


def check_image_path(path: str) -> Path:
    """The ``--image`` destination, checked before anything is read or drawn.

    Raises ConfigError (exit 2) when the suffix is not one of :data:`IMAGE_FORMATS` or the folder does not exist.
    """
    dest = Path(path)
    if dest.suffix.lower() not in IMAGE_FORMATS:
        raise ConfigError(f"--image {path}: the file name must end in {' or '.join(IMAGE_FORMATS)} (the format "
                          "is taken from it)")
    if not dest.parent.is_dir():
        raise ConfigError(f"--image {path}: folder {dest.parent} does not exist; create it or pick another path")
    return dest


def draw_scores(versions: Sequence[ModelVersion], dest: Path) -> None:
    """Draw every benchmark's accuracy per version, with its 95% interval as an error bar, into ``dest``.

    One group of bars per benchmark, one bar per version (a version without a score on a benchmark has no bar
    there). The file is written whole or not at all (temporary file, then rename), without a timestamp, so the
    same versions give the same picture. Raises ConfigError when no version has a benchmark score (nothing to
    draw; nothing written) and OSError from the write.
    """
    entries = comparison(versions)["versions"]
    names = sorted({n for e in entries for n in e["benchmarks"]})
    if not names:
        refs = ", ".join(e["ref"] for e in entries)
        raise ConfigError(f"--image: none of {refs} has a benchmark score to draw (scores come from training with "
                          "eval.benchmarks, or from `medft eval REF --record`); leave out --image")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(4.0, 1.2 + 1.1 * len(names) * len(entries) ** 0.5), 3.6), dpi=100)
    FigureCanvasAgg(fig)  # Agg explicitly: no pyplot, no global backend, no display
    ax = fig.add_subplot()
    width = 0.8 / len(entries)
    for i, entry in enumerate(entries):
        xs, heights, below, above = [], [], [], []
        for j, name in enumerate(names):
            score = entry["benchmarks"].get(name) or {}
            if not isinstance(score.get("accuracy"), (int, float)):
                continue
            low, high = (score.get("interval") or [score["accuracy"]] * 2)[:2]
            xs.append(j - 0.4 + width * (i + 0.5))
            heights.append(100 * score["accuracy"])
            below.append(100 * max(0.0, score["accuracy"] - low))
            above.append(100 * max(0.0, high - score["accuracy"]))
        label = entry["ref"] + (f" @{','.join(entry['aliases'])}" if entry["aliases"] else "")
        ax.bar(xs, heights, width * 0.95, yerr=[below, above], capsize=3, label=label)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("accuracy, % (95% interval)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    # Above the plot, so it never hides a bar.
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=min(len(entries), 3), fontsize="small",
              frameon=False)
    fig.tight_layout()
    fmt = dest.suffix.lower().lstrip(".")
    metadata = {"Software": None} if fmt == "png" else {"Date": None, "Creator": None}
    # bbox_inches="tight": the legend's long refs too
    write_whole(dest, lambda path: fig.savefig(path, format=fmt, metadata=metadata, bbox_inches="tight"))


# What makes two scores of one benchmark comparable: the same questions, answered under the same token limit
# and the same protocol (BenchmarkScore.protocol: temperature, top-p, samples, seed when sampled).
_SCORED_ON = (("content_sha256", "questions"), ("max_new_tokens", "max_new_tokens"))
_PROTOCOL = ("temperature", "top_p", "samples", "seed")


def _scored_differently(a: BenchmarkScore, b: BenchmarkScore) -> str | None:
    """What differs between how ``a`` and ``b`` were scored (``questions``, ``max_new_tokens``, ``temperature``,
    ``top_p``, ``samples``, ``seed``), or None.

    The questions and the token limit are compared where both scores record them (an older record without one
    does not block); the protocol always, an older record's read as greedy with one sample.
    """
    differs = [label for field, label in _SCORED_ON
               if getattr(a, field) is not None and getattr(b, field) is not None and getattr(a, field) != getattr(b, field)]
    pa, pb = a.protocol(), b.protocol()
    differs += [key for key in _PROTOCOL if pa[key] != pb[key]]
    return " and ".join(differs) or None


def required_benchmarks(items: Sequence[str]) -> tuple[str, ...]:
    """``--require`` values (repeatable, each comma-separated) as benchmark names, in order, repeats dropped.

    Raises ConfigError (exit 2) for an empty or unknown name: a gate with a typo or an empty variable in it
    must not let every version through, nor ask for a score no command can make.
    """
    names: list[str] = []
    for item in items:
        for part in str(item).split(","):
            name = part.strip().lower()
            if not name:
                raise ConfigError(f"--require {item!r}: an empty benchmark name; use one or more of "
                                  f"{', '.join(BENCHMARK_NAMES)}")
            if name not in BENCHMARK_NAMES:
                raise ConfigError(f"--require {item!r}: unknown benchmark {name!r}; use one or more of "
                                  f"{', '.join(BENCHMARK_NAMES)}")
            if name not in names:
                names.append(name)
    return tuple(names)


def _rescore(ref: str, name: str, like: BenchmarkScore | None, registry_uri: str) -> str:
    """The ``medft eval`` command that scores ``ref`` on ``name`` the way ``like`` was scored (its question
    subset, token limit, protocol and file, where it records them) and records the score in ``registry_uri``.
    A hub source has no ``medft eval`` option beyond the benchmark's own dataset, so the source is named after
    it."""
    flags = [f"--benchmarks {name}"]
    if like is not None:
        protocol = like.protocol()
        sampled = protocol["temperature"] > 0
        if like.limit is not None:
            flags.append(f"--limit {like.limit}")
        if like.limit is not None or sampled:
            flags.append(f"--seed {like.seed or 0}")
        if like.max_new_tokens is not None:
            flags.append(f"--max-new-tokens {like.max_new_tokens}")
        flags.append(f"--temperature {protocol['temperature']}")
        if sampled and protocol["top_p"] is not None:
            flags.append(f"--top-p {protocol['top_p']}")
        if protocol["samples"] > 1:
            flags.append(f"--samples {protocol['samples']}")
        if like.source and not like.source.startswith("hf://"):
            flags.append("--data " + shlex.quote(f"{name}={like.source.removeprefix('file://')}"))
    command = f"`medft eval {ref} {' '.join(flags)} --record --registry {shlex.quote(registry_uri)}`"
    if like is not None and like.source and like.source.startswith("hf://"):
        command += f" (its questions came from {like.source}" + (f" at {like.revision}" if like.revision else "") + ")"
    return command


@dataclass(frozen=True)
class Contender:
    """One side of the gate, as :func:`gate_refusal` reads it: the ref its refusals name it by, its version
    number (None before registration), its score on each benchmark with where each comes from (as
    :func:`scored_by` gives them), and the run folder a training score's answers file lies in.

    ``run_uri`` None: the scores were computed by this process from answers it still holds (a job judging its
    own run before publishing it), so there is no stored file to recheck them against and they are used as
    they are; registration checks them again once the run is published.
    """

    ref: str
    version: int | None
    scored: Mapping[str, tuple[BenchmarkScore, str]]
    run_uri: str | None

    @classmethod
    def of(cls, mv: ModelVersion) -> Contender:
        """A registered version: its scores are rechecked against their answers files before use."""
        return cls(ref=mv.ref, version=mv.version, scored=scored_by(mv), run_uri=mv.run_uri)

    @classmethod
    def unpublished(cls, ref: str, metrics: RunMetrics) -> Contender:
        """A job's run before it is published, named ``ref``: its scores after training, as it computed them."""
        return cls(ref=ref, version=None, scored={name: (score, "training")
                                                  for name, score in (metrics.benchmarks_after or {}).items()},
                   run_uri=None)


def _gated(side: Contender, name: str, registry_store: Store, like: BenchmarkScore | None,
           runs: RunStores) -> BenchmarkScore | None:
    """``side``'s score on ``name`` as the gate may use it: None without one; raises DataError (exit 3) when it
    does not match its answers file (:func:`check_answers`) or has none (recorded by an older medft, so it
    cannot be checked), saying how to re-score it."""
    origin = side.scored.get(name)
    if origin is None or not isinstance(origin[0].accuracy, (int, float)):
        return None
    score, by = origin
    if side.run_uri is None:  # computed from answers this process holds (Contender): nothing stored to recheck
        return score
    if not check_answers(side.ref, side.run_uri, name, score, by, registry_store, runs):
        raise DataError(f"{side.ref}'s {name} score ({by}) has no answers file (an older medft recorded it), so it "
                        f"cannot be checked and the gate does not use it; re-score {side.ref} with "
                        f"{_rescore(side.ref, name, like or score, registry_store.uri)}")
    return score


def gate_refusal(candidate: ModelVersion | Contender, current: ModelVersion | Contender | None,
                 require: Sequence[str], alias: str, registry: str | Store) -> str | None:
    """Why ``alias`` may not move to ``candidate`` under ``--require``, or None when it may; the reason says
    how to score what is missing.

    Refused when ``candidate`` has no score on a required benchmark, was scored on other questions, with
    another ``max_new_tokens`` or another protocol (temperature, top-p, samples, seed) than ``current`` (the
    version the alias points at now), or has a lower accuracy than ``current`` on it. A current version without
    a score does not block. Every score used is first recomputed from its answers file in ``registry`` (the
    registry's store, or its URI) or the version's run folder: DataError (exit 3, naming the version) when one
    does not match its file or has none, whatever ``--force`` says. A version is read as :meth:`Contender.of`
    reads it.
    """
    if not isinstance(candidate, Contender):
        candidate = Contender.of(candidate)
    if current is not None and not isinstance(current, Contender):
        current = Contender.of(current)
    if current is not None and current.version == candidate.version:
        return None
    registry_store = open_store(registry) if isinstance(registry, str) else registry
    registry_uri = registry_store.uri
    runs = RunStores()
    for name in require:
        other = _gated(current, name, registry_store, None, runs) if current is not None else None
        score = _gated(candidate, name, registry_store, other, runs)
        if score is None:
            has = ", ".join(sorted(candidate.scored)) or "none"
            return (f"{candidate.ref} has no {name} score (benchmarks scored: {has}); score it with "
                    f"{_rescore(candidate.ref, name, other, registry_uri)}")
        if current is None or other is None:
            continue
        differs = _scored_differently(score, other)
        if differs:
            return (f"{candidate.ref} and {current.ref} (@{alias} now) were scored on {name} with different "
                    f"{differs}, so their accuracies cannot be compared; score {candidate.ref} as {current.ref} was "
                    f"with {_rescore(candidate.ref, name, other, registry_uri)}")
        assert score.accuracy is not None and other.accuracy is not None  # _gated returns scores with one
        if score.accuracy < other.accuracy:
            return (f"{candidate.ref} scores {format_score(score.model_dump(mode='json'))} on {name}, lower than "
                    f"{current.ref} (@{alias} now) at {format_score(other.model_dump(mode='json'))}")
    return None
