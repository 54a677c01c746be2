"""The local-directory store: whole files only, create-only and CAS, checksums, keys that cannot escape."""

from __future__ import annotations

import errno
import hashlib
import multiprocessing as mp
import os
from pathlib import Path

import pytest

from registry.errors import AccessDeniedError, ConfigError, DataError, NotFoundError, TransientError
from registry.store import LocalStore, PreconditionFailed, TransferSettings, check_key, open_store


def test_open_store_uris(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert open_store("file://" + str(tmp_path / "a")).uri == str(tmp_path / "a")
    assert open_store("rel/store/").uri == str(tmp_path / "rel" / "store")
    assert open_store(str(tmp_path / "b")).url("x/y.json") == str(tmp_path / "b" / "x" / "y.json")
    for bad in ("gs://bucket/x", "file://host/x", "a/../b", "", "s3://", "s3://Bad_Bucket!/x"):
        with pytest.raises(ConfigError):
            open_store(bad)
    s3 = open_store("s3://bucket/some/prefix/")
    assert s3.uri == "s3://bucket/some/prefix"
    assert s3.child("runs/r1").url("MANIFEST.json") == "s3://bucket/some/prefix/runs/r1/MANIFEST.json"


def test_transfer_settings_from_env() -> None:
    t = TransferSettings.from_env({"MEDFT_S3_PART_SIZE_MB": "16", "MEDFT_S3_CONCURRENCY": "3",
                                   "MEDFT_S3_MAX_ATTEMPTS": "2"})
    assert (t.part_size, t.concurrency, t.max_attempts) == (16 * 1024**2, 3, 2)
    with pytest.raises(ConfigError):
        TransferSettings(part_size=1024)
    with pytest.raises(ConfigError):
        TransferSettings.from_env({"MEDFT_S3_CONCURRENCY": "many"})


@pytest.mark.parametrize("key", ["../x", "a/../../x", "/etc/passwd", "a\\b", "a//b", "./a", "a/./b", "C:/x",
                                 "a\x00b", ""])
def test_keys_that_could_escape_are_refused(tmp_path: Path, key: str) -> None:
    s = open_store(str(tmp_path / "root"))
    with pytest.raises(ConfigError):
        s.put_bytes(key, b"x")
    with pytest.raises(ConfigError):
        check_key(key)
    assert not any(tmp_path.rglob("x"))


def test_bytes_roundtrip_list_and_delete(tmp_path: Path) -> None:
    s = open_store(str(tmp_path))
    info = s.put_bytes("a/b/c.json", b"{}")
    assert info.sha256 == hashlib.sha256(b"{}").hexdigest() == info.etag and info.size == 2
    s.put_bytes("a/d.json", b"1")
    s.put_bytes("ab.json", b"2")
    assert s.get_bytes("a/b/c.json") == (b"{}", info.etag)
    assert s.list() == ["a/b/c.json", "a/d.json", "ab.json"]
    assert s.list("a") == ["a/b/c.json", "a/d.json"]
    assert s.list("missing") == []
    assert s.child("a").list() == ["b/c.json", "d.json"]
    assert s.exists("a/d.json") and not s.exists("a") and not s.exists("zzz")
    assert s.stat("a/d.json").size == 1
    s.delete("a/d.json")
    s.delete("a/d.json")
    with pytest.raises(NotFoundError, match="a/d.json"):
        s.get_bytes("a/d.json")
    with pytest.raises(NotFoundError):
        s.stat("a")


def test_create_only_and_compare_and_swap(tmp_path: Path) -> None:
    s = open_store(str(tmp_path))
    first = s.put_bytes("doc.json", b"v1", if_absent=True)
    with pytest.raises(PreconditionFailed) as e:
        s.put_bytes("doc.json", b"other", if_absent=True)
    assert e.value.exit_code == 75
    second = s.put_bytes("doc.json", b"v2", if_match=first.etag)
    with pytest.raises(PreconditionFailed):
        s.put_bytes("doc.json", b"v3", if_match=first.etag)
    with pytest.raises(PreconditionFailed):
        s.put_bytes("new.json", b"v3", if_match=first.etag)
    assert s.get_bytes("doc.json") == (b"v2", second.etag)
    src = tmp_path / "src.bin"
    src.write_bytes(b"abc")
    s.put_file("f.bin", src, if_absent=True)
    with pytest.raises(PreconditionFailed):
        s.put_file("f.bin", src, if_absent=True)
    # no temp or lock files are listed
    assert s.list() == ["doc.json", "f.bin", "src.bin"]


def _claim(args: tuple[str, int]) -> bool:
    root, i = args
    try:
        LocalStore(Path(root)).put_bytes("versions/1.json", f"{i}".encode(), if_absent=True)
        return True
    except PreconditionFailed:
        return False


def _cas_increment(args: tuple[str, int]) -> int:
    root, n = args
    s = LocalStore(Path(root))
    retries = 0
    for _ in range(n):
        while True:
            data, etag = s.get_bytes("counter")
            try:
                s.put_bytes("counter", str(int(data) + 1).encode(), if_match=etag)
                break
            except PreconditionFailed:
                retries += 1
    return retries


def test_create_only_across_processes_has_one_winner(tmp_path: Path) -> None:
    with mp.get_context("spawn").Pool(8) as pool:
        won = pool.map(_claim, [(str(tmp_path), i) for i in range(16)])
    assert won.count(True) == 1


def test_compare_and_swap_across_processes_loses_no_update(tmp_path: Path) -> None:
    LocalStore(tmp_path).put_bytes("counter", b"0")
    with mp.get_context("spawn").Pool(4) as pool:
        pool.map(_cas_increment, [(str(tmp_path), 25)] * 4)
    assert LocalStore(tmp_path).get_bytes("counter")[0] == b"100"


def test_get_file_verifies_and_leaves_dest_untouched(tmp_path: Path) -> None:
    s = open_store(str(tmp_path / "store"))
    info = s.put_bytes("w.bin", b"weights")
    dest = tmp_path / "out" / "w.bin"
    assert s.get_file("w.bin", dest, sha256=info.sha256).sha256 == info.sha256
    assert dest.read_bytes() == b"weights"
    (tmp_path / "store" / "w.bin").write_bytes(b"weightz")  # corrupted in place
    with pytest.raises(DataError, match="checksum mismatch") as e:
        s.get_file("w.bin", dest, sha256=info.sha256)
    assert e.value.exit_code == 3
    assert dest.read_bytes() == b"weights"
    assert [p.name for p in dest.parent.iterdir()] == ["w.bin"]
    with pytest.raises(NotFoundError):
        s.get_file("nope.bin", tmp_path / "nope.bin")


def test_put_dir_and_get_dir(tmp_path: Path, sample_run_dir: Path) -> None:
    s = open_store(str(tmp_path / "store"))
    infos = s.put_dir("runs/r1", sample_run_dir)
    expected = {i.key.removeprefix("runs/r1/"): i.sha256 for i in infos}
    assert set(expected) == {p.relative_to(sample_run_dir).as_posix() for p in sample_run_dir.rglob("*")
                             if p.is_file()}
    got = s.get_dir("runs/r1", tmp_path / "back", expected=expected)
    assert {i.key for i in got} == {i.key for i in infos}
    for rel in expected:
        assert (tmp_path / "back" / rel).read_bytes() == (sample_run_dir / rel).read_bytes()
    # without expected: everything under the prefix
    assert len(s.get_dir("runs/r1/merged", tmp_path / "m")) == 5
    bad = dict(expected)
    bad["metrics.json"] = "0" * 64
    with pytest.raises(DataError):
        s.get_dir("runs/r1", tmp_path / "bad", expected=bad)
    with pytest.raises(DataError):
        s.get_dir("runs/r1", tmp_path / "evil", expected={"../../outside": "0" * 64})
    assert not (tmp_path / "outside").exists()


def test_disk_full_is_transient(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = open_store(str(tmp_path / "store"))
    real_fsync = os.fsync

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(TransientError, match="disk full") as e:
        s.put_bytes("a.json", b"{}")
    assert e.value.exit_code == 75
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert s.list() == []  # the temp file went away with the failure


def test_permission_denied_is_access_denied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: Path, *a: object, **k: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(AccessDeniedError, match="permission denied") as e:
        open_store(str(tmp_path / "ro")).put_bytes("a/b.json", b"{}")
    assert e.value.exit_code == 5


def test_a_folder_where_the_store_keeps_a_file_is_one_line_exit_3(tmp_path: Path, publish_sample_run) -> None:
    """A write that finds a folder in its way (here the version record's lock) fails with one line, not an
    IsADirectoryError traceback, and writes nothing."""
    from registry.errors import DataError
    from registry.records import EvaluationRecord
    from registry.registry import Registry

    store = tmp_path / "store"
    reg = Registry.open(str(store / "registry"))
    reg.register("m", publish_sample_run(str(store)))
    record = store / "registry/models/m/versions/1.json"
    before = record.read_bytes()
    (record.parent / ".1.json.medft-lock").mkdir()
    with pytest.raises(DataError, match=r"while locking .*\.1\.json\.medft-lock: something else stands there"):
        reg.record_evaluation("m", 1, EvaluationRecord(artifact="merged"))
    assert record.read_bytes() == before
