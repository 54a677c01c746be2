"""The pull stage for weights: base models from the hub, S3, a local directory, a GGUF file or a package.

Whatever the source, the result is a local directory of safetensors weights, config and tokenizer under the
cache (``MEDFT_CACHE``, default ``~/.cache/medft``), pulled once. Pickle weight files are never loaded, and
every safetensors header is checked against its file before any tensor is read.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from job.config import JobConfig
from registry.errors import AccessDeniedError, ConfigError, DataError, NotFoundError, TransientError
from registry.logs import get_logger
from registry.store import sha256_file

log = get_logger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja")


def cache_root() -> Path:
    root = Path(os.environ.get("MEDFT_CACHE") or Path.home() / ".cache" / "medft")
    root.mkdir(parents=True, exist_ok=True)
    return root


@dataclass(frozen=True)
class BaseWeights:
    """A base model on local disk, with what lineage records about it."""

    path: Path
    uri: str
    revision: str | None
    files: dict[str, str] = field(default_factory=dict)  # weight file -> sha256

    def lineage(self) -> dict[str, Any]:
        return {"uri": self.uri, "revision": self.revision, "sha256": self.files}


def is_prequantized(uri: str) -> bool:
    """A base already quantized to 4 bits cannot be the merge target (its 16-bit weights are gone)."""
    name = uri.rstrip("/").lower()
    return any(tag in name for tag in ("bnb-4bit", "-4bit", "gptq", "awq"))


def check_weights_plan(cfg: JobConfig) -> None:
    """Refuse at start what would only fail after training. Raises ConfigError."""
    if cfg.export.merge and is_prequantized(cfg.model.base) and not cfg.model.merge_base:
        raise ConfigError(f"model.base {cfg.model.base!r} is pre-quantized, so the merge has no 16-bit weights: "
                          "set model.merge_base to the 16-bit model's URI, or export.merge=false")


def validate_safetensors(path: Path) -> None:
    """Check a safetensors header against the file's real size before anything reads a tensor.

    Raises DataError naming the file when the header is malformed or points outside the file.
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise DataError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 * 2**20):
            raise DataError(f"{path}: safetensors header claims {n} bytes in a {size}-byte file; file is corrupt")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise DataError(f"{path}: safetensors header is not valid JSON; file is corrupt") from None
    data_len = size - 8 - n
    if not isinstance(header, dict):
        raise DataError(f"{path}: safetensors header is not a mapping; file is corrupt")
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = info["data_offsets"]
            count = 1
            for d in info["shape"]:
                count *= int(d)
            width = _DTYPE_BYTES[info["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{path}: tensor {name!r} has a malformed header entry; file is corrupt") from None
        if not (0 <= start <= end <= data_len) or end - start != count * width:
            raise DataError(f"{path}: tensor {name!r} claims bytes {start}..{end} for shape {info['shape']} "
                            f"{info['dtype']} in {data_len} data bytes; the header lies about sizes")


def _hash_weights(weights_dir: Path) -> dict[str, str]:
    """sha256 of every weight file, memoised beside the cache keyed by path, size and mtime."""
    memo_path = cache_root() / "hashes.json"
    memo: dict[str, str] = json.loads(memo_path.read_text()) if memo_path.exists() else {}
    out = {}
    for f in sorted(weights_dir.glob("*.safetensors")):
        real = f.resolve()
        st = real.stat()
        key = f"{real}:{st.st_size}:{st.st_mtime_ns}"
        out[f.name] = memo.get(key) or sha256_file(real)
        memo[key] = out[f.name]
    tmp = memo_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(memo))
    tmp.replace(memo_path)
    return out


def check_weights_dir(path: Path, uri: str) -> None:
    """A weights directory must hold config.json and safetensors; pickles alone are refused."""
    if not (path / "config.json").exists():
        raise NotFoundError(f"{uri}: no config.json; point model.base at a Hugging Face model directory")
    safetensors = list(path.glob("*.safetensors"))
    if not safetensors:
        pickles = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise DataError(f"{uri}: only pickle weights ({', '.join(sorted(pickles)[:3])}); medft loads "
                            "safetensors only because pickles can run code: convert them to safetensors")
        raise NotFoundError(f"{uri}: no *.safetensors weight files")
    for f in safetensors:
        validate_safetensors(f)


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

    from job.export import write_sharded

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


def resolve_local(uri: str) -> Path:
    """Map ``pkg://package/file``, ``file://`` and plain paths to a local path (no download)."""
    if uri.startswith("pkg://"):
        package, _, rel = uri.removeprefix("pkg://").partition("/")
        # find_spec locates the package without running its __init__ (which may import what is absent).
        spec = importlib.util.find_spec(package) if package.isidentifier() else None
        if spec is None or not spec.submodule_search_locations:
            raise NotFoundError(f"{uri}: package {package!r} is not installed (make install installs it)")
        return Path(next(iter(spec.submodule_search_locations))) / rel
    return Path(uri.removeprefix("file://")).expanduser()


def pull_weights(uri: str, revision: str | None) -> BaseWeights:
    """Make ``uri``'s weights available locally and check them. Raises the errors of each source."""
    if uri.startswith("hf://"):
        path = _pull_hf(uri.removeprefix("hf://"), revision)
    elif uri.startswith("s3://"):
        path = _pull_s3(uri)
    else:
        local = resolve_local(uri)
        if not local.exists():
            raise NotFoundError(f"{uri}: no such file or directory")
        if local.suffix in PICKLE_SUFFIXES:
            raise DataError(f"{uri}: pickle weights are refused because they can run code; use safetensors")
        path = _convert_gguf(local) if local.suffix == ".gguf" else local
    check_weights_dir(path, uri)
    weights = BaseWeights(path=path, uri=uri, revision=revision, files=_hash_weights(path))
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
        if cfg.model.base.startswith("hf://"):
            path = _pull_hf(cfg.model.base.removeprefix("hf://"), cfg.model.revision,
                            tuple(f for f in _SIDE_FILES if f != "config.json"))
        elif cfg.model.base.startswith("s3://"):
            path = _pull_s3(cfg.model.base)
        else:
            local = resolve_local(cfg.model.base)
            path = _convert_gguf(local) if local.suffix == ".gguf" else local
        return load_tokenizer(path, cfg)
    except Exception as e:  # noqa: BLE001 - statistics are optional; the rows were already validated
        log.warning("data.no_tokenizer", base=cfg.model.base, reason=f"{e.__class__.__name__}: {e}")
        return None
