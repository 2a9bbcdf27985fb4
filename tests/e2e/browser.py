"""Headless Chromium driven over the Chrome DevTools protocol: open a page, evaluate a script there.

``--dump-dom`` shows what the page's scripts built, but not whether an ``<img>`` was decoded and drawn;
``naturalWidth`` answers that, and only a script in the page can read it.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--hide-scrollbars", "--window-size=1400,1000",
]


def evaluate_in_page(url: str, script: str, profile: Path, timeout_s: float = 120) -> Any:
    """Open ``url`` in headless Chromium and return the awaited value of the JS expression ``script``."""
    from websockets.sync.client import connect

    profile.mkdir(parents=True, exist_ok=True)
    browser = subprocess.Popen(
        ["chromium", *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout_s
        while not (port_file.is_file() and port_file.read_text().strip()):
            if browser.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"chromium did not open its DevTools port (exit {browser.poll()})")
            time.sleep(0.2)
        port = port_file.read_text().split()[0]
        page = httpx.put(f"http://127.0.0.1:{port}/json/new?{url}", timeout=30).json()
        ids = itertools.count(1)
        with connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=30) as ws:
            while True:  # a navigation while the script runs destroys its context: evaluate again
                call = next(ids)
                ws.send(json.dumps({"id": call, "method": "Runtime.evaluate", "params": {
                    "expression": script, "awaitPromise": True, "returnByValue": True}}))
                reply = json.loads(ws.recv(timeout=timeout_s))
                while reply.get("id") != call:
                    reply = json.loads(ws.recv(timeout=timeout_s))
                if "result" in reply:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Runtime.evaluate in {url} kept failing: {reply.get('error')}")
                time.sleep(0.5)
        result = reply["result"]
        if "exceptionDetails" in result:
            raise RuntimeError(f"script failed in {url}: {result['exceptionDetails']}")
        return result["result"].get("value")
    finally:
        browser.terminate()
        try:
            browser.wait(timeout=30)
        except subprocess.TimeoutExpired:
            browser.kill()


# Waits (up to ``ms``) for the page to show an <img> whose src starts with ``prefix`` and has finished
# loading, then returns [{src prefix, naturalWidth, naturalHeight, complete}] for every such image.
IMAGES_SCRIPT = """
new Promise(resolve => {{
  const started = Date.now();
  const look = () => {{
    const found = [...document.querySelectorAll('img')].filter(i => i.src.startsWith({prefix!r}));
    if ((found.length && found.every(i => i.complete)) || Date.now() - started > {ms}) {{
      resolve(found.map(i => ({{src: i.src.slice(0, 40), naturalWidth: i.naturalWidth,
                               naturalHeight: i.naturalHeight, complete: i.complete}})));
    }} else {{
      setTimeout(look, 250);
    }}
  }};
  look();
}})
"""


def images(url: str, prefix: str, profile: Path, wait_ms: int = 60000) -> list[dict[str, Any]]:
    return evaluate_in_page(url, IMAGES_SCRIPT.format(prefix=prefix, ms=wait_ms), profile)
