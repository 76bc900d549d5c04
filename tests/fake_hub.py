"""A tiny stand-in for the Hugging Face Hub, served on 127.0.0.1 for `huggingface_hub` to talk to.

It speaks the routes huggingface_hub 2.x uses to download a snapshot:
- `GET /api/models/{repo}/revision/{rev}`: repo info (commit sha, file list),
- `GET /api/models/{repo}/tree/{sha}`: the file tree,
- `HEAD|GET /{repo}/resolve/{rev}/{file}`: file metadata (X-Repo-Commit, ETag, Content-Length) and
  content, honouring `Range` requests.
Gated repos answer 401 (`X-Error-Code: GatedRepo`) without the right bearer token; unknown repos
answer 404 (`RepoNotFound`). Faults can be injected per file: `drop_once` sends half a file and cuts
the connection (once), `fail` answers 500. Every request is logged in `requests`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


@dataclass
class FakeRepo:
    files: dict[str, bytes]
    token: str | None = None  # gated: this bearer token is required
    sha: str = "0123456789abcdef0123456789abcdef01234567"

    @classmethod
    def from_folder(cls, folder: Path, **kwargs) -> "FakeRepo":
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        return cls(files, **kwargs)


@dataclass
class FakeHub:
    repos: dict[str, FakeRepo] = field(default_factory=dict)
    drop_once: set[str] = field(default_factory=set)
    fail: set[str] = field(default_factory=set)
    requests: list[tuple[str, str, dict]] = field(default_factory=list)  # (method, path, lower-cased headers)
    url: str = ""

    def __enter__(self) -> "FakeHub":
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output quiet
                pass

            def do_HEAD(self):
                hub._handle(self, head=True)

            def do_GET(self):
                hub._handle(self, head=False)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        # the suite runs offline (conftest sets HF_HUB_OFFLINE=1); talking to this local Hub is the exception,
        # in this process (huggingface_hub read the variable at import) and in subprocesses
        import huggingface_hub.constants

        self._saved_offline = (os.environ.get("HF_HUB_OFFLINE"), huggingface_hub.constants.HF_HUB_OFFLINE)
        os.environ["HF_HUB_OFFLINE"] = "0"
        huggingface_hub.constants.HF_HUB_OFFLINE = False
        return self

    def __exit__(self, *exc) -> None:
        import huggingface_hub.constants

        env, const = self._saved_offline
        if env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = env
        huggingface_hub.constants.HF_HUB_OFFLINE = const
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def gets(self, filename: str) -> list[dict]:
        """Headers of every GET of `filename`."""
        return [h for m, p, h in self.requests if m == "GET" and p.endswith(f"/resolve/{self._sha_of(p)}/{filename}")]

    def _sha_of(self, path: str) -> str:
        m = re.search(r"/resolve/([^/]+)/", path)
        return m.group(1) if m else ""

    # ------------------------------------------------------------------ routing
    def _handle(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        path = unquote(urlsplit(h.path).path)
        self.requests.append(("HEAD" if head else "GET", path, {k.lower(): v for k, v in h.headers.items()}))
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(revision|tree)/([^/]+)(/.*)?", path)
        if m:
            repo_id, kind, rev = m.group(1), m.group(2), m.group(3)
            repo = self._check(h, repo_id, rev)
            if repo is None:
                return
            if kind == "revision":
                body = {"id": repo_id, "modelId": repo_id, "sha": repo.sha, "private": False,
                        "gated": "auto" if repo.token else False,
                        "siblings": [{"rfilename": f} for f in sorted(repo.files)]}
            else:
                body = [{"type": "file", "oid": hashlib.sha1(data).hexdigest(), "size": len(data), "path": f}
                        for f, data in sorted(repo.files.items())]
            return self._send(h, 200, json.dumps(body).encode(), {"Content-Type": "application/json"}, head)
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m:
            repo_id, rev, filename = m.groups()
            repo = self._check(h, repo_id, rev)
            if repo is None:
                return
            if filename not in repo.files:
                return self._send(h, 404, b"entry not found", {"X-Error-Code": "EntryNotFound"}, head)
            return self._serve_file(h, repo, filename, head)
        self._send(h, 404, b"not found", {}, head)

    def _check(self, h, repo_id: str, rev: str) -> FakeRepo | None:
        repo = self.repos.get(repo_id)
        if repo is None:
            self._send(h, 404, b"Repository not found", {"X-Error-Code": "RepoNotFound"}, h.command == "HEAD")
            return None
        if repo.token and h.headers.get("Authorization") != f"Bearer {repo.token}":
            self._send(h, 401, b"Access to this model is restricted", {"X-Error-Code": "GatedRepo"}, h.command == "HEAD")
            return None
        if rev not in ("main", repo.sha):
            self._send(h, 404, b"Revision not found", {"X-Error-Code": "RevisionNotFound"}, h.command == "HEAD")
            return None
        return repo

    def _serve_file(self, h, repo: FakeRepo, filename: str, head: bool) -> None:
        data = repo.files[filename]
        headers = {"X-Repo-Commit": repo.sha, "ETag": f'"{hashlib.sha1(data).hexdigest()}"',
                   "Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
        if head:
            return self._send(h, 200, data, headers, head=True)
        if filename in self.fail:
            return self._send(h, 500, b"internal error", {}, head)
        start = 0
        m = re.fullmatch(r"bytes=(\d+)-", h.headers.get("Range", ""))
        if m:
            start = int(m.group(1))
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        if filename in self.drop_once:
            # promise the whole body, send half of it, cut the connection
            self.drop_once.discard(filename)
            h.send_response(206 if m else 200)
            for k, v in headers.items():
                h.send_header(k, v)
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body[: len(body) // 2])
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        self._send(h, 206 if m else 200, body, headers, head)

    @staticmethod
    def _send(h, status: int, body: bytes, headers: dict, head: bool) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)
