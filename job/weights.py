"""Weights on local disk, safetensors only: the sha256 of its weight files for lineage, and writing tensors as
shards. The checks a weights directory must pass before anything loads from it (header validation, no pickles, no
code) are :mod:`registry.artifact_checks`, re-exported here.

Imports no stage and no torch at import time (the pull, export and inference stages all use it).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from job.paths import cache_root
from registry.artifact_checks import (  # noqa: F401 - the checks live below job/, where registration uses them too
    PICKLE_SUFFIXES,
    check_weights_dir,
    refuse_pickles,
    remote_code,
    validate_safetensors,
)
from registry.errors import TransientError
from registry.store import sha256_file

if TYPE_CHECKING:
    import torch

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


def write_sharded(tensors: Iterator[tuple[str, torch.Tensor]], dest: Path, *, shard_size: int) -> list[str]:
    """Write named tensors as safetensors shards of at most ``shard_size`` bytes (one tensor may exceed it).

    One shard is written as ``model.safetensors``; several as ``model-0000i-of-0000n.safetensors`` with a
    ``model.safetensors.index.json``. A full shard is written by a second thread while ``tensors`` produces the
    next one (the merge computes while the disk writes), and at most one shard waits for the disk, so host
    memory stays about two shards. Returns the shard file names. Disk full raises TransientError.
    """
    from concurrent.futures import Future, ThreadPoolExecutor

    from safetensors import SafetensorError
    from safetensors.torch import save_file

    dest.mkdir(parents=True, exist_ok=True)
    shards: list[list[str]] = []
    pending: dict[str, torch.Tensor] = {}
    pending_bytes, total = 0, 0
    writing: Future[None] | None = None

    def save(part: dict[str, torch.Tensor], path: Path) -> None:
        try:
            save_file(part, str(path), metadata={"format": "pt"})
        except (OSError, SafetensorError) as e:  # safetensors reports a full disk as its own error
            raise TransientError(f"{dest}: cannot write a shard ({getattr(e, 'strerror', None) or e}); free "
                                 "disk space and rerun with the same run id") from None

    def wait() -> None:
        nonlocal writing
        if writing is not None:
            done, writing = writing, None
            done.result()  # re-raises the writer's TransientError here, in the caller's thread

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer") as writer:
        def flush() -> None:
            nonlocal pending, pending_bytes, writing
            if pending:
                wait()
                writing = writer.submit(save, pending, dest / f"part-{len(shards) + 1:05d}.safetensors")
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
        wait()
    # When ``tensors`` raises, leaving the executor still waits for the shard on its way to disk, and the
    # producer's error is the one reported.
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
