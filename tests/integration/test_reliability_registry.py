"""The registry only holds loadable versions, and ``registry verify`` catches a store that changed under it.

* ``registry register`` runs the checks loading runs (registry/artifact_checks.py) on the stored run: forged runs
  published with valid manifests (so checksums alone cannot catch them) are refused with exit 3 naming the
  file, and no version is written; on S3 the safetensors headers are read with ranged reads.
* ``registry verify`` re-hashes the store's files (not the local artifact cache, which holds a genuine copy) and
  reports each problem with its path: a file changed through the store's own filesystem or a plain boto3 client
  (its S3 metadata forged to the old sha256), a record edited to name another sha256, a corrupt record.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from registry.registry import Registry
from tests.cli import error_lines, run_main
from tests.conftest import safetensors_bytes


def _forge(root: Path, how: str) -> str:
    """Change the sample run folder the way a forger would; returns the file the refusal must name."""
    merged, adapter = root / "merged", root / "adapter"
    if how == "auto_map in config.json":
        (merged / "config.json").write_text(json.dumps({"model_type": "llama",
                                                        "auto_map": {"AutoModelForCausalLM": "evil.Model"}}))
        return "config.json"
    if how == "a .py file":
        (merged / "tokenization_evil.py").write_text("import os\n")
        return "tokenization_evil.py"
    if how == "pickle-only adapter":
        (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
        return "adapter_model.bin"
    if how == "pickle beside safetensors":
        (merged / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
        return "pytorch_model.bin"
    if how == "a header that lies":
        (merged / "model-00002-of-00002.safetensors").write_bytes(safetensors_bytes(200_000, lie=True))
        return "model-00002-of-00002.safetensors"
    assert how == "an index naming a missing shard"
    (merged / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "w1": "model-00001-of-00002.safetensors", "w2": "model-00003-of-00003.safetensors"}}))
    return "model-00003-of-00003.safetensors"


FORGERIES = ["auto_map in config.json", "a .py file", "pickle-only adapter", "pickle beside safetensors",
             "a header that lies", "an index naming a missing shard"]


@pytest.mark.parametrize("how", FORGERIES)
def test_register_refuses_what_loading_refuses(how: str, tmp_path: Path, sample_run_dir: Path,
                                               publish_sample_run: Callable[..., str],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    store = str(tmp_path / "store")
    named = _forge(sample_run_dir, how)
    run_uri = publish_sample_run(store, "run-forged")
    code, _, err = run_main(["registry", "register", "med", run_uri, "--store", store], capsys)
    assert code == 3 and len(error_lines(err)) == 1 and named in error_lines(err)[0], err
    assert Registry.open(store + "/registry").list() == []
    assert not (Path(store) / "registry" / "models" / "med" / "versions").exists()


def test_register_on_s3_reads_headers_by_range_and_refuses_a_lie(s3_bucket: str, sample_run_dir: Path,
                                                                 publish_sample_run: Callable[..., str],
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    named = _forge(sample_run_dir, "a header that lies")
    run_uri = publish_sample_run(s3_bucket, "run-forged")
    code, _, err = run_main(["registry", "register", "med", run_uri, "--store", s3_bucket], capsys)
    assert code == 3 and named in error_lines(err)[0] and "the header lies" in err, err
    assert Registry.open(s3_bucket + "/registry").list() == []


def _cache_a_genuine_copy(store: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    from job.inference.artifacts import fetch_artifact
    from job.inference.refs import resolve_ref

    monkeypatch.setenv("MEDFT_CACHE", str(tmp_path / "cache"))
    return fetch_artifact(resolve_ref("med:1", store=store), "merged")


def _verify(capsys: pytest.CaptureFixture[str], store: str, *args: str) -> tuple[int, dict[str, Any], str]:
    code, out, err = run_main(["registry", "verify", *args, "--store", store, "--json"], capsys)
    return code, json.loads(out), err


def test_verify_catches_a_file_changed_in_the_local_store(tmp_path: Path, publish_sample_run: Callable[..., str],
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    store = str(tmp_path / "store")
    run_uri = publish_sample_run(store, "run-1")
    Registry.open(store + "/registry").register("med", run_uri)
    Registry.open(store + "/registry").register("med", run_uri)
    cached = _cache_a_genuine_copy(store, monkeypatch, tmp_path)
    code, report, _ = _verify(capsys, store, "--all")
    assert code == 0 and report["ok"] and [v["files"] for v in report["versions"]] == [9, 9]

    shard = Path(run_uri) / "merged" / "model-00001-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # same size, one byte flipped: only a re-hash sees it
    shard.write_bytes(bytes(data))
    record = Path(store) / "registry" / "models" / "med" / "versions" / "2.json"
    doc = json.loads(record.read_text())
    doc["artifacts"]["adapter"]["files"]["adapter_config.json"] = "0" * 64
    record.write_text(json.dumps(doc))
    assert (cached / shard.name).read_bytes() != bytes(data)  # the cache still holds the genuine copy

    code, report, err = _verify(capsys, store, "--all")
    assert code == 3 and "2 version(s)" in error_lines(err)[0]
    problems = {v["ref"]: [(p["path"], p["problem"]) for p in v["problems"]] for v in report["versions"]}
    assert [path for path, _ in problems["med:1"]] == [str(shard)]
    assert "changed after it was published" in problems["med:1"][0][1]
    assert sorted(path for path, _ in problems["med:2"]) == sorted([str(shard), f"{run_uri}/adapter/adapter_config.json"])
    code, out, err = run_main(["registry", "verify", "med:1", "--store", store], capsys)
    assert code == 3 and f"{shard}: sha256 is" in out and str(shard) in error_lines(err)[0]


def test_verify_catches_an_s3_object_replaced_with_forged_metadata(s3_bucket: str, s3_client: Callable[[str], Any],
                                                                   s3_server: str, tmp_path: Path,
                                                                   publish_sample_run: Callable[..., str],
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    run_uri = publish_sample_run(s3_bucket, "run-s3")
    Registry.open(s3_bucket + "/registry").register("med", run_uri)
    _cache_a_genuine_copy(s3_bucket, monkeypatch, tmp_path)
    assert _verify(capsys, s3_bucket, "med:1")[0] == 0

    bucket, prefix = s3_bucket.removeprefix("s3://").split("/", 1)
    key = f"{prefix}/runs/run-s3/merged/config.json"
    client = s3_client(s3_server)
    old = client.head_object(Bucket=bucket, Key=key)
    forged = json.dumps({"model_type": "llamb"}).encode()
    assert len(forged) == old["ContentLength"]
    client.put_object(Bucket=bucket, Key=key, Body=forged, Metadata=old["Metadata"])  # claims the old sha256
    code, report, err = _verify(capsys, s3_bucket, "med:1")
    assert code == 3 and [p["path"] for p in report["versions"][0]["problems"]] == [f"{run_uri}/merged/config.json"]
    client.delete_object(Bucket=bucket, Key=f"{prefix}/registry/models/med/versions/1.json")
    client.put_object(Bucket=bucket, Key=f"{prefix}/registry/models/med/versions/1.json", Body=b"{not json")
    code, report, err = _verify(capsys, s3_bucket, "--all")
    assert code == 3 and report["unreadable"] and "versions/1.json" in report["unreadable"][0]["path"], err


def test_verify_takes_a_ref_or_all(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = str(tmp_path / "store")
    for args in ([], ["med:1", "--all"]):
        code, _, err = run_main(["registry", "verify", *args, "--store", store], capsys)
        assert code == 2 and "REF or --all" in error_lines(err)[0]
    assert run_main(["registry", "verify", "med:1", "--store", store], capsys)[0] == 4
