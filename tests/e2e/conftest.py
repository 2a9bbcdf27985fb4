"""The Prefect server fixture for end-to-end tests (helpers in tests/e2e/processes.py).

Worker fixtures depend on this one, so pytest stops every worker before the server: a worker whose API
vanished keeps retrying its websocket and ignores SIGTERM (observed with prefect 3.8 and 3.9).
"""

from __future__ import annotations

import re
import shlex
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.processes import BIN, SERVER_START_S, Prefect, client_env, free_port, stop, tail

REPO = Path(__file__).resolve().parents[2]


def readme_server_env(port: int) -> dict[str, str]:
    """The variables the README's "Running it for real" block exports before ``prefect server start``,
    moved to ``port`` (every other setting of the test's PREFECT_HOME stays the test's own)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = text.split("\n## Running it for real\n", 1)[1].split("```bash\n", 1)[1].split("\n```", 1)[0]
    lines = block.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("prefect server start "))
    readme_port = re.search(r"--port (\d+)", lines[start]).group(1)
    found = {}
    for line in lines[:start]:
        if line.startswith("export "):
            for pair in shlex.split(line.split(" #")[0])[1:]:
                name, _, value = pair.partition("=")
                found[name] = value.replace(f":{readme_port}", f":{port}")
    return {k: v for k, v in found.items() if k != "PREFECT_HOME"}


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
    # The README's server settings on this port (PREFECT_UI_API_URL: the UI's default is port 4200).
    server_env.update(readme_server_env(port))
    assert server_env["PREFECT_UI_API_URL"] == f"{url}/api"
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
