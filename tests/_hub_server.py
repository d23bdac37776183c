"""A minimal Hub-compatible HTTP server on 127.0.0.1 for the push → download tests.

It implements the endpoints huggingface_hub 2.x calls for ``create_repo``, ``create_commit``
(preupload answers "regular" for every file, so content arrives base64-encoded in the commit's
ndjson and no LFS/Xet transfer is needed), ``repo_info``/``list_repo_tree`` (what
``snapshot_download`` needs) and ``resolve`` HEAD/GET downloads. Every commit is recorded so the
tests can assert exactly which files arrived.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


@dataclass
class Repo:
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    sha: str = "0" * 40
    commits: list[dict] = field(default_factory=list)


def _git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubState:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[str] = []
        self.lock = threading.Lock()


def _handler(state: HubState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # keep test output clean
            pass

        def _send(self, status: int, body: bytes = b"", headers: dict | None = None,
                  content_type: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, status: int, obj: object, headers: dict | None = None) -> None:
            self._send(status, json.dumps(obj).encode(), headers)

        def _error(self, status: int, code: str, message: str) -> None:
            self._json(status, {"error": message}, {"X-Error-Code": code,
                                                     "X-Error-Message": message})

        def _body(self) -> bytes:
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def _repo(self, repo_id: str) -> Repo | None:
            return state.repos.get(repo_id)

        def do_POST(self) -> None:  # noqa: N802
            path = urlparse(self.path).path
            state.requests.append(f"POST {path}")
            body = self._body()
            if path == "/api/repos/create":
                req = json.loads(body)
                repo_id = f"{req['organization']}/{req['name']}"
                with state.lock:
                    if repo_id in state.repos:
                        return self._error(409, "RepoExists", "You already created this repo")
                    state.repos[repo_id] = Repo(private=req.get("visibility") == "private"
                                                or bool(req.get("private")))
                return self._json(200, {"url": f"http://{self.headers['Host']}/{repo_id}",
                                        "name": repo_id})
            if path == "/api/validate-yaml":
                return self._json(200, {"errors": [], "warnings": []})
            m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit)/(.+)", path)
            if m is None:
                return self._error(404, "NotFound", f"no route {path}")
            repo = self._repo(m.group(1))
            if repo is None:
                return self._error(404, "RepoNotFound", "Repository not found")
            if m.group(2) == "preupload":
                files = json.loads(body)["files"]
                return self._json(200, {"files": [
                    {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                     "oid": None} for f in files]})
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            added = {}
            for item in lines[1:]:
                if item["key"] != "file" or item["value"].get("encoding") != "base64":
                    return self._error(400, "BadRequest", f"unsupported operation {item['key']}")
                added[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            with state.lock:
                repo.files.update(added)
                repo.sha = hashlib.sha1(json.dumps(sorted(
                    (k, _git_blob_sha(v)) for k, v in repo.files.items())).encode()).hexdigest()
                repo.commits.append({"summary": lines[0]["value"]["summary"],
                                     "files": sorted(added)})
            host = self.headers["Host"]
            return self._json(200, {"commitUrl": f"http://{host}/{m.group(1)}/commit/{repo.sha}",
                                    "commitOid": repo.sha, "pullRequestUrl": None})

        def do_HEAD(self) -> None:  # noqa: N802
            self.do_GET()

        def do_GET(self) -> None:  # noqa: N802
            path = unquote(urlparse(self.path).path)
            state.requests.append(f"{self.command} {path}")
            m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/[^/]+)?", path)
            if m is not None:
                repo = self._repo(m.group(1))
                if repo is None:
                    return self._error(404, "RepoNotFound", "Repository not found")
                return self._json(200, {"id": m.group(1), "sha": repo.sha,
                                        "private": repo.private,
                                        "siblings": [{"rfilename": f} for f in sorted(repo.files)]})
            m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/[^/]+", path)
            if m is not None:
                repo = self._repo(m.group(1))
                if repo is None:
                    return self._error(404, "RepoNotFound", "Repository not found")
                return self._json(200, [{"type": "file", "path": f, "size": len(d),
                                         "oid": _git_blob_sha(d)}
                                        for f, d in sorted(repo.files.items())])
            m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
            if m is not None:
                repo = self._repo(m.group(1))
                if repo is None:
                    return self._error(404, "RepoNotFound", "Repository not found")
                data = repo.files.get(m.group(3))
                if data is None:
                    return self._send(404, b"", {"X-Error-Code": "EntryNotFound",
                                                 "X-Repo-Commit": repo.sha})
                return self._send(200, data, {"X-Repo-Commit": repo.sha,
                                              "ETag": f'"{_git_blob_sha(data)}"'},
                                  content_type="application/octet-stream")
            return self._error(404, "NotFound", f"no route {path}")

    return Handler


class HubServer:
    """``with HubServer() as hub: hub.url, hub.state.repos[...]``."""

    def __init__(self) -> None:
        self.state = HubState()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self.state))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
