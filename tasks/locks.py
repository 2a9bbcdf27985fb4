"""Exclusive locks for find-then-create steps (uploads, epoch jobs, endpoints).

A host lock is an ``flock`` on a file under ``$PREFECT_HOME/locks``: two runs on this host (or on a
shared filesystem) never interleave their look-up and create, and the OS releases the lock when its
holder dies, even by SIGKILL, so a crash never leaves a fold locked.

A server lease (`server_lease`) is the one slot of a Prefect global concurrency limit, created on first
use: it holds across workers and machines that share one Prefect server. The slot is leased for
``lease_s`` seconds and renewed in the background while held, so a holder that dies frees it once
its lease expires (the server's expired-lease sweep). `fold_guard` takes it only with a Prefect server
(``PREFECT_API_URL``); on the ephemeral API the flock alone covers the host.
"""

from __future__ import annotations

import contextlib
import fcntl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
from prefect.cache_policies import CachePolicy
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.context import TaskRunContext
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.locking.protocol import LockManager
from prefect.logging import get_logger
from prefect.settings import PREFECT_API_URL, PREFECT_HOME
from prefect.transactions import IsolationLevel

POLL_S = 0.2  # how often a waiting run retries the lock
logger = get_logger("epochwise.locks")  # under prefect.*: shown on the console like run logs


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


def read_or_create_limit(client: Any, name: str, slots: int) -> Any | None:
    """The global concurrency limit ``name`` as the server has it, or None when this call created it
    (active, ``slots`` slots).

    A create that answers 409 found the limit there: a rival created it between the read and the create,
    or this very create did. Prefect's client resends a request after a read timeout or a 503 (both
    come when SQLite is busy), and a create that committed the first time answers 409 to its resend.
    """
    try:
        return client.read_global_concurrency_limit_by_name(name)
    except ObjectNotFound:
        pass
    try:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=slots, active=True))
        return None
    except ObjectAlreadyExists:
        return client.read_global_concurrency_limit_by_name(name)


def lease_limit_name(name: str) -> str:
    """The global concurrency limit behind ``server_lease(name)``."""
    return f"epochwise-{name}"


@contextlib.contextmanager
def server_lease(name: str, wait_s: float | None, lease_s: float, busy: Exception) -> Iterator[None]:
    """Hold the single slot of the global concurrency limit ``epochwise-<name>`` (created on demand);
    raise ``busy`` if it is still taken after ``wait_s`` seconds (None: wait as long as it takes)."""
    limit = lease_limit_name(name)
    with get_client(sync_client=True) as client:
        read_or_create_limit(client, limit, 1)
    slot = contextlib.ExitStack()
    try:
        # strict: a limit deleted in between fails loudly instead of silently holding nothing; a failed
        # renewal (server briefly away) must not kill an hours-long local epoch, the file lock still holds
        held = concurrency(
            limit,
            occupy=1,
            timeout_seconds=wait_s,
            lease_duration=lease_s,
            strict=True,
            raise_on_lease_renewal_failure=False,
        )
        slot.enter_context(held)
    except TimeoutError:
        raise busy from None
    with slot:
        yield


@contextlib.contextmanager
def fold_guard(
    name: str, wait_s: float | None, lease_s: float, busy: Exception, directory: Path | None = None
) -> Iterator[None]:
    """The file lock (in ``directory``, default `locks_dir`), then, with a Prefect server, its lease of
    ``name``: one holder at a time on this host and on every worker of the server.

    No lease on the ephemeral API (no ``PREFECT_API_URL``): it is host-local like the file lock, and it
    never reclaims expired leases (Prefect runs that service only in ``prefect server start``), so a
    killed run would leave the slot taken in ``$PREFECT_HOME``'s database for good.
    """
    start = time.monotonic()
    with exclusive_lock(name, float("inf") if wait_s is None else wait_s, busy, directory):
        if not PREFECT_API_URL.value():
            yield
            return
        left = None if wait_s is None else max(wait_s - (time.monotonic() - start), 1.0)
        with server_lease(name, left, lease_s, busy):
            yield


class HostLockManager(LockManager):
    """A Prefect lock manager whose locks are ``flock`` s (`exclusive_lock`), for SERIALIZABLE cache
    policies on long tasks.

    With ``isolation_level=SERIALIZABLE`` Prefect takes the lock on the task's cache key before it
    looks for the cached result and releases it after the result is committed, so a second run of the
    same key on this host waits, then finds the first one's result instead of computing (and paying
    for) it again. Prefect's own `FileSystemLockManager` frees a killed holder's lock only when its
    hold timeout ends, which must outlast the longest task, and it creates its lock file empty and
    writes the holder after, so a run reading the file in between fails with ``ValueError: EOF while
    parsing`` (CI, two runs of one fold at once); an ``flock`` has no file content to read and is freed
    by the OS the moment its holder dies, even by SIGKILL. It covers one host (or a shared filesystem): a server lease
    would not do for hours-long holders, since a killed holder's lease is reclaimed only by the
    expiry sweep of ``prefect server start``, never on the ephemeral API.
    """

    def __init__(self) -> None:
        self._held: dict[str, tuple[str, contextlib.ExitStack]] = {}
        self._mutex = threading.Lock()

    def acquire_lock(
        self, key: str, holder: str, acquire_timeout: float | None = None, hold_timeout: float | None = None
    ) -> bool:
        wait = acquire_timeout  # None (what Prefect's transactions pass): as long as the holder runs
        if self.is_locked(key):
            logger.info(f"waiting for another run that holds {key}; its result is used when it finishes")
        stack = contextlib.ExitStack()
        busy = TimeoutError(f"{key} is still held by another run after {wait} s")
        # raises busy rather than returning False: Prefect's transaction would go on without the lock
        stack.enter_context(exclusive_lock(key, float("inf") if wait is None else wait, busy))
        with self._mutex:
            self._held[key] = (holder, stack)
        return True

    def release_lock(self, key: str, holder: str) -> None:
        with self._mutex:
            held = self._held.get(key)
            if held is None or held[0] != holder:
                raise ValueError(f"{holder} does not hold the lock on {key}")
            del self._held[key]
        held[1].close()

    def is_locked(self, key: str) -> bool:
        taken = BlockingIOError(key)
        try:
            with exclusive_lock(key, 0.0, taken):  # one try, released at once
                return False
        except BlockingIOError as exc:
            if exc is not taken:
                raise
            return True

    def is_lock_holder(self, key: str, holder: str) -> bool:
        with self._mutex:
            held = self._held.get(key)
        return held is not None and held[0] == holder

    def wait_for_lock(self, key: str, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.is_locked(key):
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(POLL_S)
        return True

    async def aacquire_lock(
        self, key: str, holder: str, acquire_timeout: float | None = None, hold_timeout: float | None = None
    ) -> bool:
        return await anyio.to_thread.run_sync(self.acquire_lock, key, holder, acquire_timeout, hold_timeout)

    async def await_for_lock(self, key: str, timeout: float | None = None) -> bool:
        return await anyio.to_thread.run_sync(self.wait_for_lock, key, timeout)


def serialized_on_host(cache_key_fn: Callable[[TaskRunContext, dict[str, Any]], str | None]) -> CachePolicy:
    """A cache policy on ``cache_key_fn``, SERIALIZABLE under a `HostLockManager`: a second run of the
    same key on this host waits for the first one's result and uses it instead of computing it again."""
    return CachePolicy.from_cache_key_fn(cache_key_fn).configure(
        isolation_level=IsolationLevel.SERIALIZABLE, lock_manager=HostLockManager()
    )
