"""The benchmarks medft scores, as frozen typed specs, and how a dataset row becomes one :class:`Question`.

Each spec names a hub dataset (id, revision, config, split) and the columns that hold the question, its
options and the gold answer. :func:`to_question` maps one raw row (as ``datasets`` yields it, or as the
dataset's JSONL/Parquet export holds it) onto the common :class:`Question`: an id, the question text, the
options in order as letter -> text, and the gold letter. :func:`prompt_text` is the one way a question is
put to a model.

The published schemas, as verified (dataset cards' ``dataset_info``, loader scripts and harness code):

=========  ===================================  ================================================================
benchmark  dataset (config, split)              columns used (other columns, ignored)
=========  ===================================  ================================================================
medqa      ``GBaker/MedQA-USMLE-4-options``     ``question`` (str); ``options`` (struct ``A``..``D`` of str);
           (default, ``test``, 1,273 rows)      ``answer_idx`` (str, the gold letter). No id column: the id is
                                                derived from the question and options. Ignored: ``answer``
                                                (gold text), ``meta_info`` (e.g. ``step1``),
                                                ``metamap_phrases`` (list of str).
medmcqa    ``openlifescienceai/medmcqa``        ``id`` (str); ``question`` (str); ``opa``, ``opb``, ``opc``,
           (default, ``validation``, 4,183)     ``opd`` (str, options A-D); ``cop`` (ClassLabel int 0-3 = a-d).
                                                Ignored: ``choice_type``, ``exp``, ``subject_name``,
                                                ``topic_name``. The ``test`` split's answers are not public
                                                (``cop`` is -1), hence ``validation``.
pubmedqa   ``qiaojin/PubMedQA``                 ``pubid`` (int32); ``question`` (str); ``context`` (a
           (``pqa_labeled``, ``train``, 1,000)  ``Sequence`` of {``contexts``, ``labels``, ``meshes``,
                                                ``reasoning_required_pred``, ``reasoning_free_pred``}, i.e. a
                                                struct of lists; the passages ``contexts`` with their section
                                                ``labels`` go into the question text); ``final_decision``
                                                (``yes``/``no``/``maybe`` -> options A/B/C). Ignored:
                                                ``long_answer``. ``pqa_labeled`` has only a ``train`` split.
=========  ===================================  ================================================================

Sources: the MedQA columns from lm-evaluation-harness ``lm_eval/tasks/medqa_usmle.py`` (reads
``GBaker/MedQA-USMLE-4-options``: ``doc["options"]["A"]``..``["D"]``, ``doc["answer_idx"]``) and the
``dataset_info`` of its copy ``augtoma/medqa_usmle`` (question, answer, options struct A-D, meta_info,
answer_idx, metamap_phrases; train 10,178 / test 1,273); MedMCQA from the ``dataset_info`` of
``openlifescienceai/medmcqa``'s README (id, question, opa-opd, cop class_label a-d, choice_type, exp,
subject_name, topic_name; train/test/validation 182,822/6,150/4,183); PubMedQA from ``qiaojin/PubMedQA``'s
README (``config_names`` pqa_artificial, pqa_labeled, pqa_unlabeled; pqa_labeled ``train`` 1,000 rows) and
the ``pubmed_qa.py`` loader script in ``huggingface/datasets`` (the ``pqa_labeled`` features above).

Errors: an unknown benchmark name is a :class:`ConfigError` (exit 2) listing the known ones; a row missing a
column or holding an unusable value is a :class:`DataError` (exit 3) naming the dataset, the row and the
column.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from registry.errors import ConfigError, DataError

#: Option letters in order; a question has at most this many options.
LETTERS = "ABCDEFGHIJ"
#: The fewest options a multiple-choice question may have; with one, any answer is right.
MIN_OPTIONS = 2
#: The closing instruction of every prompt; :mod:`job.evals.extract` looks first for this marker.
ANSWER_INSTRUCTION = ('Answer with the letter of the one correct option. End your response with '
                      '"The answer is X", where X is that letter.')


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Columns(_Frozen):
    """Where a row keeps each part of a question.

    ``options``: one column holding a ``{letter: text}`` mapping (MedQA), or several columns holding one
    option each, in letter order (MedMCQA), or none when the options are the spec's fixed ``labels``
    (PubMedQA). ``id``: ``None`` derives the id from the question text and options. ``context``: a column
    whose ``{"contexts": [...], "labels": [...]}`` passages are put in front of the question (PubMedQA).
    """

    id: str | None = None
    question: str = "question"
    options: tuple[str, ...] = ()
    answer: str = "answer"
    context: str | None = None


class BenchmarkSpec(_Frozen):
    """One benchmark: where its rows are and how to read them (see the module docstring's table).

    ``answer_format``: ``letter`` (the gold column holds ``"B"``), ``index`` (``1`` means B) or ``label``
    (the gold column holds one of ``labels``, which are also the option texts, in order).
    """

    name: str
    title: str
    dataset: str
    revision: str | None = None
    subset: str | None = None
    split: str
    columns: Columns
    answer_format: Literal["letter", "index", "label"]
    labels: tuple[str, ...] = ()


class ColumnsOverride(_Frozen):
    """Column names to use instead of a spec's; ``None`` keeps the spec's."""

    id: str | None = None
    question: str | None = None
    options: tuple[str, ...] | None = None
    answer: str | None = None
    context: str | None = None


class BenchmarkOverride(_Frozen):
    """What a user may change about a benchmark: another hub id (a mirror), a pinned revision, another
    config or split, other column names. ``None`` keeps the spec's value."""

    dataset: str | None = Field(None, min_length=1)
    revision: str | None = Field(None, min_length=1)
    subset: str | None = Field(None, min_length=1)
    split: str | None = Field(None, min_length=1)
    columns: ColumnsOverride = ColumnsOverride()


BENCHMARKS: dict[str, BenchmarkSpec] = {
    "medqa": BenchmarkSpec(
        name="medqa", title="MedQA (USMLE, 4 options)", dataset="GBaker/MedQA-USMLE-4-options", split="test",
        columns=Columns(id=None, question="question", options=("options",), answer="answer_idx"),
        answer_format="letter"),
    "medmcqa": BenchmarkSpec(
        name="medmcqa", title="MedMCQA (validation)", dataset="openlifescienceai/medmcqa", split="validation",
        columns=Columns(id="id", question="question", options=("opa", "opb", "opc", "opd"), answer="cop"),
        answer_format="index"),
    "pubmedqa": BenchmarkSpec(
        name="pubmedqa", title="PubMedQA (labeled)", dataset="qiaojin/PubMedQA", subset="pqa_labeled",
        split="train", columns=Columns(id="pubid", question="question", answer="final_decision", context="context"),
        answer_format="label", labels=("yes", "no", "maybe")),
}


def known_names() -> str:
    return ", ".join(BENCHMARKS)


def get_benchmark(name: str, override: BenchmarkOverride | None = None) -> BenchmarkSpec:
    """The spec called ``name`` with ``override`` applied; ConfigError (exit 2) for an unknown name."""
    spec = BENCHMARKS.get(name.strip().lower()) if isinstance(name, str) else None
    if spec is None:
        raise ConfigError(f"unknown benchmark {name!r}; use one or more of {known_names()}")
    if override is None:
        return spec
    updates = {k: v for k, v in override.model_dump(exclude={"columns"}).items() if v is not None}
    columns = {k: v for k, v in override.columns.model_dump().items() if v is not None}
    return spec.model_copy(update={**updates, "columns": spec.columns.model_copy(update=columns)})


def parse_benchmarks(text: str) -> tuple[str, ...]:
    """``"medqa, pubmedqa"`` -> ``("medqa", "pubmedqa")`` (order kept, repeats dropped); ConfigError for an
    unknown or empty name, naming it and the known ones."""
    names: list[str] = []
    for part in text.split(","):
        name = part.strip().lower()
        if not name:
            raise ConfigError(f"--benchmarks {text!r}: an empty name; use a comma-separated list of {known_names()}")
        get_benchmark(name)
        if name not in names:
            names.append(name)
    return tuple(names)


@dataclass(frozen=True)
class Question:
    """One benchmark item in medft's common form; ``options`` maps letters to texts in letter order."""

    benchmark: str
    id: str
    question: str
    options: dict[str, str]
    gold: str
    row: int


def _value(spec: BenchmarkSpec, record: dict[str, Any], col: str, field_name: str, where: str) -> Any:
    if col not in record:
        have = ", ".join(repr(str(k)[:40]) for k in list(record)[:20]) or "no columns"
        raise DataError(f"{where}: missing column {col!r} (the {field_name} of benchmark {spec.name}); the row "
                        f"has {have}; give the {spec.name} data (medft eval --data {spec.name}=FILE) or map the column "
                        f"with eval.benchmark_sources.{spec.name}.columns.{field_name}")
    return record[col]


def _text(value: Any, col: str, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        got = "empty text" if isinstance(value, str) else f"a {type(value).__name__}"
        raise DataError(f"{where}: column {col!r} holds {got}, expected text")
    return value.strip()


def _options(spec: BenchmarkSpec, record: dict[str, Any], where: str) -> dict[str, str]:
    cols = spec.columns.options
    if spec.answer_format == "label":
        return dict(zip(LETTERS, spec.labels))
    if len(cols) == 1:
        col = cols[0]
        raw = _value(spec, record, col, "options", where)
        example = "e.g. {\"A\": \"...\", \"B\": \"...\"}"
        if not isinstance(raw, dict):
            raise DataError(f"{where}: column {col!r} holds a {type(raw).__name__}, expected a mapping of option "
                            f"letters to texts, {example}")
        if len(raw) > len(LETTERS):
            raise DataError(f"{where}: column {col!r} has {len(raw)} options; a question may have at most "
                            f"{len(LETTERS)} ({LETTERS[0]}-{LETTERS[-1]})")
        if len(raw) < MIN_OPTIONS:
            got = "no options (an empty mapping)" if not raw else f"only {len(raw)} option ({', '.join(map(str, raw))})"
            raise DataError(f"{where}: column {col!r} holds {got}; a multiple-choice question needs at least "
                            f"{MIN_OPTIONS}, {example}")
        letters = sorted(str(k) for k in raw)
        if letters != list(LETTERS[:len(letters)]):
            raise DataError(f"{where}: column {col!r} has option keys {letters}, expected the letters "
                            f"{', '.join(LETTERS[:len(letters)])} (A up to at most {LETTERS[-1]}), each once")
        return {letter: _text(raw[letter], f"{col}.{letter}", where) for letter in letters}
    if not MIN_OPTIONS <= len(cols) <= len(LETTERS):
        raise ConfigError(f"benchmark {spec.name}: columns.options names {len(cols)} columns; a question needs "
                          f"{MIN_OPTIONS} to {len(LETTERS)}")
    return {LETTERS[i]: _text(_value(spec, record, col, "options", where), col, where) for i, col in enumerate(cols)}


def _gold(spec: BenchmarkSpec, raw: Any, options: dict[str, str], where: str) -> str:
    col = spec.columns.answer
    letter: str | None = None
    if spec.answer_format == "letter" and isinstance(raw, str):
        letter = raw.strip().upper()
    elif spec.answer_format == "index" and isinstance(raw, int) and not isinstance(raw, bool):
        letter = LETTERS[raw] if 0 <= raw < len(options) else None
    elif spec.answer_format == "label" and isinstance(raw, str):
        label = raw.strip().lower()
        letter = LETTERS[spec.labels.index(label)] if label in spec.labels else None
    if letter not in options:
        expected = {"letter": f"one of {', '.join(options)}", "index": f"an integer 0-{len(options) - 1}",
                    "label": f"one of {', '.join(spec.labels)}"}[spec.answer_format]
        hint = " (a split without public answers? MedMCQA's test split has none; use validation)" if raw == -1 else ""
        raise DataError(f"{where}: column {col!r} holds {raw!r}, expected {expected}{hint}")
    return letter


def _context(spec: BenchmarkSpec, col: str, record: dict[str, Any], where: str) -> str:
    raw = _value(spec, record, col, "context", where)
    passages = raw.get("contexts") if isinstance(raw, dict) else None
    if not isinstance(passages, list) or not passages or not all(isinstance(p, str) for p in passages):
        raise DataError(f"{where}: column {col!r} must hold {{\"contexts\": [passage, ...], \"labels\": [...]}}, "
                        f"got {json.dumps(raw, default=str)[:120]}")
    labels = raw.get("labels") if isinstance(raw.get("labels"), list) else []
    lines = []
    for i, passage in enumerate(passages):
        label = labels[i] if i < len(labels) and isinstance(labels[i], str) and labels[i].strip() else None
        lines.append(f"{label.strip()}: {passage.strip()}" if label else passage.strip())
    return "\n".join(lines)


def _derived_id(question: str, options: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps([question, options], ensure_ascii=False).encode()).hexdigest()[:16]


def to_question(spec: BenchmarkSpec, record: dict[str, Any], row: int, display: str) -> Question:
    """Map one raw row (1-based ``row`` of the source called ``display``) onto a :class:`Question`.

    Raises DataError naming the source, the row and the column for a missing column, a non-text question or
    option, or a gold answer that is not one of the options.
    """
    where = f"{display}: row {row}"
    cols = spec.columns
    text = _text(_value(spec, record, cols.question, "question", where), cols.question, where)
    options = _options(spec, record, where)
    gold = _gold(spec, _value(spec, record, cols.answer, "answer", where), options, where)
    if cols.context is not None:
        text = f"Context:\n{_context(spec, cols.context, record, where)}\n\nQuestion: {text}"
    if cols.id is None:
        qid = _derived_id(text, options)
    else:
        raw_id = _value(spec, record, cols.id, "id", where)
        if raw_id is None or isinstance(raw_id, (bool, float, dict, list)) or not str(raw_id).strip():
            # A float id (NaN for a missing one, 12.0 from a column with gaps) would read as 'nan' or '12.0'.
            raise DataError(f"{where}: column {cols.id!r} holds {raw_id!r}, expected an id (text or integer); fill "
                            "in missing ids and store them as text or integers")
        qid = str(raw_id).strip()
    return Question(benchmark=spec.name, id=qid, question=text, options=options, gold=gold, row=row)


def prompt_text(question: Question) -> str:
    """The one way a question is asked: the question, a blank line, one ``X. text`` line per option, a blank
    line and :data:`ANSWER_INSTRUCTION`. This text goes through the model's own template unchanged."""
    options = "\n".join(f"{letter}. {text}" for letter, text in question.options.items())
    return f"{question.question}\n\n{options}\n\n{ANSWER_INSTRUCTION}"
