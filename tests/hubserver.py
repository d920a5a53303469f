"""A stand-in for the Hugging Face Hub on 127.0.0.1, for the real `huggingface_hub` client.

It serves repos in the Hub's URL layout, `HEAD`/`GET /{org}/{name}/resolve/{revision}/{file}`,
with the headers huggingface_hub 2.x reads (`X-Repo-Commit`, `ETag`, `Content-Length`,
`X-Linked-Etag`/`X-Linked-Size` for LFS files, `Content-Range` for resumed downloads) and the
Hub's error codes (`X-Error-Code: RepoNotFound`, `RevisionNotFound`, `EntryNotFound`).
Select it with `HF_ENDPOINT=server.url`.

Every request is logged in `server.requests`; faults are switched on per file:
`cut[file] = n` (the next n GETs send half the body and close), `short.add(file)` (GETs
announce and send half the body, fewer bytes than the HEAD said), `stall.add(file)` (GETs
send half the body, set `stalled`, then hang until `release` is set).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

LFS_SUFFIXES = (".safetensors", ".bin")  # stored with Git LFS on the Hub: sha256 etags
_RESOLVE = re.compile(r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<file>.+)")


@dataclass
class Request:
    method: str
    path: str
    file: str | None  # the repo file asked for, if any
    range: str | None  # the Range header of a resumed download


@dataclass
class Repo:
    files: dict[str, bytes]
    commit: str
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> commit

    def resolve(self, revision: str) -> str | None:
        return self.commit if revision == self.commit else self.refs.get(revision)


def etag(name: str, data: bytes) -> str:
    """The Hub's ETag: sha256 for LFS files, the git blob sha1 for the others."""
    if name.endswith(LFS_SUFFIXES):
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubServer:
    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self.cut: dict[str, int] = {}
        self.short: set[str] = set()
        self.stall: set[str] = set()
        self.stalled, self.release = threading.Event(), threading.Event()
        self._httpd: ThreadingHTTPServer | None = None

    def add(self, repo_id: str, directory: Path, tags: tuple[str, ...] = ()) -> str:
        """Serve the files of `directory` as `repo_id` at branch `main`; return the commit."""
        files = {p.name: p.read_bytes() for p in sorted(Path(directory).iterdir()) if p.is_file()}
        commit = hashlib.sha1(repo_id.encode() + b"".join(etag(n, d).encode() for n, d in files.items())).hexdigest()
        self.repos[repo_id] = Repo(files, commit, {"main": commit, **{t: commit for t in tags}})
        return commit

    def gets(self, file: str | None = None) -> list[Request]:
        return [r for r in self.requests if r.method == "GET" and (file is None or r.file == file)]

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "HubServer":
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.hub = self
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop serving: the port is closed, as for a Hub that cannot be reached."""
        self.release.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # one request per connection: closing one ends the transfer

    def log_message(self, *args):  # quiet: the log is `hub.requests`
        pass

    def do_HEAD(self):
        self._serve(body=False)

    def do_GET(self):
        self._serve(body=True)

    def _serve(self, body: bool):
        hub: HubServer = self.server.hub
        path = urlsplit(self.path).path
        m = _RESOLVE.fullmatch(path)
        name = unquote(m["file"]) if m else None
        hub.requests.append(Request(self.command, path, name, self.headers.get("Range")))
        if m is None:
            return self._error(404, None, "Not found")
        repo = hub.repos.get(unquote(m["repo"]))
        if repo is None:
            return self._error(404, "RepoNotFound", "Repository not found")
        commit = repo.resolve(unquote(m["revision"]))
        if commit is None:
            return self._error(404, "RevisionNotFound", "Invalid rev id")
        data = repo.files.get(name)
        if data is None:
            return self._error(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": commit})

        tag = etag(name, data)
        start = 0
        rng = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if body and rng and int(rng[1]) < len(data):
            start = int(rng[1])
        part = data[start:]
        length = len(part)
        if body and name in hub.short:
            part = part[: len(part) // 2]
            length = len(part)
        elif body and name in hub.stall:
            part = part[: len(part) // 2]  # ... while announcing the whole length
        elif body and hub.cut.get(name, 0) > 0:
            hub.cut[name] -= 1
            part = part[: len(part) // 2]  # ... while announcing the whole length

        self.send_response(206 if start else 200)
        self.send_header("X-Repo-Commit", commit)
        self.send_header("ETag", f'"{tag}"')
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        if name.endswith(LFS_SUFFIXES):
            self.send_header("X-Linked-Etag", f'"{tag}"')
            self.send_header("X-Linked-Size", str(len(data)))
        self.end_headers()
        if not body:
            return
        self.wfile.write(part)
        self.wfile.flush()
        if name in hub.stall:
            hub.stalled.set()
            hub.release.wait(60)

    def _error(self, status: int, code: str | None, message: str, headers: dict | None = None):
        payload = json.dumps({"error": message}).encode()
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)


@pytest.fixture
def hub(monkeypatch):
    """A running stand-in Hub, selected with HF_ENDPOINT (for subprocesses and huggingface_hub)."""
    server = HubServer().start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    yield server
    server.stop()
