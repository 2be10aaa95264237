"""A small in-memory Hugging Face Hub on 127.0.0.1 for offline tests of ``peft_gp.hub``.

It implements the endpoints that ``huggingface_hub`` calls for creating a repo and a branch, committing files,
resolving and downloading files, reading revision info and validating model-card YAML. Any other request is answered
``501`` and recorded in ``unknown``, so a test that needs a new endpoint fails visibly.

Large files take the Git LFS path, as on the real Hub: the pre-upload answer says ``"lfs"`` for files of
``lfs_threshold`` bytes or more (the real Hub: 10 MB; small in tests), the client asks the LFS batch endpoint
(``/{repo}.git/info/lfs/objects/batch``) where to upload, PUTs the bytes to a second server on another port (the
"storage", like S3: no token is sent there), in one request or in parts of ``lfs_chunk_size`` (multipart, then a
completion request), then calls the verify endpoint, and the commit names the object by its SHA-256
(``lfsFile``). A download of such a file is redirected to the storage, with ``X-Linked-Etag``/``X-Linked-Size``
as the real Hub does. The storage keeps an object only when its bytes match its SHA-256 and size. Not modelled: the
Xet protocol (``huggingface_hub`` uses it instead of LFS when ``hf_xet`` is installed: tests set
``HF_HUB_DISABLE_XET``) and LFS by ``.gitattributes`` pattern.

Every request is recorded (server, method, path, query, headers, JSON body) in ``requests`` so tests can assert what
reached the server (``private``, ``create_pr``, the token). Failures on demand: ``fail_commits`` cuts off commit
requests, ``fail_lfs_uploads`` drops the connection half-way through an upload's body, ``fail_status`` answers an
endpoint with an HTTP error. Run it alone with ``python tests/fake_hub.py`` to try a client.
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
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
    lfs: dict[str, str] = field(default_factory=dict)  # path -> SHA-256 of the files stored through LFS


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
    server: str = "hub"  # or "storage" (the LFS upload and download host)


class FakeHub:
    """The server state plus a thread running it; use as a context manager or call ``start``/``stop``."""

    def __init__(
        self,
        token: str | None = None,
        namespace: str = "user",
        models: tuple[str, ...] = (),
        lfs_threshold: int = 10 * 2**20,
        lfs_chunk_size: int | None = None,
    ):
        self.token = token  # when set, requests without ``Authorization: Bearer <token>`` get a 401
        self.lfs_threshold = lfs_threshold  # files of this many bytes or more are uploaded through LFS
        self.lfs_chunk_size = lfs_chunk_size  # None: one PUT per LFS object; else multipart in parts of this size
        self.lfs_objects: dict[str, bytes] = {}  # the LFS storage: SHA-256 hex -> bytes
        self.lfs_parts: dict[str, dict[int, bytes]] = {}  # multipart uploads in progress
        self.fail_lfs_uploads = 0  # the next N uploads to the storage are cut off half-way through the body
        self.fail_status: dict[str, int] = {}  # endpoint ("commit", "preupload", "lfs-batch", ...) -> HTTP status
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
        self._storage: ThreadingHTTPServer | None = None

    # ---- lifecycle ----------------------------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def storage_endpoint(self) -> str:
        """The LFS storage: another origin (port) than the Hub, like the real Hub's S3 or CDN."""
        host, port = self._storage.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            state = hub

        class StorageHandler(_StorageHandler):
            state = hub

        self._server = _Server(("127.0.0.1", 0), Handler)
        self._storage = _Server(("127.0.0.1", 0), StorageHandler)
        for server in (self._server, self._storage):
            threading.Thread(target=server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        for server in (self._server, self._storage):
            if server is not None:
                server.shutdown()
                server.server_close()
        self._server = self._storage = None

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

    def calls(self, method: str, path_part: str, server: str | None = None) -> list[Request]:
        return [
            r
            for r in self.requests
            if r.method == method and path_part in r.path and (server is None or r.server == server)
        ]

    def lfs_paths(self, repo_id: str, revision: str = "main") -> dict[str, str]:
        """The files of ``revision`` stored through LFS: path -> SHA-256."""
        return dict(self.repos[repo_id].resolve(revision).lfs)


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

    def _failing(self, endpoint: str) -> bool:
        """Answer with the status set in ``fail_status[endpoint]``, if any (then the handler stops)."""
        status = self.state.fail_status.get(endpoint)
        if status is None:
            return False
        self._error(status, "FakeHubFailure", f"fake hub: {endpoint} answers {status} on purpose")
        return True

    def _cut_off(self) -> None:
        """Close the connection without an answer (and without reading what is left of the body)."""
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

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
        lfs_path = len(parts) == 6 and parts[1].endswith(".git") and parts[2:5] == ["info", "lfs", "objects"]
        if method == "POST" and lfs_path:
            repo_id = f"{parts[0]}/{parts[1][: -len('.git')]}"
            if repo_id not in self.state.repos:
                return self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
            if parts[5] == "batch":
                return self._lfs_batch(repo_id, request.body)
            if parts[5] == "verify":
                return self._lfs_verify(request.body)
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
        if self._failing("branch"):
            return None
        start = payload.get("startingPoint", "main")
        commit = repo.resolve(start)
        if commit is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {start}")
        if branch in repo.refs:
            return self._error(409, "BranchExists", f"Reference already exists: refs/heads/{branch}")
        repo.refs[branch] = commit.oid
        return self._reply(200, {})

    def _preupload(self, repo: Repo, revision: str, payload: dict):
        if self._failing("preupload"):
            return None
        commit = repo.resolve(revision)
        if commit is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        files = []
        for entry in payload["files"]:
            existing = commit.files.get(entry["path"])
            oid = hashlib.sha1(existing).hexdigest() if existing is not None else None
            mode = "lfs" if entry["size"] >= self.state.lfs_threshold else "regular"
            files.append({"path": entry["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        return self._reply(200, {"files": files, "commitOid": commit.oid})

    def _commit(self, repo: Repo, revision: str, request: Request):
        if self.state.fail_commits > 0:
            self.state.fail_commits -= 1
            return self._cut_off()  # an upload cut off mid-way: no answer at all
        if self._failing("commit"):
            return None
        lines = [json.loads(line) for line in request.body.splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        base = repo.resolve(revision)
        if base is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        files, lfs = dict(base.files), dict(base.lfs)
        for line in lines:
            value = line["value"]
            if line["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
                lfs.pop(value["path"], None)
            elif line["key"] == "lfsFile":
                stored = self.state.lfs_objects.get(value["oid"])
                if stored is None or value.get("algo") != "sha256" or len(stored) != value.get("size", len(stored)):
                    message = f"LFS object {value['oid']} of {value['path']} was not uploaded"
                    return self._error(422, "LfsObjectMissing", message)
                files[value["path"]], lfs[value["path"]] = stored, value["oid"]
            elif line["key"] == "deletedFile":
                files.pop(value["path"], None)
                lfs.pop(value["path"], None)
            elif line["key"] == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {path: data for path, data in files.items() if not path.startswith(prefix)}
                lfs = {path: oid for path, oid in lfs.items() if path in files}
            elif line["key"] != "header":
                return self._error(400, "BadRequest", f"fake hub: unsupported commit operation {line['key']}")
        content = json.dumps(sorted((p, hashlib.sha1(d).hexdigest()) for p, d in files.items())).encode()
        summary = header["summary"]
        commit = Commit(_oid(base.oid.encode(), summary.encode(), content), summary, base.oid, files, lfs)
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
        siblings = [_sibling(path, commit) for path in sorted(commit.files)]
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
        if path in commit.lfs:  # as the real Hub: a redirect to the storage, the file's hash and size in headers
            sha256 = commit.lfs[path]
            location = f"{self.state.storage_endpoint}/objects/{sha256}"
            headers = {"X-Repo-Commit": commit.oid, "ETag": etag, "X-Linked-Etag": f'"{sha256}"',
                       "X-Linked-Size": str(len(data)), "Location": location}  # fmt: skip
            return self._reply(302, headers=headers)
        return self._reply(200, headers={"X-Repo-Commit": commit.oid, "ETag": etag}, raw=data)

    # ---- LFS: batch and verify (the Hub's side; the bytes go to the storage) -------------------------------------

    def _lfs_batch(self, repo_id: str, payload: dict):
        """Where to upload each object (git-lfs batch API): nothing for objects already stored."""
        if self._failing("lfs-batch"):
            return None
        if payload.get("operation") != "upload" or payload.get("hash_algo", "sha256") != "sha256":
            return self._error(400, "BadRequest", "fake hub: only sha256 uploads are implemented")
        chunk = self.state.lfs_chunk_size
        transfer = "multipart" if chunk and "multipart" in payload.get("transfers", []) else "basic"
        storage, objects = self.state.storage_endpoint, []
        for entry in payload["objects"]:
            oid, size = entry["oid"], entry["size"]
            answer = {"oid": oid, "size": size, "authenticated": True}
            if len(oid) != 64 or not isinstance(size, int) or size < 0:
                objects.append({**answer, "error": {"code": 422, "message": "invalid oid or size"}})
                continue
            if oid in self.state.lfs_objects:  # already stored: no actions, the client skips the upload
                objects.append(answer)
                continue
            verify = {"href": f"{self.state.endpoint}/{repo_id}.git/info/lfs/objects/verify", "header": {}}
            if transfer == "multipart":
                parts = {str(n + 1): f"{storage}/upload/{oid}/{size}/{n + 1}" for n in range(-(-size // chunk))}
                upload = {"href": f"{storage}/complete/{oid}/{size}", "header": {"chunk_size": str(chunk), **parts}}
            else:
                upload = {"href": f"{storage}/upload/{oid}/{size}", "header": {}}
            objects.append({**answer, "actions": {"upload": upload, "verify": verify}})
        return self._reply(200, {"transfer": transfer, "objects": objects, "hash_algo": "sha256"})

    def _lfs_verify(self, payload: dict):
        stored = self.state.lfs_objects.get(payload.get("oid"))
        if stored is None or len(stored) != payload.get("size"):
            return self._error(404, "LfsObjectMissing", f"LFS object {payload.get('oid')} is not stored")
        return self._reply(200, {})


def _sibling(path: str, commit: Commit) -> dict:
    data = commit.files[path]
    entry = {"rfilename": path, "size": len(data)}
    if path in commit.lfs:
        entry["lfs"] = {"sha256": commit.lfs[path], "size": len(data), "pointerSize": 134}
    return entry


class _StorageHandler(_Handler):
    """The LFS storage (another port, like S3): PUT of whole objects or parts, completion, GET of objects.

    Like a signed URL, it needs no token; an object is kept only if its bytes match its SHA-256 and size.
    """

    def _handle(self):
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        headers = {key.lower(): value for key, value in self.headers.items()}
        request = Request(self.command, url.path, parse_qs(url.query), headers, None, server="storage")
        with self.state._lock:
            self.state.requests.append(request)
        if self.command == "PUT" and parts[0] == "upload" and len(parts) in (3, 4):
            return self._upload(parts[1], int(parts[2]), int(parts[3]) if len(parts) == 4 else None)
        if self.command == "POST" and parts[0] == "complete" and len(parts) == 3:
            payload = json.loads(self._read_body() or b"{}")
            return self._complete(parts[1], int(parts[2]), payload)
        if self.command in ("GET", "HEAD") and parts[0] == "objects" and len(parts) == 2:
            data = self.state.lfs_objects.get(parts[1])
            if data is None:
                return self._error(404, "NoSuchKey", "The specified key does not exist.")
            return self._reply(200, headers={"ETag": f'"{parts[1]}"'}, raw=data)
        self.state.unknown.append(f"storage {self.command} {self.path}")
        return self._reply(501, {"error": f"fake storage: {self.command} {self.path} is not implemented"})

    do_GET = do_HEAD = do_POST = do_PUT = _handle

    def _upload(self, oid: str, size: int, part: int | None):
        length = int(self.headers.get("Content-Length") or 0)
        with self.state._lock:
            cut = self.state.fail_lfs_uploads > 0
            self.state.fail_lfs_uploads -= int(cut)
        if cut:  # read half of the body, then drop the connection
            self.rfile.read(length // 2)
            return self._cut_off()
        data = self.rfile.read(length)
        with self.state._lock:
            if part is not None:
                self.state.lfs_parts.setdefault(oid, {})[part] = data
                return self._reply(200, headers={"ETag": f'"{hashlib.md5(data).hexdigest()}"'})
            if hashlib.sha256(data).hexdigest() != oid or len(data) != size:
                return self._error(400, "BadDigest", "The body does not match the object's SHA-256 and size.")
            self.state.lfs_objects[oid] = data
        return self._reply(200, headers={"ETag": f'"{hashlib.md5(data).hexdigest()}"'})

    def _complete(self, oid: str, size: int, payload: dict):
        with self.state._lock:
            stored = self.state.lfs_parts.pop(oid, {})
            parts = sorted(payload.get("parts", []), key=lambda part: part["partNumber"])
            if [part["partNumber"] for part in parts] != sorted(stored) or any(
                part["etag"].strip('"') != hashlib.md5(stored[part["partNumber"]]).hexdigest() for part in parts
            ):
                return self._error(400, "InvalidPart", "The parts do not match the uploaded parts.")
            data = b"".join(stored[number] for number in sorted(stored))
            if hashlib.sha256(data).hexdigest() != oid or len(data) != size:
                return self._error(400, "BadDigest", "The parts do not add up to the object's SHA-256 and size.")
            self.state.lfs_objects[oid] = data
        return self._reply(200, {})


if __name__ == "__main__":  # pragma: no cover - manual use
    with FakeHub() as hub:
        print(f"fake hub at {hub.endpoint}; HF_ENDPOINT={hub.endpoint}; Ctrl-C to stop", flush=True)
        threading.Event().wait()
