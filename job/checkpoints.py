"""Resumable training state in the store, complete or not at all.

Layout: ``runs/<run_id>/checkpoints/checkpoint-<step>/...`` holds what the trainer saved (adapter, optimizer,
scheduler, RNG, trainer state with the data position). ``COMPLETE.json`` is written last, create-only, with
every file's sha256 and the library versions; a checkpoint without it (a job killed mid-upload) is ignored.
Restoring verifies every checksum, refuses other library versions, and screens every pickle before torch
opens it, so a crafted file is refused before anything executes.
"""

from __future__ import annotations

import _compat_pickle
import io
import json
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from registry.errors import ConfigError, DataError
from registry.logs import get_logger
from registry.store import PreconditionFailed, Store

log = get_logger(__name__)

COMPLETE = "COMPLETE.json"
KEEP = 2  # complete checkpoints kept in the store; older ones are deleted once a newer one is complete
_STEP = re.compile(r"^checkpoint-(\d+)$")

# Exactly the globals a trainer checkpoint's pickles name: tensor rebuilders, storage classes and dtypes, numpy's
# RNG state, plain containers. Never whole modules: torch and numpy also hold functions that run code
# (numpy.testing's runstring, torch.hub.load).
_SAFE_PICKLE_GLOBALS = frozenset({
    "collections.OrderedDict", "_codecs.encode", "builtins.set", "builtins.frozenset", "builtins.slice",
    "builtins.complex", "builtins.bytearray", "torch._utils._rebuild_tensor", "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_tensor_v3", "torch._utils._rebuild_parameter", "torch._utils._rebuild_parameter_with_state",
    "torch._tensor._rebuild_from_type_v2", "torch.device", "torch.Size", "numpy.ndarray", "numpy.dtype",
    "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct", "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
})
_SAFE_PICKLE_CLASSES = re.compile(r"^(torch\.[A-Za-z0-9]*Storage|numpy\.dtypes\.[A-Za-z0-9]+DType)$")
_TORCH_LEGACY_PICKLES = 5  # torch's pre-zip format: magic, protocol, sys info, data, storage keys; raw bytes follow


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


def _safe_global(name: str) -> bool:
    if name in _SAFE_PICKLE_GLOBALS or _SAFE_PICKLE_CLASSES.match(name):
        return True
    module, _, attr = name.rpartition(".")
    if module == "torch" and attr.isidentifier():  # dtypes (torch.float32, ...); torch is loaded by then
        import torch

        return isinstance(vars(torch).get(attr), torch.dtype)  # vars(): no lazy import of a submodule
    return False


class _Refused(Exception):
    pass


class _Placeholder:
    """Stands in for every allowed global while screening: nothing a pickle names is ever called."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


class _ScreeningUnpickler(pickle.Unpickler):
    """Walks a pickle as the real unpickler would, resolving every global through ``find_class`` (so memo and
    stack tricks cannot hide one), but refuses any global not allowed and returns placeholders for the rest."""

    def find_class(self, module: str, name: str) -> Any:
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))  # Python 2 names, as
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)  # pickle maps them (torch.save: protocol 2)
        if not _safe_global(f"{module}.{name}"):
            raise _Refused(f"{module}.{name}")
        return _Placeholder

    def persistent_load(self, pid: Any) -> None:
        return None


def screen_pickle(path: Path) -> None:
    """Refuse a torch/pickle file that would import anything beyond tensors and plain containers.

    Files are told apart as torch.load does (a zip archive starts with ``PK\\x03\\x04``; anything else is read
    as consecutive pickles). Raises DataError naming the file and the offending global.
    """
    with path.open("rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"
    blobs: list[tuple[bytes, int]] = []
    try:
        if is_zip:
            with zipfile.ZipFile(path) as zf:
                blobs = [(zf.read(n), 1) for n in zf.namelist() if n.endswith(".pkl")]
        else:
            blobs = [(path.read_bytes(), _TORCH_LEGACY_PICKLES)]
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"{path}: not a readable torch file ({e}); delete this checkpoint to start over") from None
    for blob, count in blobs:
        stream = io.BytesIO(blob)
        for i in range(count):
            if i and stream.tell() >= len(blob):
                break
            try:
                _ScreeningUnpickler(stream).load()
            except _Refused as e:
                raise DataError(f"{path}: pickle imports {str(e)!r}, which a training checkpoint never needs; "
                                "refusing to load it (delete this checkpoint to start over)") from None
            except Exception as e:  # noqa: BLE001 - any parse failure means "not a pickle we trust"
                if i:
                    break  # the raw tensor bytes after the pickles of torch's legacy format
                raise DataError(f"{path}: not a valid pickle ({e}); delete this checkpoint to start over") from None


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
            refs.append(self._read_complete(key, parts[1]))
        incomplete = seen - {r.key.split("/")[1] for r in refs}
        if incomplete:
            log.warning("checkpoint.incomplete_ignored", checkpoints=sorted(incomplete))
        return sorted(refs, key=lambda r: r.step)

    def _read_complete(self, key: str, name: str) -> CheckpointRef:
        """A COMPLETE.json as a CheckpointRef; DataError (exit 3) naming it when it is corrupt."""
        try:
            doc = json.loads(self.store.get_bytes(key)[0])
            ref = CheckpointRef(step=int(doc["step"]), key=f"checkpoints/{name}", files=doc["files"],
                                versions=doc["versions"])
            if not (isinstance(ref.files, dict) and isinstance(ref.versions, dict)
                    and all(isinstance(k, str) and isinstance(v, str) for k, v in ref.files.items())):
                raise TypeError("'files' and 'versions' must map names to strings")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise DataError(f"{self.store.url(key)} is corrupt ({e.__class__.__name__}: {str(e)[:80]}); delete "
                            f"{self.store.url(f'checkpoints/{name}')}/ to resume from the checkpoint before it") from None
        return ref

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
