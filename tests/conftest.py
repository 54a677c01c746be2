"""Shared pytest fixtures. The S3 ones are meant for every test that needs object storage.

S3 against moto, on 127.0.0.1 only (nothing leaves the machine):

``s3_server`` (session)
    moto's ``ThreadedMotoServer`` on 127.0.0.1 at a free port. Sets ``AWS_ACCESS_KEY_ID``,
    ``AWS_SECRET_ACCESS_KEY`` and ``AWS_DEFAULT_REGION`` to test values for the session (and points the
    AWS config/credential files at nothing, so a developer's profile never leaks in). Yields the endpoint
    URL, ``http://127.0.0.1:<port>``.
``s3_bucket`` (function)
    A fresh bucket on ``s3_server``; sets ``MEDFT_S3_ENDPOINT_URL`` (monkeypatch) so ``open_store`` and
    subprocesses inheriting the environment reach it. Yields ``s3://<bucket>/medft``.
``s3_serial_server`` (session)
    moto's app behind werkzeug's single-threaded server (``make_server(..., threaded=False)``, the server
    ``run_simple(..., threaded=False)`` runs), one request at a time: moto's threaded server checks a
    condition and then writes without a lock, so races (If-None-Match, If-Match) are only meaningful here.
    Its WSGI middleware injects faults: yields a :class:`SerialS3` with ``.endpoint`` and ``.faults``
    (see :class:`Faults`: ``faults.add(status=503, code="SlowDown", times=2, method="PUT")``).
``s3_serial_bucket`` (function)
    A fresh bucket on the serial server, ``MEDFT_S3_ENDPOINT_URL`` set, faults cleared before and after.
    Yields ``s3://<bucket>/medft``.
``s3_client`` (function)
    ``s3_client(endpoint)`` -> a plain boto3 client for that endpoint, to inspect or tamper with objects.
``sample_run_dir`` / ``publish_sample_run`` (function)
    A small run folder (adapter/, merged/, metrics.json, config.yaml) and a helper that publishes it to a
    store as ``runs/<run_id>`` with a manifest; returns the run folder URI.

Both servers share moto's in-process backend; every test gets its own bucket, so they never collide. Do
not combine them with ``moto.mock_aws`` in one test: leaving a mock resets the shared backend.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.faults import RequestRule, first_due, reason

TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing-access-key",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}
_UNSET = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def _aws_test_env() -> Iterator[None]:
    mp = pytest.MonkeyPatch()
    for k, v in TEST_ENV.items():
        mp.setenv(k, v)
    for k in _UNSET:
        mp.delenv(k, raising=False)
    yield
    mp.undo()


def make_s3_client(endpoint: str) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id=TEST_ENV["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=TEST_ENV["AWS_SECRET_ACCESS_KEY"],
                        config=Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 1}))


@pytest.fixture
def s3_client() -> Callable[[str], Any]:
    return make_s3_client


@pytest.fixture(scope="session")
def s3_server(_aws_test_env: None) -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)  # the OS picks: no race for a port
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def _new_bucket(endpoint: str) -> str:
    bucket = f"medft-test-{uuid.uuid4().hex[:12]}"
    make_s3_client(endpoint).create_bucket(Bucket=bucket)
    return bucket


@pytest.fixture
def s3_bucket(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    bucket = _new_bucket(s3_server)
    monkeypatch.setenv("MEDFT_S3_ENDPOINT_URL", s3_server)
    yield f"s3://{bucket}/medft"


# ------------------------------------------------------------------------ fault-injecting serial server

@dataclass(kw_only=True)
class Fault(RequestRule):
    times: int | None = 1
    applied: bool = False
    """Let moto apply the request, then answer the error anyway (a response lost after the write)."""


@dataclass
class Faults:
    """Faults the serial server injects, in order of ``add``; ``injected`` logs what it answered."""

    rules: list[Fault] = field(default_factory=list)
    injected: list[tuple[str, str, str, int]] = field(default_factory=list)
    requests: list[tuple[str, str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, **kw: Any) -> Fault:
        f = Fault(**kw)
        with self.lock:
            self.rules.append(f)
        return f

    def clear(self) -> None:
        with self.lock:
            self.rules.clear()
            self.injected.clear()
            self.requests.clear()

    def take(self, method: str, path: str, query: str) -> Fault | None:
        with self.lock:
            self.requests.append((method, path, query))
            f = first_due(self.rules, method, path, query)
            if f is None:
                return None
            f.hits += 1
            self.injected.append((method, path, query, f.status))
            return f


def fault_middleware(app: Any, faults: Faults) -> Any:
    def wrapped(environ: dict[str, Any], start_response: Any) -> Any:
        method = environ.get("REQUEST_METHOD", "")
        path = environ.get("PATH_INFO", "")
        query = environ.get("QUERY_STRING", "")
        fault = faults.take(method, path, query)
        if fault is None:
            return app(environ, start_response)
        if fault.applied:
            result = app(environ, lambda *a, **k: None)
            b"".join(result)
            getattr(result, "close", lambda: None)()
        else:
            length = int(environ.get("CONTENT_LENGTH") or 0)
            if length:
                environ["wsgi.input"].read(length)  # drain the body so the client sees our answer
        body = fault.error_body()
        start_response(f"{fault.status} {reason(fault.status)}",
                       [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))])
        return [body] if method != "HEAD" else [b""]

    return wrapped


@dataclass
class SerialS3:
    endpoint: str
    faults: Faults


@pytest.fixture(scope="session")
def s3_serial_server(_aws_test_env: None) -> Iterator[SerialS3]:
    from moto.moto_server.threaded_moto_server import MotoRequestHandler
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    faults = Faults()
    app = fault_middleware(DomainDispatcherApplication(create_backend_app), faults)
    server = make_server("127.0.0.1", 0, app, threaded=False, request_handler=MotoRequestHandler)
    server.request_queue_size = 256  # room for many concurrent clients waiting their turn
    thread = threading.Thread(target=server.serve_forever, name="moto-serial", daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    try:
        yield SerialS3(f"http://{host}:{port}", faults)
    finally:
        server.shutdown()
        thread.join(timeout=10)


@pytest.fixture
def s3_serial_bucket(s3_serial_server: SerialS3, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    s3_serial_server.faults.clear()
    bucket = _new_bucket(s3_serial_server.endpoint)
    monkeypatch.setenv("MEDFT_S3_ENDPOINT_URL", s3_serial_server.endpoint)
    yield f"s3://{bucket}/medft"
    s3_serial_server.faults.clear()


# ------------------------------------------------------------------------------------- sample runs

def safetensors_bytes(size: int, *, lie: bool = False) -> bytes:
    """A ``size``-byte safetensors file of one random U8 tensor, its header true (or, with ``lie``, claiming
    twice the bytes the file holds)."""
    n = size - 8 - 128  # a 128-byte header, padded with spaces as safetensors pads its own
    header = json.dumps({"w": {"dtype": "U8", "shape": [n * (2 if lie else 1)], "data_offsets": [0, n]}}).encode()
    if n > 0 and len(header) <= 128:
        return (128).to_bytes(8, "little") + header.ljust(128) + os.urandom(n)
    raise AssertionError(f"no safetensors layout of {size} bytes")


@pytest.fixture
def sample_run_dir(tmp_path: Path) -> Path:
    """A run folder as the job leaves it: adapter/, merged/ (two shards + index), metrics, config."""
    root = tmp_path / "sample-run"
    (root / "adapter").mkdir(parents=True)
    (root / "merged").mkdir()
    (root / "adapter" / "adapter_config.json").write_text(json.dumps({"r": 16, "lora_alpha": 16}))
    (root / "adapter" / "adapter_model.safetensors").write_bytes(safetensors_bytes(4096))
    (root / "merged" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    (root / "merged" / shards[0]).write_bytes(safetensors_bytes(300_000))
    (root / "merged" / shards[1]).write_bytes(safetensors_bytes(200_000))
    (root / "merged" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w1": shards[0],
                                                                                              "w2": shards[1]}}))
    (root / "merged" / "tokenizer.json").write_text(json.dumps({"version": "1.0"}))
    (root / "metrics.json").write_text(json.dumps({"train_loss": 1.5}))
    (root / "config.yaml").write_text("model:\n  base: hf://org/tiny\n")
    return root


SAMPLE_RECORD = {
    "artifacts": {"adapter": "adapter", "merged": "merged"},
    "lineage": {
        "base_model": {"uri": "hf://org/tiny", "revision": "0" * 40, "sha256": {"model.safetensors": "a" * 64}},
        "dataset": {"source": "hf://org/data", "subset": "en", "split": "train[:10]", "rows": 10,
                    "content_sha256": "b" * 64},
    },
    "metrics": {"train_loss": 1.5, "eval_loss_before": 2.0, "eval_loss_after": 1.2, "tokens_per_s": 900.0},
    "environment": {"medft": "0.1.0", "torch": "2.13.0", "gpu": None},
    "config": {"model": {"base": "hf://org/tiny"}, "train": {"max_steps": 1}},
}


@pytest.fixture
def publish_sample_run(sample_run_dir: Path) -> Callable[..., str]:
    """``publish_sample_run(store_uri, run_id="run-1", record=None, files=None) -> run folder URI``; ``files``
    (run-relative path -> bytes) are published in the run folder too, listed in its manifest."""
    def publish(store_uri: str, run_id: str = "run-1", record: dict[str, Any] | None = None,
                files: dict[str, bytes] | None = None) -> str:
        from registry.runs import publish_dir, run_prefix
        from registry.store import open_store

        store = open_store(store_uri)
        local = sample_run_dir
        if files:
            local = sample_run_dir.with_name(f"{sample_run_dir.name}-{run_id}")
            shutil.copytree(sample_run_dir, local)
            for rel, data in files.items():
                (local / rel).parent.mkdir(parents=True, exist_ok=True)
                (local / rel).write_bytes(data)
        publish_dir(store, run_id, local, dict(record or SAMPLE_RECORD))
        return store.url(run_prefix(run_id))

    return publish
