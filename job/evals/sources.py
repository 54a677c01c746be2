"""A benchmark's questions: from the Hugging Face hub through ``datasets``, or from a local file.

:func:`load_questions` reads a :class:`~job.medical_benchmarks.BenchmarkSpec`'s rows, maps each onto a
:class:`~job.medical_benchmarks.Question` and, given a limit, keeps a seeded subset (:func:`select_subset`).

* Hub: ``datasets.load_dataset(spec.dataset, spec.subset, split=spec.split, revision=spec.revision,
  cache_dir=..., token=$HF_TOKEN)``; ``HF_HUB_OFFLINE=1`` reads the local cache only. The revision recorded
  is the commit the hub resolves (best effort, as for training data: :mod:`job.data.sources`).
* File: a ``.jsonl`` or ``.parquet`` file in the dataset's exact published schema (nested columns as the
  hub exports them: MedQA's ``options`` an object, PubMedQA's ``context`` an object of lists), so tests and
  air-gapped users can point at a copy. ``spec.split``/``subset``/``revision`` do not apply to a file.

Subset: with ``limit`` the questions kept are those with the smallest ``sha256(f"{seed}:{id}")``, listed in
the dataset's order. The choice depends on nothing but the seed and the ids, so every model is asked the
same questions, and a larger limit keeps every question a smaller one kept.

Errors (one line each): a missing file or dataset :class:`NotFoundError` (exit 4), the hub unreachable
:class:`TransientError` (exit 75, or NotFoundError with ``HF_HUB_OFFLINE`` set and nothing cached), a gated
dataset :class:`AccessDeniedError` (exit 5), an unknown split or config :class:`ConfigError` (exit 2), a bad
row, a missing column, a duplicate id or no rows :class:`DataError` (exit 3).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from job.data.readers import file_records, open_parquet, parquet_records
from job.hub import HubKeys, hf_revision, load_hub_dataset
from job.medical_benchmarks import BenchmarkSpec, Question, to_question
from job.paths import resolve_local
from registry.errors import ConfigError, DataError, NotFoundError
from registry.logs import get_logger

log = get_logger(__name__)

_FILE_SUFFIXES = (".jsonl", ".parquet")


@dataclass(frozen=True)
class BenchmarkData:
    """The questions of one benchmark as scored, and what identifies them for lineage.

    ``source``: ``hf://<dataset>`` or the file path; ``revision``: the hub commit (None for a file);
    ``rows``: rows read; ``content_sha256``: over the kept questions (id, text, options, gold), so two runs
    that report the same hash asked the same questions with the same answers.
    """

    spec: BenchmarkSpec
    questions: tuple[Question, ...]
    source: str
    revision: str | None
    rows: int
    limit: int | None
    seed: int
    content_sha256: str


# ------------------------------------------------------------------------------------------------- hub

_BENCHMARK_HUB_KEYS = HubKeys(split="split", config="config (subset)", dataset="dataset",
                              not_found_hint="check the benchmark's dataset id, revision and HF_TOKEN, or point it "
                                             "at a local .jsonl/.parquet file",
                              offline_hint="download it once online or point the benchmark at a local "
                                           ".jsonl/.parquet file")


def _hub_records(spec: BenchmarkSpec, display: str, cache_dir: str | None) -> tuple[Iterator[dict[str, Any]], str]:
    import datasets

    ds = load_hub_dataset(spec.dataset, spec.subset, spec.split, revision=spec.revision, cache_dir=cache_dir,
                          display=display, keys=_BENCHMARK_HUB_KEYS)
    if not isinstance(ds, datasets.Dataset):
        raise ConfigError(f"{display}: name one split, e.g. test")
    return iter(ds), hf_revision(spec.dataset, spec.revision)


# ------------------------------------------------------------------------------------------------ files

def _file_records(path: Path, display: str, spec: BenchmarkSpec) -> Iterator[dict[str, Any]]:
    suffix = path.suffix.lower()
    if path.is_dir():
        raise DataError(f"{display}: is a directory; give the {spec.name} rows as one .jsonl or .parquet file")
    if path.exists() and not path.is_file():  # /dev/zero, a FIFO, a socket: reading it never ends or blocks
        raise DataError(f"{display}: is not a regular file (a device, pipe or socket); give the {spec.name} rows as "
                        "one .jsonl or .parquet file")
    if suffix not in _FILE_SUFFIXES:
        raise ConfigError(f"{display}: unsupported file type {path.suffix or '(none)'!r}; give the {spec.name} "
                          "rows as .jsonl or .parquet in the dataset's own schema")
    if not path.is_file():
        raise NotFoundError(f"{display}: no such file; check the path (relative paths are from {Path.cwd()})")
    if suffix == ".parquet":  # every column: the spec maps them, and PubMedQA's context is nested
        return (record for _, _, record in parquet_records(open_parquet(path, display), display))
    wanted = [c for c in (spec.columns.id, spec.columns.question, *spec.columns.options, spec.columns.answer) if c]
    return (record for _, _, record in file_records(path, display, wanted))


# ----------------------------------------------------------------------------------------------- subset

def subset_key(seed: int, question_id: str) -> str:
    """The rank of a question in the seeded subset: smaller keys are kept first."""
    return hashlib.sha256(f"{seed}:{question_id}".encode()).hexdigest()


def select_subset(questions: list[Question], limit: int | None, seed: int) -> list[Question]:
    """The ``limit`` questions with the smallest :func:`subset_key`, in their original order (all of them
    when ``limit`` is None or not smaller than their number)."""
    if limit is None or limit >= len(questions):
        return list(questions)
    if limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {limit}")
    kept = {q.id for q in sorted(questions, key=lambda q: subset_key(seed, q.id))[:limit]}
    return [q for q in questions if q.id in kept]


def _content_hash(questions: list[Question]) -> str:
    digest = hashlib.sha256()
    for q in questions:
        line = json.dumps([q.id, q.question, q.options, q.gold], ensure_ascii=False)
        digest.update(line.encode() + b"\n")
    return digest.hexdigest()


def _unique_ids(spec: BenchmarkSpec, questions: list[Question], display: str) -> list[Question]:
    """Derived ids of repeated questions get ``#2``, ``#3``...; a repeated id from an id column is an error."""
    seen: dict[str, int] = {}
    out = []
    for q in questions:
        count = seen.get(q.id, 0) + 1
        seen[q.id] = count
        if count > 1:
            if spec.columns.id is not None:
                raise DataError(f"{display}: row {q.row}: id {q.id!r} in column {spec.columns.id!r} repeats an "
                                "earlier row's; ids must be unique so a subset is the same for every model")
            q = Question(benchmark=q.benchmark, id=f"{q.id}#{count}", question=q.question, options=q.options,
                         gold=q.gold, row=q.row)
        out.append(q)
    return out


# ------------------------------------------------------------------------------------------------- load

def load_questions(spec: BenchmarkSpec, *, path: str | Path | None = None, limit: int | None = None, seed: int = 0,
                   cache_dir: str | None = None) -> BenchmarkData:
    """Read ``spec``'s rows from ``path`` (a local .jsonl/.parquet file) or, without one, from the hub, map them
    onto questions and keep the seeded subset of ``limit``. Raises the errors in the module docstring."""
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {limit}")
    if path is not None:
        file = resolve_local(str(path)).expanduser()  # file:// and plain paths, as every local source
        display = f"{spec.name}: {path}"
        records, source, revision = _file_records(file, display, spec), str(path), None
    else:
        display = f"{spec.name}: hf://{spec.dataset} ({spec.subset or 'default'}, {spec.split})"
        records, revision = _hub_records(spec, display, cache_dir)
        source = f"hf://{spec.dataset}"
    questions = [to_question(spec, record, row, display) for row, record in enumerate(records, start=1)]
    if not questions:
        raise DataError(f"{display}: row 1: no rows; the {spec.name} data is empty")
    kept = select_subset(_unique_ids(spec, questions, display), limit, seed)
    data = BenchmarkData(spec=spec, questions=tuple(kept), source=source, revision=revision, rows=len(questions),
                         limit=limit, seed=seed, content_sha256=_content_hash(kept))
    log.info("eval.questions_loaded", benchmark=spec.name, source=source, revision=revision, rows=len(questions),
             kept=len(kept), seed=seed, content_sha256=data.content_sha256)
    return data
