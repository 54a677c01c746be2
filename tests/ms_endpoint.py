"""A local ModelScope hub for tests: the routes modelscope's ``snapshot_download`` calls, on 127.0.0.1.

Point ``MODELSCOPE_ENDPOINT`` at :attr:`MsEndpoint.endpoint`. What it answers (read from modelscope-hub's
``_legacy_api``/``_download``, the client medft's pinned modelscope delegates to):

* ``GET /api/v1/repos/internalAccelerationInfo``: 404 (the client's cloud-region probe; so it asks no other host)
* ``GET /api/v1/{models,datasets}/OWNER/NAME``: the repository's info
* ``GET /api/v1/models/OWNER/NAME/repo/files?Revision=R`` and ``GET /api/v1/datasets/OWNER/NAME/repo/tree?...``:
  the file listing at revision R, with each file's size and sha256 (the client verifies both)
* ``GET /api/v1/{models,datasets}/OWNER/NAME/repo?Revision=R&FilePath=P``: the file's bytes

A repository in :attr:`MsEndpoint.fail` answers every route with that HTTP status; an unknown repository or
revision answers 404. Every request is recorded in :attr:`MsEndpoint.requests`.

:class:`ProxyTrap` is a proxy that records whatever reaches it and refuses it: set ``HTTP(S)_PROXY`` to it with
``NO_PROXY=127.0.0.1`` and any request to a host other than the local endpoint lands there, so a test can
assert that none was made.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit


class MsEndpoint:
    def __init__(self) -> None:
        self.repos: dict[tuple[str, str], dict[str, dict[str, bytes]]] = {}
        self.fail: dict[str, int] = {}
        self.requests: list[tuple[str, str]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def add(self, kind: str, repo: str, files: dict[str, bytes] | Path, revision: str = "master") -> None:
        """Serve ``files`` (a mapping, or every file under a folder) as ``repo`` (a ``model`` or ``dataset``)."""
        if isinstance(files, Path):
            files = {p.relative_to(files).as_posix(): p.read_bytes() for p in sorted(files.rglob("*")) if p.is_file()}
        self.repos.setdefault((kind, repo), {})[revision] = dict(files)

    def downloads(self) -> list[str]:
        """The ``FilePath`` of every file download requested, in order."""
        return [parse_qs(urlsplit(p).query)["FilePath"][0] for _, p in self.requests if "FilePath=" in p]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _answer(self, path: str, query: dict[str, list[str]]) -> tuple[int, bytes, str]:
        parts = path.strip("/").split("/")
        if parts[:2] != ["api", "v1"] or len(parts) < 5:
            return 404, _error(404, "no such route"), "application/json"
        segment, repo, rest = parts[2], "/".join(parts[3:5]), parts[5:]
        kind = {"models": "model", "datasets": "dataset"}.get(segment)
        if repo in self.fail:
            status = self.fail[repo]
            return status, _error(status, "refused by the test endpoint"), "application/json"
        revisions = self.repos.get((kind or "", repo))
        if revisions is None:
            return 404, _error(404, "Model does not exist."), "application/json"
        if not rest:
            return 200, json.dumps({"Code": 200, "Data": {"Path": repo.split("/")[0], "Name": repo.split("/")[1]},
                                    "Success": True}).encode(), "application/json"
        files = revisions.get(query.get("Revision", ["master"])[0])
        if files is None:
            return 404, _error(404, "revision not found"), "application/json"
        if rest in (["repo", "files"], ["repo", "tree"]):
            page = int(query.get("PageNumber", ["1"])[0])
            listing = [{"Path": name, "Name": name.rsplit("/", 1)[-1], "Type": "blob", "Size": len(data),
                        "Sha256": hashlib.sha256(data).hexdigest()} for name, data in sorted(files.items())]
            body = {"Code": 200, "Data": {"Files": listing if page == 1 else []}, "Success": True}
            return 200, json.dumps(body).encode(), "application/json"
        if rest == ["repo"]:
            data = files.get(query.get("FilePath", [""])[0])
            if data is None:
                return 404, _error(404, "file not found"), "application/json"
            return 200, data, "application/octet-stream"
        return 404, _error(404, "no such route"), "application/json"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                hub.requests.append((self.headers.get("Host", ""), self.path))
                url = urlsplit(self.path)
                status, body, ctype = hub._answer(url.path, parse_qs(url.query))
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        return Handler


def _error(status: int, message: str) -> bytes:
    return json.dumps({"Code": status, "Message": message, "Success": False}).encode()


class ProxyTrap:
    """A proxy that refuses everything and records what reached it (``requests``: method and target)."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        trap = self

        class Handler(BaseHTTPRequestHandler):
            def _refuse(self) -> None:
                trap.requests.append(f"{self.command} {self.path}")
                self.send_response(403)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST = do_PUT = do_HEAD = do_CONNECT = _refuse  # noqa: N815 - http.server's names

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@contextmanager
def local_modelscope() -> Iterator[tuple[MsEndpoint, ProxyTrap]]:
    hub, trap = MsEndpoint(), ProxyTrap()
    try:
        yield hub, trap
    finally:
        hub.close()
        trap.close()
