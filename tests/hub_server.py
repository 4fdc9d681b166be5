"""A tiny stand-in for the few Hugging Face Hub endpoints that `bzq push` and `load_quantized("hf-hub:...")` use.

Standard library only; it keeps what it receives so tests can check it (files, headers, the card's metadata).
"""

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


class FakeHub:
    def __init__(self, token: str, fail_commit: bool = False):
        self.token = token
        self.fail_commit = fail_commit
        self.repos: dict[str, dict] = {}  # repo_id -> {"files": {path: bytes}, "sha": str, "private": bool}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Authorization header)
        self.validated_cards: list[str] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _send(self, status: int, body: bytes | dict | list = b"", headers: dict | None = None) -> None:
                data = json.dumps(body).encode() if isinstance(body, dict | list) else body
                self.send_response(status)
                for k, v in (headers or {"Content-Type": "application/json"}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _authorised(self) -> bool:
                return self.headers.get("Authorization") == f"Bearer {hub.token}"

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _route(self) -> None:
                path = unquote(urlparse(self.path).path)
                hub.requests.append((self.command, path, self.headers.get("Authorization")))
                parts = path.strip("/").split("/")
                if self.command == "POST" and path == "/api/repos/create":
                    if not self._authorised():
                        return self._send(401, {"error": "Invalid credentials"})
                    req = json.loads(self._body())
                    repo_id = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
                    hub.repos.setdefault(
                        repo_id, {"files": {}, "sha": "0" * 40, "private": req.get("visibility") == "private"}
                    )
                    return self._send(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})
                if self.command == "POST" and path == "/api/validate-yaml":
                    content = json.loads(self._body())["content"]
                    hub.validated_cards.append(content)
                    return self._send(200, {"errors": [], "warnings": []})
                if parts[:2] == ["api", "models"] and len(parts) >= 4:
                    repo_id = "/".join(parts[2:4])
                    repo = hub.repos.get(repo_id)
                    if repo is None or (repo["private"] and not self._authorised()):
                        return self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                    rest = parts[4:]
                    if self.command == "POST" and rest[:1] == ["preupload"]:
                        files = json.loads(self._body())["files"]
                        return self._send(
                            200,
                            {
                                "files": [
                                    {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files
                                ]
                            },
                        )
                    if self.command == "POST" and rest[:1] == ["commit"]:
                        if not self._authorised():
                            return self._send(401, {"error": "Invalid credentials"})
                        if hub.fail_commit:
                            return self._send(500, {"error": "Internal Error - We're working hard to fix this"})
                        for line in self._body().splitlines():
                            item = json.loads(line)
                            if item["key"] == "file":
                                value = item["value"]
                                repo["files"][value["path"]] = base64.b64decode(value["content"])
                        digest = hashlib.sha1()
                        for name in sorted(repo["files"]):
                            digest.update(name.encode() + repo["files"][name])
                        repo["sha"] = digest.hexdigest()
                        return self._send(
                            200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{repo['sha']}", "commitOid": repo["sha"]}
                        )
                    if self.command == "GET" and (not rest or rest[0] == "revision"):
                        siblings = [{"rfilename": name} for name in sorted(repo["files"])]
                        return self._send(
                            200,
                            {
                                "id": repo_id,
                                "modelId": repo_id,
                                "sha": repo["sha"],
                                "siblings": siblings,
                                "private": repo["private"],
                            },
                        )
                    if self.command == "GET" and rest[:1] == ["tree"]:
                        entries = [
                            {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                            for name, data in sorted(repo["files"].items())
                        ]
                        return self._send(200, entries)
                if self.command in ("GET", "HEAD") and len(parts) >= 5 and parts[2] == "resolve":
                    repo_id, name = "/".join(parts[:2]), "/".join(parts[4:])
                    repo = hub.repos.get(repo_id)
                    if repo is None or (repo["private"] and not self._authorised()):
                        return self._send(404, b"", {"X-Error-Code": "RepoNotFound"})
                    if name not in repo["files"]:
                        return self._send(404, b"", {"X-Error-Code": "EntryNotFound"})
                    data = repo["files"][name]
                    return self._send(
                        200,
                        data,
                        {
                            "Content-Type": "application/octet-stream",
                            "X-Repo-Commit": repo["sha"],
                            "ETag": f'"{hashlib.sha1(data).hexdigest()}"',
                        },
                    )
                return self._send(404, {"error": f"not implemented here: {self.command} {path}"})

            do_GET = do_POST = do_HEAD = _route

        return Handler
