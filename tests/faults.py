"""A small fault-injecting HTTP proxy for S3, for tests: put it between a job and a real S3 server (moto).

Point ``MEDFT_S3_ENDPOINT_URL`` at :attr:`FaultProxy.endpoint`; every request is forwarded, as real HTTP, to
``upstream`` unless a rule matching it says otherwise. The proxy listens on 127.0.0.1 only and forwards
only to the upstream it was given (which must be on 127.0.0.1 as well), so nothing leaves the machine.

Rules (checked in the order added; the first that fires applies)::

    proxy.add("error", status=503, code="SlowDown", rate=0.1)       # an S3 error answer, request not forwarded
    proxy.add("drop", rate=0.05)                                    # close the connection, no answer
    proxy.add("drop_after", method="PUT", rate=0.05)                # forward (the write lands), lose the answer
    proxy.add("truncate", method="GET", rate=0.05)                  # forward, send half the body, close
    proxy.add("delay", seconds=0.3, rate=0.1)                       # a slow answer
    gate = proxy.add("hold", method="PUT", path=r"/checkpoint-4/")  # park matching requests until released
    gate.wait_held(1, timeout=60); ...; gate.release(forward=False)

``rate`` draws from one ``random.Random(seed)``, so a seed gives the same sequence of decisions; ``times``
caps how often a rule fires and ``after`` lets that many matching requests through first. Every request is
logged in :attr:`FaultProxy.requests` and every injected fault in :attr:`FaultProxy.injected` (and counted by
:meth:`FaultProxy.tally`), so a test can count both (e.g. to prove that a permanent error was not retried).

``hold`` parks the request after its body was read; ``release(forward=True)`` sends the parked requests on,
``release(forward=False)`` drops them unanswered, as when the client died while they were in flight.
``barrier=N`` on a hold rule releases the first N matching requests together as soon as N are parked
(a start line for races). Closing the proxy releases everything still parked, unforwarded.
"""

from __future__ import annotations

import atexit
import http.client
import random
import re
import socket
import socketserver
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import urlsplit

ACTIONS = ("error", "drop", "drop_after", "truncate", "delay", "hold")
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade",
               "expect"}


@dataclass(kw_only=True)
class RequestRule:
    """Which requests a fault applies to, and its counts; shared by this proxy and the WSGI middleware behind
    the serial moto server (``tests/conftest.py``)."""

    method: str | None = None
    path: str | None = None
    """Regex searched in the request path (``/bucket/key``)."""
    query: str | None = None
    """Regex searched in the query string (e.g. ``partNumber=[3-9]``)."""
    times: int | None = None
    """How many requests to fault; ``None``: every matching request."""
    after: int = 0
    """Let this many matching requests through first."""
    status: int = 503
    code: str = "SlowDown"
    seen: int = 0
    hits: int = 0

    def matches(self, method: str, path: str, query: str) -> bool:
        return ((self.method is None or self.method == method)
                and (self.path is None or re.search(self.path, path) is not None)
                and (self.query is None or re.search(self.query, query) is not None))

    def error_body(self) -> bytes:
        """The S3 error document answered for this fault."""
        return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{self.code}</Code>'
                f"<Message>injected by a test</Message><RequestId>fault</RequestId></Error>").encode()


def reason(status: int) -> str:
    """The standard reason phrase of an HTTP status, for injected error answers."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def first_due(rules: list[Any], method: str, path: str, query: str, admit: Any = None) -> Any:
    """The first of ``rules`` that matches the request and is due (past ``after``, under ``times``, and
    ``admit(rule)`` when given), or None. Counts ``seen`` on every matching rule it passes; the caller
    counts ``hits`` for the rule it applies. Call it holding the injector's lock."""
    for rule in rules:
        if not rule.matches(method, path, query):
            continue
        rule.seen += 1
        if rule.seen <= rule.after or (rule.times is not None and rule.hits >= rule.times):
            continue
        if admit is None or admit(rule):
            return rule
    return None


@dataclass
class Rule(RequestRule):
    action: str
    rate: float = 1.0
    seconds: float = 0.0
    barrier: int | None = None
    _held: list[tuple[threading.Event, list[bool]]] = field(default_factory=list)
    _parked: int = 0  # requests parked in all (a hit counts before its request is parked)
    _cond: threading.Condition = field(default_factory=threading.Condition)

    # hold ----------------------------------------------------------------------------------------------
    @property
    def held(self) -> int:
        """How many requests are parked by this rule right now."""
        with self._cond:
            return len(self._held)

    def wait_held(self, n: int = 1, timeout: float = 60.0) -> bool:
        """Wait until this rule has parked at least ``n`` requests in all; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._parked < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def release(self, *, forward: bool = True) -> int:
        """Let every parked request go on (``forward``) or drop it unanswered; returns how many."""
        with self._cond:
            held, self._held = self._held, []
        for event, decision in held:
            decision.append(forward)
            event.set()
        return len(held)

    def _park(self) -> bool:
        event, decision = threading.Event(), []
        with self._cond:
            self._held.append((event, decision))
            self._parked += 1
            self._cond.notify_all()
            if self.barrier is not None and len(self._held) >= self.barrier:
                ready, self._held = self._held, []
                for e, d in ready:
                    d.append(True)
                    e.set()
        event.wait()
        return decision[0]


class _Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128
    proxy: FaultProxy


RANDOM_STREAK = 3


class FaultProxy:
    """See the module docstring. Use as a context manager or call :meth:`close`."""

    def __init__(self, upstream: str, *, seed: int = 0) -> None:
        parts = urlsplit(upstream)
        if parts.hostname not in ("127.0.0.1", "localhost") or parts.scheme != "http":
            raise ValueError(f"upstream must be http://127.0.0.1:PORT, got {upstream!r}")
        self.upstream = (parts.hostname, parts.port or 80)
        self.rng = random.Random(seed)
        self.rules: list[Rule] = []
        self.requests: list[tuple[str, str, str]] = []
        self.ranges: list[tuple[str, str, str]] = []  # (method, path, Range header) of every ranged request
        self.injected: list[tuple[str, str, str, str]] = []  # (action, label, method, path)
        self.lock = threading.Lock()
        self._streaks: dict[tuple[str, str, str], int] = {}  # random faults in a row, by request
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.proxy = self
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)
        self._thread.start()
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self):  # returns self
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for rule in self.rules:
            rule.barrier = None
            rule.release(forward=False)
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def add(self, action: str, **kw: Any) -> Rule:
        if action not in ACTIONS:
            raise ValueError(f"unknown action {action!r}; one of {ACTIONS}")
        rule = Rule(action, **kw)
        with self.lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        """Remove every rule (parked requests are dropped) and forget what was logged."""
        with self.lock:
            rules, self.rules = self.rules, []
            self.requests.clear()
            self.injected.clear()
        for rule in rules:
            rule.release(forward=False)

    def count(self, action: str | None = None) -> int:
        with self.lock:
            return sum(1 for a, _, _, _ in self.injected if action is None or a == action)

    def tally(self) -> dict[str, int]:
        """How many times each fault was injected, e.g. ``{"503 SlowDown": 9, "drop": 4}``."""
        out: dict[str, int] = {}
        with self.lock:
            for _, label, _, _ in self.injected:
                out[label] = out.get(label, 0) + 1
        return dict(sorted(out.items()))

    def _decide(self, method: str, path: str, query: str) -> Rule | None:
        key = (method, path, query)
        with self.lock:
            self.requests.append(key)
            # Random faults (rate < 1) never hit one request more than RANDOM_STREAK times in a row: fewer
            # than the client's attempts, so a seeded fault rate cannot fail a run by a run of bad luck.
            random_ok = self._streaks.get(key, 0) < RANDOM_STREAK
            rule = first_due(self.rules, method, path, query,
                             admit=lambda r: r.rate >= 1.0 or (random_ok and self.rng.random() < r.rate))
            self._streaks[key] = self._streaks.get(key, 0) + 1 if rule is not None and rule.rate < 1.0 else 0
            if rule is None:
                return None
            with rule._cond:
                rule.hits += 1
                rule._cond.notify_all()
            label = f"{rule.status} {rule.code}" if rule.action == "error" else rule.action
            self.injected.append((rule.action, label, method, path))
            return rule


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and 100-continue for boto's large PUTs
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline().strip():  # trailers
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _drop(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _error(self, rule: Rule) -> None:
        body = rule.error_body()
        self.send_response(rule.status, reason(rule.status))
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(*self.server.proxy.upstream, timeout=120)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            if body or self.command in ("PUT", "POST"):
                headers["Content-Length"] = str(len(body))
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, resp.reason, resp.getheaders(), data
        finally:
            conn.close()

    def _handle(self) -> None:
        body = self._body()
        path, _, query = self.path.partition("?")
        if self.headers.get("Range"):
            with self.server.proxy.lock:
                self.server.proxy.ranges.append((self.command, path, self.headers["Range"]))
        rule = self.server.proxy._decide(self.command, path, query)
        action = rule.action if rule else None
        if action == "hold":
            assert rule is not None
            if not rule._park():
                return self._drop()
        elif action == "error":
            assert rule is not None
            return self._error(rule)
        elif action == "drop":
            return self._drop()
        elif action == "delay":
            assert rule is not None
            time.sleep(rule.seconds)
        status, reason, headers, data = self._forward(body)
        if action == "drop_after":
            return self._drop()
        self.send_response(status, reason)
        for k, v in headers:
            if k.lower() not in _HOP_BY_HOP and k.lower() != "content-length":
                self.send_header(k, v)
        length = next((v for k, v in headers if k.lower() == "content-length"), None)
        if self.command == "HEAD" or status in (204, 304):
            self.send_header("Content-Length", length if length is not None else "0")
            self.end_headers()
            return
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if action == "truncate" and len(data) > 1:
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            return self._drop()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._handle()

    do_PUT = do_POST = do_DELETE = do_HEAD = do_GET


# ----------------------------------------------------------------------------------- driving a job under faults

class Job:
    """A ``medft`` subprocess whose JSON log lines (stderr) are read as they come, to act on them.

    ``wait_for(event, step=...)`` blocks until a matching log event (or raises AssertionError when the job
    ends first or ``timeout`` passes); ``kill(sig)``, ``wait()``, ``stderr``, ``errors`` (the ``medft:
    error:`` lines) and ``events`` (every JSON log line) tell the rest. A job that times out is killed, and
    any still running when the test process exits too: a failed test leaves no orphan behind.
    """

    running: set[Job] = set()

    def __init__(self, cmd: list[str], *, cwd: Any, env: dict[str, str]) -> None:
        import subprocess

        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self.lines: list[str] = []
        self.out: list[str] = []
        self._cond = threading.Condition()
        self._done = False
        self._threads = [threading.Thread(target=self._read, args=(self.proc.stderr, self.lines, True), daemon=True),
                         threading.Thread(target=self._read, args=(self.proc.stdout, self.out, False), daemon=True)]
        for t in self._threads:
            t.start()
        Job.running.add(self)

    def _read(self, stream: Any, sink: list[str], main: bool) -> None:
        for line in stream:
            with self._cond:
                sink.append(line)
                self._cond.notify_all()
        if main:
            with self._cond:
                self._done = True
                self._cond.notify_all()

    @property
    def events(self) -> list[dict[str, Any]]:
        import json

        with self._cond:
            lines = list(self.lines)
        out = []
        for line in lines:
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
        return out

    def wait_for(self, event: str, timeout: float = 120.0, **fields: Any) -> dict[str, Any]:
        """The first log event named ``event`` whose fields include ``fields`` (a callable value is a test)."""
        import json

        def ok(doc: dict[str, Any]) -> bool:
            return doc.get("event") == event and all(
                (v(doc.get(k)) if callable(v) else doc.get(k) == v) for k, v in fields.items())

        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    if line.startswith("{") and f'"{event}"' in line:
                        doc = json.loads(line)
                        if ok(doc):
                            return doc
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if self._done or left <= 0:
                    if not self._done:
                        self.proc.kill()
                    raise AssertionError(f"no {event} {fields} (job {'ended' if self._done else 'timed out'}):\n"
                                         + "".join(self.lines[-30:]))
                self._cond.wait(left)

    def kill(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 180.0) -> int:
        import subprocess

        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        for t in self._threads:
            t.join(timeout=10)
        Job.running.discard(self)
        return code

    @property
    def stderr(self) -> str:
        with self._cond:
            return "".join(self.lines)

    @property
    def stdout(self) -> str:
        with self._cond:
            return "".join(self.out)

    @property
    def errors(self) -> list[str]:
        return [line.rstrip("\n") for line in self.stderr.splitlines() if line.startswith("medft: error:")]


def _kill_leftover_jobs() -> None:
    for job in list(Job.running):
        if job.proc.poll() is None:
            job.proc.kill()


atexit.register(_kill_leftover_jobs)


def fill_disk(directory: Any, name: str = "ballast") -> int:
    """Fill the filesystem holding ``directory`` until writes fail with ENOSPC; returns the bytes written."""
    import errno
    import os

    path = os.path.join(directory, name)
    written = 0
    with open(path, "ab", buffering=0) as f:
        for size in (2**20, 4096, 512, 1):
            block = b"\0" * size
            while True:
                try:
                    n = f.write(block)
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    break
                written += n or 0
                if not n:
                    break
    return written


# ------------------------------------------------------------------------------- what the reliability tests check

def run_files(store_uri: str, run_id: str) -> dict[str, int]:
    """``{relpath: size}`` of every object under ``runs/<run_id>/`` (straight from the store)."""
    from registry.store import open_store

    return {o.key: o.size for o in open_store(store_uri).child(f"runs/{run_id}").list_info("")}


def assert_published_whole(store_uri: str, run_id: str, dest: Any) -> dict[str, Any]:
    """The run is published exactly as its manifest says; returns the manifest.

    Every manifest file is downloaded and checked against its sha256, and the run holds no artifact that
    the manifest does not list (only checkpoints/, LEASE.json and MANIFEST.json besides).
    """
    from registry.runs import MANIFEST, read_manifest
    from registry.store import open_store

    store = open_store(store_uri)
    manifest = read_manifest(store, run_id)
    run = store.child(f"runs/{run_id}")
    run.get_dir("", dest, expected={rel: meta["sha256"] for rel, meta in manifest["files"].items()})
    extra = {k for k in run_files(store_uri, run_id)
             if not k.startswith("checkpoints/") and k not in (MANIFEST, "LEASE.json")} - set(manifest["files"])
    assert not extra, f"files in the run that its manifest does not list: {sorted(extra)}"
    return manifest


def registry_versions(store_uri: str, name: str = "tiny") -> list[Any]:
    from registry.registry import Registry

    return Registry.open(store_uri + "/registry").list(name)


def wait_lease_expired(store_uri: str, run_id: str) -> float:
    """Sleep until the run's LEASE.json (left by a killed job) has expired; returns the seconds waited."""
    import json

    from registry.errors import NotFoundError
    from registry.store import open_store

    try:
        raw, _ = open_store(store_uri).get_bytes(f"runs/{run_id}/LEASE.json")
    except NotFoundError:
        return 0.0
    wait = max(0.0, json.loads(raw)["expires"] - time.time()) + 0.3
    time.sleep(wait)
    return wait


def wait_until(check: Any, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class SmallDisk:
    """A small filesystem at ``path`` for a job's ``MEDFT_CACHE``, which a test fills up while the job runs.

    As root a tmpfs is mounted there (unmounted by :meth:`close`). Otherwise every job runs under
    ``unshare -rm`` with its own tmpfs mounted there, reached from outside through ``/proc/<pid>/root``.
    When neither works the constructor raises: a disk-full test fails loudly, it never skips.
    """

    def __init__(self, path: Any, size_mb: int = 16) -> None:
        import os
        import subprocess
        from pathlib import Path

        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.size_mb = size_mb
        self.mounted = False
        if os.geteuid() == 0:
            done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(self.path)],
                                  check=False, capture_output=True, text=True)
            self.mounted = done.returncode == 0
        if not self.mounted:
            probe = subprocess.run(self.command(["true"]), check=False, capture_output=True, text=True)
            if probe.returncode != 0:
                raise RuntimeError(f"cannot make a small filesystem at {self.path}: not root, and unshare -rm + "
                                   f"mount failed ({probe.stderr.strip()}); this test needs one of the two")

    def command(self, cmd: list[str]) -> list[str]:
        if self.mounted:
            return cmd
        script = 'mount -t tmpfs -o size="$1"m tmpfs "$0" && shift && exec "$@"'
        return ["unshare", "-rm", "sh", "-c", script, str(self.path), str(self.size_mb), *cmd]

    def where(self, job: Job | None) -> str:
        if self.mounted:
            return str(self.path)
        assert job is not None, "without root the small disk lives in the job's namespace"
        return f"/proc/{job.proc.pid}/root{self.path}"

    def fill(self, job: Job | None = None) -> int:
        """Fill it to the last byte; returns how many bytes that took."""
        return fill_disk(self.where(job))

    def free(self, job: Job | None = None) -> None:
        import os

        if self.mounted:
            os.unlink(os.path.join(self.where(job), "ballast"))

    def close(self) -> None:
        import subprocess

        if self.mounted:
            subprocess.run(["umount", "-l", str(self.path)], check=True)
            self.mounted = False

    def __enter__(self):  # returns self
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
