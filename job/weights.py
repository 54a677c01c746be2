"""Weight files on local disk, checked and written: safetensors headers checked against their files before any
tensor is read, pickles refused, sha256 of every weight file, and safetensors shards written as they fill.
Imports no stage."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from job.paths import cache_root
from registry.errors import DataError, NotFoundError, TransientError
from registry.store import sha256_file

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

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


def write_sharded(tensors: Iterator[tuple[str, torch.Tensor]], dest: Path, *, shard_size: int) -> list[str]:
    """Write named tensors as safetensors shards of at most ``shard_size`` bytes (one tensor may exceed it).

    One shard is written as ``model.safetensors``; several as ``model-0000i-of-0000n.safetensors`` with a
    ``model.safetensors.index.json``. Returns the shard file names. Disk full raises TransientError.
    """
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
