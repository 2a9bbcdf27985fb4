"""A real HTTP proxy in front of the test Prefect API that can answer some requests late or with an error,
as a busy or briefly unreachable server does.

Only `ApiProxy.rules` differ from the API: each rule sees a request's method and path (without ``/api``)
and may hold the reply or replace it. ``seen`` counts the requests that each rule matched.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
from prefect.settings import PREFECT_API_REQUEST_TIMEOUT, PREFECT_API_URL, temporary_settings

LIMITS = "/v2/concurrency_limits"
RENEW = re.compile(r"/v2/concurrency_limits/leases/[0-9a-f-]+/renew")


@dataclass
class Rule:
    """Requests of ``method`` whose path matches ``path``: the n-th one (from 1) is answered ``late_s``
    seconds after the API committed it when ``late(n)``, or with ``status(n)`` without reaching the API."""

    method: str
    path: str | re.Pattern[str]
    late_s: float = 0.0
    late: Callable[[int], bool] = lambda n: False
    status: Callable[[int], int | None] = lambda n: None
    seen: int = 0

    def matches(self, method: str, path: str) -> bool:
        if method != self.method:
            return False
        if isinstance(self.path, str):
            return path.rstrip("/") == self.path
        return self.path.fullmatch(path) is not None


class ApiProxy(ThreadingHTTPServer):
    def __init__(self, upstream: str, rules: list[Rule]) -> None:
        self.upstream, self.rules = upstream.rstrip("/"), rules
        self.lock = threading.Lock()
        self.answered: list[tuple[str, int]] = []  # (path, status) of every request that matched a rule
        super().__init__(("127.0.0.1", 0), ForwardHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/api"


class ForwardHandler(BaseHTTPRequestHandler):
    server: ApiProxy

    def forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        path = self.path.removeprefix("/api")
        rule, n = None, 0
        with self.server.lock:
            rule = next((r for r in self.server.rules if r.matches(self.command, path)), None)
            if rule is not None:
                rule.seen += 1
                n = rule.seen
        status = rule.status(n) if rule else None
        if status is not None:
            self.reply(status, {}, b'{"detail": "proxy: server unavailable"}')
        else:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
            reply = httpx.request(self.command, self.server.upstream + path, content=body, headers=headers)
            if rule is not None and rule.late(n):
                time.sleep(rule.late_s)  # committed upstream; the client has given up by now
            status = reply.status_code
            self.reply(status, reply.headers, reply.content)
        if rule is not None:
            with self.server.lock:
                self.server.answered.append((path, status))

    def reply(self, status: int, headers: httpx.Headers | dict, content: bytes) -> None:
        try:
            self.send_response(status)
            for key, value in headers.items():
                if key.lower() not in ("content-length", "transfer-encoding", "content-encoding", "connection"):
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            self.wfile.write(content)
        except (BrokenPipeError, ConnectionResetError):
            pass

    do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = forward

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def api_proxy(rules: list[Rule], timeout_s: float | None = None) -> Iterator[ApiProxy]:
    """Point this process's Prefect client at an `ApiProxy` (request timeout ``timeout_s`` if given)."""
    proxy = ApiProxy(PREFECT_API_URL.value(), rules)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    settings = {PREFECT_API_URL: proxy.url} | ({PREFECT_API_REQUEST_TIMEOUT: timeout_s} if timeout_s else {})
    try:
        with temporary_settings(settings):
            yield proxy
    finally:
        proxy.shutdown()
        proxy.server_close()


def late_first_create(route: str, late_s: float = 3.0) -> contextlib.AbstractContextManager[ApiProxy]:
    """A proxy that answers the first POST to ``route`` ``late_s`` seconds late, with a 1 s client timeout."""
    return api_proxy([Rule("POST", route, late_s=late_s, late=lambda n: n == 1)], timeout_s=1.0)
