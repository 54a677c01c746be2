"""The sections of the job configuration (``model``, ``data``, ``lora``, ``train``, ``eval``, ``export``,
``output``): frozen pydantic models with their defaults and per-key checks. :mod:`job.config` assembles them
into the one :class:`~job.config.JobConfig` and loads it; import from there.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from job.medical_benchmarks import BENCHMARKS, BenchmarkOverride, known_names, parse_benchmarks
from registry.errors import ConfigError
from registry.names import DEFAULT_STORE, NAME_RE
from registry.registry import check_alias, check_name
from registry.uris import ms_repo_id, parse_uri

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

#: The reference tutorials' two test cases, in our own words: asked before and after fine-tuning.
DEFAULT_EVAL_QUESTIONS = (
    "A 61-year-old woman with a long history of involuntary urine loss during activities like coughing or "
    "sneezing but no leakage at night undergoes a gynecological exam and Q-tip test. Based on these "
    "findings, what would cystometry most likely reveal about her residual volume and detrusor contractions?",
    "A patient has had a 5-day history of pain in the right lower abdomen, and on day 5 a tender mass is "
    "palpable in the right lower quadrant, with a low-grade fever. What is the most likely diagnosis and "
    "how should it be managed initially?",
)

#: numpy, which transformers' set_seed seeds, takes seeds in [0, 2**32).
MAX_SEED = 2**32 - 1


class _Section(BaseModel):
    # inf and nan are never meaningful settings (an infinite learning rate only fails after weights load).
    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=(), allow_inf_nan=False)


def _no_path_tricks(value: str | None, what: str) -> str | None:
    """Refuse '..' segments inside remote URIs (hf://, s3://, pkg://), where they can only be a trick.

    A local relative path such as ``../data/rows.jsonl`` is ordinary and allowed.
    """
    if value is None or parse_uri(value).is_local:
        return value
    parts = re.split(r"[\\/]", parse_uri(value).path)
    if ".." in parts or "." in parts:
        raise ValueError(f"{what} must not contain '.' or '..' path segments in a URI: {value!r}")
    return value


def check_uri(value: str, what: str) -> str:
    """Refuse a URI no source could mean: '.'/'..' segments in a remote URI, an hf:// repo id the hub refuses, an
    ms:// URI that is not ms://owner/name (:func:`registry.uris.ms_repo_id`).

    Raises ValueError naming ``what``; used for config keys and for URIs read from stored records.
    """
    _no_path_tricks(value, what)
    location = parse_uri(value)
    if location.scheme == "hf":
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(location.path)
        except HFValidationError as e:
            raise ValueError(f"{what} {value!r} is not hf://org/name or hf://name ({e})") from None
    if location.scheme == "ms":
        try:
            ms_repo_id(location)
        except ValueError as e:
            raise ValueError(f"{what}: {e}") from None
    return value


class ModelConfig(_Section):
    base: str = "hf://deepseek-ai/DeepSeek-R1-Distill-Llama-8B"
    """Base weights: hf://org/name, ms://owner/name (ModelScope), s3://bucket/prefix, a local directory or a .gguf
    file."""
    revision: str | None = None
    """Hub revision (commit sha, tag or branch) of an hf:// or ms:// ``base``; pin a sha for reproducible runs."""
    merge_base: str | None = None
    """16-bit weights to merge into when ``base`` is pre-quantized (a ...-bnb-4bit repository)."""
    merge_revision: str | None = None
    """Hub revision of an hf:// or ms:// ``merge_base`` (default: its default branch); pin a sha to reproduce."""
    max_seq_length: int = Field(2048, gt=0, le=131072)
    load_in_4bit: bool | Literal["auto"] = "auto"
    """4-bit NF4 base weights (QLoRA). ``auto``: on unsloth, 16-bit LoRA when the GPU's memory allows (it trains
    against the exact weights the adapter is merged into, and skips dequantizing), else 4-bit; 4-bit on the hf
    backend with CUDA; always 4-bit for a pre-quantized base."""
    backend: Literal["auto", "unsloth", "hf"] = "auto"
    trust_remote_code: bool = False
    tokenizer_check: bool = True
    """Before any weights move, stop (exit 2) when model.base's tokenizer does not give the template and a sample
    of rows back through encode and decode (docs/tokenizers.md). Off only for synthetic tokenizers that cannot
    round-trip by design (the word-level ones of benchmarks and GPU tests)."""

    _check_base = field_validator("base", "merge_base")(
        lambda v, info: v if v is None else check_uri(v, f"model.{info.field_name}"))

    @field_validator("merge_revision")
    @classmethod
    def _merge_revision_needs_merge_base(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is not None and not info.data.get("merge_base"):
            raise ValueError("only applies to model.merge_base, which is not set; set both or neither")
        return v

    @field_validator("trust_remote_code")
    @classmethod
    def _remote_code_needs_pin(cls, v: bool, info: ValidationInfo) -> bool:
        base, revision = info.data.get("base") or "", info.data.get("revision")
        # A commit sha pins code only on the hub; a directory, bucket or GGUF file can change under the same name.
        # ms:// does not qualify either: modelscope keys its cache by the revision *name* it was asked for, never
        # checks that a cached snapshot belongs to that commit, and reuses an old-layout cache for any revision.
        if v and parse_uri(base).scheme != "hf":
            raise ValueError("only allowed for an hf:// model.base pinned to a commit sha (model.revision); "
                             f"{base!r} is not on the Hugging Face hub (ms:// caches cannot prove their commit)")
        if v and not (revision and re.fullmatch(r"[0-9a-f]{40}", revision)):
            raise ValueError("model.trust_remote_code needs model.revision pinned to a 40-hex commit sha")
        return v


class ColumnsConfig(_Section):
    question: str = "Question"
    reasoning: str = "Complex_CoT"
    answer: str = "Response"


class DataConfig(_Section):
    source: str = "hf://FreedomIntelligence/medical-o1-reasoning-SFT"
    """hf://org/dataset, ms://owner/dataset (ModelScope), s3://bucket/key, or a local .json/.jsonl/.parquet/.csv
    file."""
    subset: str | None = "en"
    split: str = "train[:500]"
    revision: str | None = None
    columns: ColumnsConfig = ColumnsConfig()
    template: Literal["r1-medical", "r1-medical-zh", "chat"] = "r1-medical"
    eval_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    too_long: Literal["drop", "truncate"] = "drop"
    """What to do with a row longer than model.max_seq_length."""
    train_on_prompt: bool = False
    """Train on the whole text as the tutorials do; by default only the completion is trained."""
    cache_dir: str | None = None

    _check_source = field_validator("source")(
        lambda v: check_uri(v, "data.source") if parse_uri(v).scheme == "ms" else _no_path_tricks(v, "data.source"))


class LoraConfig(_Section):
    r: int = Field(16, gt=0, le=1024)
    alpha: int = Field(16, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: tuple[str, ...] = ALL_PROJECTIONS

    @field_validator("target_modules")
    @classmethod
    def _not_empty(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("lora.target_modules needs at least one module name")
        return v


class TrainConfig(_Section):
    batch_size: int | Literal["auto"] = "auto"
    """Micro-batch size; ``auto`` sizes it to the GPU's memory on unsloth (2, the recipe's, on hf). The
    reference configs pin the recipe's 2."""
    grad_accum: int = Field(4, gt=0)
    max_steps: int = Field(60, ge=-1)
    """Optimizer steps; -1 trains for ``epochs`` instead."""
    epochs: float = Field(1.0, gt=0)
    learning_rate: float = Field(2e-4, gt=0)
    warmup_steps: int = Field(5, ge=0)
    optim: str = "auto"
    """A transformers optimizer name. ``auto``: fused torch AdamW (float32 moments, one kernel for every LoRA
    tensor) on a GPU whose memory allows, else the recipe's 8-bit AdamW (``adamw_torch`` on CPU)."""
    weight_decay: float = Field(0.01, ge=0)
    scheduler: str = "linear"
    seed: int = Field(3407, ge=0, le=MAX_SEED)
    packing: bool | Literal["auto"] = "auto"
    """Padding-free batches (rows concatenated, no padding); ``auto`` lets the backend choose (unsloth measured
    padded batches faster, because it compiles its decoder for them)."""
    gradient_checkpointing: Literal["auto", "unsloth", "on", "off"] = "auto"
    compile: bool | Literal["auto"] = "auto"
    """Unsloth's ``torch.compile`` of each decoder block (unsloth backend). Compiling makes the first steps
    slow and every later one a little faster; ``auto`` compiles jobs of at least
    :data:`job.backends.memory_plan.COMPILE_MIN_STEPS` optimizer steps, or trained by epochs."""
    checkpoint_every: int = Field(20, gt=0)
    logging_steps: int = Field(1, gt=0)
    report_to: tuple[Literal["wandb", "mlflow", "tensorboard"], ...] = ()
    """Experiment trackers for the curves and the run's results (job/trackers.py; medft[tracking]). Their
    settings come from each tool's own environment variables, never from this file."""

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_name_is_a_list(cls, v: Any) -> Any:
        # `--set train.report_to=mlflow` and MEDFT_TRAIN__REPORT_TO=wandb name one tracker; `none` names none.
        if v is None or v == "none":
            return ()
        return (v,) if isinstance(v, str) else v

    @field_validator("report_to")
    @classmethod
    def _no_repeats(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(v)) != len(v):
            raise ValueError(f"train.report_to names a tracker twice: {list(v)}")
        return v

    @field_validator("gradient_checkpointing", mode="before")
    @classmethod
    def _yaml_booleans(cls, v: Any) -> Any:
        # YAML 1.1 reads a bare on/off as a boolean.
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v

    @field_validator("batch_size")
    @classmethod
    def _positive_batch(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v <= 0:
            raise ValueError("train.batch_size must be a positive integer or 'auto'")
        return v

    @model_validator(mode="after")
    def _steps_not_zero(self) -> TrainConfig:
        if self.max_steps == 0:
            raise ValueError("train.max_steps must be positive, or -1 to train for train.epochs")
        return self


class BenchmarkSource(BenchmarkOverride):
    """Where one benchmark's questions come from, when not the spec's own hub dataset: another ``dataset`` id
    (a mirror), a pinned ``revision``, another ``subset``/``split``, other ``columns``, or a local ``file``
    (.jsonl/.parquet in the dataset's own schema; then the hub settings do not apply)."""

    file: str | None = Field(None, min_length=1)

    def override(self) -> BenchmarkOverride:
        return BenchmarkOverride(**self.model_dump(exclude={"file"}))


class EvalConfig(_Section):
    enabled: bool = True
    questions: tuple[str, ...] = DEFAULT_EVAL_QUESTIONS
    max_new_tokens: int = Field(256, gt=0)
    max_eval_rows: int = Field(64, gt=0)
    benchmarks: tuple[str, ...] = ()
    """Benchmarks scored before and after training (``medqa``, ``medmcqa``, ``pubmedqa``); none by default."""
    benchmark_limit: int | None = Field(None, gt=0)
    """Questions per benchmark: a seeded subset (``benchmark_seed``), the same for every model; None: all."""
    benchmark_max_new_tokens: int = Field(2048, gt=0)
    """Most tokens per answer, reasoning included (published R1-style medical evaluations use 2,000-2,048)."""
    benchmark_temperature: float = Field(0.6, ge=0, allow_inf_nan=False)
    """Sampling temperature of the answers (DeepSeek's advice for R1 models); 0 is greedy."""
    benchmark_top_p: float = Field(0.95, gt=0, le=1)
    benchmark_samples: int = Field(1, ge=1)
    """Answers per question, each with its own seed; needs ``benchmark_temperature`` > 0."""
    benchmark_batch_size: int = Field(256, gt=0)
    benchmark_seed: int = Field(0, ge=0, le=MAX_SEED)
    """Seed of the ``benchmark_limit`` subset and of every sampled answer."""
    benchmark_sources: dict[str, BenchmarkSource] = {}
    """Per-benchmark overrides, keyed by benchmark name."""

    @field_validator("benchmarks", mode="before")
    @classmethod
    def _benchmark_list(cls, v: Any) -> Any:
        # `--set eval.benchmarks=medqa,pubmedqa` arrives as one string.
        return [part for part in v.split(",")] if isinstance(v, str) else v

    @field_validator("benchmarks")
    @classmethod
    def _known_benchmarks(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        try:
            return parse_benchmarks(",".join(v)) if v else ()
        except ConfigError as e:
            raise ValueError(e.message) from None

    @field_validator("benchmark_sources")
    @classmethod
    def _known_sources(cls, v: dict[str, BenchmarkSource]) -> dict[str, BenchmarkSource]:
        unknown = sorted(set(v) - set(BENCHMARKS))
        if unknown:
            raise ValueError(f"unknown benchmark {unknown[0]!r}; use one or more of {known_names()}")
        return v

    @model_validator(mode="after")
    def _samples_need_sampling(self) -> EvalConfig:
        if self.benchmark_samples > 1 and self.benchmark_temperature == 0:
            raise ValueError(f"eval.benchmark_samples={self.benchmark_samples} with eval.benchmark_temperature=0: "
                             "greedy decoding gives the same answer every time; set a temperature (e.g. 0.6) or "
                             "benchmark_samples=1")
        return self


#: GGUF types the ``gguf`` library writes itself (job/gguf_export.py).
GGUF_LIBRARY_TYPES = ("f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
#: k-quants: quantized from the f16 file by llama.cpp's ``llama-quantize`` (MEDFT_LLAMA_QUANTIZE or PATH).
GGUF_K_QUANTS = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")


class ExportConfig(_Section):
    merge: bool = True
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    shard_size: int = Field(2 * 1024**3, gt=0)
    """Largest merged shard in bytes; also bounds the merge's peak host memory."""
    merge_tolerance: float = Field(2e-2, gt=0)
    """Largest allowed |logit difference| between the merged model and base + adapter, relative to the
    logits' own scale."""
    merge_check_layers: int = Field(2, ge=0)
    """The merge check compares models cut to their first this many decoder layers; 0 compares whole models
    (two float32 copies of the model loaded one after the other)."""
    gguf: tuple[str, ...] = ()
    """GGUF files of the merged model to write (``gguf/<model_name>-<type>.gguf`` with an Ollama Modelfile each),
    lower case as llama.cpp names them; a name is accepted in any case."""

    @field_validator("gguf", mode="before")
    @classmethod
    def _gguf_types(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, (list, tuple)):
            return v
        known = (*GGUF_LIBRARY_TYPES, *GGUF_K_QUANTS)
        names = [str(t).lower() for t in v]
        for name in names:
            if name not in known:
                raise ValueError(f"unknown GGUF type {name!r}; use any of {', '.join(known)}")
        if len(set(names)) != len(names):
            raise ValueError(f"a GGUF type is listed twice ({', '.join(names)})")
        return tuple(names)

    @model_validator(mode="after")
    def _gguf_needs_merge(self) -> ExportConfig:
        if self.gguf and not self.merge:
            raise ValueError("export.gguf needs export.merge=true (GGUF files are written from the merged "
                             "model); set it, or export.gguf=[]")
        return self


class OutputConfig(_Section):
    store: str = DEFAULT_STORE
    registry: str | None = None
    """Registry URI; defaults to ``<store>/registry``."""
    model_name: str = "r1-medical"
    aliases: tuple[str, ...] = ()
    run_id: str | None = None
    tags: dict[str, str] = {}
    """Tags of the registered version (``registry show``; ``registry tag`` changes them later)."""
    description: str | None = None
    """Free text stored with the registered version (``registry describe`` replaces it)."""

    @field_validator("store", "registry")
    @classmethod
    def _store_uri(cls, v: str | None, info: ValidationInfo) -> str | None:
        """A URI the store layer opens (it makes no request), so a bad one is named by its key and source."""
        from registry.store import TransferSettings, open_store

        if v is None:
            return v
        _no_path_tricks(v, f"output.{info.field_name}")
        try:
            open_store(v, transfer=TransferSettings())  # default transfer: MEDFT_S3_* are checked on their own
        except ConfigError as e:
            raise ValueError(e.message) from None
        return v

    @field_validator("run_id")
    @classmethod
    def _run_id_shape(cls, v: str | None) -> str | None:
        if v is not None and not NAME_RE.fullmatch(v):
            raise ValueError("output.run_id must be 1-128 letters, digits, '.', '_' or '-', starting with a "
                             f"letter or digit; got {v!r}")
        return v

    # The registry's own checks, so a run never trains for hours to be refused at registration.
    @field_validator("model_name")
    @classmethod
    def _name_shape(cls, v: str) -> str:
        try:
            return check_name(v)
        except ConfigError as e:
            raise ValueError(e.message) from None

    @field_validator("tags")
    @classmethod
    def _tag_shape(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            if not key.strip() or len(key) > 128 or len(value) > 1000:
                raise ValueError(f"output.tags: key {key[:40]!r} must be 1-128 characters and its value at most 1000")
        return v

    @field_validator("aliases")
    @classmethod
    def _alias_shape(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        try:
            return tuple(check_alias(a) for a in v)
        except ConfigError as e:
            raise ValueError(e.message) from None
