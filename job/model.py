"""The pull stage for weights: base models from the hub, S3, a local directory, a GGUF file or a package.

Whatever the source, the result is a local directory of safetensors weights, config and tokenizer under the
cache (``MEDFT_CACHE``, default ``~/.cache/medft``), pulled once. Pickle weight files are never loaded, and
every safetensors header is checked against its file before any tensor is read.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from job.config import JobConfig
from job.paths import cache_root, is_prequantized, resolve_local
from job.weights import PICKLE_SUFFIXES, check_weights_dir, hash_weights, write_sharded
from registry.errors import AccessDeniedError, ConfigError, DataError, NotFoundError, TransientError
from registry.logs import get_logger
from registry.uris import parse_uri

log = get_logger(__name__)

_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja")



@dataclass(frozen=True)
class BaseWeights:
    """A base model on local disk, with what lineage records about it."""

    path: Path
    uri: str
    revision: str | None
    files: dict[str, str] = field(default_factory=dict)  # weight file -> sha256

    def lineage(self) -> dict[str, Any]:
        return {"uri": self.uri, "revision": self.revision, "sha256": self.files}



def check_weights_plan(cfg: JobConfig) -> None:
    """Refuse at start what would only fail after training. Raises ConfigError."""
    if cfg.export.merge and is_prequantized(cfg.model.base) and not cfg.model.merge_base:
        raise ConfigError(f"model.base {cfg.model.base!r} is pre-quantized, so the merge has no 16-bit weights: "
                          "set model.merge_base to the 16-bit model's URI, or export.merge=false")





def _pull_hf(repo: str, revision: str | None,
             patterns: tuple[str, ...] = ("*.safetensors", "*.safetensors.index.json", *_SIDE_FILES)) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(snapshot_download(
            repo, revision=revision, token=os.environ.get("HF_TOKEN") or None,
            cache_dir=os.environ.get("HF_HUB_CACHE") or cache_root() / "hf",
            allow_patterns=list(patterns)))
    except GatedRepoError:
        raise AccessDeniedError(f"hf://{repo}: gated or private; set HF_TOKEN to a token with access") from None
    except RepositoryNotFoundError:
        raise NotFoundError(f"hf://{repo}: no such model on the hub (or HF_TOKEN lacks access)") from None
    except RevisionNotFoundError:
        raise NotFoundError(f"hf://{repo}: revision {revision!r} not found") from None
    except LocalEntryNotFoundError:
        raise NotFoundError(f"hf://{repo}: not in the local cache and the hub is unreachable or HF_HUB_OFFLINE "
                            "is set; pull it once with network access or point model.base at a local copy") from None
    except OSError as e:
        raise TransientError(f"hf://{repo}: download failed ({e.__class__.__name__}); retry") from None


def _pull_s3(uri: str) -> Path:
    from registry.store import open_store

    dest = cache_root() / "s3" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    done = dest / ".medft-complete"
    if not done.exists():
        open_store(uri).get_dir("", dest)
        done.write_text(uri)
    return dest


def _convert_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF checkpoint once into a safetensors directory in the cache."""
    st = gguf.stat()
    key = hashlib.sha256(f"v3:{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    dest = cache_root() / "gguf" / key
    if (dest / ".medft-complete").exists():
        return dest
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("weights.gguf_convert", file=str(gguf), dest=str(dest))
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=dest.name + "."))
    # A GGUF-loaded model refuses save_pretrained; tied weights are stored once, as transformers expects.
    state, seen = {}, set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        state[name] = tensor.to(torch.float16).contiguous()
    write_sharded(iter(state.items()), tmp, shard_size=2 * 1024**3)
    model.config.dtype = "float16"
    # The weights are plain float16 now; a leftover GGUF quantization_config would make them untrainable.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    # transformers' GGUF tokenizer import can label the wrong special tokens (SmolLM2 comes out with
    # eos=<|im_start|>); the model's own generation config says which ids end and begin a turn.
    for role in ("eos", "bos"):
        token_id = getattr(model.generation_config, f"{role}_token_id", None)
        if isinstance(token_id, list):
            token_id = token_id[0] if token_id else None
        if token_id is not None:
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(int(token_id)))
    tokenizer.save_pretrained(tmp)
    (tmp / ".medft-complete").write_text(str(gguf))
    try:
        tmp.replace(dest)
    except OSError:  # another job converted the same file first; theirs is complete, ours is discarded
        shutil.rmtree(tmp, ignore_errors=True)
    return dest



def pull_weights(uri: str, revision: str | None) -> BaseWeights:
    """Make ``uri``'s weights available locally and check them. Raises the errors of each source."""
    location = parse_uri(uri)
    if location.scheme == "hf":
        path = _pull_hf(location.path, revision)
    elif location.scheme == "s3":
        path = _pull_s3(uri)
    else:
        local = resolve_local(uri)
        if not local.exists():
            raise NotFoundError(f"{uri}: no such file or directory")
        if local.suffix in PICKLE_SUFFIXES:
            raise DataError(f"{uri}: pickle weights are refused because they can run code; use safetensors")
        path = _convert_gguf(local) if local.suffix == ".gguf" else local
    check_weights_dir(path, uri)
    weights = BaseWeights(path=path, uri=uri, revision=revision, files=hash_weights(path))
    log.info("weights.ready", uri=uri, path=str(path), files=len(weights.files))
    return weights


def load_tokenizer(path: Path, cfg: JobConfig) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenizer_for_report(cfg: JobConfig) -> Any | None:
    """model.base's tokenizer for data statistics, or None (logged) when it cannot be had here."""
    try:
        location = parse_uri(cfg.model.base)
        if location.scheme == "hf":
            path = _pull_hf(location.path, cfg.model.revision,
                            tuple(f for f in _SIDE_FILES if f != "config.json"))
        elif location.scheme == "s3":
            path = _pull_s3(cfg.model.base)
        else:
            local = resolve_local(cfg.model.base)
            path = _convert_gguf(local) if local.suffix == ".gguf" else local
        return load_tokenizer(path, cfg)
    except Exception as e:  # noqa: BLE001 - statistics are optional; the rows were already validated
        log.warning("data.no_tokenizer", base=cfg.model.base, reason=f"{e.__class__.__name__}: {e}")
        return None
