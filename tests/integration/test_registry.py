"""Runs, manifests and the registry, on a local store and on S3 (moto server on 127.0.0.1)."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from registry.errors import ConfigError, DataError, NotFoundError, TransientError
from registry.registry import Registry, parse_ref
from registry.runs import (
    MANIFEST,
    is_published,
    publish_dir,
    read_manifest,
    run_prefix,
    verify_run,
    write_manifest,
)
from registry.store import MiB, PreconditionFailed, TransferSettings, open_store
from registry.versions import ModelVersion
from tests.alias_race import move_alias_before_our_write
from tests.conftest import SAMPLE_RECORD


@pytest.fixture(params=["local", "s3"])
def store_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_bucket")


# ------------------------------------------------------------------------------------------ runs

def test_manifest_written_last_and_create_only(store_uri: str, sample_run_dir: Path) -> None:
    store = open_store(store_uri)
    assert not is_published(store, "run-1")
    files = store.put_dir(run_prefix("run-1"), sample_run_dir)
    assert not is_published(store, "run-1")
    uri = write_manifest(store, "run-1", files, SAMPLE_RECORD)
    assert uri == store.url("runs/run-1/MANIFEST.json")
    assert is_published(store, "run-1")
    doc = read_manifest(store, "run-1")
    assert doc["format"] == 1 and doc["run_id"] == "run-1" and doc["created_at"]
    assert doc["files"]["merged/model-00001-of-00002.safetensors"]["size"] == 300_000
    assert MANIFEST not in doc["files"]
    assert doc["lineage"] == SAMPLE_RECORD["lineage"]
    assert read_manifest(None, store.url("runs/run-1")) == doc
    verify_run(store, "run-1")
    with pytest.raises(PreconditionFailed, match="already published"):
        write_manifest(store, "run-1", files, SAMPLE_RECORD)


def test_read_manifest_refuses_unpublished_and_corrupt_runs(store_uri: str) -> None:
    store = open_store(store_uri)
    with pytest.raises(NotFoundError, match="run .*runs/nope is not published") as e:
        read_manifest(store, "nope")
    assert e.value.exit_code == 4
    store.put_bytes("runs/bad/MANIFEST.json", b"{not json")
    with pytest.raises(DataError, match="not valid JSON") as e3:
        read_manifest(store, "bad")
    assert e3.value.exit_code == 3
    store.put_bytes("runs/partial/MANIFEST.json", json.dumps({"format": 1, "run_id": "partial"}).encode())
    with pytest.raises(DataError, match="'created_at'"):
        read_manifest(store, "partial")
    with pytest.raises(ConfigError):
        run_prefix("../escape")


def test_verify_run_catches_missing_and_changed_files(store_uri: str, publish_sample_run: Callable[..., str]) -> None:
    publish_sample_run(store_uri, "run-1")
    store = open_store(store_uri)
    store.put_bytes("runs/run-1/metrics.json", b'{"train_loss": 9}')  # same run, other content
    with pytest.raises(DataError, match="metrics.json"):
        verify_run(store, "run-1")
    store.delete("runs/run-1/adapter/adapter_model.safetensors")
    with pytest.raises(DataError, match="missing"):
        verify_run(store, "run-1")


# -------------------------------------------------------------------------------------- registry

def test_register_get_resolve_download(store_uri: str, publish_sample_run: Callable[..., str],
                                       sample_run_dir: Path, tmp_path: Path) -> None:
    run_uri = publish_sample_run(store_uri, "run-1")
    reg = Registry.open(store_uri + "/registry")
    mv = reg.register("medical-r1", run_uri, aliases=["prod"], tags={"team": "ml"}, description="first")
    assert (mv.name, mv.version, mv.run_id, mv.run_uri) == ("medical-r1", 1, "run-1", run_uri)
    assert mv.aliases == ("prod",) and mv.tags == {"team": "ml"} and mv.description == "first"
    assert mv.base_model["revision"] == "0" * 40 and mv.dataset["rows"] == 10
    assert mv.metrics["eval_loss_after"] == 1.2 and mv.environment["torch"] == "2.13.0"
    assert mv.config["train"]["max_steps"] == 1
    assert mv.artifacts["merged"]["uri"] == run_uri + "/merged"
    manifest = read_manifest(None, run_uri)
    assert mv.artifacts["adapter"]["files"] == {
        "adapter_config.json": manifest["files"]["adapter/adapter_config.json"]["sha256"],
        "adapter_model.safetensors": manifest["files"]["adapter/adapter_model.safetensors"]["sha256"]}
    assert len(mv.artifacts["merged"]["files"]) == 5

    mv2 = reg.register("medical-r1", run_uri)
    assert mv2.version == 2
    assert reg.get("medical-r1").version == 2
    assert reg.get("medical-r1@latest").version == 2
    assert reg.get("medical-r1:1") == mv
    assert reg.get("medical-r1@prod") == mv
    assert [v.version for v in reg.list("medical-r1")] == [1, 2]
    assert reg.artifact_uri("medical-r1@prod", "adapter") == run_uri + "/adapter"
    assert reg.artifact_uri("medical-r1") == run_uri + "/merged"
    assert reg.find_by_run("medical-r1", "run-1") == mv
    assert reg.find_by_run("medical-r1", "run-9") is None
    assert ModelVersion.from_dict(mv.to_dict()) == mv

    dest = reg.download("medical-r1:1", tmp_path / "dl")
    for rel in mv.artifacts["merged"]["files"]:
        assert (dest / rel).read_bytes() == (sample_run_dir / "merged" / rel).read_bytes()


def test_list_all_names_and_aliases(store_uri: str, publish_sample_run: Callable[..., str]) -> None:
    run_uri = publish_sample_run(store_uri, "run-1")
    reg = Registry.open(store_uri + "/registry")
    assert reg.list() == []
    reg.register("b-model", run_uri)
    reg.register("a-model", run_uri)
    reg.register("a-model", run_uri, aliases=["prod", "staging"])
    assert [(v.name, v.version, v.aliases) for v in reg.list()] == [
        ("a-model", 1, ()), ("a-model", 2, ("prod", "staging")), ("b-model", 1, ())]
    reg.set_alias("a-model", 1, "prod")
    assert reg.get("a-model@prod").version == 1
    reg.delete_alias("a-model", "staging")
    with pytest.raises(NotFoundError, match="a-model@staging"):
        reg.get("a-model@staging")
    with pytest.raises(NotFoundError):
        reg.delete_alias("a-model", "staging")
    with pytest.raises(NotFoundError, match="a-model:7"):
        reg.set_alias("a-model", 7, "prod")
    with pytest.raises(ConfigError):
        reg.set_alias("a-model", 1, "latest")


@pytest.mark.parametrize("ref", ["ghost", "ghost:1", "ghost@prod", "a/b", "a\\b", "..", "a..b", "x:0", "x:-1",
                                 "x@", "", "s3://bucket/x"])
def test_unknown_or_bad_refs_are_not_found(tmp_path: Path, ref: str) -> None:
    reg = Registry.open(str(tmp_path / "registry"))
    with pytest.raises(NotFoundError) as e:
        reg.get(ref)
    assert repr(ref) in e.value.message
    assert e.value.exit_code == 4


def test_parse_ref() -> None:
    assert parse_ref("m") == ("m", None, None)
    assert parse_ref("m.v2_x-y:12") == ("m.v2_x-y", 12, None)
    assert parse_ref("m@prod") == ("m", None, "prod")


def test_register_refuses_a_run_without_manifest(store_uri: str, sample_run_dir: Path) -> None:
    store = open_store(store_uri)
    store.put_dir(run_prefix("run-x"), sample_run_dir)  # uploaded, never published
    reg = Registry.open(store_uri + "/registry")
    with pytest.raises(NotFoundError, match="not published") as e:
        reg.register("m", store.url("runs/run-x"))
    assert e.value.exit_code == 4 and "\n" not in e.value.message
    store.put_bytes("runs/run-y/MANIFEST.json", b"[]")
    with pytest.raises(DataError):
        reg.register("m", store.url("runs/run-y"))
    assert reg.list() == []


def test_hand_edited_record_missing_a_field(tmp_path: Path, publish_sample_run: Callable[..., str]) -> None:
    store_uri = str(tmp_path / "store")
    reg = Registry.open(store_uri + "/registry")
    reg.register("m", publish_sample_run(store_uri))
    path = tmp_path / "store" / "registry" / "models" / "m" / "versions" / "1.json"
    doc = json.loads(path.read_text())
    del doc["run_uri"]
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"1\.json lacks the required field 'run_uri'"):
        reg.get("m:1")


def test_corrupted_download_fails_its_checksum(store_uri: str, publish_sample_run: Callable[..., str],
                                               tmp_path: Path) -> None:
    run_uri = publish_sample_run(store_uri)
    reg = Registry.open(store_uri + "/registry")
    reg.register("m", run_uri)
    open_store(run_uri).put_bytes("merged/config.json", b'{"model_type": "tampered"}')
    with pytest.raises(DataError, match="checksum mismatch.*config.json") as e:
        reg.download("m", tmp_path / "dl")
    assert e.value.exit_code == 3
    assert not (tmp_path / "dl" / "config.json").exists()


# ------------------------------------------------------------------------------------- concurrency

def _register_worker(registry_uri: str, run_uri: str, barrier: Any, out: Any) -> None:
    try:
        barrier.wait(timeout=120)
        mv = Registry.open(registry_uri).register("race", run_uri)
        out.put(("ok", mv.version))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        out.put(("error", repr(e)))


def _alias_worker(registry_uri: str, alias: str, version: int, barrier: Any, out: Any) -> None:
    try:
        barrier.wait(timeout=120)
        Registry.open(registry_uri).set_alias("race", version, alias)
        out.put(("ok", alias))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        out.put(("error", repr(e)))


def _run_processes(target: Callable[..., None], args_list: list[tuple[Any, ...]]) -> list[tuple[str, Any]]:
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(len(args_list))
    out = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, barrier, out)) for args in args_list]
    for p in procs:
        p.start()
    results = [out.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    return results


@pytest.fixture(params=["local", "s3-serial"])
def race_store_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_serial_bucket")


@pytest.mark.slow
def test_sixteen_processes_register_versions_one_to_sixteen(race_store_uri: str,
                                                           publish_sample_run: Callable[..., str],
                                                           request: pytest.FixtureRequest) -> None:
    run_uri = publish_sample_run(race_store_uri)
    registry_uri = race_store_uri + "/registry"
    results = _run_processes(_register_worker, [(registry_uri, run_uri)] * 16)
    assert [r for r in results if r[0] != "ok"] == []
    assert sorted(v for _, v in results) == list(range(1, 17))
    assert [mv.version for mv in Registry.open(registry_uri).list("race")] == list(range(1, 17))
    if race_store_uri.startswith("s3://"):  # the processes really collided: more tries than versions
        faults = request.getfixturevalue("s3_serial_server").faults
        puts = [r for r in faults.requests if r[0] == "PUT" and "/versions/" in r[1]]
        assert len(puts) > 16


@pytest.mark.slow
def test_concurrent_alias_updates_lose_nothing(race_store_uri: str, publish_sample_run: Callable[..., str]) -> None:
    run_uri = publish_sample_run(race_store_uri)
    registry_uri = race_store_uri + "/registry"
    reg = Registry.open(registry_uri)
    for _ in range(3):
        reg.register("race", run_uri)
    jobs = [(registry_uri, f"alias-{i}", i % 3 + 1) for i in range(8)]
    results = _run_processes(_alias_worker, jobs)
    assert [r for r in results if r[0] != "ok"] == []
    for _, alias, version in jobs:
        assert reg.get(f"race@{alias}").version == version


def test_stale_alias_update_is_retried(store_uri: str, publish_sample_run: Callable[..., str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    run_uri = publish_sample_run(store_uri)
    reg = Registry.open(store_uri + "/registry")
    reg.register("m", run_uri, aliases=["champion"])
    reg.register("m", run_uri)
    other = Registry.open(store_uri + "/registry")
    conflicts = move_alias_before_our_write(reg, monkeypatch, lambda: other.set_alias("m", 1, "staging"))
    reg.set_alias("m", 2, "prod")
    assert conflicts == ["models/m/aliases.json"]  # our first, stale write was refused, then retried
    assert {a: reg.get(f"m@{a}").version for a in ("champion", "staging", "prod")} == {
        "champion": 1, "staging": 1, "prod": 2}


# ------------------------------------------------------------------------------- interrupted upload

def test_upload_interrupted_between_parts_publishes_nothing(s3_serial_server: Any, s3_serial_bucket: str,
                                                            sample_run_dir: Path, s3_client: Any,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDFT_S3_PART_SIZE_MB", "5")
    monkeypatch.setenv("MEDFT_S3_MAX_ATTEMPTS", "2")
    (sample_run_dir / "merged" / "model-00001-of-00002.safetensors").write_bytes(os.urandom(12 * MiB))
    s3_serial_server.faults.add(status=500, code="InternalError", times=None, query=r"partNumber=2")
    store = open_store(s3_serial_bucket)
    with pytest.raises(TransientError):
        publish_dir(store, "run-cut", sample_run_dir, SAMPLE_RECORD)
    s3_serial_server.faults.clear()
    assert not is_published(store, "run-cut")
    assert MANIFEST not in [k.rsplit("/", 1)[-1] for k in store.list("runs/run-cut")]
    assert "runs/run-cut/merged/model-00001-of-00002.safetensors" not in store.list()
    assert s3_client(s3_serial_server.endpoint).list_multipart_uploads(
        Bucket=store.bucket).get("Uploads", []) == []
    reg = Registry.open(s3_serial_bucket + "/registry")
    with pytest.raises(NotFoundError, match="not published"):
        reg.register("m", store.url("runs/run-cut"))
    assert reg.list() == []


def test_transfer_settings_reach_the_store(monkeypatch: pytest.MonkeyPatch, s3_bucket: str) -> None:
    monkeypatch.setenv("MEDFT_S3_CONCURRENCY", "3")
    assert open_store(s3_bucket).transfer == TransferSettings(concurrency=3)
