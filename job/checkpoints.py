"""Resumable training state in the store, complete or not at all.

Layout: ``runs/<run_id>/checkpoints/checkpoint-<step>/...`` holds what the trainer saved (adapter, optimizer,
scheduler, RNG, trainer state with the data position). ``COMPLETE.json`` is written last, create-only, with
every file's sha256 and the library versions; a checkpoint without it (a job killed mid-upload) is ignored.
Restoring verifies every checksum, refuses other library versions, and screens every pickle before torch
opens it, so a crafted file is refused before anything executes.
"""

from __future__ import annotations

import json
import pickletools
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

from registry.errors import ConfigError, DataError
from registry.logs import get_logger
from registry.store import PreconditionFailed, Store

log = get_logger(__name__)

COMPLETE = "COMPLETE.json"
KEEP = 2  # complete checkpoints kept in the store; older ones are deleted once a newer one is complete
_STEP = re.compile(r"^checkpoint-(\d+)$")

# Modules a trainer checkpoint's pickles may name: tensors, numpy RNG state, plain containers.
_SAFE_PICKLE_MODULES = ("torch", "numpy", "collections", "_codecs", "builtins")


def library_versions() -> dict[str, str]:
    """Versions that must match for optimizer and RNG state to mean the same thing on resume."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("medft", "torch", "transformers", "trl", "peft"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    out["torch"] = out["torch"].split("+")[0]  # a CUDA and a CPU build of one release keep one format
    return out


def _pickle_globals(data: bytes) -> list[str]:
    """Every ``module.name`` a pickle would import, found without unpickling it."""
    names, strings = [], []
    for op, arg, _pos in pickletools.genops(data):
        if op.name in ("GLOBAL", "INST"):
            names.append(str(arg).replace(" ", "."))
        elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
            names.append(f"{strings[-2]}.{strings[-1]}")
        if isinstance(arg, str):
            strings.append(arg)
    return names


def screen_pickle(path: Path) -> None:
    """Refuse a torch/pickle file that would import anything beyond tensors and plain containers.

    Raises DataError naming the file and the offending global.
    """
    blobs: list[bytes] = []
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            blobs = [zf.read(n) for n in zf.namelist() if n.endswith(".pkl")]
    else:
        blobs = [path.read_bytes()]
    for blob in blobs:
        try:
            names = _pickle_globals(blob)
        except Exception as e:  # noqa: BLE001 - any parse failure means "not a pickle we trust"
            raise DataError(f"{path}: not a valid pickle ({e}); delete this checkpoint to start over") from None
        for name in names:
            if not name.split(".")[0] in _SAFE_PICKLE_MODULES or name.startswith(("builtins.eval", "builtins.exec",
                                                                                   "builtins.__import__",
                                                                                   "builtins.getattr",
                                                                                   "builtins.open")):
                raise DataError(f"{path}: pickle imports {name!r}, which a training checkpoint never needs; "
                                "refusing to load it (delete this checkpoint to start over)")


@dataclass(frozen=True)
class CheckpointRef:
    step: int
    key: str  # prefix in the store, e.g. checkpoints/checkpoint-20
    files: dict[str, str]  # relative path -> sha256
    versions: dict[str, str]


class Checkpointer:
    """Uploads trainer checkpoints to ``store`` (a run's prefix) and finds the latest complete one."""

    def __init__(self, store: Store, *, versions: dict[str, str] | None = None) -> None:
        self.store = store
        self.versions = versions or library_versions()

    def complete(self) -> list[CheckpointRef]:
        """Complete checkpoints, oldest first; incomplete ones are ignored (and logged)."""
        refs, seen = [], set()
        for key in self.store.list("checkpoints/"):
            parts = key.split("/")
            if len(parts) < 3 or not _STEP.match(parts[1]):
                continue
            seen.add(parts[1])
            if parts[2] != COMPLETE:
                continue
            doc = json.loads(self.store.get_bytes(key)[0])
            refs.append(CheckpointRef(step=int(doc["step"]), key=f"checkpoints/{parts[1]}",
                                      files=doc["files"], versions=doc["versions"]))
        incomplete = seen - {r.key.split("/")[1] for r in refs}
        if incomplete:
            log.warning("checkpoint.incomplete_ignored", checkpoints=sorted(incomplete))
        return sorted(refs, key=lambda r: r.step)

    def latest(self) -> CheckpointRef | None:
        refs = self.complete()
        return refs[-1] if refs else None

    def upload(self, local_dir: Path, step: int) -> CheckpointRef:
        """Upload one trainer checkpoint, then its COMPLETE marker; prune older complete ones."""
        key = f"checkpoints/checkpoint-{step}"
        # The trainer pickles its arguments here but never reads them back on resume; the run's config is
        # already stored as YAML, so this pickle would only be something to screen and refuse.
        (local_dir / "training_args.bin").unlink(missing_ok=True)
        infos = self.store.put_dir(key, local_dir)
        files = {info.key.removeprefix(key + "/"): info.sha256 for info in infos}
        doc = {"step": step, "files": files, "versions": self.versions}
        try:
            self.store.put_bytes(f"{key}/{COMPLETE}", json.dumps(doc, indent=1).encode(), if_absent=True)
        except PreconditionFailed:
            log.info("checkpoint.already_complete", step=step)
        ref = CheckpointRef(step=step, key=key, files=files, versions=self.versions)
        log.info("checkpoint.uploaded", step=step, uri=self.store.url(key), files=len(files))
        for old in self.complete()[:-KEEP]:
            for rel in [*old.files, COMPLETE]:
                self.store.delete(f"{old.key}/{rel}")
        return ref

    def restore(self, ref: CheckpointRef, dest_root: Path) -> Path:
        """Download ``ref`` into ``dest_root/checkpoint-<step>``, verified and screened.

        Raises ConfigError when it was written by other library versions, DataError when a file fails its
        checksum or holds a pickle that imports code.
        """
        if ref.versions != self.versions:
            diff = {k: f"{ref.versions.get(k)} != {v}" for k, v in self.versions.items()
                    if ref.versions.get(k) != v}
            raise ConfigError(f"{self.store.url(ref.key)}: checkpoint written by other library versions "
                              f"({diff}); install those versions to resume, or start a new output.run_id")
        dest = dest_root / f"checkpoint-{ref.step}"
        self.store.get_dir(ref.key, dest, expected=ref.files)
        for path in dest.rglob("*"):
            if path.suffix in (".pt", ".pth", ".bin", ".pkl"):
                screen_pickle(path)
        log.info("checkpoint.restored", step=ref.step, uri=self.store.url(ref.key))
        return dest
