"""The checks a model folder must pass before anything loads from it, or the registry lists it.

One implementation for every place that trusts a folder of weights: the pull stage (``model.base``), ``medft
generate``/``chat``/``eval`` on a fetched artifact (:mod:`job.inference.checks`), and ``medft registry register``,
which runs them on the stored run before writing a version, so the registry never lists a version that loading
would refuse. The rules: safetensors weights only (no pickle weight file, even beside safetensors), an index
naming present safetensors files, every safetensors header true to the file's size, and no code to run
(``auto_map`` entries, ``.py`` files) unless the caller trusts it.

The checks read a :class:`Folder`: a local directory (:class:`LocalFolder`, or a plain ``Path``) or the files a
manifest lists in a store (:class:`StoreFolder`: only config files and safetensors headers are read, with
ranged reads, never the weights). Torch-free; imports nothing of ``job``. Refusals are DataError (exit 3)
naming the file; a folder with no config.json or no weights is NotFoundError (exit 4).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Protocol

from registry.errors import DataError, NotFoundError

if TYPE_CHECKING:
    from registry.store import Store

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
#: The most header a safetensors file may claim; a real one is a few MiB at most.
MAX_HEADER_BYTES = 100 * 2**20
#: Files whose ``auto_map`` tells transformers to import code from the model's folder (under trust_remote_code).
_CODE_MAPS = ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json",
              "feature_extractor_config.json", "image_processor_config.json")


class Folder(Protocol):
    """The files of a model folder, wherever they are: names, sizes and byte ranges."""

    def names(self) -> list[str]:
        """Relative posix paths of every file, sorted (subfolders included)."""
    def size(self, rel: str) -> int: ...
    def read(self, rel: str, start: int = 0, length: int | None = None) -> bytes:
        """``length`` bytes from ``start`` (the whole file when None)."""
    def where(self, rel: str) -> str:
        """How messages name the file: its path or URL."""


@dataclass(frozen=True)
class LocalFolder:
    root: Path

    def names(self) -> list[str]:
        return sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file())

    def size(self, rel: str) -> int:
        return (self.root / rel).stat().st_size

    def read(self, rel: str, start: int = 0, length: int | None = None) -> bytes:
        with (self.root / rel).open("rb") as f:
            f.seek(start)
            return f.read() if length is None else f.read(length)

    def where(self, rel: str) -> str:
        return str(self.root / rel)


@dataclass(frozen=True)
class StoreFolder:
    """The files ``sizes`` names (relative path -> size, as a manifest lists them) under ``store``'s root."""

    store: Store
    sizes: dict[str, int]

    def names(self) -> list[str]:
        return sorted(self.sizes)

    def size(self, rel: str) -> int:
        return self.sizes[rel]

    def read(self, rel: str, start: int = 0, length: int | None = None) -> bytes:
        if length is None and start == 0:
            return self.store.get_bytes(rel)[0]
        length = self.sizes[rel] - start if length is None else min(length, self.sizes[rel] - start)
        return self.store.get_range(rel, start, length)

    def where(self, rel: str) -> str:
        return self.store.url(rel)


def _folder(folder: Folder | Path) -> Folder:
    return LocalFolder(Path(folder)) if isinstance(folder, (str, Path)) else folder


def _top(folder: Folder) -> list[str]:
    return [n for n in folder.names() if "/" not in n]


def _check_header(folder: Folder, rel: str) -> None:
    where, size = folder.where(rel), folder.size(rel)
    head = folder.read(rel, 0, 8) if size else b""
    if len(head) < 8:
        raise DataError(f"{where}: not a safetensors file (shorter than its 8-byte header length)")
    (n,) = struct.unpack("<Q", head)
    if n > min(size - 8, MAX_HEADER_BYTES):
        raise DataError(f"{where}: safetensors header claims {n} bytes in a {size}-byte file; file is corrupt")
    try:
        header = json.loads(folder.read(rel, 8, n))
    except ValueError:
        raise DataError(f"{where}: safetensors header is not valid JSON; file is corrupt") from None
    data_len = size - 8 - n
    if not isinstance(header, dict):
        raise DataError(f"{where}: safetensors header is not a mapping; file is corrupt")
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
            raise DataError(f"{where}: tensor {name!r} has a malformed header entry; file is corrupt") from None
        if not (0 <= start <= end <= data_len) or end - start != count * width:
            raise DataError(f"{where}: tensor {name!r} claims bytes {start}..{end} for shape {info['shape']} "
                            f"{info['dtype']} in {data_len} data bytes; the header lies about sizes")


def validate_safetensors(path: Path) -> None:
    """Check a local safetensors file's header against its real size before anything reads a tensor.

    Raises DataError naming the file when the header is malformed or points outside the file.
    """
    path = Path(path)
    _check_header(LocalFolder(path.parent), path.name)


def is_pickle_weights(name: str) -> bool:
    """A pickle weight file, or the index of sharded pickles (``pytorch_model.bin.index.json``)."""
    if name.endswith(".index.json"):
        return not name.endswith(".safetensors.index.json")
    return PurePosixPath(name).suffix in PICKLE_SUFFIXES


def refuse_pickles(folder: Folder | Path, uri: str) -> None:
    """Refuse a folder holding any pickle weight file, named, even beside safetensors (DataError).

    A pickle can run code when loaded, and a loader that finds one may prefer it to the safetensors next to it
    (transformers did, with a decoy ``extra.safetensors`` beside ``pytorch_model.bin``).
    """
    folder = _folder(folder)
    top = _top(folder)
    names = [n for n in top if is_pickle_weights(n)]
    if not names:
        return
    if not any(n.endswith(".safetensors") for n in top):
        raise DataError(f"{uri}: only pickle weights ({', '.join(names[:3])}); medft loads safetensors only "
                        "because pickles can run code: convert them to safetensors")
    raise DataError(f"{uri}: {names[0]} is a pickle weight file beside the safetensors; medft refuses a directory "
                    "holding pickles (they can run code, and a loader may pick them): remove "
                    f"{', '.join(names[:3])} and keep the safetensors")


def _indexed_shards(folder: Folder, uri: str) -> list[str]:
    """The shards ``model.safetensors.index.json`` names: plain safetensors file names, each present."""
    try:
        weight_map = json.loads(folder.read("model.safetensors.index.json").decode("utf-8"))["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise DataError(f"{uri}: model.safetensors.index.json is not a safetensors index (a JSON object with a "
                        "weight_map of tensor -> file name); the directory is corrupt") from None
    present = set(_top(folder))
    shards = []
    for name in dict.fromkeys(weight_map.values()):
        if PurePosixPath(name).name != name or name in (".", "..") or not name.endswith(".safetensors"):
            raise DataError(f"{uri}: model.safetensors.index.json names {name!r}, not a safetensors file in the "
                            "directory; medft loads safetensors only")
        if name not in present:
            raise DataError(f"{uri}: model.safetensors.index.json lists {name}, which is missing; the directory "
                            "is incomplete")
        shards.append(name)
    if not shards:
        raise DataError(f"{uri}: model.safetensors.index.json lists no weight files; the directory is corrupt")
    return shards


def check_weights(folder: Folder, uri: str) -> list[str]:
    """:func:`check_weights_dir` on any :class:`Folder`; returns the names of the weight files a load reads."""
    top = _top(folder)
    if "config.json" not in top:
        raise NotFoundError(f"{uri}: no config.json; point model.base at a Hugging Face model directory")
    refuse_pickles(folder, uri)
    safetensors = [n for n in top if n.endswith(".safetensors")]
    if not safetensors:
        raise NotFoundError(f"{uri}: no *.safetensors weight files")
    if "model.safetensors.index.json" in top:
        used = _indexed_shards(folder, uri)
    elif "model.safetensors" in top:
        used = ["model.safetensors"]
    else:
        raise DataError(f"{uri}: has {safetensors[0]} but neither model.safetensors nor "
                        "model.safetensors.index.json, so no loader would read it; rename it or add the index")
    for name in safetensors:  # the unused ones too: lineage hashes every safetensors file here
        _check_header(folder, name)
    return used


def check_weights_dir(path: Path, uri: str) -> list[Path]:
    """A weights directory: config.json and safetensors weights only, every header true. Returns the weight files
    a load reads (``model.safetensors``, or the shards its index lists).

    Refused before anything loads, naming the file: any pickle weight file (DataError, also beside
    safetensors), an index naming files that are not safetensors or are missing (DataError), safetensors
    without ``model.safetensors`` or its index (DataError: a loader would find nothing it may read), a header
    that lies about its tensors (DataError). No config.json or no weights at all: NotFoundError.
    """
    return [Path(path) / name for name in check_weights(LocalFolder(Path(path)), uri)]


def remote_code(folder: Folder | Path) -> list[str]:
    """What in a model folder names code to run: ``auto_map`` entries and ``.py`` files (empty when none).

    transformers runs such code only with ``trust_remote_code=True``; callers that must never run it refuse a
    folder for which this is not empty, so the refusal is one clear line rather than a loader's exception.
    Raises DataError naming a mapping file that is not a JSON object.
    """
    folder = _folder(folder)
    names = folder.names()
    found = []
    for name in _CODE_MAPS:
        if name not in names:
            continue
        try:
            doc = json.loads(folder.read(name).decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise DataError(f"{folder.where(name)}: not valid JSON; the model folder is corrupt") from None
        if not isinstance(doc, dict):
            raise DataError(f"{folder.where(name)}: not a JSON object; the model folder is corrupt")
        if doc.get("auto_map"):
            found.append(f"{name} auto_map ({', '.join(sorted(map(str, doc['auto_map'])))[:80]})")
    found += [n for n in names if n.endswith(".py")]
    return found


def refuse_code(folder: Folder | Path, where: str, trust_remote_code: bool = False) -> None:
    """DataError (exit 3) naming the first thing in the folder that names code to run, unless trusted."""
    code = [] if trust_remote_code else remote_code(folder)
    if code:
        raise DataError(f"{where}: names code to run ({code[0]}); medft never runs code from a model folder. For a "
                        "run folder you trust, pass --trust-remote-code with its base's commit sha")


def check_artifact_folder(folder: Folder | Path, where: str, artifact: str, *, trust_remote_code: bool = False) -> None:
    """Refuse an artifact folder before anything loads from it or the registry lists it (DataError, exit 3,
    naming the file).

    ``merged``: what :func:`check_weights_dir` demands of any weights (config.json, safetensors only, no pickle
    beside them, index naming present safetensors, true headers). ``adapter``: adapter_config.json and
    adapter_model.safetensors with a true header, no pickle. ``gguf``: no pickle. All: no ``auto_map`` or
    ``.py`` file unless ``trust_remote_code``.
    """
    folder = _folder(folder)
    if artifact == "merged":
        try:
            check_weights(folder, where)
        except NotFoundError as e:  # the record lists these files: a folder without weights is a corrupt record
            raise DataError(e.message) from None
    elif artifact == "gguf":  # GGUF files and Modelfiles are data for llama.cpp and Ollama; medft loads neither
        refuse_pickles(folder, where)
    else:
        refuse_pickles(folder, where)
        top = _top(folder)
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            if name not in top:
                raise DataError(f"{where}: no {name}; a PEFT adapter needs it (medft loads safetensors only)")
        _check_header(folder, "adapter_model.safetensors")
    refuse_code(folder, where, trust_remote_code)
