"""A loopback stand-in for the Hugging Face Hub's upload API, for tests: point ``HF_ENDPOINT`` at it.

It speaks what ``huggingface_hub``'s ``create_repo`` and ``create_commit`` send: ``POST
/api/repos/create``, ``POST /api/validate-yaml`` (the README check before an upload), ``POST
/api/{type}s/{repo}/preupload/{rev}`` (every file answered ``regular``, so contents travel base64 in
the commit, no LFS or Xet) and ``POST /api/{type}s/{repo}/commit/{rev}`` (NDJSON). Files committed
land in :attr:`FakeHub.repos`. ``statuses`` scripts failures: each request takes the next status
from the list (``200`` means answer normally), so ``[500]`` fails once and then serves.
"""

from __future__ import annotations

import base64
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

ERRORS = {401: "Invalid credentials in Authorization header", 403: "You don't have the rights to create a repo"}


@dataclass
class FakeHub:
    statuses: list[int] = field(default_factory=list)
    repos: dict[str, dict[str, bytes]] = field(default_factory=dict)
    """``"dataset/org/name"`` -> path -> content, as committed."""
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    """(method, path, Authorization header) of every request, in order."""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def handle(self, base: str, method: str, path: str, auth: str | None, body: bytes) -> tuple[int, Any]:
        with self.lock:
            self.requests.append((method, path, auth))
            status = self.statuses.pop(0) if self.statuses else 200
        if status != 200:
            return status, {"error": ERRORS.get(status, "Internal Error - We're working hard to fix this")}
        parts = path.split("?")[0].strip("/").split("/")
        if path.startswith("/api/repos/create"):
            req = json.loads(body)
            kind = req.get("type") or "model"
            with self.lock:
                self.repos.setdefault(f"{kind}/{req['organization'] or ''}/{req['name']}".replace("//", "/"), {})
            prefix = "" if kind == "model" else f"{kind}s/"
            return 200, {"url": f"{base}/{prefix}{req['organization']}/{req['name']}"}
        if path.startswith("/api/validate-yaml"):
            return 200, {"errors": [], "warnings": []}
        if len(parts) >= 6 and parts[4] == "preupload":
            files = json.loads(body)["files"]
            return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
        if len(parts) >= 6 and parts[4] == "commit":
            key = f"{parts[1][:-1]}/{parts[2]}/{parts[3]}"
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            with self.lock:
                repo = self.repos.setdefault(key, {})
                for line in lines:
                    if line["key"] == "file":
                        repo[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
            return 200, {
                "commitUrl": f"{base}/{parts[1]}/{parts[2]}/{parts[3]}/commit/{'a' * 40}",
                "commitOid": "a" * 40,
            }
        return 404, {"error": f"fake hub: no route for {method} {path}"}


def serve(hub: FakeHub) -> tuple[ThreadingHTTPServer, str]:
    """Start ``hub`` on a free loopback port (a daemon thread); returns the server and its URL."""

    class Handler(BaseHTTPRequestHandler):
        def _any(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            status, payload = hub.handle(
                f"http://{self.headers['Host']}", self.command, self.path, self.headers.get("Authorization"), body
            )
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = _any

        def log_message(self, *args: Any) -> None:  # quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"
