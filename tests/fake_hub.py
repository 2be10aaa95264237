"""A small in-memory Hugging Face Hub on 127.0.0.1 for offline tests of ``peft_gp.hub``.

It implements the endpoints that ``huggingface_hub`` calls for creating a repo and a branch, committing regular
(non-LFS) files, resolving and downloading files, reading revision info and validating model-card YAML. Any other
request is answered ``501`` and recorded in ``unknown``, so a test that needs a new endpoint fails visibly.

Every request is recorded (method, path, query, headers, JSON body) in ``requests`` so tests can assert what reached
the server (``private``, ``create_pr``, the token). Run it alone with ``python tests/fake_hub.py`` to try a client.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit


@dataclass
class Commit:
    oid: str
    message: str
    parent: str | None
    files: dict[str, bytes]


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)  # branch or "refs/pr/N" -> commit oid
    pull_requests: int = 0

    def resolve(self, revision: str) -> Commit | None:
        if revision in self.refs:
            return self.commits[self.refs[revision]]
        return self.commits.get(revision)

    def history(self, revision: str) -> list[Commit]:
        """Commits reachable from ``revision``, newest first."""
        commit, chain = self.resolve(revision), []
        while commit is not None:
            chain.append(commit)
            commit = self.commits.get(commit.parent) if commit.parent else None
        return chain


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-case names
    body: object


class FakeHub:
    """The server state plus a thread running it; use as a context manager or call ``start``/``stop``."""

    def __init__(self, token: str | None = None, namespace: str = "user", models: tuple[str, ...] = ()):
        self.token = token  # when set, requests without ``Authorization: Bearer <token>`` get a 401
        self.namespace = namespace
        self.repos: dict[str, Repo] = {}
        for repo_id in models:  # other repos that exist on this Hub (e.g. base models named in model cards)
            self.repos[repo_id] = Repo(repo_id, private=False)
            first = Commit(_oid(repo_id.encode()), "initial commit", None, {})
            self.repos[repo_id].commits[first.oid] = first
            self.repos[repo_id].refs["main"] = first.oid
        self.requests: list[Request] = []
        self.unknown: list[str] = []
        self.fail_commits = 0  # the next N commit requests are cut off (connection closed without an answer)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle ----------------------------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            state = hub

        self._server = _Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- helpers for tests --------------------------------------------------------------------------------------

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        return dict(self.repos[repo_id].resolve(revision).files)

    def messages(self, repo_id: str, revision: str = "main") -> list[str]:
        """Commit messages reachable from ``revision``, newest first."""
        return [commit.message for commit in self.repos[repo_id].history(revision)]

    def calls(self, method: str, path_part: str) -> list[Request]:
        return [r for r in self.requests if r.method == method and path_part in r.path]


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):  # a connection cut on purpose is not worth a traceback
        pass


def _oid(*parts: bytes) -> str:
    return hashlib.sha1(b"\0".join(parts)).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    state: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002 - quiet: tests read ``state.requests`` instead
        pass

    # ---- plumbing -----------------------------------------------------------------------------------------------

    def _reply(self, status: int, body: object = None, headers: dict[str, str] | None = None, raw: bytes = b""):
        data = json.dumps(body).encode() if body is not None else raw
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if body is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, status: int, code: str, message: str):
        self._reply(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message})

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self):
        url = urlsplit(self.path)
        raw = self._read_body() if self.command == "POST" else b""
        try:
            body = json.loads(raw) if raw and "ndjson" not in (self.headers.get("Content-Type") or "") else raw
        except json.JSONDecodeError:
            body = raw
        headers = {key.lower(): value for key, value in self.headers.items()}
        request = Request(self.command, url.path, parse_qs(url.query), headers, body)
        with self.state._lock:
            self.state.requests.append(request)
        if url.path == "/api/agent-harnesses":  # huggingface_hub's user-agent registry, fetched without a token
            return self._reply(200, {"standardEnvVars": [], "harnesses": {}})
        if self.state.token is not None and self.headers.get("Authorization") != f"Bearer {self.state.token}":
            # What the Hub says for a missing or wrong token
            return self._error(401, "Unauthorized", "Invalid credentials in Authorization header")
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        with self.state._lock:
            return self._route(request, parts)

    do_GET = do_HEAD = do_POST = _handle

    def _route(self, request: Request, parts: list[str]):
        method = request.method
        if method == "POST" and parts == ["api", "repos", "create"]:
            return self._create_repo(request.body)
        if method == "POST" and parts == ["api", "validate-yaml"]:
            return self._reply(200, {})
        if method == "GET" and len(parts) == 4 and parts[:2] == ["api", "models"]:
            repo = self.state.repos.get("/".join(parts[2:4]))
            if repo is None:
                return self._error(404, "RepoNotFound", f"Repository {'/'.join(parts[2:4])} not found")
            return self._revision_info(repo, "main")
        if len(parts) >= 5 and parts[:2] == ["api", "models"]:
            repo_id, action, rest = "/".join(parts[2:4]), parts[4], "/".join(parts[5:])
            repo = self.state.repos.get(repo_id)
            if repo is None:
                return self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
            if method == "POST" and action == "branch":
                return self._create_branch(repo, rest, request.body or {})
            if method == "POST" and action == "preupload":
                return self._preupload(repo, rest, request.body)
            if method == "POST" and action == "commit":
                return self._commit(repo, rest, request)
            if method == "GET" and action == "revision":
                return self._revision_info(repo, rest)
        if method in ("GET", "HEAD") and len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve(repo_id="/".join(parts[:2]), revision=parts[3], path="/".join(parts[4:]))
        self.state.unknown.append(f"{method} {request.path}")
        return self._reply(501, {"error": f"fake hub: {method} {request.path} is not implemented"})

    # ---- endpoints ----------------------------------------------------------------------------------------------

    def _create_repo(self, payload: dict):
        repo_id = f"{payload.get('organization') or self.state.namespace}/{payload['name']}"
        url = f"{self.state.endpoint}/{repo_id}"
        if repo_id in self.state.repos:  # the Hub names the existing repo in its 409 answer
            message = "You already created this model repo"
            return self._reply(409, {"error": message, "url": url}, {"X-Error-Message": message})
        repo = Repo(repo_id, private=payload.get("visibility") == "private")
        files = {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}
        first = Commit(_oid(repo_id.encode(), b"initial"), "initial commit", None, files)
        repo.commits[first.oid], repo.refs["main"] = first, first.oid
        self.state.repos[repo_id] = repo
        return self._reply(200, {"url": url, "name": repo_id})

    def _create_branch(self, repo: Repo, branch: str, payload: dict):
        start = payload.get("startingPoint", "main")
        commit = repo.resolve(start)
        if commit is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {start}")
        if branch in repo.refs:
            return self._error(409, "BranchExists", f"Reference already exists: refs/heads/{branch}")
        repo.refs[branch] = commit.oid
        return self._reply(200, {})

    def _preupload(self, repo: Repo, revision: str, payload: dict):
        commit = repo.resolve(revision)
        if commit is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        files = []
        for entry in payload["files"]:
            existing = commit.files.get(entry["path"])
            oid = hashlib.sha1(existing).hexdigest() if existing is not None else None
            files.append({"path": entry["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": oid})
        return self._reply(200, {"files": files, "commitOid": commit.oid})

    def _commit(self, repo: Repo, revision: str, request: Request):
        if self.state.fail_commits > 0:
            self.state.fail_commits -= 1
            self.close_connection = True  # an upload cut off mid-way: no answer at all
            self.connection.shutdown(2)
            return None
        lines = [json.loads(line) for line in request.body.splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        base = repo.resolve(revision)
        if base is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        files = dict(base.files)
        for line in lines:
            value = line["value"]
            if line["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif line["key"] == "deletedFile":
                files.pop(value["path"], None)
            elif line["key"] == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {path: data for path, data in files.items() if not path.startswith(prefix)}
            elif line["key"] != "header":
                return self._error(400, "BadRequest", f"fake hub: unsupported commit operation {line['key']}")
        content = json.dumps(sorted((p, hashlib.sha1(d).hexdigest()) for p, d in files.items())).encode()
        summary = header["summary"]
        commit = Commit(_oid(base.oid.encode(), summary.encode(), content), summary, base.oid, files)
        repo.commits[commit.oid] = commit
        pr_url = None
        if request.query.get("create_pr") == ["1"]:
            repo.pull_requests += 1
            repo.refs[f"refs/pr/{repo.pull_requests}"] = commit.oid
            pr_url = f"{self.state.endpoint}/{repo.repo_id}/discussions/{repo.pull_requests}"
        else:
            repo.refs[revision] = commit.oid
        return self._reply(
            200,
            {
                "commitUrl": f"{self.state.endpoint}/{repo.repo_id}/commit/{commit.oid}",
                "commitOid": commit.oid,
                "pullRequestUrl": pr_url,
            },
        )

    def _revision_info(self, repo: Repo, revision: str):
        commit = repo.resolve(revision)
        if commit is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        siblings = [{"rfilename": path} for path in sorted(commit.files)]
        return self._reply(
            200, {"id": repo.repo_id, "modelId": repo.repo_id, "sha": commit.oid, "private": repo.private,
                  "siblings": siblings, "tags": [], "downloads": 0, "likes": 0},
        )  # fmt: skip

    def _resolve(self, repo_id: str, revision: str, path: str):
        repo = self.state.repos.get(repo_id)
        if repo is None:
            return self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
        commit = repo.resolve(revision)
        if commit is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        if path not in commit.files:
            return self._error(404, "EntryNotFound", f"{path} does not exist on {revision}")
        data = commit.files[path]
        etag = f'"{hashlib.sha1(data).hexdigest()}"'
        return self._reply(200, headers={"X-Repo-Commit": commit.oid, "ETag": etag}, raw=data)


if __name__ == "__main__":  # pragma: no cover - manual use
    with FakeHub() as hub:
        print(f"fake hub at {hub.endpoint}; HF_ENDPOINT={hub.endpoint}; Ctrl-C to stop", flush=True)
        threading.Event().wait()
