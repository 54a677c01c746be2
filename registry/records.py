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

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from registry.errors import DataError

Number = int | float  # a union, not float: an int stays an int when the record is written back


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
    reasons: dict[str, str] | None = None


class TrackerRun(_Record):
    """One experiment tracker's run for a training run (``train.report_to``): where to find it, or why not."""

    status: str | None = None  # "logged", or "skipped" when the tracker was down or failed
    run_id: str | None = None
    url: str | None = None
    reason: str | None = None  # why it was skipped


class BenchmarkScore(_Record):
    """One benchmark's score as recorded (:class:`job.evals.scoring.BenchmarkResult` plus what it was scored
    on): accuracy with its Wilson 95% ``interval`` ([low, high]), ``correct`` of ``scored`` questions, the
    shares with no extractable answer and that hit the token limit, the median reasoning length, and the
    questions' identity (source, revision, rows read, limit, seed, content hash) and ``max_new_tokens``."""

    benchmark: str | None = None
    accuracy: Number | None = None
    interval: list[Number] | None = None
    correct: int | None = None
    scored: int | None = None
    no_answer_share: Number | None = None
    hit_limit_share: Number | None = None
    median_reasoning_tokens: Number | None = None
    source: str | None = None
    revision: str | None = None
    rows: int | None = None
    limit: int | None = None
    seed: int | None = None
    content_sha256: str | None = None
    max_new_tokens: int | None = None
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
