"""Loading a version for inference: its merged weights, or its base model with the adapter applied.

Every artifact (and the base model) is checked before anything loads from it (:mod:`job.inference.checks`);
every load passes ``use_safetensors=True``. The weights load through the backend seam
(:func:`job.backends.inference_backend`): on a GPU with unsloth installed, unsloth's ``FastLanguageModel``
loads the model; elsewhere plain transformers runs it (float32 on CPU).
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from job.backends import inference_backend
from job.inference.artifacts import fetch_artifact
from job.inference.checks import check_artifact, refuse_code
from job.inference.refs import Version
from job.templates import Template, get_template
from registry.errors import ConfigError, DataError
from registry.logs import get_logger
from registry.names import LOADABLE_ARTIFACTS

log = get_logger(__name__)


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


def _tokenizer(path: Path, trust_remote_code: bool) -> Any:
    from job.tokenizer import load_tokenizer

    return load_tokenizer(path, trust_remote_code=trust_remote_code)


def _max_seq_length(version: Version) -> int:
    """The length the version was trained for (``model.max_seq_length``), 2048 where the record has none."""
    return int((version.config.get("model") or {}).get("max_seq_length") or 2048)


# What the log calls each backend's inference library.
_LIBRARY = {"hf": "transformers"}


def _pull_base(version: Version, trust_remote_code: bool = False) -> Path:
    """The version's base weights on local disk, refused when they differ from the ones it was trained on.

    The base is named by the record, so it is checked as an artifact is: a URI no source could mean, pickles,
    lying headers or code to run (without ``trust_remote_code``) are DataError (exit 3).
    """
    from job.model import pull_weights

    uri, revision = version.base_uri()
    weights = pull_weights(uri, revision)
    refuse_code(weights.path, f"base model {uri} of {version.label}", trust_remote_code)
    recorded = version.base_model.sha256 or {}
    if recorded and weights.files and recorded != weights.files:
        changed = sorted(n for n in set(recorded) | set(weights.files) if recorded.get(n) != weights.files.get(n))
        raise DataError(f"base model {uri} of {version.label}: {changed[0]} differs from the weights it was trained "
                        "on (sha256), so it is not the model the adapter was trained for; use --artifact merged, "
                        f"or restore the base at revision {revision or '(unpinned; pin model.revision)'}")
    return weights.path


def check_loadable(artifact: str) -> None:
    """ConfigError (exit 2) for an artifact transformers cannot load here (``gguf``: llama.cpp runs it)."""
    if artifact == "gguf":
        raise ConfigError("--artifact gguf: medft generate, chat and eval load safetensors with transformers, not "
                          "a GGUF file; use --artifact merged, or fetch the GGUF with `medft registry download REF DEST "
                          "--artifact gguf` and run it with llama.cpp or Ollama (README: Run it locally)")
    if artifact not in LOADABLE_ARTIFACTS:
        raise ConfigError(f"--artifact {artifact!r}: use one of {', '.join(LOADABLE_ARTIFACTS)}")


def load(version: Version, artifact: str = "merged", *, trust_remote_code: bool = False) -> Loaded:
    """Load a version's ``merged`` weights, or its base model with the ``adapter`` applied.

    ``trust_remote_code`` comes from :func:`remote_code_trust` (the command line), never from the record.
    Raises what :func:`fetch_artifact` and :func:`job.model.pull_weights` raise, DataError when an artifact
    or the base fails :func:`check_artifact` or the base weights are not the ones the adapter was trained on,
    and ConfigError for an unknown artifact or template.
    """
    check_loadable(artifact)
    template = get_template(version.template_name)
    started = time.monotonic()
    backend = inference_backend()
    path = fetch_artifact(version, artifact)
    check_artifact(path, version, artifact, trust_remote_code=trust_remote_code)
    if artifact == "merged":
        model = backend.load_for_inference(path, max_seq_length=_max_seq_length(version),
                                           trust_remote_code=trust_remote_code)
    else:
        from peft import PeftModel

        # The adapter names its base by public id (hf://org/name -> org/name, else the URI); the base loaded
        # here is the one the version's record names, pulled into (or found in) the cache and checked.
        base_path = _pull_base(version, trust_remote_code)
        base = backend.load_for_inference(base_path, max_seq_length=_max_seq_length(version),
                                          load_in_4bit=version.trained_in_4bit, trust_remote_code=trust_remote_code)
        model = PeftModel.from_pretrained(base, str(path), is_trainable=False)
        for adapter_config in model.peft_config.values():  # mapped back: where this machine holds that base
            adapter_config.base_model_name_or_path = str(base_path)
    # The artifact's own tokenizer: the one training saved beside the weights it produced.
    loaded = Loaded(label=version.label, model=backend.for_inference(model),
                    tokenizer=_tokenizer(path, trust_remote_code), template=template,
                    backend=_LIBRARY.get(backend.name, backend.name))
    log.info("inference.loaded", ref=version.label, artifact=artifact, backend=loaded.backend,
             template=template.name, device=str(_device(loaded.model)), seconds=round(time.monotonic() - started, 2))
    return loaded


def load_base(version: Version, *, trust_remote_code: bool = False) -> Loaded:
    """The version's base model, untrained, asked with the version's template (``--compare base``)."""
    template = get_template(version.template_name)
    backend = inference_backend()
    path = _pull_base(version, trust_remote_code)
    uri, _ = version.base_uri()
    model = backend.for_inference(backend.load_for_inference(path, max_seq_length=_max_seq_length(version),
                                                             trust_remote_code=trust_remote_code))
    return Loaded(label=f"base {uri}", model=model, tokenizer=_tokenizer(path, trust_remote_code),
                  template=template, backend=_LIBRARY.get(backend.name, backend.name))


def _device(model: Any) -> Any:
    return next(model.parameters()).device


def unload(loaded: Loaded) -> None:
    """Free a model's memory before the next one loads (``--compare`` holds one model at a time)."""
    import torch

    loaded.model = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
