"""The run record: what a training run records about itself, typed.

The pipeline builds a :class:`RunRecord`; publish writes it into the run's MANIFEST.json (beside the
manifest's own ``format``, ``run_id``, ``created_at`` and ``files``); registration copies its lineage,
metrics, config and environment into the registry record; inference reads the base model and the training
plan back from it. It lives in ``registry`` (which imports nothing from ``job``), so ``job`` converts its own
types to it (:meth:`job.backends.TrainPlan.record`).

Records are read from storage, where older and newer medft versions wrote them too, so every model here
takes unknown keys and keeps them (``extra="allow"``), every field is optional, and a JSON ``null`` for an
object reads as an empty one. What a record holds is checked on reading: a field of the wrong type is a
:class:`DataError` (exit 3) naming the object and the field (:func:`parse_record`). Dumped with
:func:`dump`, a record reproduces exactly the keys it was built or read with, no defaults added, so a
record read from an old run is copied on unchanged.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, field_validator, model_validator

from registry.errors import DataError

Number = int | float  # a union, not float: an int stays an int when the record is written back
Count = Annotated[int, Strict()]  # a count a gate reads: 3.0, "3" or true is not one


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="allow", populate_by_name=True, protected_namespaces=(),
                              ser_json_inf_nan="constants")  # a NaN loss is written as json.dumps writes it

    def is_empty(self) -> bool:
        """Nothing recorded: built or read from ``{}`` (or ``null``)."""
        return not dump(self)


class BaseModelLineage(_Record):
    """The base model a run trained from: its URI, revision and the sha256 of each weight file."""

    uri: str | None = None
    revision: str | None = None
    sha256: dict[str, str] | None = None


class DatasetLineage(_Record):
    """The data a run trained on (:class:`job.data.DatasetIdentity` as recorded)."""

    source: str | None = None
    revision: str | None = None
    subset: str | None = None
    split: str | None = None
    rows: int | None = None
    content_sha256: str | None = None
    loaded_rows: int | None = None
    loaded_sha256: str | None = None


class Lineage(_Record):
    """Where a run's weights came from: its base model, the 16-bit weights it was merged into when those are
    another model (``model.merge_base``; None when the merge used the base), and its dataset."""

    base_model: BaseModelLineage = BaseModelLineage()
    merge_base: BaseModelLineage | None = None
    dataset: DatasetLineage = DatasetLineage()

    @field_validator("base_model", "dataset", mode="before")
    @classmethod
    def _null_is_empty(cls, value: Any) -> Any:
        return {} if value is None else value


class TrainPlanRecord(_Record):
    """The settings a backend picked for the run (:class:`job.backends.TrainPlan`), with its reasons."""

    batch_size: int | None = None
    grad_accum: int | None = None
    packing: bool | None = None
    gradient_checkpointing: bool | str | None = None
    load_in_4bit: bool | None = None
    precision: str | None = None  # "bf16", "fp16" or "fp32"
    optim: str | None = None
    compile: bool | None = None  # unsloth's per-block torch.compile; None in records written before it
    reasons: dict[str, str] | None = None


class TrackerRun(_Record):
    """One experiment tracker's run for a training run (``train.report_to``): where to find it, or why not."""

    status: str | None = None  # "logged", or "skipped" when the tracker was down or failed
    run_id: str | None = None
    url: str | None = None
    reason: str | None = None  # why it was skipped


class AnswersFile(_Record):
    """Where a score's answers are kept (:mod:`registry.answers`): ``path`` is relative to the run folder for
    a training run's scores (``metrics.benchmarks_before``/``benchmarks_after``) and to the registry root for
    a recorded evaluation's (``evaluations``); ``sha256`` and ``size`` of its bytes."""

    path: str | None = None
    sha256: str | None = None
    size: Count | None = None

    @field_validator("sha256")
    @classmethod
    def _hex(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[0-9a-f]{64}", value):
            raise ValueError("must be a 64-hex sha256")
        return value


class BenchmarkScore(_Record):
    """One benchmark's score as recorded (:class:`registry.answers.Summary` plus how it was scored):
    accuracy (correct answers / all answers) with its 95% ``interval`` ([low, high]), ``correct`` answers of
    ``scored`` questions times ``samples`` answers each, the shares with no extractable answer and that hit
    the token limit, the median reasoning length, the questions' identity (source, revision, rows read,
    limit, seed, content hash), the protocol (``max_new_tokens``, ``temperature`` (0: greedy), ``top_p``,
    ``samples``, ``seed``) and the ``answers_file`` it can be recomputed from. A record written before the
    protocol fields reads as greedy with one sample (:meth:`protocol`)."""

    benchmark: str | None = None
    accuracy: Number | None = None
    interval: list[Number] | None = None
    correct: Count | None = Field(None, ge=0)
    scored: Count | None = Field(None, ge=0)
    no_answer_share: Number | None = None
    hit_limit_share: Number | None = None
    median_reasoning_tokens: Number | None = None
    source: str | None = None
    revision: str | None = None
    rows: Count | None = Field(None, ge=0)
    limit: Count | None = Field(None, ge=1)
    seed: Count | None = Field(None, ge=0)
    content_sha256: str | None = None
    max_new_tokens: Count | None = Field(None, ge=1)
    temperature: Number | None = Field(None, ge=0)
    top_p: Number | None = Field(None, gt=0, le=1)
    samples: Count | None = Field(None, ge=1)
    answers_file: AnswersFile | None = None
    seconds: Number | None = None

    # The gate compares these: a hand-edited NaN or 1.5 must not pass for a score.
    @field_validator("accuracy", "no_answer_share", "hit_limit_share")
    @classmethod
    def _share(cls, value: Number | None) -> Number | None:
        if value is not None and not 0 <= value <= 1:  # NaN fails too
            raise ValueError("must be a share from 0 to 1")
        return value

    @field_validator("interval")
    @classmethod
    def _interval(cls, value: list[Number] | None) -> list[Number] | None:
        if value is not None and not (len(value) == 2 and 0 <= value[0] <= value[1] <= 1):
            raise ValueError("must be [low, high] with 0 <= low <= high <= 1")
        return value

    @model_validator(mode="after")
    def _possible_counts(self) -> BenchmarkScore:
        answers = None if self.scored is None else self.scored * (self.samples or 1)
        if self.correct is not None and answers is not None and self.correct > answers:
            raise ValueError(f"correct ({self.correct}) is more than the answers scored ({answers})")
        for bound in ("rows", "limit"):
            if self.scored is not None and getattr(self, bound) is not None and self.scored > getattr(self, bound):
                raise ValueError(f"scored ({self.scored}) is more than the questions there are ({bound} "
                                 f"{getattr(self, bound)})")
        return self

    def protocol(self) -> dict[str, Any]:
        """How the answers were generated, what makes two scores comparable besides their questions:
        ``max_new_tokens``, ``temperature``, ``top_p`` and ``seed`` (both None when greedy: unused) and
        ``samples``; a record without them reads as greedy with one sample."""
        temperature = self.temperature or 0
        sampled = temperature > 0
        return {"max_new_tokens": self.max_new_tokens, "temperature": temperature,
                "top_p": self.top_p if sampled else None, "samples": self.samples or 1,
                "seed": self.seed if sampled else None}


class EvaluationRecord(_Record):
    """One ``medft eval REF --record`` of a registered version, appended to its record's ``evaluations``:
    the scores by benchmark, the artifact that answered (``merged`` or ``adapter``), when and by whom."""

    benchmarks: dict[str, BenchmarkScore] | None = None
    artifact: str | None = None
    evaluated_at: str | None = None
    by: str | None = None


class RunMetrics(_Record):
    """What the pipeline measured: losses, throughput, memory, stage times, and the plan it trained with."""

    train_loss: Number | None = None
    eval_loss_before: Number | None = None
    eval_loss_after: Number | None = None
    steps: int | None = None
    tokens_per_s: Number | None = None
    trained_tokens: int | None = None
    peak_gpu_mem_gib: Number | None = None
    peak_host_mem_gib: Number | None = None
    resumed_from_step: int | None = None
    merge_check: dict[str, Any] | None = None
    stage_seconds: dict[str, Number] | None = None
    loss_history: list[dict[str, Any]] | None = None
    backend: str | None = None
    plan: TrainPlanRecord | None = None
    trackers: dict[str, TrackerRun] | None = None  # train.report_to: each tracker's run id and URL, or skipped
    # Benchmark accuracy (eval.benchmarks), by benchmark name, before and after training.
    benchmarks_before: dict[str, BenchmarkScore] | None = None
    benchmarks_after: dict[str, BenchmarkScore] | None = None


class RunRecord(_Record):
    """A run's record as MANIFEST.json holds it (the manifest's own fields aside).

    ``artifacts`` maps an artifact name to its folder in the run. ``base_model``/``dataset`` at the top
    level are where records from before ``lineage`` kept them; read them through :attr:`base_model_lineage`
    and :attr:`dataset_lineage`, which prefer ``lineage``.
    """

    artifacts: dict[str, Any] | None = None
    lineage: Lineage = Lineage()
    metrics: RunMetrics = RunMetrics()
    data_report: dict[str, Any] | None = None
    answers: dict[str, Any] | None = None
    environment: dict[str, Any] = Field(default_factory=dict)
    config: dict[str, Any] = Field(default_factory=dict)
    legacy_base_model: BaseModelLineage | None = Field(default=None, alias="base_model")
    legacy_dataset: DatasetLineage | None = Field(default=None, alias="dataset")

    @field_validator("lineage", "metrics", "environment", "config", mode="before")
    @classmethod
    def _null_is_empty(cls, value: Any) -> Any:
        return {} if value is None else value

    @property
    def base_model_lineage(self) -> BaseModelLineage:
        """The base model: ``lineage.base_model``, else the top-level one of older records, else empty."""
        if not self.lineage.base_model.is_empty():
            return self.lineage.base_model
        return self.legacy_base_model or BaseModelLineage()

    @property
    def dataset_lineage(self) -> DatasetLineage:
        """The dataset: ``lineage.dataset``, else the top-level one of older records, else empty."""
        if not self.lineage.dataset.is_empty():
            return self.lineage.dataset
        return self.legacy_dataset or DatasetLineage()


R = TypeVar("R", bound=_Record)


def dotted(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts (a run's config) as one level with dotted keys, ``{"train.learning_rate": 0.0002, ...}``; an
    empty dict below the top is a value of its own."""
    if isinstance(tree, dict) and tree:
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(dotted(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: tree} if prefix else {}


def dump(record: _Record) -> dict[str, Any]:
    """The record as JSON-ready data: the keys it was built or read with, unknown ones included."""
    return record.model_dump(mode="json", exclude_unset=True, by_alias=True)


def parse_record(model: type[R], data: Any, where: str, corrupt: str = "the run is corrupt") -> R:
    """``data`` read from ``where`` as ``model``; DataError (exit 3) naming ``where`` and the bad field.

    ``corrupt`` ends the message (what is broken: the run, the registry record).
    """
    if isinstance(data, model):
        return data
    try:
        return model.model_validate(data if data is not None else {})
    except ValidationError as e:
        err = e.errors()[0]
        # A union (``Number``) names the member it tried last in the location: not a field of the record.
        parts = [str(part) for part in err["loc"]]
        number = bool(parts) and parts[-1] in ("int", "float")
        field = ".".join(parts[:-1] if number else parts)
        if err["type"] in ("dict_type", "model_type", "model_attributes_type"):
            what = "must be an object"
        elif number:
            what = f"must be a number (got {err['input']!r:.80})"
        else:
            reason = err["msg"].removeprefix("Value error, ")  # a validator's own words, as it wrote them
            what = f"is invalid: {reason[:1].lower() + reason[1:]} (got {err['input']!r:.80})"
        name = f" field {field!r}" if field else ""
        raise DataError(f"{where}:{name} {what}; {corrupt}") from None
