"""The one tokenizer loader every stage uses, the round-trip guard, and the tokenizer written into artifacts.

Loading (:func:`load_tokenizer`): a directory with a ``tokenizer.json`` is loaded exactly as that file defines
the tokenizer (normalizer, pre-tokenizer, model, decoder, post-processor, added tokens), whatever
``tokenizer_class`` its ``tokenizer_config.json`` names; the chat template and the BOS/EOS/pad settings still
come from ``tokenizer_config.json``. The class name is not trusted because transformers 5 maps
``LlamaTokenizerFast`` (which the released DeepSeek-R1-Distill-Llama files name) to ``LlamaTokenizer``, whose
constructor replaces the file's byte-level pre-tokenizer and decoder with SentencePiece-style Metaspace ones:
every space and newline is lost. transformers works around it only for hub ids
(``MODEL_IDS_TO_TOKENIZERS_BACKEND``), never for the local directories medft loads. A directory without
``tokenizer.json`` (SentencePiece-only, or code the config asks for under ``model.trust_remote_code``) is
loaded by ``AutoTokenizer``. A tokenizer without a pad token gets its EOS as pad, as the released
R1-Distill tokenizers set it; training masks padding through its labels, never by token id, so the EOS
that ends every example stays trained.

Guard (:func:`check_round_trip`): the training texts of a sample of rows, and the template around a fixed
example, are encoded and decoded; if the text does not come back the job stops with :class:`ConfigError`
(exit 2) naming the tokenizer and the first differing characters. Allowed differences are the tokenizer's
own documented normalisation only: the Unicode normal forms, lower-casing, accent stripping and
SentencePiece character maps of its normalizer. Decoding runs with ``clean_up_tokenization_spaces`` off,
so what is compared is what the model sees, not a cosmetic clean-up of printed text.

Saving (:func:`save_tokenizer`): ``adapter/`` and ``merged/`` get the tokenizer with ``tokenizer_class:
PreTrainedTokenizerFast``, which transformers 4.x, 5.x and vLLM all load from ``tokenizer.json`` as written,
and the written directory is reloaded with plain ``AutoTokenizer`` and compared id for id.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from job.templates import get_template
from registry.errors import ConfigError
from registry.logs import get_logger

log = get_logger(__name__)

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
#: A class name transformers 4.x, 5.x and vLLM all read as "the pipeline of tokenizer.json, unchanged".
PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"
#: Rows whose training text the guard round-trips (spread over the data), besides the template example.
GUARD_ROWS = 64
#: Characters shown either side of the first difference.
_CONTEXT = 24
#: Normalizer steps whose changes are the tokenizer's documented normalisation (the text may come back so).
_DOCUMENTED_NORMALIZERS = ("NFC", "NFD", "NFKC", "NFKD", "Lowercase", "StripAccents", "Precompiled")
# A fixed example in the dataset's shape: the template's own text, newlines and the think block around it.
_EXAMPLE = ("A 45-year-old man has chest pain on exertion.  What is the next step?",
            "Exertional chest pain suggests angina.\nFirst, an ECG; then a stress test.",
            "Order an ECG and a stress test.")


def _tokenizer_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads((path / TOKENIZER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def load_tokenizer(path: Path | str, *, trust_remote_code: bool = False) -> Any:
    """The tokenizer in local directory ``path``, as its ``tokenizer.json`` defines it (module docstring).

    Raises what transformers raises for a directory without a usable tokenizer (OSError, ValueError).
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(path)
    config = _tokenizer_config(path)
    remote = trust_remote_code and bool(config.get("auto_map"))
    if (path / TOKENIZER_JSON).is_file() and not remote:
        # In transformers 5 this is TokenizersBackend: the backend is tokenizer.json itself, untouched by any
        # model-specific constructor; tokenizer_config.json still supplies special tokens and chat template.
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    else:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    log.info("tokenizer.loaded", path=str(path), loaded_as=type(tokenizer).__name__,
             config_class=config.get("tokenizer_class"), pad_is_eos=tokenizer.pad_token_id == tokenizer.eos_token_id)
    return tokenizer


# ------------------------------------------------------------------------------------------ the guard

def documented_normalization(tokenizer: Any) -> Callable[[str], str]:
    """The part of the tokenizer's normalizer that may change text for good (Unicode forms, case, accents)."""
    from tokenizers import normalizers

    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()).get("normalizer") if backend is not None else None
    steps: list[dict[str, Any]] = []
    pending = [spec] if spec else []
    while pending:
        step = pending.pop(0)
        if step.get("type") == "Sequence":
            pending[:0] = step.get("normalizers") or []
        elif step.get("type") in _DOCUMENTED_NORMALIZERS:
            steps.append(step)
    built = []
    for step in steps:
        kind = step["type"]
        if kind == "Precompiled":
            built.append(normalizers.Precompiled(base64.b64decode(step["precompiled_charsmap"])))
        else:
            built.append(getattr(normalizers, kind)())
    if not built:
        return lambda text: text
    chain = normalizers.Sequence(built)
    return chain.normalize_str


def guard_texts(rows: Sequence[Any], template_name: str, tokenizer: Any, *, limit: int = GUARD_ROWS
                ) -> list[tuple[str, str]]:
    """``(where, text)`` pairs to round-trip: the template around a fixed example, then up to ``limit`` rows
    spread over ``rows`` (each its whole training text, prompt, completion and EOS).

    Raises ConfigError when the template cannot be rendered with this tokenizer (no EOS, no chat template).
    """
    template = get_template(template_name)
    texts = [(f"the {template.name} template", template.text(*_EXAMPLE, tokenizer))]
    step = max(1, math.ceil(len(rows) / limit)) if rows else 1
    for row in list(rows)[::step][:limit]:
        texts.append((f"row {row.source_row}", template.text(row.question, row.reasoning, row.answer, tokenizer)))
    return texts


def first_difference(expected: str, got: str) -> int | None:
    """Index of the first character where ``got`` differs from ``expected``; None when equal."""
    if expected == got:
        return None
    return next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))


def round_trip(tokenizer: Any, text: str) -> tuple[str, str]:
    """``(expected, decoded)``: ``text`` after the documented normalisation, and after encode then decode."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    decoded = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return documented_normalization(tokenizer)(text), str(decoded)


def check_round_trip(tokenizer: Any, texts: Iterable[tuple[str, str]], *, name: str) -> None:
    """Stop when any text does not come back through the tokenizer. ``name`` says which tokenizer it is.

    Raises ConfigError (exit 2) naming the tokenizer, where the text came from and the first differing
    characters.
    """
    checked = 0
    for where, text in texts:
        expected, decoded = round_trip(tokenizer, text)
        at = first_difference(expected, decoded)
        checked += 1
        if at is None:
            continue
        lo = max(0, at - _CONTEXT)
        path = getattr(tokenizer, "name_or_path", "") or "?"
        raise ConfigError(
            f"{name}: its tokenizer ({path}, loaded as {type(tokenizer).__name__}) does not give the text back: "
            f"{where}, character {at}: expected {expected[lo:at + _CONTEXT]!r}, decoded "
            f"{decoded[lo:at + _CONTEXT]!r}. Training would see other text than the data holds: check "
            "tokenizer.json's pre_tokenizer and decoder (set model.tokenizer_check=false only for a synthetic "
            "tokenizer that cannot round-trip by design)")
    log.info("tokenizer.round_trip_ok", tokenizer=name, texts=checked)


# ----------------------------------------------------------------------------------------- saving

def save_tokenizer(tokenizer: Any, dest: Path, probe: Sequence[str] = ()) -> None:
    """Write ``tokenizer`` into ``dest`` so that plain ``AutoTokenizer.from_pretrained(dest)`` rebuilds it.

    ``tokenizer_class`` becomes :data:`PORTABLE_TOKENIZER_CLASS` wherever a ``tokenizer.json`` is written
    (and no remote code is named); then ``dest`` is reloaded with ``AutoTokenizer`` and the ids of ``probe``
    compared, a difference logged as a warning (medft's own loader reads the file correctly either way).
    """
    from transformers import AutoTokenizer

    dest = Path(dest)
    tokenizer.save_pretrained(dest)
    config_path = dest / TOKENIZER_CONFIG
    config = _tokenizer_config(dest)
    if (dest / TOKENIZER_JSON).is_file() and config and not config.get("auto_map"):
        config["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if not probe:
        return
    try:
        reloaded = AutoTokenizer.from_pretrained(dest, local_files_only=True)
    except (OSError, ValueError) as e:
        log.warning("tokenizer.reload_failed", dest=str(dest), reason=f"{e.__class__.__name__}: {e}")
        return
    for text in probe:
        ours = list(tokenizer(text, add_special_tokens=True)["input_ids"])
        theirs = list(reloaded(text, add_special_tokens=True)["input_ids"])
        if ours != theirs:
            log.warning("tokenizer.reload_differs", dest=str(dest), reloaded_as=type(reloaded).__name__,
                        hint="plain AutoTokenizer rebuilds this tokenizer differently; load it with "
                             "PreTrainedTokenizerFast.from_pretrained")
            return
