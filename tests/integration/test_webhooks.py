"""Promotion events against real HTTP receivers on 127.0.0.1: one that checks the signature, a slow one, one that
answers 500 then 200, and one that is down (a closed port)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from registry import webhooks
from registry.registry import Registry
from tests.cli import error_lines, run_main
from tests.integration.test_registry_gate import scored_run

SECRET = "s3cret-for-tests-only"


class Receiver:
    """An HTTP server on 127.0.0.1 whose answers come from ``answer(n)`` (n: the request's number, from 0)."""

    def __init__(self, answer: Callable[[int], int], delay_s: float = 0.0) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.requests.append((dict(self.headers), body))
                time.sleep(delay_s)
                status = answer(len(outer.requests) - 1)
                expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
                if not hmac.compare_digest(self.headers.get("X-Medft-Signature-256", ""), expected):
                    status = 401  # what a receiver checking the signature answers a forged event
                try:
                    self.send_response(status)
                    self.end_headers()
                except OSError:
                    pass  # the client gave up waiting (the slow receiver)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receivers() -> Iterator[dict[str, Receiver]]:
    made = {"checks": Receiver(lambda n: 200), "flaky": Receiver(lambda n: 500 if n == 0 else 200),
            "slow": Receiver(lambda n: 200, delay_s=0.6)}
    yield made
    for r in made.values():
        r.close()


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/down"


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_an_alias_move_is_announced_signed_and_a_receiver_that_is_down_never_blocks_it(
        backend: str, request: pytest.FixtureRequest, tmp_path: Path, receivers: dict[str, Receiver],
        publish_sample_run: Callable[..., str], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    store_uri = str(tmp_path / "store") if backend == "local" else request.getfixturevalue("s3_bucket")
    reg = Registry.open(store_uri + "/registry")
    run_uri = publish_sample_run(store_uri, run_id="run-1", **scored_run(0.6))
    reg.register("m", run_uri)
    args = ["--store", store_uri]
    secret_url = receivers["checks"].url.replace("http://", "http://ops:pa55word@") + "?token=tok-123"
    for url in (secret_url, receivers["flaky"].url):
        assert run_main(["registry", "webhooks", "add", url, *args], capsys)[0] == 0
    down = _closed_port_url()
    monkeypatch.setenv("MEDFT_REGISTRY_WEBHOOKS", f"{receivers['slow'].url}, {down}")
    monkeypatch.setenv("MEDFT_WEBHOOK_SECRET", SECRET)
    monkeypatch.setenv("MEDFT_WEBHOOK_TIMEOUT", "0.3")
    code, out, _ = run_main(["registry", "webhooks", "list", *args], capsys)
    assert code == 0 and "pa55word" not in out and "tok-123" not in out and webhooks.label(secret_url) in out
    assert "/hook" not in out  # a webhook's path can be its secret (Slack, Discord): shown as origin and hash
    assert "events are signed" in out

    started = time.monotonic()
    code, out, _ = run_main(["registry", "alias", "m", "1", "production", *args], capsys)
    elapsed = time.monotonic() - started
    assert code == 0 and reg.get("m@production").version == 1  # made, whatever the receivers did
    assert elapsed < 10

    [(headers, body)] = receivers["checks"].requests
    event = json.loads(body)
    assert headers["X-Medft-Event"] == "alias.set" and headers["X-Medft-Delivery"] == event["id"]
    assert headers["Authorization"] == "Basic " + base64.b64encode(b"ops:pa55word").decode()  # the URL's user
    assert int(headers["X-Medft-Timestamp"]) == event["timestamp"]
    assert {k: event[k] for k in ("type", "model", "version", "alias", "before", "after", "run_id", "run_uri")} == {
        "type": "alias.set", "model": "m", "version": 1, "alias": "production", "before": None, "after": 1,
        "run_id": "run-1", "run_uri": run_uri}
    assert set(event["artifacts"]) == {"adapter", "merged"} and event["scores"]["medqa"]["accuracy"] == 0.6
    assert event["registry"] == reg.uri and event["seq"] == 2 and event["time"]
    assert len(receivers["flaky"].requests) == 2 and receivers["flaky"].requests[1][1] == body  # the same event

    # The outcome of each receiver is in the history entry, URLs without their secrets.
    [entry] = reg.history("m", "production")
    by_url = {d["url"]: d for d in entry.deliveries or []}
    shown = webhooks.label(secret_url)
    assert by_url[shown] == {"url": shown, "ok": True, "status": 200, "attempts": 1}
    flaky = webhooks.label(receivers["flaky"].url)
    assert by_url[flaky] == {"url": flaky, "ok": True, "status": 200, "attempts": 2}
    slow, gone = by_url[webhooks.label(receivers["slow"].url)], by_url[webhooks.label(down)]
    assert not slow["ok"] and slow["attempts"] == 3 and "timed out" in slow["error"]
    assert not gone["ok"] and gone["attempts"] == 3 and "ConnectionRefusedError" in gone["error"]
    stored = reg.store.get_bytes("models/m/aliases.json")[0].decode() + reg.store.get_bytes("config.json")[0].decode()
    assert SECRET not in stored and "tok-123" not in stored.split('"webhooks"')[0]
    code, out, _ = run_main(["registry", "history", "m@production", *args], capsys)
    assert "webhooks 2/4 delivered" in out


def test_a_forged_or_unsigned_event_is_refused_by_a_checking_receiver_and_a_bad_url_is_refused_early(
        tmp_path: Path, receivers: dict[str, Receiver], publish_sample_run: Callable[..., str],
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    store_uri = str(tmp_path / "store")
    reg = Registry.open(store_uri + "/registry")
    reg.register("m", publish_sample_run(store_uri))
    monkeypatch.setenv("MEDFT_REGISTRY_WEBHOOKS", receivers["checks"].url)
    monkeypatch.setenv("MEDFT_WEBHOOK_SECRET", "another-secret")  # not the receiver's
    reg.set_alias("m", 1, "staging")
    [delivery] = reg.history("m", "staging")[0].deliveries or []
    assert delivery["status"] == 401 and delivery["attempts"] == 1 and not delivery["ok"]  # a 4xx is not retried
    monkeypatch.delenv("MEDFT_WEBHOOK_SECRET")
    reg.delete_alias("m", "staging")
    headers, _ = receivers["checks"].requests[-1]
    assert "X-Medft-Signature-256" not in headers and headers["X-Medft-Event"] == "alias.deleted"
    # A URL that is not one refuses the change before it is made.
    monkeypatch.setenv("MEDFT_REGISTRY_WEBHOOKS", "ftp://127.0.0.1/x")
    code, _, err = run_main(["registry", "alias", "m", "1", "staging", "--store", store_uri], capsys)
    assert code == 2 and "MEDFT_REGISTRY_WEBHOOKS: 'ftp://127.0.0.1/x' is not an http:// or https:// URL" in (
        error_lines(err)[0])
    assert reg.history("m", "staging")[0].action == "delete"
    code, _, err = run_main(["registry", "webhooks", "remove", "http://127.0.0.1:1/nope", "--store", store_uri],
                            capsys)
    assert code == 4 and "no webhook" in error_lines(err)[0]
