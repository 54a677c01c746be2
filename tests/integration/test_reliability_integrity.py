"""Issue 14, storage integrity: every stored byte is checked, corrupt state and bad settings fail with one line.

Registration verifies content (a flipped byte in a file over 1 MiB), the S3 base-model cache is never marked
complete while partial, cached artifacts are checked on every use, corrupt LEASE.json / config.yaml /
MANIFEST.json / registry records exit 3 naming the object, downloads are all or nothing (also on SIGTERM),
and bad environment values and paths exit 2 naming the variable or path. S3 is the moto server of
tests/conftest.py, tampered with through plain boto3 calls that bypass medft.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from job.inference import Version, fetch_artifact
from job.model import _pull_s3
from registry.registry import Registry
from registry.runs import publish_dir, read_manifest
from registry.store import open_store, sha256_file
from tests import cli
from tests.conftest import SAMPLE_RECORD, make_s3_client, safetensors_bytes
from tests.faults import FaultProxy, Job
from tests.integration.conftest import ROOT, job_args, medft_cmd

MiB = 1024**2


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``medft ARGV`` in-process: (exit code, the one ``medft: error:`` line); no traceback allowed."""
    code, _, err = cli.run_main(argv, capsys)
    assert "Traceback" not in err, err[-3000:]
    lines = cli.error_lines(err)
    assert len(lines) == (1 if code else 0), err[-3000:]
    return code, lines[0] if lines else ""


def _bucket_key(store_uri: str, key: str) -> tuple[str, str]:
    bucket, _, prefix = store_uri.removeprefix("s3://").partition("/")
    return bucket, f"{prefix}/{key}" if prefix else key


def _flip_byte_keeping_metadata(endpoint: str, store_uri: str, key: str, offset: int) -> None:
    """Replace an object with a copy whose byte at ``offset`` is flipped, through raw boto3, keeping the
    sha256 metadata medft wrote (so only the content, not the metadata, tells)."""
    s3 = make_s3_client(endpoint)
    bucket, full = _bucket_key(store_uri, key)
    obj = s3.get_object(Bucket=bucket, Key=full)
    data = bytearray(obj["Body"].read())
    data[offset] ^= 0x01
    s3.put_object(Bucket=bucket, Key=full, Body=bytes(data), Metadata=obj.get("Metadata") or {})


@pytest.fixture
def big_run_dir(sample_run_dir: Path) -> Path:
    """The sample run with a 12 MiB merged/model.safetensors (over any size-only threshold; 3 parts at 5 MiB)."""
    (sample_run_dir / "merged" / "model.safetensors").write_bytes(safetensors_bytes(12 * MiB))
    return sample_run_dir


# ------------------------------------------------------------------------------ registration verifies content

def test_register_refuses_a_flipped_byte_on_a_local_store(tmp_path: Path, big_run_dir: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    store = str(tmp_path / "store")
    publish_dir(open_store(store), "run-1", big_run_dir, dict(SAMPLE_RECORD))
    path = tmp_path / "store" / "runs" / "run-1" / "merged" / "model.safetensors"
    with path.open("r+b") as f:  # same size, one bit different, 6 MiB in
        f.seek(6 * MiB)
        byte = f.read(1)
        f.seek(6 * MiB)
        f.write(bytes([byte[0] ^ 1]))
    code, line = _run(["registry", "register", "m", "run-1", "--store", store], capsys)
    assert code == 3 and "merged/model.safetensors" in line and "sha256" in line, line
    assert Registry.open(store + "/registry").list() == []


@pytest.mark.parametrize("part_mb", ["64", "5"], ids=["single-part", "multipart"])
def test_register_on_s3_uses_the_recorded_checksum_and_refuses_a_flipped_byte(
        part_mb: str, s3_server: str, s3_bucket: str, big_run_dir: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MEDFT_S3_PART_SIZE_MB", part_mb)
    publish_dir(open_store(s3_bucket), "run-1", big_run_dir, dict(SAMPLE_RECORD))
    entry = read_manifest(open_store(s3_bucket), "run-1")["files"]["merged/model.safetensors"]
    assert entry["checksum_sha256"].endswith("-3" if part_mb == "5" else "=")  # composite for 3 parts

    # Untampered: registration compares S3's checksums and reads no weights: only the manifest, the small JSON
    # files the loading checks read, and each safetensors header by a ranged GET.
    with FaultProxy(s3_server) as proxy:
        monkeypatch.setenv("MEDFT_S3_ENDPOINT_URL", proxy.endpoint)
        code, line = _run(["registry", "register", "m", "run-1", "--store", s3_bucket], capsys)
        assert code == 0, line
        ranged = {path for method, path, _ in proxy.ranges if method == "GET"}
        assert not [r for r in proxy.requests if r[0] == "GET" and "/runs/run-1/" in r[1]
                    and not r[1].endswith(".json") and r[1] not in ranged], proxy.requests
        assert any(path.endswith("merged/model.safetensors") for path in ranged)
        assert all(int(rng.split("-")[1]) < 1 * MiB for _, _, rng in proxy.ranges), proxy.ranges
    monkeypatch.setenv("MEDFT_S3_ENDPOINT_URL", s3_server)

    _flip_byte_keeping_metadata(s3_server, s3_bucket, "runs/run-1/merged/model.safetensors", 6 * MiB)
    code, line = _run(["registry", "register", "m", "run-1", "--store", s3_bucket], capsys)
    assert code == 3 and "runs/run-1/merged/model.safetensors" in line, line
    assert [v.version for v in Registry.open(s3_bucket + "/registry").list()] == [1]


# ------------------------------------------------------------------------------------ S3 base-model cache

def _upload(store_uri: str, files: dict[str, bytes]) -> None:
    store = open_store(store_uri)
    for key, data in files.items():
        store.put_bytes(key, data)


def test_s3_base_model_cache_is_complete_only_when_whole_and_recovers(s3_bucket: str, tiny_model_dir: Path,
                                                                      tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from registry.errors import NotFoundError

    monkeypatch.setenv("MEDFT_CACHE", str(tmp_path / "cache"))
    uri = f"{s3_bucket}/models/tiny"
    # 1. An empty prefix: refused naming config.json, nothing cached.
    with pytest.raises(NotFoundError, match="config.json is missing"):
        _pull_s3(uri)
    assert not [p for p in (tmp_path / "cache" / "s3").iterdir() if not p.name.startswith(".")]
    # 2. Half uploaded: the index lists two shards, one is there.
    config = (tiny_model_dir / "config.json").read_bytes()
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    _upload(uri, {"config.json": config, "model.safetensors.index.json": json.dumps(index).encode(),
                  "model-00001-of-00002.safetensors": b"shard-1"})
    with pytest.raises(NotFoundError, match=r"model-00002-of-00002.safetensors \(listed in model.safetensors"):
        _pull_s3(uri)
    # 3. The upload finishes: the next run downloads it whole (not a poisoned entry forever).
    _upload(uri, {"model-00002-of-00002.safetensors": b"shard-2"})
    path = _pull_s3(uri)
    assert (path / "model-00002-of-00002.safetensors").read_bytes() == b"shard-2"
    assert (path / ".medft-complete").exists()
    # 4. An entry an older medft marked complete while empty is downloaded again.
    for f in path.iterdir():
        if f.name != ".medft-complete":
            f.unlink()
    assert _pull_s3(uri) == path and (path / "config.json").read_bytes() == config


# ------------------------------------------------------------------------- cached artifacts checked on use

def test_generate_never_answers_from_a_tampered_cache(s3_server: str, s3_bucket: str, tiny_model_dir: Path,
                                                       tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    (run_dir / "merged").mkdir(parents=True)
    for f in tiny_model_dir.iterdir():
        (run_dir / "merged" / f.name).write_bytes(f.read_bytes())
    record = {"artifacts": {"merged": "merged"}, "config": {"data": {"template": "r1-medical"}}}
    publish_dir(open_store(s3_bucket), "run-1", run_dir, record)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDFT_")}
    env.update(MEDFT_CACHE=str(tmp_path / "cache"), MEDFT_LOG_FORMAT="json", MEDFT_S3_ENDPOINT_URL=s3_server,
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    args = ("generate", f"{s3_bucket}/runs/run-1", "-q", "Fever and neck stiffness?", "--json",
            "--temperature", "0", "--max-new-tokens", "6")

    def generate() -> tuple[int, dict[str, Any] | str, str]:
        job = Job(medft_cmd(*args), cwd=ROOT, env=env)
        code = job.wait()
        assert "Traceback" not in job.stderr, job.stderr[-3000:]
        if code:
            return code, job.errors, job.stderr
        answer = json.loads(job.stdout)
        return code, {k: answer[k] for k in ("reasoning", "answer", "completion_tokens")}, job.stderr

    code, first, _ = generate()
    assert code == 0
    [entry] = (tmp_path / "cache" / "models").iterdir()
    weights = entry / "model.safetensors"
    good = sha256_file(weights)
    size = weights.stat().st_size
    for reset_mtime in (False, True):  # also when the writer puts the old mtime back
        st = weights.stat()
        with weights.open("r+b") as f:  # 16 MiB of zeros after the header, or all but it for a smaller file
            f.seek(4096)
            f.write(b"\0" * min(16 * MiB, size - 4096))
        if reset_mtime:
            os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
        code, answer, stderr = generate()
        assert code == 0 and answer == first  # answered from verified weights, downloaded again
        assert '"cache.file_changed"' in stderr and '"model.download"' in stderr
        assert sha256_file(weights) == good

    # The cache and the store's copy both bad: exit 3 naming the file, no answer.
    with weights.open("r+b") as f:
        f.seek(4096)
        f.write(b"\0" * 64)
    _flip_byte_keeping_metadata(s3_server, s3_bucket, "runs/run-1/merged/model.safetensors", size - 1)
    code, errors, _ = generate()
    assert code == 3 and len(errors) == 1 and "merged/model.safetensors" in errors[0], errors


def test_fetch_artifact_rehashes_only_when_a_stamp_changed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib

    monkeypatch.setenv("MEDFT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "store").mkdir()
    data = os.urandom(2 * MiB)
    (tmp_path / "store" / "w.safetensors").write_bytes(data)
    version = Version("v:1", {"merged": {"uri": str(tmp_path / "store"),
                                         "files": {"w.safetensors": hashlib.sha256(data).hexdigest()}}})
    entry = fetch_artifact(version)
    hashed: list[Path] = []
    import job.cache

    real = job.cache.sha256_file
    monkeypatch.setattr(job.cache, "sha256_file", lambda p: hashed.append(p) or real(p))
    assert fetch_artifact(version) == entry and hashed == []  # unchanged stamp: no re-hash
    os.utime(entry / "w.safetensors", ns=(1, 1))  # same bytes, other stamp: hashed once, then trusted again
    assert fetch_artifact(version) == entry and len(hashed) == 1
    assert fetch_artifact(version) == entry and len(hashed) == 1


# ------------------------------------------------------------------------------------ corrupt stored state

@pytest.mark.parametrize("lease", [b"{not json", b'["a list"]', b'{"owner": "x", "expires": "soon"}',
                                   b'{"owner": "x", "expires": 1e300}'])
def test_corrupt_lease_json_exits_3_naming_it(lease: bytes, tiny_model_dir: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDFT_CACHE", str(tmp_path / "cache"))
    store = str(tmp_path / "store")
    open_store(store).put_bytes("runs/run-c/LEASE.json", lease)
    code, line = _run(job_args(tiny_model_dir, store, "run-c"), capsys)
    assert code == 3 and "runs/run-c/LEASE.json is corrupt" in line, line


@pytest.mark.parametrize("config", [b"model: [unclosed\n", b"- a list\n", b"model: a string\n", b"\xff\xfe"])
def test_corrupt_stored_config_exits_3_naming_it(config: bytes, tiny_model_dir: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDFT_CACHE", str(tmp_path / "cache"))
    store = str(tmp_path / "store")
    open_store(store).put_bytes("runs/run-c/config.yaml", config)
    code, line = _run(job_args(tiny_model_dir, store, "run-c"), capsys)
    assert code == 3 and "runs/run-c/config.yaml" in line, line
    assert not open_store(store).exists("runs/run-c/LEASE.json")  # released on the way out


@pytest.mark.parametrize("field, value", [("lineage", ["a", "list"]), ("metrics", {"plan": "fast"}),
                                          ("config", "text"), ("artifacts", ["merged"])])
def test_corrupt_manifest_exits_3_naming_it(field: str, value: Any, s3_bucket: str,
                                            publish_sample_run: Callable[..., str],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    run_uri = publish_sample_run(s3_bucket)
    store = open_store(run_uri)
    doc = json.loads(store.get_bytes("MANIFEST.json")[0])
    doc[field] = value
    store.put_bytes("MANIFEST.json", json.dumps(doc).encode())
    for argv in (["registry", "register", "m", run_uri, "--store", s3_bucket],
                 ["generate", run_uri, "-q", "hi", "--store", s3_bucket]):
        code, line = _run(argv, capsys)
        assert code == 3 and "runs/run-1/MANIFEST.json" in line, (argv, line)


@pytest.mark.parametrize("sha", [123, None, "A" * 64, "../x"])
def test_registry_record_with_a_bad_file_checksum_exits_3_naming_it(sha: Any, s3_bucket: str, tmp_path: Path,
                                                                   publish_sample_run: Callable[..., str],
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    reg = Registry.open(s3_bucket + "/registry")
    reg.register("m", publish_sample_run(s3_bucket))
    key = "models/m/versions/1.json"
    doc = json.loads(reg.store.get_bytes(key)[0])
    doc["artifacts"]["merged"]["files"]["config.json"] = sha
    reg.store.put_bytes(key, json.dumps(doc).encode())
    for argv in (["registry", "download", "m:1", str(tmp_path / "dl"), "--store", s3_bucket],
                 ["registry", "show", "m", "--store", s3_bucket]):
        code, line = _run(argv, capsys)
        assert code == 3 and key in line and "config.json" in line, line
    assert not (tmp_path / "dl").exists()


def test_corrupt_checkpoint_marker_exits_3_naming_it(tmp_path: Path) -> None:
    from job.checkpoints import Checkpointer
    from registry.errors import DataError

    store = open_store(str(tmp_path / "store")).child("runs/r")
    store.put_bytes("checkpoints/checkpoint-2/COMPLETE.json", b'{"step": 2, "files": [1], "versions": {}}')
    with pytest.raises(DataError, match="checkpoint-2/COMPLETE.json is corrupt"):
        Checkpointer(store, versions={}).latest()


# ---------------------------------------------------------------------------------------------- downloads

def _files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()) if path.exists() else []


def test_a_failed_download_removes_every_file_it_wrote(s3_server: str, s3_bucket: str, tmp_path: Path,
                                                       publish_sample_run: Callable[..., str],
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    reg = Registry.open(s3_bucket + "/registry")
    reg.register("m", publish_sample_run(s3_bucket))
    # the last of the five merged files fails its checksum; the four before it had landed
    _flip_byte_keeping_metadata(s3_server, s3_bucket, "runs/run-1/merged/tokenizer.json", 0)
    dest = tmp_path / "out" / "model"
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("not medft's")
    code, line = _run(["registry", "download", "m", str(dest), "--store", s3_bucket], capsys)
    assert code == 3 and "tokenizer.json" in line and "nothing was written" in line, line
    assert _files_under(tmp_path / "out") == ["mine.txt"] and not dest.exists()


def test_sigterm_during_a_download_leaves_no_file_and_no_temp_file(s3_server: str, s3_bucket: str,
                                                                   tmp_path: Path, big_run_dir: Path) -> None:
    publish_dir(open_store(s3_bucket), "run-1", big_run_dir, dict(SAMPLE_RECORD))
    Registry.open(s3_bucket + "/registry").register("m", f"{s3_bucket}/runs/run-1")
    dest = tmp_path / "dl"
    with FaultProxy(s3_server) as proxy:
        proxy.add("delay", method="GET", path=r"/merged/", seconds=0.4)  # a slow S3
        env = {k: v for k, v in os.environ.items() if not k.startswith("MEDFT_")}
        env.update(MEDFT_S3_ENDPOINT_URL=proxy.endpoint, MEDFT_S3_PART_SIZE_MB="5", MEDFT_S3_CONCURRENCY="2",
                   MEDFT_LOG_FORMAT="json")
        job = Job(medft_cmd("registry", "download", "m", str(dest), "--store", s3_bucket), cwd=ROOT, env=env)
        deadline = time.monotonic() + 60
        while not _files_under(dest) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _files_under(dest), job.stderr[-3000:]  # mid-download: some files have landed
        job.kill(signal.SIGTERM)
        code = job.wait()
    assert code == 143, job.stderr[-3000:]
    assert "Traceback" not in job.stderr and len(job.errors) == 1 and "SIGTERM" in job.errors[0], job.stderr
    assert _files_under(tmp_path) == [] or not [f for f in _files_under(tmp_path) if f.startswith("dl")]
    assert not [p for p in tmp_path.rglob("*") if ".medft-tmp." in p.name]


def test_download_dest_under_a_file_exits_2_naming_it(tmp_path: Path, publish_sample_run: Callable[..., str],
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    store = str(tmp_path / "store")
    Registry.open(store + "/registry").register("m", publish_sample_run(store))
    (tmp_path / "a-file").write_text("x")
    for dest in (tmp_path / "a-file", tmp_path / "a-file" / "sub"):  # the first is click's own usage error
        code, _, err = cli.run_main(["registry", "download", "m", str(dest), "--store", store], capsys)
        assert code == 2 and str(tmp_path / "a-file") in err and "Traceback" not in err, err
    assert (tmp_path / "a-file").read_text() == "x"


# -------------------------------------------------------------------------------- environment and paths

@pytest.mark.parametrize("var, value", [
    ("MEDFT_S3_PART_SIZE_MB", "inf"), ("MEDFT_S3_PART_SIZE_MB", "nan"), ("MEDFT_S3_PART_SIZE_MB", "0"),
    ("MEDFT_S3_PART_SIZE_MB", "-64"), ("MEDFT_S3_PART_SIZE_MB", "big"), ("MEDFT_S3_PART_SIZE_MB", "1e9"),
    ("MEDFT_S3_CONCURRENCY", "0"), ("MEDFT_S3_CONCURRENCY", "2.5"), ("MEDFT_S3_MAX_ATTEMPTS", "-1"),
    ("MEDFT_S3_CONTENT_MD5", "maybe"), ("MEDFT_S3_ENDPOINT_URL", "not a url"),
    ("MEDFT_S3_ENDPOINT_URL", "localhost:9000"), ("AWS_ENDPOINT_URL", "ftp://host"),
    ("MEDFT_S3_ENDPOINT_URL", "http://host:port"), ("MEDFT_LEASE_SECONDS", "0"), ("MEDFT_LEASE_SECONDS", "-5"),
    ("MEDFT_LEASE_SECONDS", "inf"), ("MEDFT_LEASE_SECONDS", "nan"), ("MEDFT_LEASE_SECONDS", "soon"),
    ("MEDFT_LEASE_SECONDS", "1"),
])
def test_bad_environment_values_exit_2_naming_the_variable(var: str, value: str, tiny_model_dir: Path,
                                                           tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MEDFT_S3_ENDPOINT_URL", raising=False)
    monkeypatch.setenv(var, value)
    commands = [job_args(tiny_model_dir, "s3://bucket/medft", "run-e", "--dry-run")]
    if not var.startswith("MEDFT_LEASE"):
        commands.append(["registry", "list", "--store", "s3://bucket/medft"])
    for argv in commands:
        code, line = _run(argv, capsys)
        assert code == 2 and f"{var}={value!r}" in line, (argv, line)


def test_store_or_cache_that_is_a_file_exits_2_naming_it(tiny_model_dir: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    a_file = tmp_path / "hostname"
    a_file.write_text("host\n")
    monkeypatch.setenv("MEDFT_CACHE", str(tmp_path / "cache"))
    for store in (str(a_file), str(a_file / "sub"), f"file://{a_file}"):
        for argv in (job_args(tiny_model_dir, store, "run-p"), ["registry", "list", "--store", store]):
            code, line = _run(argv, capsys)
            assert code == 2 and str(a_file) in line and "not a directory" in line, (argv, line)
    monkeypatch.setenv("MEDFT_CACHE", str(a_file / "cache"))
    code, line = _run(job_args(tiny_model_dir, str(tmp_path / "store"), "run-p", "--dry-run"), capsys)
    assert code == 2 and "MEDFT_CACHE" in line, line
    assert a_file.read_text() == "host\n"
