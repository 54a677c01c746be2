"""Weights on local disk, safetensors only: header validation, the checks a weights directory must pass before
anything loads from it, the sha256 of its weight files for lineage, and writing tensors as shards.

Imports no stage and no torch at import time (the pull, export and inference stages all use it).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from job.paths import cache_root
from registry.errors import DataError, NotFoundError, TransientError
from registry.store import sha256_file

if TYPE_CHECKING:
    import torch

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


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


def hash_weights(weights_dir: Path) -> dict[str, str]:
    """sha256 of every weight file, memoised beside the cache keyed by path, size and mtime.

    Every ``*.safetensors`` file is hashed, which covers every file a load reads: :func:`check_weights_dir`
    refuses a directory holding any other kind of weight file before this runs.
    """
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


def _is_pickle_weights(name: str) -> bool:
    """A pickle weight file, or the index of sharded pickles (``pytorch_model.bin.index.json``)."""
    if name.endswith(".index.json"):
        return not name.endswith(".safetensors.index.json")
    return Path(name).suffix in PICKLE_SUFFIXES


def refuse_pickles(path: Path, uri: str) -> None:
    """Refuse a directory holding any pickle weight file, named, even beside safetensors (DataError).

    A pickle can run code when loaded, and a loader that finds one may prefer it to the safetensors next to it
    (transformers did, with a decoy ``extra.safetensors`` beside ``pytorch_model.bin``).
    """
    names = sorted(p.name for p in path.iterdir() if p.is_file() and _is_pickle_weights(p.name))
    if not names:
        return
    if not any(path.glob("*.safetensors")):
        raise DataError(f"{uri}: only pickle weights ({', '.join(names[:3])}); medft loads safetensors only "
                        "because pickles can run code: convert them to safetensors")
    raise DataError(f"{uri}: {names[0]} is a pickle weight file beside the safetensors; medft refuses a directory "
                    "holding pickles (they can run code, and a loader may pick them): remove "
                    f"{', '.join(names[:3])} and keep the safetensors")


def _indexed_shards(path: Path, uri: str) -> list[Path]:
    """The shards ``model.safetensors.index.json`` names: plain safetensors file names, each present."""
    index = path / "model.safetensors.index.json"
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise DataError(f"{uri}: model.safetensors.index.json is not a safetensors index (a JSON object with a "
                        "weight_map of tensor -> file name); the directory is corrupt") from None
    shards = []
    for name in dict.fromkeys(weight_map.values()):
        if Path(name).name != name or name in (".", "..") or not name.endswith(".safetensors"):
            raise DataError(f"{uri}: model.safetensors.index.json names {name!r}, not a safetensors file in the "
                            "directory; medft loads safetensors only")
        if not (path / name).is_file():
            raise DataError(f"{uri}: model.safetensors.index.json lists {name}, which is missing; the directory "
                            "is incomplete")
        shards.append(path / name)
    if not shards:
        raise DataError(f"{uri}: model.safetensors.index.json lists no weight files; the directory is corrupt")
    return shards


def check_weights_dir(path: Path, uri: str) -> list[Path]:
    """A weights directory: config.json and safetensors weights only, every header true. Returns the weight files
    a load reads (``model.safetensors``, or the shards its index lists).

    Refused before anything loads, naming the file: any pickle weight file (DataError, also beside
    safetensors), an index naming files that are not safetensors or are missing (DataError), safetensors
    without ``model.safetensors`` or its index (DataError: a loader would find nothing it may read), a header
    that lies about its tensors (DataError). No config.json or no weights at all: NotFoundError.
    """
    if not (path / "config.json").exists():
        raise NotFoundError(f"{uri}: no config.json; point model.base at a Hugging Face model directory")
    refuse_pickles(path, uri)
    safetensors = sorted(path.glob("*.safetensors"))
    if not safetensors:
        raise NotFoundError(f"{uri}: no *.safetensors weight files")
    if (path / "model.safetensors.index.json").exists():
        used = _indexed_shards(path, uri)
    elif (path / "model.safetensors").is_file():
        used = [path / "model.safetensors"]
    else:
        raise DataError(f"{uri}: has {safetensors[0].name} but neither model.safetensors nor "
                        "model.safetensors.index.json, so no loader would read it; rename it or add the index")
    for f in safetensors:  # the unused ones too: lineage hashes every safetensors file here
        validate_safetensors(f)
    return used


#: Files whose ``auto_map`` tells transformers to import code from the model's folder (under trust_remote_code).
_CODE_MAPS = ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json",
              "feature_extractor_config.json", "image_processor_config.json")


def remote_code(path: Path) -> list[str]:
    """What in a model folder names code to run: ``auto_map`` entries and ``.py`` files (empty when none).

    transformers runs such code only with ``trust_remote_code=True``; callers that must never run it refuse a
    folder for which this is not empty, so the refusal is one clear line rather than a loader's exception.
    Raises DataError naming a mapping file that is not a JSON object.
    """
    found = []
    for name in _CODE_MAPS:
        f = path / name
        if not f.is_file():
            continue
        try:
            doc = json.loads(f.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise DataError(f"{f}: not valid JSON; the model folder is corrupt") from None
        if not isinstance(doc, dict):
            raise DataError(f"{f}: not a JSON object; the model folder is corrupt")
        if doc.get("auto_map"):
            found.append(f"{name} auto_map ({', '.join(sorted(map(str, doc['auto_map'])))[:80]})")
    found += sorted(str(p.relative_to(path)) for p in path.rglob("*.py"))
    return found


def write_sharded(tensors: Iterator[tuple[str, torch.Tensor]], dest: Path, *, shard_size: int) -> list[str]:
    """Write named tensors as safetensors shards of at most ``shard_size`` bytes (one tensor may exceed it).

    One shard is written as ``model.safetensors``; several as ``model-0000i-of-0000n.safetensors`` with a
    ``model.safetensors.index.json``. Returns the shard file names. Disk full raises TransientError.
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    dest.mkdir(parents=True, exist_ok=True)
    shards: list[list[str]] = []
    pending: dict[str, torch.Tensor] = {}
    pending_bytes, total = 0, 0

    def flush() -> None:
        nonlocal pending, pending_bytes
        if pending:
            try:
                save_file(pending, str(dest / f"part-{len(shards) + 1:05d}.safetensors"), metadata={"format": "pt"})
            except (OSError, SafetensorError) as e:  # safetensors reports a full disk as its own error
                raise TransientError(f"{dest}: cannot write a shard ({getattr(e, 'strerror', None) or e}); free "
                                     "disk space and rerun with the same run id") from None
            shards.append(list(pending))
            pending, pending_bytes = {}, 0

    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if pending and pending_bytes + nbytes > shard_size:
            flush()
        pending[name] = tensor
        pending_bytes += nbytes
        total += nbytes
    flush()
    if len(shards) == 1:
        (dest / "part-00001.safetensors").replace(dest / "model.safetensors")
        return ["model.safetensors"]
    names = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    weight_map = {}
    for i, (keys, name) in enumerate(zip(shards, names), start=1):
        (dest / f"part-{i:05d}.safetensors").replace(dest / name)
        weight_map.update({k: name for k in keys})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (dest / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return names
