"""Host-wide exclusive locks for find-then-create steps (uploads, epoch jobs, endpoints).

A lock is an ``flock`` on a file under ``$PREFECT_HOME/locks``: two runs on this host (or on a shared
filesystem) never interleave their look-up and create, and the OS releases the lock when its holder dies,
even by SIGKILL, so a crash never leaves a fold locked.
"""

from __future__ import annotations

import contextlib
import fcntl
import time
from collections.abc import Iterator
from pathlib import Path

from prefect.settings import PREFECT_HOME

POLL_S = 0.2  # how often a waiting run retries the lock


def locks_dir() -> Path:
    """``$PREFECT_HOME/locks``, created on first use."""
    path = Path(PREFECT_HOME.value()) / "locks"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def exclusive_lock(name: str, wait_s: float, busy: Exception) -> Iterator[Path]:
    """Hold the lock ``<locks>/<name>.lock``; raise ``busy`` if it is still taken after ``wait_s`` seconds."""
    path = locks_dir() / f"{name}.lock"
    with open(path, "a+") as handle:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise busy from None
                time.sleep(POLL_S)
        try:
            yield path
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
