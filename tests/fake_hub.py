"""A Hugging Face hub on 127.0.0.1 that speaks as much of the hub's HTTP API as `datasets` streaming uses (the
repository's info, its file tree, each file resolved with ranges), with faults to order: a 503, a connection
dropped half-way through a file, a gated repository, a file served slowly. Point HF_ENDPOINT at `url`."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class Faults:
    """What goes wrong, and how often: each count is used up by the data-file requests it spoils."""

    unavailable: int = 0  # answer 503 to this many data-file requests
    dropped: int = 0  # send half of the file, then close the connection, this many times
    gated: set[str] = field(default_factory=set)  # repositories that answer 401
    bytes_per_second: float | None = None  # serve data files this slowly


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, dict[str, bytes]] = {}
        self.faults = Faults()
        self.requests: list[str] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def take(self, fault: str) -> bool:
        """Use up one of a counted fault, if any is left."""
        with self._lock:
            left = getattr(self.faults, fault)
            if left:
                setattr(self.faults, fault, left - 1)
            return bool(left)

    def data_requests(self, repo: str, path: str) -> list[str]:
        return [r for r in self.requests if r.startswith("GET ") and r.endswith(f"/datasets/{repo}/{path}")]


def _entry(path: str, data: bytes | None) -> dict:
    if data is None:
        return {"type": "directory", "path": path, "oid": "0" * 40, "size": 0}
    return {"type": "file", "path": path, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def start(self, status: int, headers: dict[str, str], length: int) -> None:
            self.send_response(status)
            for name, value in {"Content-Type": "application/json", **headers, "Content-Length": str(length)}.items():
                self.send_header(name, value)
            self.end_headers()

        def answer(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
            self.start(status, headers or {}, len(body))
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_HEAD(self) -> None:
            self.do_GET()

        def do_GET(self) -> None:
            url = urlparse(self.path)
            path, query = unquote(url.path), parse_qs(url.query)
            parts = path.strip("/").split("/")
            # /api/datasets/OWNER/NAME[/revision/REV | /tree/REV[/DIR]], /datasets/OWNER/NAME/resolve/REV/FILE
            api = parts[:2] == ["api", "datasets"]
            repo = "/".join(parts[2:4] if api else parts[1:3])
            rest = parts[4:] if api else parts[3:]
            if not (api or parts[0] == "datasets"):
                return self.answer(404, b'{"error": "not found"}')
            if repo in hub.faults.gated:
                return self.answer(401, b'{"error": "gated"}', {"X-Error-Code": "GatedRepo"})
            if repo not in hub.repos:
                return self.answer(404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"})
            files = hub.repos[repo]
            if api and (not rest or rest[0] == "revision"):
                info = {"id": repo, "sha": COMMIT, "private": False, "gated": False, "disabled": False,
                        "siblings": [{"rfilename": name} for name in files], "cardData": {}, "tags": []}
                return self.answer(200, json.dumps(info).encode())
            if api and rest[0] == "tree":
                folder = "/".join(rest[2:])
                recursive = query.get("recursive", ["false"])[0] == "true"
                entries: dict[str, dict] = {}
                for name, data in files.items():
                    if folder and not name.startswith(folder + "/"):
                        continue
                    below = name[len(folder) + 1 if folder else 0:]
                    if "/" in below and not recursive:
                        directory = f"{folder}/{below.split('/')[0]}" if folder else below.split("/")[0]
                        entries[directory] = _entry(directory, None)
                    else:
                        entries[name] = _entry(name, data)
                return self.answer(200, json.dumps(list(entries.values())).encode())
            if not api and rest[:1] == ["resolve"]:
                name = "/".join(rest[2:])
                hub.requests.append(f"{self.command} /datasets/{repo}/{name}")
                if name not in files:
                    return self.answer(404, b'{"error": "Entry not found"}', {"X-Error-Code": "EntryNotFound"})
                return self.send_file(files[name])
            return self.answer(404, b'{"error": "not found"}')

        def send_file(self, data: bytes) -> None:
            if self.command == "GET" and hub.take("unavailable"):
                return self.answer(503, b'{"error": "Service Unavailable"}')
            headers = {"Content-Type": "application/octet-stream", "ETag": f'"{hashlib.sha1(data).hexdigest()}"',
                       "X-Repo-Commit": COMMIT, "Accept-Ranges": "bytes"}
            status, body = 200, data
            if ranged := self.headers.get("Range"):
                first, _, last = ranged.removeprefix("bytes=").partition("-")
                start, end = int(first), min(int(last) if last else len(data) - 1, len(data) - 1)
                status, body = 206, data[start:end + 1]
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            if self.command == "GET" and hub.take("dropped"):
                self.start(status, headers, len(body))
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)
                return None
            if self.command == "GET" and hub.faults.bytes_per_second:
                self.start(status, headers, len(body))
                chunk = max(1, int(hub.faults.bytes_per_second / 20))
                try:
                    for start in range(0, len(body), chunk):
                        self.wfile.write(body[start:start + chunk])
                        self.wfile.flush()
                        time.sleep(0.05)
                except OSError:  # the client went away (killed)
                    self.close_connection = True
                return None
            return self.answer(status, body, headers)

    return Handler
