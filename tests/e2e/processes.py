"""Real processes for end-to-end tests: ``prefect server start`` on a free port, a process worker, and
a small REST client for checking what the server recorded.

Everything lives in a temporary PREFECT_HOME (SQLite database, result storage), so a developer's own
~/.prefect is never touched.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import wait_for

BIN = Path(sys.executable).parent
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
SERVER_START_S = 180  # hang guard: ~12 s measured on a fresh SQLite DB, more on 2 loaded cores
RUN_WAIT_S = 600  # hang guard for one flow run
API_RETRY_S = 120  # how long one API call may keep meeting a locked database


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tail(path: Path, lines: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def stop(process: subprocess.Popen, grace_s: float = 20) -> None:
    """SIGTERM the process group we started, SIGKILL it if it is still there after ``grace_s``."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=grace_s)


@dataclass
class Prefect:
    """A running server and the environment every client process (CLI, worker) gets."""

    url: str
    home: Path
    env: dict[str, str]
    log: Path

    @property
    def api(self) -> str:
        return f"{self.url}/api"

    def get(self, path: str) -> Any:
        return self._request("GET", path)

    def post(self, path: str, body: dict[str, Any]) -> Any:
        return self._request("POST", path, body)

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """One API call, retried like Prefect's own client retries: a SQLite-backed server on 2 busy cores
        stalls or answers 503 while its database is locked (PrefectHQ/prefect#18934); that is load, not an
        answer. Other errors fail at once."""
        deadline = time.monotonic() + API_RETRY_S
        while True:
            try:
                response = httpx.request(method, f"{self.api}{path}", json=body, timeout=30)
                if response.status_code != 503:
                    response.raise_for_status()
                    return response.json()
                problem: Exception = httpx.HTTPStatusError("503", request=response.request, response=response)
            except httpx.TransportError as exc:
                problem = exc
            if time.monotonic() > deadline:
                raise problem
            time.sleep(2)

    def run(self, *args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
        """Run a command (``prefect ...``, ``epochwise ...``) as a user would, against this server."""
        done = subprocess.run(
            list(args), env=self.env, cwd=cwd, capture_output=True, text=True, timeout=timeout
        )
        assert done.returncode == 0, f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
        return done

    def wait_for_run(self, flow_run_id: str, worker_log: Path | None = None) -> dict[str, Any]:
        """Poll the flow run until it is in a terminal state; returns the run as the API shows it."""

        def finished() -> dict[str, Any] | None:
            run = self.get(f"/flow_runs/{flow_run_id}")
            return run if run["state"] and run["state"]["type"] in TERMINAL else None

        return wait_for(
            finished,
            f"flow run {flow_run_id} not finished; worker log:",
            explain=lambda: tail(worker_log) if worker_log else "",
            timeout_s=RUN_WAIT_S,
            every_s=1,
        )

    def artifacts(self, key: str) -> list[dict[str, Any]]:
        return self.post("/artifacts/filter", {"artifacts": {"key": {"any_": [key]}}, "sort": "CREATED_DESC"})


def client_env(home: Path, api_url: str | None) -> dict[str, str]:
    """The test process's environment without any PREFECT_* setting from the developer's shell."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_RESULTS_LOCAL_STORAGE_PATH=str(home / "storage"),
        PREFECT_WORKER_QUERY_SECONDS="1",  # seconds between the worker's polls (default 10)
        WANDB_MODE="offline",
        COLUMNS="200",  # rich tables in CLI output: wide enough that names are never cut
    )
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


@dataclass
class Worker:
    process: subprocess.Popen
    log: Path


def start_worker(prefect: Prefect, pool: str, log: Path) -> Worker:
    """``prefect worker start --pool <pool>`` and wait until the server lists it."""
    with log.open("w") as out:
        process = subprocess.Popen(
            [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--limit", "4"],
            env=prefect.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    deadline = time.monotonic() + SERVER_START_S
    while not prefect.post(f"/work_pools/{pool}/workers/filter", {}):
        if process.poll() is not None:
            pytest.fail(f"worker exited with {process.returncode}:\n{tail(log)}")
        if time.monotonic() > deadline:
            stop(process)
            pytest.fail(f"worker not registered after {SERVER_START_S} s:\n{tail(log)}")
        time.sleep(0.5)
    return Worker(process, log)


class CuttableLink:
    """A TCP relay to a local port, for clients on "another machine": they reach the server through it
    until `cut`, which drops every open connection and closes each new one at once, as a network outage
    between that machine and the server does (the server runs on for everyone else); `mend` ends it.
    It relays bytes, so HTTP and Prefect's event websocket pass alike."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.up = threading.Event()
        self.up.set()
        self.lock = threading.Lock()
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def _accept(self) -> None:
        while True:
            try:
                near, _ = self.listener.accept()
            except OSError:  # closed
                return
            if not self.up.is_set():
                near.close()
                continue
            try:
                far = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                near.close()
                continue
            with self.lock:
                self.sockets += [near, far]
            for src, dst in ((near, far), (far, near)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    def cut(self) -> None:
        self.up.clear()
        with self.lock:
            open_now, self.sockets = self.sockets, []
        for sock in open_now:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def mend(self) -> None:
        self.up.set()

    def close(self) -> None:
        self.cut()
        self.listener.close()
