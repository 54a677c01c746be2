"""``medft registry verify``: is every stored file of a version still the file its run published?

For each version (one ref, or every version in the registry): the version record must parse; its run's
MANIFEST.json must parse; every file the manifest lists is read back from the store, every byte, and its sha256
compared with the manifest's (whatever checksum the store keeps: a file replaced with a forged checksum is still
caught, and a genuine copy in the local artifact cache proves nothing about the store, so it is not consulted);
every artifact file the version record names must be in the manifest with the same sha256; the adapter and
merged artifacts must still pass the checks loading runs (:func:`registry.artifact_checks.check_artifact_folder`).
Every problem is reported with its path; nothing is changed.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from registry.artifact_checks import StoreFolder, check_artifact_folder
from registry.errors import MedftError
from registry.names import ARTIFACTS
from registry.registry import Registry
from registry.runs import MANIFEST, read_manifest, run_store
from registry.store import Store
from registry.versions import ModelVersion


@dataclass(frozen=True)
class Problem:
    path: str
    """The URI of the file (or record) at fault."""
    problem: str


@dataclass
class VersionCheck:
    ref: str
    run_uri: str
    files: int = 0
    """Files re-hashed."""
    problems: list[Problem] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"ref": self.ref, "run_uri": self.run_uri, "files": self.files, "ok": not self.problems,
                "problems": [asdict(p) for p in self.problems]}


def verify_versions(registry: Registry, ref: str | None = None) -> tuple[list[VersionCheck], list[Problem]]:
    """Check ``ref``'s version (or, with None, every version in ``registry``); returns each version's check and
    the records that could not be read at all (path, problem).

    Raises what :meth:`Registry.get` raises for an unknown or corrupt ``ref`` (NotFoundError, DataError), and the
    store's errors (exit 5 for refused credentials, 75 for an unreachable store) which are no finding about the
    version; a missing or changed file is a finding, never an exception.
    """
    if ref is not None:
        versions, unreadable = [registry.get(ref)], []
    else:
        versions, corrupt = registry.scan()
        unreadable = [Problem(_path_in(e.message, registry), e.message) for e in corrupt]
    return [verify_version(registry, mv) for mv in versions], unreadable


def _path_in(message: str, registry: Registry) -> str:
    """The record a DataError's message names: it starts with the record's URI."""
    head = message.split(" ", 1)[0].rstrip(":")
    return head if "/" in head else registry.uri


def verify_version(registry: Registry, mv: ModelVersion) -> VersionCheck:
    check = VersionCheck(ref=mv.ref, run_uri=mv.run_uri)
    try:
        rs, _ = run_store(registry.store, mv.run_uri)
        manifest = read_manifest(registry.store, mv.run_uri)
    except MedftError as e:
        if e.exit_code not in (3, 4):  # refused or unreachable: the store's problem, not the version's
            raise
        check.problems.append(Problem(f"{mv.run_uri}/{MANIFEST}", e.message))
        return check
    files: dict[str, dict[str, Any]] = manifest["files"]
    check.problems += _rehash(rs, files)
    check.files = len(files)
    for art, spec in sorted(mv.artifacts.items()):
        folder = spec["uri"][len(rs.uri) + 1:] if spec["uri"].startswith(rs.uri + "/") else None
        if folder is None:
            check.problems.append(Problem(spec["uri"], f"{mv.ref} {art} artifact lies outside its run {rs.uri}"))
            continue
        for rel, sha in sorted(spec["files"].items()):
            meta = files.get(f"{folder}/{rel}")
            if meta is None:
                check.problems.append(Problem(f"{spec['uri']}/{rel}", f"{mv.ref} names it but {MANIFEST} does not"))
            elif meta["sha256"] != sha:
                check.problems.append(Problem(f"{spec['uri']}/{rel}", f"{mv.ref} records sha256 {sha}, {MANIFEST} "
                                              f"{meta['sha256']}: the version record was changed"))
        if art in ARTIFACTS and not check.problems:
            sizes = {rel: files[f"{folder}/{rel}"]["size"] for rel in spec["files"]}
            try:
                check_artifact_folder(StoreFolder(rs.child(folder), sizes), f"{spec['uri']} ({art} artifact)", art)
            except MedftError as e:
                if e.exit_code not in (3, 4):
                    raise
                check.problems.append(Problem(spec["uri"], e.message))
    return check


def _rehash(rs: Store, files: dict[str, dict[str, Any]]) -> list[Problem]:
    """Every manifest file read back in full from the store and compared with its size and sha256."""
    present = {o.key: o.size for o in rs.list_info("")}
    problems: list[Problem] = []
    todo = []
    for rel, meta in sorted(files.items()):
        if rel not in present:
            problems.append(Problem(rs.url(rel), f"listed in {MANIFEST} but missing"))
        elif present[rel] != meta["size"]:
            problems.append(Problem(rs.url(rel), f"has {present[rel]} bytes, {MANIFEST} says {meta['size']}"))
        else:
            todo.append((rel, meta["sha256"]))

    def rehash(item: tuple[str, str]) -> Problem | None:
        rel, expected = item
        got = rs.sha256(rel)
        return None if got == expected else Problem(rs.url(rel), f"sha256 is {got}, {MANIFEST} says {expected}: "
                                                                 "its content changed after it was published")

    with ThreadPoolExecutor(max_workers=max(1, min(rs.transfer.concurrency, len(todo) or 1))) as ex:
        problems += [p for p in ex.map(rehash, todo) if p is not None]
    return problems
