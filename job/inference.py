"""``medft generate`` and ``medft chat``: ask a registered model version a question, the way it was taught.

A REF is a registry reference (``NAME``, ``NAME:VERSION``, ``NAME@ALIAS``, looked up in the registry the
``--store``/``--registry`` options name) or a published run's folder (``s3://bucket/prefix/runs/<id>``, a
``file://`` URI or a local path), read through its MANIFEST.json. Anything containing ``://``, ``/`` or
``\\`` is taken for a run folder; everything else must be a registry reference.

Loading: the artifact's files are downloaded once into ``<cache>/models/<key>``, every file checked against
the sha256 the record lists, then reused; ``<key>`` is derived from those checksums, so a cached copy is
always the content the record names. ``--artifact adapter`` loads the version's base model (through
:func:`job.model.pull_weights`, checked against the base weights' recorded sha256) and applies the adapter
with peft. On a GPU with unsloth installed, unsloth's ``FastLanguageModel`` loads the model and switches it
to fast inference; elsewhere plain transformers runs it (float32 on CPU).

Prompting: the template the version was trained with (``data.template`` in its recorded config) builds the
prompt ids exactly as :func:`job.data.prepare` built the masked head of every training example (BOS,
instruction, question, response header, the opening ``<think>\\n``), so the response is opened with
``<think>\\n`` as DeepSeek advises for R1-Distill models and the model continues with its reasoning. Sampling
defaults to DeepSeek's advice too: temperature 0.6, top-p 0.95; temperature 0 is greedy decoding.

Every expected failure raises a :mod:`registry.errors` class with one line: a bad or unknown ref
:class:`NotFoundError` (exit 4), a file failing its checksum :class:`DataError` (exit 3), bad usage
:class:`ConfigError` (exit 2).
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from job.templates import THINK_CLOSE, THINK_OPEN, Template, get_template
from registry.errors import ConfigError, DataError, NotFoundError
from registry.logs import get_logger

log = get_logger(__name__)

DEFAULT_MAX_NEW_TOKENS = 512
#: DeepSeek's advice for R1-Distill models: 0.5-0.7, 0.6 recommended, with top-p 0.95.
DEFAULT_TEMPERATURE = 0.6
DEFAULT_TOP_P = 0.95
DEFAULT_STORE = "./medft-store"
ARTIFACTS = ("merged", "adapter")
#: ``--compare base``: the compared version's own base model, as the tutorials ask it before fine-tuning.
BASE_REF = "base"
CHAT_STOP_WORDS = ("stop", "exit")
COMPLETE_MARKER = ".medft-complete"
CUT_OFF = "(none: --max-new-tokens ran out while the model was still reasoning; raise it for an answer)"


# ------------------------------------------------------------------------------------------ resolving

@dataclass(frozen=True)
class Version:
    """What a REF resolved to: the record's artifacts, base model and training config.

    ``label`` names it in output and errors: ``NAME:VERSION`` for a registry ref, the run URI otherwise.
    """

    label: str
    artifacts: dict[str, dict[str, Any]]
    base_model: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    plan: dict[str, Any] = field(default_factory=dict)  # the settings training ran with (metrics.plan)

    @property
    def trained_in_4bit(self) -> bool:
        """Whether the adapter trained against 4-bit base weights: the plan's choice, else the config's."""
        if "load_in_4bit" in self.plan:
            return bool(self.plan["load_in_4bit"])
        return (self.config.get("model") or {}).get("load_in_4bit") is True

    @property
    def template_name(self) -> str:
        """The template the version was trained with; records without one predate templates (default)."""
        name = (self.config.get("data") or {}).get("template")
        if not name:
            from job.config import DataConfig

            name = DataConfig().template
            log.warning("inference.template_default", ref=self.label, template=name,
                        reason="the record's config has no data.template")
        return str(name)

    @property
    def trust_remote_code(self) -> bool:
        return bool((self.config.get("model") or {}).get("trust_remote_code", False))

    def base_uri(self) -> tuple[str, str | None]:
        """(uri, revision) of the base model the version was trained from; NotFoundError if unrecorded."""
        model_cfg = self.config.get("model") or {}
        uri = self.base_model.get("uri") or model_cfg.get("base")
        if not uri:
            raise NotFoundError(f"{self.label} records no base model, so it cannot be loaded as base + adapter "
                                "or compared with its base; use --artifact merged and compare with a REF")
        return str(uri), self.base_model.get("revision") or model_cfg.get("revision")


def is_run_uri(ref: str) -> bool:
    """A run folder (URI or path) rather than a registry reference: it holds ``://``, ``/`` or ``\\``."""
    return "://" in ref or "/" in ref or "\\" in ref or ref.startswith("~")


def resolve(ref: str, *, store: str | None = None, registry: str | None = None) -> Version:
    """Resolve REF to a :class:`Version`.

    A registry ref is looked up in ``registry`` (a URI), else in ``<store>/registry`` (``store`` defaults
    to ``./medft-store``); a run folder is read through its MANIFEST.json. Raises NotFoundError (exit 4)
    for a malformed or unknown ref or an unpublished run, DataError (exit 3) for a corrupt record, and the
    store's errors (access refused, transient) as they are.
    """
    if not isinstance(ref, str) or not ref.strip():
        raise NotFoundError("empty model ref: give NAME, NAME:VERSION, NAME@ALIAS or a run folder URI")
    ref = ref.strip()
    if is_run_uri(ref):
        return _resolve_run(ref)
    from registry.registry import Registry
    from registry.store import open_store

    reg = Registry.open(registry) if registry else Registry(open_store(store or DEFAULT_STORE).child("registry"))
    mv = reg.get(ref)
    return Version(label=mv.ref, artifacts=mv.artifacts, base_model=mv.base_model, config=mv.config,
                   plan=(mv.metrics or {}).get("plan") or {})


def _resolve_run(ref: str) -> Version:
    from registry.registry import artifacts_from_manifest
    from registry.runs import MANIFEST, read_manifest, run_store

    # A local path may be relative or contain '..'; the store layer refuses '..', so hand it an absolute one.
    uri = ref if "://" in ref else os.path.abspath(os.path.expanduser(ref))
    try:
        rs, label = run_store(None, uri)
        manifest = read_manifest(None, uri)
    except ConfigError as e:
        raise NotFoundError(f"model ref {ref!r} is neither NAME, NAME:VERSION, NAME@ALIAS nor a run folder URI "
                            f"({e.message})") from None
    except NotFoundError as e:
        # Say which ref was meant: the path the store layer names may be a resolved form of it.
        raise NotFoundError(f"model ref {ref!r} names no published run: {e.message}") from None
    lineage = manifest.get("lineage") or {}
    return Version(label=label, artifacts=artifacts_from_manifest(manifest, rs.uri, rs.url(MANIFEST)),
                   base_model=lineage.get("base_model") or manifest.get("base_model") or {},
                   config=manifest.get("config") or {}, plan=(manifest.get("metrics") or {}).get("plan") or {})


# ---------------------------------------------------------------------------------------------- cache

def cache_key(files: dict[str, str]) -> str:
    """The cache folder name for an artifact: a hash of its ``{relpath: sha256}`` list."""
    canonical = json.dumps(sorted(files.items()), separators=(",", ":")).encode()
    return hashlib.sha256(canonical).hexdigest()[:32]


def _whole(dest: Path, files: dict[str, str]) -> bool:
    # The marker is trusted rather than re-hashing gigabytes on every call; files are only checked to exist,
    # so a cache entry someone deleted files from is fetched again instead of failing to load.
    return (dest / COMPLETE_MARKER).exists() and all((dest / rel).is_file() for rel in files)


def fetch_artifact(version: Version, artifact: str = "merged") -> Path:
    """The artifact's files on local disk: from the cache when complete, else downloaded and verified.

    A download goes to a temporary folder beside the cache entry and is renamed into place, completion
    marker inside, only after every file passed its sha256 check; so a cache entry with its marker is
    always whole and verified, and a failed or interrupted download leaves nothing behind. Raises
    NotFoundError when the version has no such artifact or a listed file is missing from the store,
    DataError (exit 3) when a file fails its checksum.
    """
    from job.model import cache_root
    from registry.store import open_store

    if artifact not in version.artifacts:
        has = ", ".join(sorted(version.artifacts)) or "none"
        other = next((a for a in ARTIFACTS if a in version.artifacts), None)
        raise NotFoundError(f"{version.label} has no {artifact!r} artifact (it has: {has})"
                            + (f"; use --artifact {other}" if other else ""))
    spec = version.artifacts[artifact]
    files: dict[str, str] = spec["files"]
    dest = cache_root() / "models" / cache_key(files)
    if _whole(dest, files):
        log.info("model.cached", ref=version.label, artifact=artifact, path=str(dest))
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    log.info("model.download", ref=version.label, artifact=artifact, uri=spec["uri"], files=len(files))
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        open_store(spec["uri"]).get_dir("", tmp, expected=files)
        (tmp / COMPLETE_MARKER).write_text(json.dumps({"ref": version.label, "uri": spec["uri"]}) + "\n")
        # Another process may have finished the same download meanwhile; its copy is as verified as ours.
        if not _whole(dest, files):
            if dest.exists():
                shutil.rmtree(dest)  # an entry with files deleted by hand: replace it whole
            try:
                tmp.replace(dest)
            except OSError:
                if not _whole(dest, files):
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("model.downloaded", ref=version.label, artifact=artifact, path=str(dest),
             seconds=round(time.monotonic() - started, 2))
    return dest


# -------------------------------------------------------------------------------------------- loading

@dataclass
class Loaded:
    """A model ready to answer: weights in eval mode, its tokenizer and the prompt template to use."""

    label: str
    model: Any
    tokenizer: Any
    template: Template
    backend: str

    def prompt_ids(self, question: str) -> list[int]:
        """The prompt's token ids: equal, token for token, to the masked head of a training example."""
        return self.template.encode_prompt(question, self.tokenizer)


def _use_unsloth() -> bool:
    from job.backends import unsloth_available

    if not unsloth_available():
        return False
    # unsloth patches transformers and peft when imported, so it must come before them.
    from job.backends.unsloth import import_unsloth

    import_unsloth()
    return True


def _torch_dtype() -> Any:
    import torch

    if not torch.cuda.is_available():
        return torch.float32  # half precision on CPU is slow and, for some ops, unsupported
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _tokenizer(path: Path, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_weights(path: Path, version: Version, *, unsloth: bool, four_bit: bool = False) -> Any:
    """A causal LM from a local safetensors folder, on the GPU when there is one (unsloth's loader on CUDA)."""
    import torch

    if unsloth:
        from unsloth import FastLanguageModel

        max_seq = int((version.config.get("model") or {}).get("max_seq_length") or 2048)
        model, _ = FastLanguageModel.from_pretrained(
            model_name=str(path), max_seq_length=max_seq, dtype=None, load_in_4bit=four_bit,
            local_files_only=True, use_exact_model_name=True, trust_remote_code=version.trust_remote_code)
        return model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=_torch_dtype(), use_safetensors=True,
                                                 trust_remote_code=version.trust_remote_code)
    if torch.cuda.is_available():
        model = model.to("cuda")
    return model.eval()


def _pull_base(version: Version) -> Path:
    """The version's base weights on local disk, refused when they differ from the ones it was trained on."""
    from job.model import pull_weights

    uri, revision = version.base_uri()
    weights = pull_weights(uri, revision)
    recorded = version.base_model.get("sha256") or {}
    if recorded and weights.files and recorded != weights.files:
        changed = sorted(n for n in set(recorded) | set(weights.files) if recorded.get(n) != weights.files.get(n))
        raise DataError(f"base model {uri} of {version.label}: {changed[0]} differs from the weights it was trained "
                        "on (sha256), so it is not the model the adapter was trained for; use --artifact merged, "
                        f"or restore the base at revision {revision or '(unpinned; pin model.revision)'}")
    return weights.path


def _for_inference(model: Any, unsloth: bool) -> Any:
    if unsloth:
        from unsloth import FastLanguageModel

        FastLanguageModel.for_inference(model)
    return model.eval()


def load(version: Version, artifact: str = "merged") -> Loaded:
    """Load a version's ``merged`` weights, or its base model with the ``adapter`` applied.

    Raises what :func:`fetch_artifact` and :func:`job.model.pull_weights` raise, DataError when the base
    weights are not the ones the adapter was trained on, and ConfigError for an unknown artifact or template.
    """
    if artifact not in ARTIFACTS:
        raise ConfigError(f"--artifact {artifact!r}: use one of {', '.join(ARTIFACTS)}")
    template = get_template(version.template_name)
    started = time.monotonic()
    unsloth = _use_unsloth()
    path = fetch_artifact(version, artifact)
    if artifact == "merged":
        model = _load_weights(path, version, unsloth=unsloth)
    else:
        from peft import PeftModel

        four_bit = unsloth and version.trained_in_4bit
        base = _load_weights(_pull_base(version), version, unsloth=unsloth, four_bit=four_bit)
        model = PeftModel.from_pretrained(base, str(path), is_trainable=False)
    # The artifact's own tokenizer: the one training saved beside the weights it produced.
    loaded = Loaded(label=version.label, model=_for_inference(model, unsloth),
                    tokenizer=_tokenizer(path, version.trust_remote_code), template=template,
                    backend="unsloth" if unsloth else "transformers")
    log.info("inference.loaded", ref=version.label, artifact=artifact, backend=loaded.backend,
             template=template.name, device=str(_device(loaded.model)), seconds=round(time.monotonic() - started, 2))
    return loaded


def load_base(version: Version) -> Loaded:
    """The version's base model, untrained, asked with the version's template (``--compare base``)."""
    template = get_template(version.template_name)
    unsloth = _use_unsloth()
    path = _pull_base(version)
    uri, _ = version.base_uri()
    model = _for_inference(_load_weights(path, version, unsloth=unsloth), unsloth)
    return Loaded(label=f"base {uri}", model=model, tokenizer=_tokenizer(path, version.trust_remote_code),
                  template=template, backend="unsloth" if unsloth else "transformers")


def _device(model: Any) -> Any:
    return next(model.parameters()).device


def unload(loaded: Loaded) -> None:
    """Free a model's memory before the next one loads (``--compare`` holds one model at a time)."""
    import torch

    loaded.model = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------- generation

@dataclass(frozen=True)
class Sampling:
    """Generation settings; ``temperature == 0`` means greedy decoding (top-p is then unused)."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"--temperature must be 0 (greedy) or positive, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p must be in (0, 1], got {self.top_p}")


@dataclass(frozen=True)
class Answer:
    """One answered question; ``to_dict`` is what ``--json`` prints.

    ``finish_reason`` is ``stop`` when the model ended its answer, ``length`` when ``max_new_tokens`` cut
    it off (then ``answer`` may be empty: the model was still reasoning).
    """

    question: str
    reasoning: str
    answer: str
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    ref: str
    finish_reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_text(self) -> str:
        """The reasoning and the answer under headings; an answer cut off before it began says so."""
        answer = self.answer or (CUT_OFF if self.finish_reason == "length" else "")
        return f"Reasoning:\n{self.reasoning}\n\nAnswer:\n{answer}"


def split_completion(text: str) -> tuple[str, str]:
    """(reasoning, answer) of a completion that follows the prompt's opening ``<think>\\n``.

    The reasoning is everything before the first ``</think>``, the answer everything after it, both
    stripped. Without ``</think>`` (cut off while reasoning) all of it is reasoning and the answer is empty.
    """
    reasoning, sep, answer = text.partition(THINK_CLOSE)
    return (reasoning.strip(), answer.strip()) if sep else (text.strip(), "")


def stop_ids(loaded: Loaded) -> list[int]:
    """Token ids that end a response: the tokenizer's EOS, which training appended to every example, and
    the model's own generation EOS ids (they can differ, e.g. after a GGUF conversion)."""
    ids: list[int] = []
    if loaded.tokenizer.eos_token_id is not None:
        ids.append(int(loaded.tokenizer.eos_token_id))
    configured = getattr(getattr(loaded.model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        configured = [configured]
    ids += [int(i) for i in configured or () if int(i) not in ids]
    return ids


def _decoder(tokenizer: Any) -> Callable[[list[int]], str]:
    """Decode completion ids without special tokens, keeping ``<think>``/``</think>`` should a tokenizer
    mark them special (R1-Distill tokenizers add them as tokens)."""
    keep = {tokenizer.convert_tokens_to_ids(t) for t in (THINK_OPEN.strip(), THINK_CLOSE)
            if t in getattr(tokenizer, "all_special_tokens", ())}
    special = set(getattr(tokenizer, "all_special_ids", ())) - keep

    def decode(ids: list[int]) -> str:
        return str(tokenizer.decode([i for i in ids if i not in special], skip_special_tokens=False))

    return decode


class SectionWriter:
    """Writes completion text as it streams under ``Reasoning:`` and ``Answer:`` headings.

    Whatever the chunking, the output is exactly :meth:`Answer.to_text` plus a newline. ``</think>`` may
    arrive split across chunks, so text that could be its start is held back until the next chunk decides;
    whitespace at the end of what has arrived is held back too, since each section is shown stripped.
    """

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.reasoning = True
        self.held = ""  # arrived but not shown: trailing whitespace, maybe the start of </think>
        self.started = False  # the current section has shown text

    def _write(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.out.flush()

    def _show(self, text: str) -> None:
        """Show ``text`` in the current section, but not its trailing whitespace (kept in ``held``)."""
        if not self.started:
            text = text.lstrip()
        body = text.rstrip()
        self._write(body)
        self.started = self.started or bool(body)
        self.held = text[len(body):]

    def open(self) -> None:
        self._write("Reasoning:\n")

    def feed(self, text: str) -> None:
        buf, self.held = self.held + text, ""
        if not self.reasoning:
            self._show(buf)
            return
        at = buf.find(THINK_CLOSE)
        if at >= 0:
            self._show(buf[:at])
            self._write("\n\nAnswer:\n")
            self.reasoning, self.started, self.held = False, False, ""
            self._show(buf[at + len(THINK_CLOSE):])
            return
        partial = next((n for n in range(min(len(buf), len(THINK_CLOSE) - 1), 0, -1)
                        if THINK_CLOSE.startswith(buf[-n:])), 0)
        self._show(buf[:len(buf) - partial])
        self.held += buf[len(buf) - partial:]

    def close(self, finish_reason: str = "stop") -> None:
        """Flush what was held and end the output, noting a reasoning cut off as :meth:`Answer.to_text` does."""
        if self.reasoning:
            rest = self.held.rstrip() if self.started else self.held.strip()
            self._write(rest)
            self._write("\n\nAnswer:\n" + (CUT_OFF if finish_reason == "length" else ""))
        elif not self.started and finish_reason == "length":
            self._write(CUT_OFF)
        self.held = ""
        self._write("\n")


class TokenStream:
    """A transformers streamer (``put`` token ids, ``end``) feeding decoded text to a :class:`SectionWriter`.

    The first ``put`` is the prompt and is skipped. Each step decodes the ids since the last newline (as
    transformers' TextStreamer does), which keeps the cost linear in the answer's length; a trailing U+FFFD
    means a multi-byte character is still incomplete, so it waits for the next token. ``end`` flushes what
    is left; the caller closes the sink, knowing why generation stopped.
    """

    def __init__(self, decode: Callable[[list[int]], str], sink: SectionWriter) -> None:
        self.decode = decode
        self.sink = sink
        self.ids: list[int] = []
        self.shown = 0
        self.prompt_seen = False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.ids.extend(int(i) for i in value.reshape(-1).tolist())
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):
            return
        self.sink.feed(text[self.shown:])
        self.shown = len(text)
        if text.endswith("\n"):
            self.ids, self.shown = [], 0

    def end(self) -> None:
        self.sink.feed(self.decode(self.ids)[self.shown:])
        self.ids, self.shown = [], 0


def _generation_config(loaded: Loaded, sampling: Sampling, stops: list[int]) -> Any:
    import copy

    from transformers import GenerationConfig

    own = getattr(loaded.model, "generation_config", None)
    config = copy.deepcopy(own) if own is not None else GenerationConfig()
    config.max_new_tokens = sampling.max_new_tokens
    config.max_length = None
    config.eos_token_id = stops
    config.pad_token_id = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else stops[0]
    if sampling.temperature > 0:
        config.do_sample, config.temperature, config.top_p = True, sampling.temperature, sampling.top_p
    else:
        # Sampling knobs a model ships in its generation config would only earn warnings when greedy.
        config.do_sample, config.temperature, config.top_p, config.top_k = False, None, None, None
    return config


def generate(loaded: Loaded, question: str, sampling: Sampling = Sampling(), *, stream: TextIO | None = None
             ) -> Answer:
    """Answer one question (a fresh single-turn prompt, as the model was trained).

    ``stream``: a text stream that receives the reasoning and the answer as tokens are generated. The same
    ``sampling.seed`` gives the same answer on the same machine. Raises ConfigError for an empty question.
    """
    import torch

    question = question.strip() if isinstance(question, str) else ""
    if not question:
        raise ConfigError("the question is empty; pass --question \"...\" (or type one at the chat prompt)")
    if loaded.model is None:
        raise ConfigError(f"{loaded.label} was unloaded; load it again")
    ids = loaded.prompt_ids(question)
    stops = stop_ids(loaded)
    if not stops:
        raise ConfigError(f"{loaded.label}: its tokenizer defines no eos_token, so generation could not stop")
    device = _device(loaded.model)
    inputs = torch.tensor([ids], dtype=torch.long, device=device)
    decode = _decoder(loaded.tokenizer)
    writer = SectionWriter(stream) if stream is not None else None
    streamer = TokenStream(decode, writer) if writer is not None else None
    if writer is not None:
        writer.open()
    if sampling.seed is not None:
        from transformers import set_seed

        set_seed(sampling.seed)
    started = time.perf_counter()
    with torch.inference_mode():
        out = loaded.model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs),
                                    generation_config=_generation_config(loaded, sampling, stops), streamer=streamer)
    seconds = time.perf_counter() - started
    new = [int(i) for i in out[0, len(ids):].tolist()]
    # Generation pads nothing for a single row, but cut at the first stop token in case a model keeps going.
    end = next((n for n, i in enumerate(new) if i in stops), None)
    finish = "stop" if end is not None else "length"
    completion = new[:end + 1] if end is not None else new
    reasoning, answer = split_completion(decode(completion))
    if writer is not None:
        writer.close(finish)
    result = Answer(question=question, reasoning=reasoning, answer=answer, prompt_tokens=len(ids),
                    completion_tokens=len(completion), seconds=round(seconds, 3), ref=loaded.label,
                    finish_reason=finish)
    log.info("inference.answered", ref=loaded.label, prompt_tokens=result.prompt_tokens,
             completion_tokens=result.completion_tokens, seconds=result.seconds, finish_reason=finish,
             tokens_per_s=round(result.completion_tokens / seconds, 1) if seconds > 0 else None)
    return result


# ------------------------------------------------------------------------------------------- commands

def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _header(label: str) -> str:
    return f"=== {label} ==="


def generate_command(ref: str, question: str, *, sampling: Sampling, artifact: str = "merged",
                     compare: str | None = None, store: str | None = None, registry: str | None = None,
                     as_json: bool = False, out: TextIO | None = None) -> list[Answer]:
    """``medft generate``: answer ``question`` with REF (and with ``compare`` after it, one model at a time).

    Prints the reasoning and the answer (streamed when ``out`` is a terminal), or with ``as_json`` one JSON
    object (a list of two with ``compare``). ``compare`` is another REF, or ``base`` for REF's base model.
    Both refs are resolved before any weights load, so a bad second ref fails at once.
    """
    out = out or sys.stdout
    if not question or not question.strip():
        raise ConfigError("--question is empty; ask something, e.g. --question \"What causes anemia?\"")
    version = resolve(ref, store=store, registry=registry)
    other = None if compare is None or compare == BASE_REF else resolve(compare, store=store, registry=registry)
    if compare == BASE_REF:
        version.base_uri()  # refuse now, not after the first answer, when no base is recorded
    stream = out if _is_tty(out) and not as_json else None
    results: list[Answer] = []
    loaders: list[Callable[[], Loaded]] = [lambda: load(version, artifact)]
    if compare == BASE_REF:
        loaders.append(lambda: load_base(version))
    elif other is not None:
        loaders.append(lambda: load(other, artifact))
    for n, make in enumerate(loaders):
        loaded = make()
        if compare is not None and not as_json:
            out.write(("\n" if n else "") + _header(loaded.label) + "\n")
            out.flush()
        try:
            result = generate(loaded, question, sampling, stream=stream)
        finally:
            unload(loaded)
        results.append(result)
        if not as_json and stream is None:
            out.write(result.to_text() + "\n")
            out.flush()
    if as_json:
        payload: Any = [r.to_dict() for r in results] if compare is not None else results[0].to_dict()
        out.write(json.dumps(payload, ensure_ascii=False, indent=2) + "\n")
        out.flush()
    return results


def questions(stdin: TextIO, prompt: TextIO | None = None) -> Iterable[str]:
    """Non-blank lines of ``stdin``, stripped, until a stop word, end of input (Ctrl-D) or Ctrl-C at the prompt.

    ``prompt``: where to ask for each question (stderr at a terminal, so stdout holds only answers).
    """
    while True:
        try:
            if prompt is not None:
                prompt.write("\nQuestion (stop, exit or Ctrl-D to end)> ")
                prompt.flush()
            line = stdin.readline()
        except KeyboardInterrupt:
            return
        if not line:  # end of input
            return
        question = line.strip()
        if question.lower() in CHAT_STOP_WORDS:
            return
        if question:
            yield question


def chat_command(ref: str, *, sampling: Sampling, artifact: str = "merged", store: str | None = None,
                 registry: str | None = None, as_json: bool = False, stdin: TextIO | None = None,
                 out: TextIO | None = None) -> list[Answer]:
    """``medft chat``: load REF once, then answer each line read from ``stdin`` as a fresh question.

    The loop ends at ``stop``, ``exit`` or end of input (Ctrl-D). Each turn is a single-question prompt,
    since the model was trained single-turn. Output per turn is text (streamed on a terminal) or, with
    ``as_json``, one JSON object per line. Ctrl-C during an answer abandons that answer only.
    """
    stdin, out = stdin or sys.stdin, out or sys.stdout
    version = resolve(ref, store=store, registry=registry)
    loaded = load(version, artifact)
    stream = out if _is_tty(out) and not as_json else None
    prompt = sys.stderr if _is_tty(stdin) else None
    if prompt is not None:
        prompt.write(f"Chatting with {loaded.label}; each question is asked on its own, as the model was trained.\n")
    answers: list[Answer] = []
    try:
        for question in questions(stdin, prompt):
            try:
                result = generate(loaded, question, sampling, stream=stream)
            except KeyboardInterrupt:
                out.write("\n(answer interrupted)\n")
                out.flush()
                continue
            answers.append(result)
            if as_json:
                out.write(json.dumps(result.to_dict(), ensure_ascii=False) + "\n")
            elif stream is None:
                out.write(result.to_text() + "\n\n")
            out.flush()
    finally:
        unload(loaded)
    log.info("chat.done", ref=loaded.label, questions=len(answers))
    return answers
