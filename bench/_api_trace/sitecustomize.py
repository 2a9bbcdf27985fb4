"""Per-request trace of the Prefect API, for ``bench/many_folds.py --trace-api`` only.

Python imports ``sitecustomize`` at start-up from the first ``sys.path`` entry that has one; the bench
puts this directory first on the worker's ``PYTHONPATH``, so the worker and every flow run process it
starts record each HTTP request their httpx clients send to the Prefect server (the port in
``EW_TRACE_PORT``): one tab-separated line per request in ``$EW_TRACE_DIR/api-<pid>.tsv``, with the
request's start (``time.time()``), seconds until its answer, method, path with ids replaced by ``{id}``,
status (0 for no answer) and which client sent it (``id()`` of the httpx client, so a route that comes
first for many clients shows where clients are made: each new Prefect client first asks for a CSRF
token). Events over the websocket are not requests and are not recorded.
"""

from __future__ import annotations

import os
import re
import time

_PORT = os.environ.get("EW_TRACE_PORT")
_DIR = os.environ.get("EW_TRACE_DIR")
_ID = re.compile(r"/[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _route(request) -> str | None:
    url = request.url
    if str(url.port) != _PORT:
        return None
    return _ID.sub("/{id}", url.path.removeprefix("/api"))


def _write(started: float, took: float, method: str, route: str, status: int, client: int) -> None:
    with open(os.path.join(_DIR, f"api-{os.getpid()}.tsv"), "a") as out:
        out.write(f"{started:.4f}\t{took:.4f}\t{method}\t{route}\t{status}\t{client}\n")


def _install() -> None:
    import httpx

    sync_send, async_send = httpx.Client.send, httpx.AsyncClient.send

    def send(self, request, *args, **kwargs):
        route = _route(request)
        if route is None:
            return sync_send(self, request, *args, **kwargs)
        started, t0, status = time.time(), time.perf_counter(), 0
        try:
            response = sync_send(self, request, *args, **kwargs)
            status = response.status_code
            return response
        finally:
            _write(started, time.perf_counter() - t0, request.method, route, status, id(self))

    async def asend(self, request, *args, **kwargs):
        route = _route(request)
        if route is None:
            return await async_send(self, request, *args, **kwargs)
        started, t0, status = time.time(), time.perf_counter(), 0
        try:
            response = await async_send(self, request, *args, **kwargs)
            status = response.status_code
            return response
        finally:
            _write(started, time.perf_counter() - t0, request.method, route, status, id(self))

    httpx.Client.send, httpx.AsyncClient.send = send, asend


if _PORT and _DIR:
    _install()
