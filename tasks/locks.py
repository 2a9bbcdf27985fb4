"""Exclusive locks for find-then-create steps (uploads, epoch jobs, endpoints).

A host lock is an ``flock`` on a file under ``$PREFECT_HOME/locks``: two runs on this host (or on a
shared filesystem) never interleave their look-up and create, and the OS releases the lock when its
holder dies, even by SIGKILL, so a crash never leaves a fold locked.

A server lease (`server_lease`) is the one slot of a Prefect global concurrency limit, created on first
use: it holds across workers and machines that share one Prefect server. The slot is leased for
``lease_s`` seconds and renewed in the background while held, so a holder that dies frees it once
its lease expires. On Prefect's ephemeral API the limit lives in this host's database only; the flock
covers that case.
"""

from __future__ import annotations

import contextlib
import fcntl
import time
from collections.abc import Iterator
from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.settings import PREFECT_HOME

POLL_S = 0.2  # how often a waiting run retries the lock


def locks_dir() -> Path:
    """``$PREFECT_HOME/locks``, created on first use."""
    path = Path(PREFECT_HOME.value()) / "locks"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def exclusive_lock(name: str, wait_s: float, busy: Exception, directory: Path | None = None) -> Iterator[Path]:
    """Hold the lock ``<directory>/<name>.lock`` (default directory: `locks_dir`); raise ``busy`` if it
    is still taken after ``wait_s`` seconds."""
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
    path = (directory or locks_dir()) / f"{name}.lock"
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


def lease_limit_name(name: str) -> str:
    """The global concurrency limit behind ``server_lease(name)``."""
    return f"epochwise-{name}"


@contextlib.contextmanager
def server_lease(name: str, wait_s: float | None, lease_s: float, busy: Exception) -> Iterator[None]:
    """Hold the single slot of the global concurrency limit ``epochwise-<name>`` (created on demand);
    raise ``busy`` if it is still taken after ``wait_s`` seconds (None: wait as long as it takes)."""
    limit = lease_limit_name(name)
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(limit)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=limit, limit=1))
            except ObjectAlreadyExists:  # the racer we are about to wait for created it first
                pass
    slot = contextlib.ExitStack()
    try:
        # strict: a limit deleted in between fails loudly instead of silently holding nothing
        slot.enter_context(concurrency(limit, occupy=1, timeout_seconds=wait_s, lease_duration=lease_s, strict=True))
    except TimeoutError:
        raise busy from None
    with slot:
        yield


@contextlib.contextmanager
def fold_guard(
    name: str, wait_s: float | None, lease_s: float, busy: Exception, directory: Path | None = None
) -> Iterator[None]:
    """The file lock (in ``directory``, default `locks_dir`), then the server lease, of ``name``: one
    holder at a time on this host and on every worker of the Prefect server."""
    start = time.monotonic()
    with exclusive_lock(name, float("inf") if wait_s is None else wait_s, busy, directory):
        left = None if wait_s is None else max(wait_s - (time.monotonic() - start), 1.0)
        with server_lease(name, left, lease_s, busy):
            yield
