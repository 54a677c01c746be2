"""A small Hugging Face Hub on 127.0.0.1 for tests that drive the real ``huggingface_hub`` client.

It answers the routes ``HfApi`` uses to create a repo, read repo info, create a branch, validate a model card,
and make a commit: ``preupload`` (regular or lfs per file), the Git LFS batch API with single-part and
multipart uploads plus ``verify``, and the NDJSON ``commit``. Shapes and status codes follow what
huggingface_hub 1.x parses (``X-Error-Code: RepoNotFound``, ``X-Error-Message``, ``commitOid``...). It keeps
repos, branches and commits in memory, hashes every byte it receives, and records every request
(:attr:`FakeHub.requests`) so a test can assert what arrived.

With ``hf_xet`` installed the client sends large files through Xet instead: it asks
``/api/models/{repo}/xet-write-token/{rev}`` for a token, which this Hub does not grant (404, or the status a
test injects with :meth:`FakeHub.fail`); there is no Xet storage (CAS) server here.

It does NOT do: real authentication (one bearer token, compared as a string), Xet storage (to upload bytes a test sets
``HF_HUB_DISABLE_XET=1``: the client then uses LFS), rate limiting, the real Hub's size limits and LFS rules
(.gitattributes), or git itself (commit ids are sha1s of the tree, not git objects).

Faults: :meth:`FakeHub.fail` answers a route with a status a number of times; :meth:`FakeHub.deny` makes a
repo refuse writes (403).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")


@dataclass
class Commit:
    oid: str
    branch: str
    summary: str
    description: str
    parent: str | None
    files: dict[str, str]
    """path -> sha256 of the content, the whole tree at this commit."""
    added: dict[str, str]
    """path -> sha256 of what this commit itself added."""
    oids: dict[str, str] = field(default_factory=dict)
    """path -> the oid preupload reports: git blob sha1 for a regular file, sha256 for an LFS one."""


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)
    denied: bool = False

    def tree(self, branch: str) -> dict[str, str]:
        head = self.branches.get(branch)
        return dict(self.commits[head].files) if head else {}

    def oids(self, branch: str) -> dict[str, str]:
        head = self.branches.get(branch)
        return dict(self.commits[head].oids) if head else {}


@dataclass
class Request:
    method: str
    path: str
    status: int
    authorization: str | None


@dataclass
class _Fault:
    method: str
    route: str
    status: int
    times: int | None
    body: dict[str, Any]


class FakeHub:
    """Start with :func:`running_hub` (or :meth:`start` / :meth:`stop`); ``endpoint`` goes in ``HF_ENDPOINT``."""

    def __init__(self, token: str, *, lfs_threshold: int = 10 * 1024**2,
                 multipart_threshold: int | None = None, chunk_size: int = 64 * 1024) -> None:
        self.token = token
        self.lfs_threshold = lfs_threshold
        self.multipart_threshold = multipart_threshold
        self.chunk_size = chunk_size
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        """sha256 -> bytes of every LFS object received whole and verified."""
        self.requests: list[Request] = []
        self.bodies: list[bytes] = []
        """Every request body received, raw (for tests that grep them)."""
        self._parts: dict[str, dict[int, bytes]] = {}
        self._faults: list[_Fault] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # set-up --------------------------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        assert self._server is not None, "start the fake hub first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def add_repo(self, repo_id: str, *, private: bool = False) -> Repo:
        """A repo as the Hub creates one: branch main with an initial commit holding ``.gitattributes``."""
        repo = Repo(repo_id, private)
        attrs = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
        self._new_commit(repo, "main", "initial commit", "", {".gitattributes": hashlib.sha256(attrs).hexdigest()},
                         {".gitattributes": _git_blob_oid(attrs)})
        self.repos[repo_id] = repo
        return repo

    def deny(self, repo_id: str) -> None:
        """The token may read ``repo_id`` but every write is refused with 403."""
        self.repos[repo_id].denied = True

    def fail(self, route: str, status: int, *, method: str = "", times: int | None = None,
             message: str = "injected failure") -> None:
        """Answer requests whose path contains ``route`` (and whose method is ``method``, if given) with
        ``status``, ``times`` times (``None``: always)."""
        self._faults.append(_Fault(method.upper(), route, status, times, {"error": message}))

    # what arrived -------------------------------------------------------------------------------------
    def commits(self, repo_id: str) -> list[Commit]:
        """Commits made through the API (not the initial one), in order."""
        return [c for c in self.repos[repo_id].commits.values() if c.summary != "initial commit"]

    def count(self, method: str, route: str) -> int:
        return sum(1 for r in self.requests if r.method == method and route in r.path)

    # internals ----------------------------------------------------------------------------------------
    def _take_fault(self, method: str, path: str) -> _Fault | None:
        with self._lock:
            for f in self._faults:
                if f.route in path and (not f.method or f.method == method) and (f.times is None or f.times > 0):
                    if f.times is not None:
                        f.times -= 1
                    return f
        return None

    def _new_commit(self, repo: Repo, branch: str, summary: str, description: str,
                    added: dict[str, str], oids: dict[str, str]) -> Commit:
        parent = repo.branches.get(branch)
        files = {**(repo.commits[parent].files if parent else {}), **added}
        all_oids = {**(repo.commits[parent].oids if parent else {}), **oids}
        seed = json.dumps([parent, branch, summary, sorted(files.items()), len(repo.commits)]).encode()
        oid = hashlib.sha1(seed).hexdigest()
        commit = Commit(oid, branch, summary, description, parent, files, added, all_oids)
        repo.commits[oid] = commit
        repo.branches[branch] = oid
        return commit


_REPO_ROUTE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/(?P<action>revision|preupload|commit|branch)/"
                         r"(?P<rev>[^/]+))?$")
_LFS_BATCH = re.compile(r"^/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch$")
_LFS_OBJECT = re.compile(r"^/fake-lfs/(?P<oid>[0-9a-f]{64})(?:/part/(?P<part>[0-9]+)|/(?P<verb>complete|verify))?$")


class _Handler(BaseHTTPRequestHandler):
    fake: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet: the test reads FakeHub.requests
        pass

    # plumbing -----------------------------------------------------------------------------------------
    def _reply(self, status: int, body: Any = None, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body if body is not None else {}).encode()
        # recorded before the reply goes out: once the client has its answer, the test may read the list
        self.fake.requests.append(Request(self.command, self.path, status, self.headers.get("Authorization")))
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, code: str | None = None) -> None:
        headers = {"X-Error-Message": message, **({"X-Error-Code": code} if code else {})}
        self._reply(status, {"error": message}, headers)

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        data = self.rfile.read(n) if n else b""
        self.fake.bodies.append(data)
        return data

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def _handle(self) -> None:
        path = urlsplit(self.path).path
        body = self._body()
        fault = self.fake._take_fault(self.command, path)
        if fault is not None:
            self._reply(fault.status, fault.body, {"X-Error-Message": fault.body["error"]})
            return
        if path == "/api/agent-harnesses":  # the client's best-effort, once-a-day lookup: answered, not recorded
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        lfs = _LFS_OBJECT.match(path)
        if lfs:  # storage URLs are pre-signed on the real Hub: no Authorization header reaches them
            self._lfs_object(lfs["oid"], lfs["part"], lfs["verb"], body)
            return
        if self.headers.get("Authorization") != f"Bearer {self.fake.token}":
            self._error(401, "Invalid credentials in Authorization header")
            return
        if path == "/api/repos/create" and self.command == "POST":
            self._create_repo(json.loads(body or b"{}"))
        elif path == "/api/validate-yaml" and self.command == "POST":
            self._reply(200, {"errors": [], "warnings": []})
        elif m := _LFS_BATCH.match(path):
            self._lfs_batch(m["repo"], json.loads(body))
        elif m := _REPO_ROUTE.match(path):
            self._repo_route(m["repo"], m["action"], unquote(m["rev"]) if m["rev"] else None, body)
        else:
            self._error(404, f"no route {self.command} {path}")

    # routes -------------------------------------------------------------------------------------------
    def _create_repo(self, payload: dict[str, Any]) -> None:
        repo_id = f"{payload.get('organization')}/{payload.get('name')}"
        if repo_id in self.fake.repos:
            self._reply(409, {"error": "You already created this model repo", "url": f"{self.fake.endpoint}/{repo_id}"},
                        {"X-Error-Message": "You already created this model repo"})
            return
        self.fake.add_repo(repo_id, private=payload.get("visibility") == "private" or bool(payload.get("private")))
        self._reply(200, {"url": f"{self.fake.endpoint}/{repo_id}", "name": repo_id, "id": repo_id})

    def _repo_route(self, repo_id: str, action: str | None, rev: str | None, body: bytes) -> None:
        repo = self.fake.repos.get(repo_id)
        if repo is None:
            self._error(404, "Repository not found", "RepoNotFound")
            return
        if action in ("preupload", "commit", "branch") and repo.denied:
            self._error(403, "You don't have the rights to write to this repo")
            return
        if action is None or action == "revision":
            branch = rev or "main"
            if branch not in repo.branches:
                self._error(404, "Invalid rev id", "RevisionNotFound")
                return
            siblings = [{"rfilename": p} for p in sorted(repo.tree(branch))]
            self._reply(200, {"id": repo_id, "sha": repo.branches[branch], "private": repo.private,
                              "siblings": siblings})
        elif action == "branch":
            assert rev is not None
            if rev in repo.branches:
                self._error(409, "Branch already exists")
                return
            start = json.loads(body or b"{}").get("startingPoint") or repo.branches["main"]
            repo.branches[rev] = repo.branches.get(start, start)
            self._reply(200, {})
        elif action == "preupload":
            self._preupload(repo, rev or "main", json.loads(body))
        else:
            self._commit(repo, rev or "main", body)

    def _preupload(self, repo: Repo, branch: str, payload: dict[str, Any]) -> None:
        if branch not in repo.branches:
            self._error(404, "Invalid rev id", "RevisionNotFound")
            return
        tree = repo.oids(branch)
        files = []
        for f in payload["files"]:
            lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] >= self.fake.lfs_threshold
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                          "oid": tree.get(f["path"])})
        self._reply(200, {"files": files, "commitOid": repo.branches[branch]})

    def _lfs_batch(self, repo_id: str, payload: dict[str, Any]) -> None:
        repo = self.fake.repos.get(repo_id)
        if repo is None:
            self._error(404, "Repository not found", "RepoNotFound")
            return
        if repo.denied:
            self._error(403, "You don't have the rights to write to this repo")
            return
        objects = []
        for obj in payload["objects"]:
            oid, size = obj["oid"], obj["size"]
            out: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if oid not in self.fake.lfs:
                base = f"{self.fake.endpoint}/fake-lfs/{oid}"
                threshold = self.fake.multipart_threshold
                if threshold is not None and size > threshold:
                    n = -(-size // self.fake.chunk_size)
                    header = {"chunk_size": str(self.fake.chunk_size),
                              **{f"{i:05d}": f"{base}/part/{i}" for i in range(1, n + 1)}}
                    out["actions"] = {"upload": {"href": f"{base}/complete", "header": header}}
                else:
                    out["actions"] = {"upload": {"href": base}, "verify": {"href": f"{base}/verify"}}
            objects.append(out)
        self._reply(200, {"transfer": "basic", "objects": objects})

    def _lfs_object(self, oid: str, part: str | None, verb: str | None, body: bytes) -> None:
        fake = self.fake
        if part is not None:  # one part of a multipart upload; the etag is what the client sends back
            with fake._lock:
                fake._parts.setdefault(oid, {})[int(part)] = body
            self._reply(200, {}, {"ETag": f'"{hashlib.md5(body).hexdigest()}"'})
        elif verb == "complete":
            parts = fake._parts.pop(oid, {})
            done = json.loads(body)
            order = [p["partNumber"] for p in done["parts"]]
            etags = [p["etag"].strip('"') for p in done["parts"]]
            if order != sorted(parts) or etags != [hashlib.md5(parts[i]).hexdigest() for i in order]:
                self._error(400, "multipart parts do not match the completion request")
                return
            self._store_lfs(oid, b"".join(parts[i] for i in order))
        elif verb == "verify":
            got = json.loads(body)
            if got["oid"] not in fake.lfs or len(fake.lfs[got["oid"]]) != got["size"]:
                self._error(404, "LFS object not found or of another size")
                return
            self._reply(200, {})
        elif self.command == "PUT":
            self._store_lfs(oid, body)
        else:
            self._error(404, "no such LFS route")

    def _store_lfs(self, oid: str, data: bytes) -> None:
        # The real Hub refuses an object whose content does not hash to its oid; so does this one.
        if hashlib.sha256(data).hexdigest() != oid:
            self._error(400, "LFS object content does not match its oid")
            return
        self.fake.lfs[oid] = data
        self._reply(200, {})

    def _commit(self, repo: Repo, branch: str, body: bytes) -> None:
        if branch not in repo.branches:
            self._error(404, "Invalid rev id", "RevisionNotFound")
            return
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next(item["value"] for item in lines if item["key"] == "header")
        added: dict[str, str] = {}
        oids: dict[str, str] = {}
        for item in lines:
            key, value = item["key"], item["value"]
            if key == "file":
                data = base64.b64decode(value["content"])
                added[value["path"]] = hashlib.sha256(data).hexdigest()
                oids[value["path"]] = _git_blob_oid(data)
            elif key == "lfsFile":
                if value["oid"] not in self.fake.lfs or len(self.fake.lfs[value["oid"]]) != value["size"]:
                    self._error(422, f"LFS object {value['oid']} for {value['path']} was never uploaded")
                    return
                added[value["path"]] = oids[value["path"]] = value["oid"]
            elif key != "header":
                self._error(400, f"unsupported commit operation {key!r}")
                return
        parent = header.get("parentCommit")
        if parent and parent != repo.branches[branch]:
            self._error(412, "A commit has happened since. Please refresh and try again.")
            return
        commit = self.fake._new_commit(repo, branch, header["summary"], header.get("description", ""), added,
                                        oids)
        self._reply(200, {"success": True, "commitOid": commit.oid, "pullRequestUrl": None,
                          "commitUrl": f"{self.fake.endpoint}/{repo.repo_id}/commit/{commit.oid}"})


def _git_blob_oid(data: bytes) -> str:
    """The git object id of a blob with this content (what the Hub reports for a regular file)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@contextmanager
def running_hub(token: str, **kw: Any) -> Iterator[FakeHub]:
    hub = FakeHub(token, **kw).start()
    try:
        yield hub
    finally:
        hub.stop()
