"""Weights on local disk, safetensors only: the sha256 of its weight files for lineage, and writing tensors as
shards. The checks a weights directory must pass before anything loads from it (header validation, no pickles, no
code) are :mod:`registry.artifact_checks`, re-exported here.

Imports no stage and no torch at import time (the pull, export and inference stages all use it).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
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


def plan_shards(sizes: list[tuple[str, int]], shard_size: int) -> list[tuple[str, list[str]]]:
    """(file name, tensor names) of each shard for tensors of ``sizes`` (name, bytes) in that order: a shard
    closes before the tensor that would take it past ``shard_size`` (one tensor may exceed it alone). One shard
    is ``model.safetensors``; several are ``model-0000i-of-0000n.safetensors``, as transformers names them."""
    groups: list[list[str]] = []
    current: list[str] = []
    current_bytes = 0
    for name, nbytes in sizes:
        if current and current_bytes + nbytes > shard_size:
            groups.append(current)
            current, current_bytes = [], 0
        current.append(name)
        current_bytes += nbytes
    if current:
        groups.append(current)
    if len(groups) == 1:
        return [("model.safetensors", groups[0])]
    return [(f"model-{i:05d}-of-{len(groups):05d}.safetensors", g) for i, g in enumerate(groups, start=1)]


def write_sharded(tensors: Iterator[tuple[str, torch.Tensor]], dest: Path, *, sizes: list[tuple[str, int]],
                  shard_size: int, on_written: Callable[[Path], None] = lambda path: None) -> list[str]:
    """Write named tensors as the shards :func:`plan_shards` plans for ``sizes``, with a
    ``model.safetensors.index.json`` when there are several; returns the shard file names.

    ``tensors`` must come in the order of ``sizes``, each of its planned size. Every shard is written under its
    final name at once, so ``on_written(path)`` (called from the writer thread when a shard is complete on disk)
    can hand it on, for example to an upload, while the next shards are produced. A full shard is written by a
    second thread while ``tensors`` produces the next one, and at most one shard waits for the disk, so host
    memory stays about two shards. Disk full raises TransientError; a tensor out of plan raises RuntimeError.
    """
    from concurrent.futures import Future, ThreadPoolExecutor

    from safetensors import SafetensorError
    from safetensors.torch import save_file

    dest.mkdir(parents=True, exist_ok=True)
    plan = plan_shards(sizes, shard_size)
    planned = dict(sizes)
    writing: Future[None] | None = None

    def save(part: dict[str, torch.Tensor], path: Path) -> None:
        try:
            save_file(part, str(path), metadata={"format": "pt"})
        except (OSError, SafetensorError) as e:  # safetensors reports a full disk as its own error
            raise TransientError(f"{dest}: cannot write a shard ({getattr(e, 'strerror', None) or e}); free "
                                 "disk space and rerun with the same run id") from None
        on_written(path)

    def wait() -> None:
        nonlocal writing
        if writing is not None:
            done, writing = writing, None
            done.result()  # re-raises the writer's error here, in the caller's thread

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer") as writer:
        produced = iter(tensors)
        for file_name, names in plan:
            part = {}
            for expected in names:
                name, tensor = next(produced, (None, None))
                if name != expected or tensor.numel() * tensor.element_size() != planned[expected]:
                    raise RuntimeError(f"{dest}: got tensor {name!r} where the shard plan has {expected!r} "
                                       f"of {planned[expected]} bytes")
                part[name] = tensor
            wait()
            writing = writer.submit(save, part, dest / file_name)
        # Run ``tensors`` to its end: a generator's checks after its last tensor run only then.
        extra = next(produced, None)
        if extra is not None:
            raise RuntimeError(f"{dest}: got tensor {extra[0]!r} after the last one the shard plan has")
        wait()
    # When ``tensors`` raises, leaving the executor still waits for the shard on its way to disk, and the
    # producer's error is the one reported.
    if len(plan) > 1:
        index = {"metadata": {"total_size": sum(planned.values())},
                 "weight_map": dict(sorted((name, file_name) for file_name, names in plan for name in names))}
        (dest / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return [file_name for file_name, _ in plan]
