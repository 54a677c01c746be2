"""The S3 store against a real S3 endpoint: moto's server on 127.0.0.1 (see tests/conftest.py)."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest

from registry.errors import AccessDeniedError, ConfigError, DataError, NotFoundError, TransientError
from registry.store import MiB, PreconditionFailed, S3Store, TransferSettings, open_store

FAST = TransferSettings(part_size=5 * MiB, concurrency=4, max_attempts=4, backoff_base=0.01, backoff_max=0.05)


def _store(uri: str, **kw: object) -> S3Store:
    s = open_store(uri, transfer=TransferSettings(**{**FAST.__dict__, **kw}))
    assert isinstance(s, S3Store)
    return s


def _bucket_key(store: S3Store, key: str) -> tuple[str, str]:
    return store.bucket, f"{store.prefix}/{key}"


def _random_file(path: Path, size: int) -> str:
    data = os.urandom(size)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------------------- basics

def test_uri_child_and_url(s3_bucket: str) -> None:
    s = _store(s3_bucket + "/")
    assert s.uri == s3_bucket
    assert s.url("a/b.json") == s3_bucket + "/a/b.json"
    c = s.child("runs/r1")
    assert c.uri == s3_bucket + "/runs/r1"
    c.put_bytes("x.txt", b"hi")
    assert s.list() == ["runs/r1/x.txt"]
    assert c.list() == ["x.txt"]


def test_bytes_roundtrip_list_exists_delete(s3_bucket: str) -> None:
    s = _store(s3_bucket)
    info = s.put_bytes("b/two.txt", b"2")
    assert info.sha256 == hashlib.sha256(b"2").hexdigest() and info.size == 1 and info.etag
    s.put_bytes("a/one.txt", b"1")
    s.put_bytes("a/deeper/three.txt", b"3")
    s.put_bytes("ab.txt", b"not under a/")
    data, etag = s.get_bytes("b/two.txt")
    assert data == b"2" and etag == info.etag
    assert s.list() == ["a/deeper/three.txt", "a/one.txt", "ab.txt", "b/two.txt"]
    assert s.list("a") == ["a/deeper/three.txt", "a/one.txt"]
    assert s.list("a/one.txt") == ["a/one.txt"]
    assert s.list("nothing") == []
    assert s.exists("a/one.txt") and not s.exists("a/none.txt")
    assert s.stat("b/two.txt").sha256 == info.sha256  # carried in object metadata
    s.delete("a/one.txt")
    s.delete("a/one.txt")  # idempotent
    assert not s.exists("a/one.txt")
    with pytest.raises(NotFoundError, match="a/one.txt"):
        s.get_bytes("a/one.txt")


@pytest.mark.parametrize("key", ["../escape", "a/../../b", "/abs", "a\\b", "a//b", "./a", ""])
def test_bad_keys_refused(s3_bucket: str, key: str) -> None:
    with pytest.raises(ConfigError):
        _store(s3_bucket).put_bytes(key, b"x")


def test_endpoint_medft_variable_wins(s3_server: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    s = _store(s3_bucket)
    assert s.endpoint == s3_server
    s.put_bytes("k", b"v")
    assert s.get_bytes("k")[0] == b"v"


# -------------------------------------------------------------------------------------- big files

def test_multipart_upload_and_ranged_download(s3_bucket: str, tmp_path: Path, s3_client) -> None:
    s = _store(s3_bucket)
    src = tmp_path / "big.bin"
    digest = _random_file(src, 12 * MiB + 123)
    info = s.put_file("w/big.bin", src)
    assert info.sha256 == digest and info.size == src.stat().st_size
    assert info.etag and info.etag.endswith("-3")  # three parts of 5 MiB
    dest = tmp_path / "out" / "big.bin"
    got = s.get_file("w/big.bin", dest, sha256=digest)
    assert got.sha256 == digest
    assert dest.read_bytes() == src.read_bytes()
    assert not [p for p in dest.parent.iterdir() if p.name != "big.bin"]  # no temp files left
    assert s3_client(s.endpoint).list_multipart_uploads(Bucket=s.bucket).get("Uploads", []) == []


def test_small_file_single_put(s3_bucket: str, tmp_path: Path) -> None:
    s = _store(s3_bucket)
    src = tmp_path / "small.json"
    digest = _random_file(src, 1000)
    info = s.put_file("small.json", src)
    assert info.sha256 == digest and "-" not in (info.etag or "")
    assert s.get_file("small.json", tmp_path / "copy.json").sha256 == digest


def test_put_dir_get_dir_verified(s3_bucket: str, sample_run_dir: Path, tmp_path: Path) -> None:
    s = _store(s3_bucket)
    (sample_run_dir / "merged" / "big.safetensors").write_bytes(os.urandom(6 * MiB))
    infos = s.put_dir("runs/r/files", sample_run_dir)
    rels = sorted(p.relative_to(sample_run_dir).as_posix() for p in sample_run_dir.rglob("*") if p.is_file())
    assert [i.key for i in infos] == [f"runs/r/files/{r}" for r in rels]
    expected = {i.key.removeprefix("runs/r/files/"): i.sha256 for i in infos}
    got = s.get_dir("runs/r/files", tmp_path / "back", expected=expected)
    assert len(got) == len(rels)
    for r in rels:
        assert (tmp_path / "back" / r).read_bytes() == (sample_run_dir / r).read_bytes()
    with pytest.raises(NotFoundError, match="nope.bin"):
        s.get_dir("runs/r/files", tmp_path / "again", expected={**expected, "nope.bin": "0" * 64})
    with pytest.raises(DataError):
        s.get_dir("runs/r/files", tmp_path / "evil", expected={"../../etc/passwd": "0" * 64})


# ----------------------------------------------------------------------------- checksums on download

@pytest.mark.parametrize("size", [2000, 11 * MiB], ids=["single", "ranged"])
def test_corrupted_download_fails_its_checksum(s3_bucket: str, tmp_path: Path, s3_client, size: int) -> None:
    s = _store(s3_bucket)
    src = tmp_path / "w.bin"
    digest = _random_file(src, size)
    s.put_file("w.bin", src)
    corrupt = bytearray(src.read_bytes())
    corrupt[size // 2] ^= 0xFF
    bucket, key = _bucket_key(s, "w.bin")
    s3_client(s.endpoint).put_object(Bucket=bucket, Key=key, Body=bytes(corrupt))  # bit rot / tampering
    dest = tmp_path / "dl" / "w.bin"
    dest.parent.mkdir()
    dest.write_bytes(b"previous good copy")
    with pytest.raises(DataError, match="checksum mismatch") as e:
        s.get_file("w.bin", dest, sha256=digest)
    assert e.value.exit_code == 3
    assert dest.read_bytes() == b"previous good copy"
    assert [p.name for p in dest.parent.iterdir()] == ["w.bin"]


# ------------------------------------------------------------------------- create-only and CAS

def test_put_if_absent_single_and_multipart(s3_bucket: str, tmp_path: Path, s3_client) -> None:
    s = _store(s3_bucket)
    s.put_bytes("once.json", b"1", if_absent=True)
    with pytest.raises(PreconditionFailed):
        s.put_bytes("once.json", b"2", if_absent=True)
    assert s.get_bytes("once.json")[0] == b"1"
    big = tmp_path / "big.bin"
    _random_file(big, 11 * MiB)
    s.put_file("big.bin", big, if_absent=True)
    other = tmp_path / "other.bin"
    _random_file(other, 11 * MiB)
    with pytest.raises(PreconditionFailed) as e:
        s.put_file("big.bin", other, if_absent=True)
    assert e.value.exit_code == 75
    assert s.get_file("big.bin", tmp_path / "check.bin").sha256 == hashlib.sha256(big.read_bytes()).hexdigest()
    assert s3_client(s.endpoint).list_multipart_uploads(Bucket=s.bucket).get("Uploads", []) == []


def test_compare_and_swap(s3_bucket: str) -> None:
    s = _store(s3_bucket)
    first = s.put_bytes("doc.json", b"v1")
    second = s.put_bytes("doc.json", b"v2", if_match=first.etag)
    with pytest.raises(PreconditionFailed):
        s.put_bytes("doc.json", b"v3", if_match=first.etag)  # stale
    assert s.get_bytes("doc.json") == (b"v2", second.etag)
    with pytest.raises(PreconditionFailed):  # a missing key fails If-Match (moto answers 404)
        s.put_bytes("missing.json", b"x", if_match=first.etag)


def test_create_only_race_has_one_winner(s3_serial_bucket: str, tmp_path: Path) -> None:
    """16 threads race to create one key on the one-request-at-a-time server: exactly one wins."""
    s = _store(s3_serial_bucket)
    results: list[str] = []
    barrier = threading.Barrier(16)

    def attempt(i: int) -> None:
        barrier.wait()
        try:
            s.put_bytes("race.json", str(i).encode(), if_absent=True)
            results.append(f"won:{i}")
        except PreconditionFailed:
            results.append("lost")

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r in results if r.startswith("won")]
    assert len(winners) == 1 and results.count("lost") == 15
    assert s.get_bytes("race.json")[0] == winners[0].split(":")[1].encode()


def test_multipart_create_only_race(s3_serial_bucket: str, tmp_path: Path) -> None:
    s = _store(s3_serial_bucket, concurrency=2)
    files = []
    for i in range(3):
        p = tmp_path / f"f{i}.bin"
        _random_file(p, 6 * MiB)
        files.append(p)
    outcome: dict[int, str] = {}

    def attempt(i: int) -> None:
        try:
            s.put_file("model.bin", files[i], if_absent=True)
            outcome[i] = "won"
        except PreconditionFailed:
            outcome[i] = "lost"

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcome.values()) == ["lost", "lost", "won"]
    winner = next(i for i, o in outcome.items() if o == "won")
    got = s.get_file("model.bin", tmp_path / "check.bin")
    assert got.sha256 == hashlib.sha256(files[winner].read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------ failures

def test_missing_bucket_is_not_found(s3_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MEDFT_S3_ENDPOINT_URL", s3_server)
    s = _store("s3://medft-no-such-bucket/prefix")
    for call in (lambda: s.exists("k"), lambda: s.list(), lambda: s.get_bytes("k"), lambda: s.put_bytes("k", b"x"),
                 lambda: s.get_file("k", tmp_path / "k")):
        with pytest.raises(NotFoundError, match="bucket 'medft-no-such-bucket' does not exist") as e:
            call()
        assert e.value.exit_code == 4


def test_injected_503s_are_retried(s3_serial_server, s3_serial_bucket: str, tmp_path: Path) -> None:
    faults = s3_serial_server.faults
    s = _store(s3_serial_bucket)
    faults.add(status=503, code="SlowDown", times=2, method="PUT")
    s.put_bytes("k.json", b"data")
    faults.add(status=500, code="InternalError", times=3, method="GET")
    assert s.get_bytes("k.json")[0] == b"data"
    big = tmp_path / "big.bin"
    digest = _random_file(big, 11 * MiB)
    faults.add(status=503, code="SlowDown", times=2, method="PUT", query=r"partNumber=2")
    assert s.put_file("big.bin", big).sha256 == digest
    faults.add(status=503, code="ServiceUnavailable", times=2, method="GET", path=r"big\.bin")
    assert s.get_file("big.bin", tmp_path / "back.bin", sha256=digest).sha256 == digest
    assert [i[3] for i in faults.injected] == [503, 503, 500, 500, 500, 503, 503, 503, 503]


def test_retries_give_up_with_transient_error(s3_serial_server, s3_serial_bucket: str) -> None:
    s3_serial_server.faults.add(status=503, code="SlowDown", times=None, method="PUT")
    s = _store(s3_serial_bucket, max_attempts=3)
    with pytest.raises(TransientError, match="gave up after 3 attempts") as e:
        s.put_bytes("k", b"x")
    assert e.value.exit_code == 75
    assert len(s3_serial_server.faults.injected) == 3


def test_connection_refused_is_transient(monkeypatch: pytest.MonkeyPatch, _aws_test_env: None) -> None:
    import socket

    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("MEDFT_S3_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    s = _store("s3://bucket/p", max_attempts=2)
    with pytest.raises(TransientError, match="connection to S3 failed"):
        s.get_bytes("k")


def test_403_is_access_denied_and_not_retried(s3_serial_server, s3_serial_bucket: str) -> None:
    s3_serial_server.faults.add(status=403, code="AccessDenied", times=None)
    s = _store(s3_serial_bucket)
    with pytest.raises(AccessDeniedError, match="access denied") as e:
        s.get_bytes("k")
    assert e.value.exit_code == 5
    assert len(s3_serial_server.faults.injected) == 1
    with pytest.raises(AccessDeniedError):
        s.exists("k")  # HEAD: 403 with no body


def test_interrupted_multipart_upload_leaves_nothing(s3_serial_server, s3_serial_bucket: str, tmp_path: Path,
                                                     s3_client) -> None:
    s = _store(s3_serial_bucket, concurrency=1, max_attempts=2)
    big = tmp_path / "big.bin"
    _random_file(big, 16 * MiB)
    s3_serial_server.faults.add(status=500, code="InternalError", times=None, query=r"partNumber=3")
    with pytest.raises(TransientError):
        s.put_file("big.bin", big)
    assert not s.exists("big.bin")
    assert s3_client(s.endpoint).list_multipart_uploads(Bucket=s.bucket).get("Uploads", []) == []


def test_ctrl_c_between_parts_aborts_the_upload(s3_bucket: str, tmp_path: Path, s3_client,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    s = _store(s3_bucket, concurrency=1)
    big = tmp_path / "big.bin"
    _random_file(big, 16 * MiB)
    real = s.client.upload_part
    calls = []

    def upload_part(**kw):
        calls.append(kw["PartNumber"])
        if kw["PartNumber"] == 2:
            raise KeyboardInterrupt
        return real(**kw)

    monkeypatch.setattr(s.client, "upload_part", upload_part)
    with pytest.raises(KeyboardInterrupt):
        s.put_file("big.bin", big)
    assert not s.exists("big.bin")
    assert s3_client(s.endpoint).list_multipart_uploads(Bucket=s.bucket).get("Uploads", []) == []


def test_lost_response_after_create_only_write_is_recognised(s3_serial_server, s3_serial_bucket: str,
                                                             tmp_path: Path) -> None:
    """The write lands but its answer is lost; the retry's 412 must be recognised as our own write."""
    faults = s3_serial_server.faults
    s = _store(s3_serial_bucket)
    faults.add(status=503, code="SlowDown", times=1, method="PUT", applied=True)
    s.put_bytes("once.json", b"mine", if_absent=True)
    assert s.get_bytes("once.json")[0] == b"mine"
    big = tmp_path / "big.bin"
    digest = _random_file(big, 11 * MiB)
    faults.add(status=500, code="InternalError", times=1, method="POST", query=r"uploadId=", applied=True)
    assert s.put_file("big.bin", big, if_absent=True).sha256 == digest
    with pytest.raises(PreconditionFailed):  # but a real loser still loses
        s.put_bytes("once.json", b"theirs", if_absent=True)


def test_without_content_md5(s3_bucket: str, tmp_path: Path) -> None:
    s = _store(s3_bucket, content_md5=False)
    src = tmp_path / "big.bin"
    digest = _random_file(src, 11 * MiB)
    assert s.put_file("big.bin", src, if_absent=True).sha256 == digest
    assert s.put_bytes("small", b"x").sha256 == hashlib.sha256(b"x").hexdigest()
    assert s.get_file("big.bin", tmp_path / "back.bin", sha256=digest).size == src.stat().st_size
