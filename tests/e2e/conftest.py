"""The Prefect server fixture for end-to-end tests (helpers in tests/e2e/processes.py).

Worker fixtures depend on this one, so pytest stops every worker before the server: a worker whose API
vanished keeps retrying its websocket and ignores SIGTERM (observed with prefect 3.8 and 3.9).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.e2e.processes import BIN, SERVER_START_S, Prefect, client_env, free_port, stop, tail


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prefect]:
    """``prefect server start`` on 127.0.0.1 with SQLite in a temporary PREFECT_HOME."""
    root = tmp_path_factory.mktemp("prefect-e2e")
    home = root / "home"
    home.mkdir()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = root / "server.log"
    server_env = client_env(home, None)
    # The UI asks the browser to call this URL; its default is port 4200.
    server_env["PREFECT_UI_API_URL"] = f"{url}/api"
    with log.open("w") as out:
        server = subprocess.Popen(
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=server_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if server.poll() is not None:
                pytest.fail(f"prefect server exited with {server.returncode}:\n{tail(log)}")
            try:
                if httpx.get(f"{url}/api/health", timeout=5).json() is True:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"prefect server not healthy after {SERVER_START_S} s:\n{tail(log)}")
            time.sleep(0.5)
        yield Prefect(url=url, home=home, env=client_env(home, f"{url}/api"), log=log)
    finally:
        stop(server)
