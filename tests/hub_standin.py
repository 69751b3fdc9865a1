"""A local stand-in for the Hugging Face Hub's file API on 127.0.0.1, for tests of the real `datasets` code path.

Serves dataset repositories from files a test writes: `{repo_id: {revision: {path: bytes}}}`. It answers the
requests `huggingface_hub` and `datasets` make to load a dataset (repository info, the file tree, paths-info,
HEAD/GET of a file by `resolve/`); anything else is a 404, as the Hub answers for a missing repository.
Point a process at it with `HF_ENDPOINT=<url>` (read by `huggingface_hub` when it is imported).
"""

from __future__ import annotations

import hashlib
import json
import threading
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

Repositories = dict[str, dict[str, dict[str, bytes]]]


def _commit(repo_id: str, revision: str) -> str:
    return hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()


class _HubHandler(BaseHTTPRequestHandler):
    repositories: Repositories = {}
    requests_seen: list[str] = []

    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _not_found(self, what: str) -> None:
        self._send(404, json.dumps({"error": f"{what} not found"}).encode(), {"X-Error-Code": "RepoNotFound"})

    def _split_repo(self, rest: str) -> tuple[str, str, str] | None:
        """'owner/name/<kind>/<revision>/<path>' -> (repo, revision, path); revisions may hold '/' URL-encoded."""
        parts = rest.split("/", 3)
        if len(parts) < 3:
            return None
        repo = unquote(f"{parts[0]}/{parts[1]}")
        revision_and_path = parts[3] if len(parts) > 3 else ""
        revision, _, path = revision_and_path.partition("/")
        return repo, unquote(revision) or "main", unquote(path)

    def _revision_files(self, repo: str, revision: str) -> dict[str, bytes] | None:
        revisions = self.repositories.get(repo, {})
        by_commit = {_commit(repo, name): files for name, files in revisions.items()}
        return revisions.get(revision, by_commit.get(revision))

    def _info(self, repo: str, revision: str) -> None:
        files = self._revision_files(repo, revision)
        if files is None:
            return self._not_found(f"{repo}@{revision}")
        payload = {
            "_id": _commit(repo, "id"), "id": repo, "author": repo.split("/")[0], "sha": _commit(repo, revision),
            "private": False, "disabled": False, "gated": False, "downloads": 0, "likes": 0, "tags": [],
            "lastModified": "2024-01-01T00:00:00.000Z", "cardData": {},
            "siblings": [{"rfilename": path} for path in sorted(files)],
        }
        self._send(200, json.dumps(payload).encode())

    def _entries(self, files: dict[str, bytes], folder: str, recursive: bool) -> list[dict]:
        prefix = f"{folder.strip('/')}/" if folder.strip("/") else ""
        entries, folders = [], set()
        for path in sorted(files):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix):]
            parts = rest.split("/")
            for depth in range(1, len(parts)):
                if recursive or depth == 1:
                    folders.add(prefix + "/".join(parts[:depth]))
            if recursive or len(parts) == 1:
                data = files[path]
                entries.append({"type": "file", "oid": hashlib.sha1(data).hexdigest(), "size": len(data), "path": path})
        entries += [{"type": "directory", "oid": hashlib.sha1(f.encode()).hexdigest(), "size": 0, "path": f} for f in sorted(folders)]
        return entries

    def _tree(self, repo: str, revision: str, folder: str, query: dict) -> None:
        files = self._revision_files(repo, revision)
        if files is None:
            return self._not_found(f"{repo}@{revision}")
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        if folder.strip("/") and not any(p.startswith(folder.strip("/") + "/") for p in files):
            return self._send(404, json.dumps({"error": f"{folder} not found"}).encode(), {"X-Error-Code": "EntryNotFound"})
        self._send(200, json.dumps(self._entries(files, folder, recursive)).encode())

    def _paths_info(self, repo: str, revision: str, paths: list[str]) -> None:
        files = self._revision_files(repo, revision)
        if files is None:
            return self._not_found(f"{repo}@{revision}")
        found = []
        for path in paths:
            path = path.strip("/")
            if path in files:
                found.append({"type": "file", "oid": hashlib.sha1(files[path]).hexdigest(), "size": len(files[path]), "path": path})
            elif any(p.startswith(path + "/") for p in files) or path == "":
                found.append({"type": "directory", "oid": hashlib.sha1(path.encode()).hexdigest(), "size": 0, "path": path})
        self._send(200, json.dumps(found).encode())

    def _resolve(self, repo: str, revision: str, path: str) -> None:
        files = self._revision_files(repo, revision)
        if files is None:
            return self._not_found(f"{repo}@{revision}")
        if path not in files:
            return self._send(404, json.dumps({"error": "Entry not found"}).encode(), {"X-Error-Code": "EntryNotFound"})
        data = files[path]
        etag = f'"{hashlib.sha1(data).hexdigest()}"'
        headers = {"ETag": etag, "X-Repo-Commit": _commit(repo, revision), "Accept-Ranges": "bytes",
                   "Last-Modified": formatdate(usegmt=True)}
        span = self.headers.get("Range")
        if span and span.startswith("bytes=") and self.command == "GET":
            start_text, _, end_text = span[6:].partition("-")
            start = int(start_text or 0)
            end = min(int(end_text) if end_text else len(data) - 1, len(data) - 1)
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            return self._send(206, data[start:end + 1], headers, "application/octet-stream")
        self._send(200, data, headers, "application/octet-stream")

    def _route(self, body: bytes = b"") -> None:
        url = urlsplit(self.path)
        self.requests_seen.append(f"{self.command} {url.path}")
        path, query = url.path, parse_qs(url.query)
        if path.startswith("/api/datasets/"):
            rest = path[len("/api/datasets/"):]
            parts = rest.split("/")
            if len(parts) == 2 or (len(parts) == 3 and parts[2] == ""):
                return self._info(unquote("/".join(parts[:2])), query.get("revision", ["main"])[0])
            kind = parts[2]
            located = self._split_repo(rest)
            if located is None:
                return self._not_found(rest)
            repo, revision, inner = located
            if kind == "revision":
                return self._info(repo, revision)
            if kind == "tree":
                return self._tree(repo, revision, inner, query)
            if kind == "paths-info":
                form = parse_qs(body.decode()) if body else {}
                paths = form.get("paths", [])
                if not paths and body:
                    try:
                        paths = json.loads(body).get("paths", [])
                    except ValueError:
                        paths = []
                return self._paths_info(repo, revision, paths)
            return self._not_found(rest)
        if path.startswith("/datasets/"):
            located = self._split_repo(path[len("/datasets/"):])
            if located and path[len("/datasets/"):].split("/")[2] == "resolve":
                return self._resolve(*located)
        self._not_found(path)

    def do_GET(self) -> None:
        self._route()

    def do_HEAD(self) -> None:
        self._route()

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self._route(self.rfile.read(length) if length else b"")


class HubStandIn:
    """`with HubStandIn(repositories) as hub:` serves them at `hub.url` until the block ends."""

    def __init__(self, repositories: Repositories):
        handler = type("Handler", (_HubHandler,), {"repositories": repositories, "requests_seen": []})
        self.handler = handler
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    @property
    def requests_seen(self) -> list[str]:
        return self.handler.requests_seen

    def __enter__(self) -> "HubStandIn":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
