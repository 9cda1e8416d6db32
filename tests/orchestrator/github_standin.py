"""A stand-in of the GitHub REST API (v2022-11-28), for the issue-queue intake's tests.

A real HTTP server on loopback that answers only the documented requests the intake makes,
with the documented shapes, and refuses anything else with 404 (as GitHub does for an unknown
route) or 422 (a body that breaks the documented schema). Each repository is backed by a local
git repository: contents are read from it, and a pull request's head must be a branch in it.

Documented behaviour kept here:
- `Authorization: token T` (or `Bearer T`), `Accept: application/vnd.github+json` and
  `X-GitHub-Api-Version: 2022-11-28` on every request; a wrong token is 401.
- `GET /repos/{o}/{r}/issues?labels=&state=&sort=&direction=&per_page=&page=`: issues and pull
  requests (newest first, by creation or by update; a label change updates the issue), with an
  `ETag`; `If-None-Match` equal to it gives 304 with no body, which does not count against the
  rate limit (docs: "Use conditional requests if appropriate"). `per_page` issues a page (30 by
  default, 100 at most), and a `Link` header with `rel="next"` and `rel="last"` while more
  pages follow (docs: "Using pagination in the REST API").
- Rate-limit headers on every counted answer: x-ratelimit-limit, -remaining, -used, -reset,
  -resource.
- `POST …/issues/{n}/comments` {body} → 201; `POST …/issues/{n}/labels` {labels} → 200 with the
  issue's labels; `DELETE …/issues/{n}/labels/{name}` → 200, 404 when absent.
- `GET /repos/{o}/{r}` (default_branch), `GET /repos/{o}/{r}/contents/{path}?ref=` (type file,
  encoding base64), `POST /repos/{o}/{r}/pulls` {title, head, base, body} → 201, 422 when the
  head is not a branch.

A test can script GitHub's failures: `fail_once(method, suffix, status)` answers the next
matching request with that status (a 502 as GitHub's front end gives one), counted as a call.
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

API_VERSION = "2022-11-28"
RATE_LIMIT = 5000


@dataclass
class Call:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: Any
    status: int


@dataclass
class StandIn:
    token: str
    repos: dict[str, Path]
    """`owner/name` → the local git repository (work tree) that backs it."""
    url: str = ""
    issues: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)
    comments: list[tuple[str, int, str]] = field(default_factory=list)
    pulls: list[dict[str, Any]] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)
    failures: list[tuple[str, str, int]] = field(default_factory=list)
    """Scripted failures still to give: (method, path suffix, status), each once."""
    remaining: int = RATE_LIMIT
    reset_at: int = field(default_factory=lambda: int(time.time()) + 3600)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add_issue(
        self, repo: str, number: int, title: str, body: str, labels: list[str], *, pr: bool = False
    ) -> dict[str, Any]:
        issue = {
            "id": 1000 + number,
            "node_id": f"I_{number}",
            "url": f"{self.url}/repos/{repo}/issues/{number}",
            "html_url": f"https://github.com/{repo}/issues/{number}",
            "number": number,
            "state": "open",
            "title": title,
            "body": body,
            "user": {"login": "octocat", "id": 1, "type": "User"},
            "labels": [_label(name) for name in labels],
            "comments": 0,
            "created_at": "2026-01-01T00:00:00Z",
            "updated_at": "2026-01-01T00:00:00Z",
            "locked": False,
        }
        if pr:
            issue["pull_request"] = {"url": f"{self.url}/repos/{repo}/pulls/{number}"}
        with self.lock:
            self.issues.setdefault(repo, {})[number] = issue
        return issue

    def labels_of(self, repo: str, number: int) -> list[str]:
        with self.lock:
            return [x["name"] for x in self.issues[repo][number]["labels"]]

    def comments_on(self, repo: str, number: int) -> list[str]:
        with self.lock:
            return [body for r, n, body in self.comments if (r, n) == (repo, number)]

    def fail_once(self, method: str, suffix: str, status: int = 502) -> None:
        """Answer the next `method` request whose path ends with `suffix` with `status`."""
        with self.lock:
            self.failures.append((method, suffix, status))

    def counted(self, method: str, suffix: str) -> list[Call]:
        return [c for c in self.calls if c.method == method and c.path.endswith(suffix)]


def _label(name: str) -> dict[str, Any]:
    return {"id": abs(hash(name)) % 10**6, "name": name, "color": "ededed", "default": False}


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message


def _handler(standin: StandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            self._serve("GET")

        def do_POST(self) -> None:
            self._serve("POST")

        def do_DELETE(self) -> None:
            self._serve("DELETE")

        def _serve(self, method: str) -> None:
            split = urlsplit(self.path)
            path, query = unquote(split.path), parse_qs(split.query)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = json.loads(raw) if raw else None
            extra: dict[str, str] = {}
            try:
                self._check_headers()
                self._scripted_failure(method, path)
                status, doc, extra = self._route(method, path, query, body)
            except _Refused as exc:
                status = exc.status
                doc = {"message": exc.message, "documentation_url": "https://docs.github.com/rest"}
            standin.calls.append(Call(method, path, query, dict(self.headers), body, status))
            if status != 304:
                with standin.lock:
                    standin.remaining = max(0, standin.remaining - 1)
            payload = b"" if status == 304 else json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("X-GitHub-Api-Version-Selected", API_VERSION)
            self.send_header("x-ratelimit-limit", str(RATE_LIMIT))
            self.send_header("x-ratelimit-remaining", str(standin.remaining))
            self.send_header("x-ratelimit-used", str(RATE_LIMIT - standin.remaining))
            self.send_header("x-ratelimit-reset", str(standin.reset_at))
            self.send_header("x-ratelimit-resource", "core")
            for k, v in extra.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(payload)

        def _check_headers(self) -> None:
            auth = self.headers.get("Authorization", "")
            if auth not in (f"token {standin.token}", f"Bearer {standin.token}"):
                raise _Refused(401, "Bad credentials")
            if self.headers.get("Accept") != "application/vnd.github+json":
                raise _Refused(415, f"unexpected Accept {self.headers.get('Accept')!r}")
            if self.headers.get("X-GitHub-Api-Version") != API_VERSION:
                raise _Refused(400, "X-GitHub-Api-Version missing or unsupported")

        def _scripted_failure(self, method: str, path: str) -> None:
            with standin.lock:
                for failure in standin.failures:
                    if failure[0] == method and path.endswith(failure[1]):
                        standin.failures.remove(failure)
                        raise _Refused(failure[2], "Server Error")

        def _route(
            self, method: str, path: str, query: dict[str, list[str]], body: Any
        ) -> tuple[int, Any, dict[str, str]]:
            parts = path.strip("/").split("/")
            if len(parts) < 3 or parts[0] != "repos":
                raise _Refused(404, "Not Found")
            repo = f"{parts[1]}/{parts[2]}"
            if repo not in standin.repos:
                raise _Refused(404, "Not Found")
            rest = parts[3:]
            if method == "GET" and rest == []:
                return 200, self._repo(repo), {}
            if method == "GET" and rest == ["issues"]:
                return self._list(repo, query)
            if method == "GET" and rest[:1] == ["contents"] and len(rest) > 1:
                return 200, self._contents(repo, "/".join(rest[1:]), query), {}
            if len(rest) >= 3 and rest[0] == "issues" and rest[1].isdigit():
                number = int(rest[1])
                if number not in standin.issues.get(repo, {}):
                    raise _Refused(404, "Not Found")
                if method == "POST" and rest[2:] == ["comments"]:
                    return 201, self._comment(repo, number, body), {}
                if method == "POST" and rest[2:] == ["labels"]:
                    return 200, self._add_labels(repo, number, body), {}
                if method == "DELETE" and rest[2] == "labels" and len(rest) == 4:
                    return 200, self._remove_label(repo, number, rest[3]), {}
            if method == "POST" and rest == ["pulls"]:
                return 201, self._pull(repo, body), {}
            raise _Refused(404, "Not Found")

        def _repo(self, repo: str) -> dict[str, Any]:
            return {
                "id": 1,
                "name": repo.split("/")[1],
                "full_name": repo,
                "private": False,
                "default_branch": _git(standin.repos[repo], "symbolic-ref", "--short", "HEAD"),
                "clone_url": f"https://github.com/{repo}.git",
            }

        def _list(self, repo: str, query: dict[str, list[str]]) -> tuple[int, Any, dict[str, str]]:
            allowed = {"labels", "state", "per_page", "page", "sort", "direction", "since"}
            if set(query) - allowed:
                raise _Refused(422, f"unknown parameters {sorted(set(query) - allowed)}")
            state = query.get("state", ["open"])[0]
            wanted = [x for x in query.get("labels", [""])[0].split(",") if x]
            # Newest first by creation (the default) or by the last update (`sort=updated`).
            key = "updated_at" if query.get("sort", ["created"])[0] == "updated" else "number"
            with standin.lock:
                issues = [
                    i for i in sorted(standin.issues.get(repo, {}).values(),
                                      key=lambda i: (i[key], i["number"]), reverse=True)
                    if (state == "all" or i["state"] == state)
                    and all(w in [x["name"] for x in i["labels"]] for w in wanted)
                ]  # fmt: skip
            per_page = min(100, int(query.get("per_page", ["30"])[0]))
            number = int(query.get("page", ["1"])[0])
            page = issues[(number - 1) * per_page : number * per_page]
            doc = json.dumps(page, sort_keys=True).encode()
            etag = f'W/"{hashlib.sha256(doc).hexdigest()[:32]}"'
            if self.headers.get("If-None-Match") == etag:
                return 304, None, {"ETag": etag}
            headers = {"ETag": etag}
            last = max(1, -(-len(issues) // per_page))
            if number < last:

                def link(n: int) -> str:
                    at = {k: v[0] for k, v in query.items()} | {"page": str(n)}
                    return f"<{standin.url}/repos/{repo}/issues?{urlencode(at)}>"

                headers["Link"] = f'{link(number + 1)}; rel="next", {link(last)}; rel="last"'
            return 200, page, headers

        def _contents(self, repo: str, path: str, query: dict[str, list[str]]) -> Any:
            ref = query.get("ref", ["HEAD"])[0]
            try:
                text = _git(standin.repos[repo], "show", f"{ref}:{path}", strip=False)
            except subprocess.CalledProcessError:
                raise _Refused(404, "Not Found") from None
            return {
                "type": "file",
                "encoding": "base64",
                "size": len(text.encode()),
                "name": path.rsplit("/", 1)[-1],
                "path": path,
                "content": base64.encodebytes(text.encode()).decode(),
                "sha": hashlib.sha1(text.encode()).hexdigest(),
                "url": f"{standin.url}/repos/{repo}/contents/{path}",
            }

        def _comment(self, repo: str, number: int, body: Any) -> Any:
            if (
                not isinstance(body, dict)
                or not isinstance(body.get("body"), str)
                or set(body) != {"body"}
            ):
                raise _Refused(422, "Validation Failed: body is required")
            with standin.lock:
                standin.comments.append((repo, number, body["body"]))
                cid = len(standin.comments)
            return {
                "id": cid,
                "body": body["body"],
                "user": {"login": "autovibe-bot", "id": 2, "type": "Bot"},
                "html_url": f"https://github.com/{repo}/issues/{number}#issuecomment-{cid}",
                "created_at": "2026-01-01T00:00:00Z",
            }

        def _add_labels(self, repo: str, number: int, body: Any) -> Any:
            labels = body.get("labels") if isinstance(body, dict) else None
            if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
                raise _Refused(422, "Validation Failed: labels")
            with standin.lock:
                issue = standin.issues[repo][number]
                have = [x["name"] for x in issue["labels"]]
                issue["labels"] += [_label(x) for x in labels if x not in have]
                issue["updated_at"] = _now()
                return list(issue["labels"])

        def _remove_label(self, repo: str, number: int, name: str) -> Any:
            with standin.lock:
                issue = standin.issues[repo][number]
                if name not in [x["name"] for x in issue["labels"]]:
                    raise _Refused(404, "Label does not exist")
                issue["labels"] = [x for x in issue["labels"] if x["name"] != name]
                issue["updated_at"] = _now()
                return list(issue["labels"])

        def _pull(self, repo: str, body: Any) -> Any:
            if not isinstance(body, dict) or not {"head", "base"} <= set(body):
                raise _Refused(422, "Validation Failed: head and base are required")
            if not body.get("title"):
                raise _Refused(422, "Validation Failed: title is required")
            backing = standin.repos[repo]
            for side in ("head", "base"):
                try:
                    _git(backing, "rev-parse", "--verify", f"refs/heads/{body[side]}")
                except subprocess.CalledProcessError:
                    raise _Refused(422, f"Validation Failed: {side} invalid") from None
            with standin.lock:
                number = 100 + len(standin.pulls)
                pull = {
                    "number": number,
                    "html_url": f"https://github.com/{repo}/pull/{number}",
                    "state": "open",
                    "title": body["title"],
                    "body": body.get("body"),
                    "head": {"ref": body["head"]},
                    "base": {"ref": body["base"]},
                }
                standin.pulls.append(pull)
            return pull

    return Handler


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _git(repo: Path, *args: str, strip: bool = True) -> str:
    out = subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True
    ).stdout
    return out.strip() if strip else out


@contextmanager
def github_standin(token: str, repos: dict[str, Path]) -> Iterator[StandIn]:
    standin = StandIn(token, repos)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(standin))
    server.daemon_threads = True
    standin.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield standin
    finally:
        server.shutdown()
        server.server_close()
