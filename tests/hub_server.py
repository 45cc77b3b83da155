"""A small Hub-compatible HTTP server for the tests: the endpoints the real `huggingface_hub` client uses to create a
model repo, upload (preupload, LFS batch + basic transfer, NDJSON commit), validate a card's YAML, read repo info
and file trees, and resolve files with the Hub's headers and error codes. Uploads go through the LFS protocol
(`HF_HUB_DISABLE_XET=1`): Xet storage needs its own CAS service."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

LFS_SUFFIXES = (".safetensors", ".bin", ".png")


@dataclass
class Repo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> files
    branches: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> str | None:
        return self.branches.get(revision) or (revision if revision in self.commits else None)


class HubState:
    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.fail_commits = False  # simulate an interrupted upload: the commit request fails
        self.lock = threading.Lock()


def _is_lfs(path: str) -> bool:
    return path.endswith(LFS_SUFFIXES)


class _Handler(BaseHTTPRequestHandler):
    state: HubState
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    # ------------------------------------------------------------------------------------------------ helpers
    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, payload=None, headers: dict | None = None, body: bytes | None = None, head=False):
        if body is None:
            body = json.dumps(payload).encode() if payload is not None else b""
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if payload is not None else "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _error(self, status: int, code: str, message: str, head=False):
        self._send(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message}, head=head)

    def _repo(self, repo_id: str, head=False) -> Repo | None:
        repo = self.state.repos.get(repo_id)
        if repo is None:
            self._error(401, "RepositoryNotFound", f"Repository not found: {repo_id}", head=head)
        return repo

    def _base(self) -> str:
        return f"http://{self.headers['Host']}"

    # ------------------------------------------------------------------------------------------------ verbs
    def do_HEAD(self):
        self._resolve(head=True)

    def do_GET(self):
        path = urlparse(self.path).path
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/(.+))?", path)
        if match:
            return self._info(match.group(1), unquote(match.group(2) or "main"))
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(/.*)?", path)
        if match:
            return self._tree(match.group(1), unquote(match.group(2)))
        self._resolve(head=False)

    def do_PUT(self):
        match = re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", urlparse(self.path).path)
        if not match:
            return self._error(404, "NotFound", "no such endpoint")
        data = self._body()
        if hashlib.sha256(data).hexdigest() != match.group(1):
            return self._error(400, "BadRequest", "sha256 mismatch")
        self.state.lfs[match.group(1)] = data
        self._send(200, {})

    def do_POST(self):
        path = urlparse(self.path).path
        if path == "/api/repos/create":
            return self._create(json.loads(self._body()))
        if path == "/api/validate-yaml":
            self._body()
            return self._send(200, {"errors": [], "warnings": []})
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/(.+)", path)
        if match:
            return self._preupload(match.group(1), json.loads(self._body()))
        match = re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path)
        if match:
            return self._lfs_batch(json.loads(self._body()))
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/(.+)", path)
        if match:
            return self._commit(match.group(1), unquote(match.group(2)), self._body())
        self._error(404, "NotFound", f"no such endpoint: {path}")

    # ------------------------------------------------------------------------------------------------ endpoints
    def _create(self, request: dict):
        repo_id = f"{request.get('organization') or 'user'}/{request['name']}"
        with self.state.lock:
            if repo_id in self.state.repos:
                return self._send(
                    409, {"error": "You already created this model repo", "url": f"{self._base()}/{repo_id}"}
                )
            repo = self.state.repos[repo_id] = Repo()
            sha = hashlib.sha1(f"{repo_id}:init".encode()).hexdigest()
            repo.commits[sha], repo.branches["main"] = {".gitattributes": b"*.safetensors filter=lfs\n"}, sha
        self._send(200, {"url": f"{self._base()}/{repo_id}", "name": repo_id})

    def _snapshot(self, repo_id: str, revision: str, head=False) -> tuple[str, dict[str, bytes]] | None:
        """The commit `revision` names and its files, or `None` after sending the Hub's error."""
        repo = self._repo(repo_id, head=head)
        if repo is None:
            return None
        sha = repo.resolve(revision)
        if sha is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head=head)
            return None
        return sha, repo.commits[sha]

    def _info(self, repo_id: str, revision: str):
        found = self._snapshot(repo_id, revision)
        if found is not None:
            sha, files = found
            self._send(200, {"id": repo_id, "modelId": repo_id, "sha": sha, "private": False,
                             "siblings": [{"rfilename": name} for name in sorted(files)]})  # fmt: skip

    def _tree(self, repo_id: str, revision: str):
        found = self._snapshot(repo_id, revision)
        if found is None:
            return
        entries = []
        for name, data in sorted(found[1].items()):
            entry = {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
            if _is_lfs(name):
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            entries.append(entry)
        self._send(200, entries)

    def _preupload(self, repo_id: str, request: dict):
        if self._repo(repo_id) is None:
            return
        files = [{"path": f["path"], "uploadMode": "lfs" if _is_lfs(f["path"]) else "regular", "shouldIgnore": False}
                 for f in request["files"]]  # fmt: skip
        self._send(200, {"files": files})

    def _lfs_batch(self, request: dict):
        objects = []
        for obj in request["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.state.lfs:
                entry["actions"] = {"upload": {"href": f"{self._base()}/lfs-upload/{obj['oid']}"}}
            objects.append(entry)
        self._send(200, {"transfer": "basic", "objects": objects})

    def _commit(self, repo_id: str, revision: str, body: bytes):
        repo = self._repo(repo_id)
        if repo is None:
            return
        if self.state.fail_commits:
            return self._error(500, "InternalError", "the connection dropped during the commit")
        sha = repo.resolve(revision)
        if sha is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        files = dict(repo.commits[sha])
        for line in body.decode().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                if value["oid"] not in self.state.lfs:
                    return self._error(400, "BadRequest", f"LFS object {value['oid']} was never uploaded")
                files[value["path"]] = self.state.lfs[value["oid"]]
            elif key == "deletedFile":
                files.pop(value["path"], None)
        new = hashlib.sha1(f"{sha}:{body!r}".encode()).hexdigest()
        with self.state.lock:
            repo.commits[new], repo.branches[revision if revision in repo.branches else "main"] = files, new
        self._send(200, {"commitUrl": f"{self._base()}/{repo_id}/commit/{new}", "commitOid": new,
                         "pullRequestUrl": None})  # fmt: skip

    def _resolve(self, head: bool):
        match = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", urlparse(self.path).path)
        if not match:
            return self._error(404, "NotFound", "no such endpoint", head=head)
        repo_id, revision, name = match.group(1), unquote(match.group(2)), unquote(match.group(3))
        found = self._snapshot(repo_id, revision, head=head)
        if found is None:
            return
        sha, files = found
        if name not in files:
            return self._error(404, "EntryNotFound", f"{name} does not exist at {revision}", head=head)
        data = files[name]
        headers = {"X-Repo-Commit": sha, "ETag": f'"{hashlib.sha1(data).hexdigest()}"'}
        if _is_lfs(name):
            headers.update({"X-Linked-Etag": f'"{hashlib.sha256(data).hexdigest()}"', "X-Linked-Size": str(len(data))})
        self._send(200, headers=headers, body=data, head=head)


class HubServer:
    """`with HubServer() as hub:` serves on a free local port; `hub.endpoint` is the `HF_ENDPOINT`."""

    def __init__(self):
        self.state = HubState()
        handler = type("Handler", (_Handler,), {"state": self.state})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> HubServer:
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
