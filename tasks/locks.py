"""Exclusive locks for find-then-create steps (uploads, epoch jobs, endpoints).

A host lock is an ``flock`` on a file under ``$PREFECT_HOME/locks``: two runs on this host (or on a
shared filesystem) never interleave their look-up and create, and the OS releases the lock when its
holder dies, even by SIGKILL, so a crash never leaves a fold locked.

A server lease (`server_lease`) is the one slot of a Prefect global concurrency limit, created on first
use: it holds across workers and machines that share one Prefect server. The slot is leased for
``lease_s`` seconds and renewed in the background while held (`LeaseKeeper`, through server outages),
so a holder that dies frees it once its lease expires (the server's expired-lease sweep). `fold_guard`
takes it only with a Prefect server (``PREFECT_API_URL``); on the ephemeral API the flock alone covers
the host.
"""

from __future__ import annotations

import contextlib
import contextvars
import fcntl
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
from prefect.cache_policies import CachePolicy
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency._asyncio import _discard_cleanup_lease
from prefect.concurrency._events import emit_concurrency_acquisition_events, emit_concurrency_release_events
from prefect.concurrency._sync import acquire_concurrency_slots_with_lease, release_concurrency_slots_with_lease
from prefect.context import TaskRunContext
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.locking.protocol import LockManager
from prefect.logging import get_logger
from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, PREFECT_HOME, temporary_settings
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


class LeaseLost(RuntimeError):
    """A server lease expired while its holder ran (another run may hold the slot now)."""


class LeaseKeeper:
    """Renews the lease ``lease_id`` (``lease_s`` long) every ``every_s`` seconds in a thread until `stop`.

    Prefect's own renewal (`prefect.concurrency.sync.concurrency`) tries three times, a few seconds
    apart, then stops for good: a server away for those seconds ends the lease while its holder runs
    on, and a run waiting on another machine takes the slot. This one retries until the server answers
    again, so an outage shorter than ``lease_s - every_s`` costs nothing. `expired` once no renewal
    reached the server for ``lease_s`` (the server may have freed the slot for another run); when the
    server answers 410 (it did: the lease expired and its sweep reclaimed it) it sets ``lost`` and stops.
    Either way `ServerLease.check` stops the holder.
    """

    RETRY_S = (1.0, 2.0, 5.0)  # waits between failed renewals; the last one repeats
    MARGIN_S = 1.0  # the grant's reply may come this late after the server started the lease

    def __init__(self, name: str, lease_id: Any, lease_s: float, every_s: float) -> None:
        self.name, self.lease_id, self.lease_s, self.every_s = name, lease_id, lease_s, every_s
        self.valid_until = time.monotonic() - self.MARGIN_S + lease_s  # the server's expiry, or earlier
        self.lost = threading.Event()
        self._stop = threading.Event()
        # in the holder's context: its settings (the API it talks to) and run, whose logger shows the keeper's lines
        context = contextvars.copy_context()
        self._thread = threading.Thread(target=context.run, args=(self._run,), daemon=True, name=f"lease-{name}")
        self._thread.start()

    def expired(self) -> bool:
        """The lease may be over: the server reclaimed it (410), or no renewal reached it for ``lease_s``."""
        return self.lost.is_set() or time.monotonic() >= self.valid_until

    def stop(self, wait: bool = True) -> None:
        """End the renewals; ``wait=False``: without waiting for one in flight (a server still away)."""
        self._stop.set()
        if wait:
            self._thread.join()

    def _run(self) -> None:
        with get_client(sync_client=True) as client:
            while not self._stop.wait(self.every_s) and self._renew(client):
                pass

    def _renew(self, client: Any) -> bool:
        """One renewal, retried through failures; False once the lease is gone or the keeper stops."""
        for attempt in itertools.count():
            sent = time.monotonic()  # the server extends the lease to lease_s after it receives this
            try:
                client.renew_concurrency_lease(lease_id=self.lease_id, lease_duration=self.lease_s)
                self.valid_until = sent + self.lease_s
                if attempt:
                    logger.info(f"renewed the lease of {self.name} after {attempt} failed tries")
                return True
            except httpx.HTTPStatusError as exc:
                if exc.response.status_code == 410:
                    logger.error(
                        f"the lease of {self.name} expired before it could be renewed (the Prefect server was "
                        f"unreachable for longer than its {self.lease_s:.0f} s); another run may hold it now"
                    )
                    self.lost.set()
                    return False
                failure: Exception = exc
            except Exception as exc:  # the server is away (refused, timed out, restarting)
                failure = exc
            wait = self.RETRY_S[min(attempt, len(self.RETRY_S) - 1)]
            logger.warning(f"could not renew the lease of {self.name} ({failure}); trying again in {wait:.0f} s")
            if self._stop.wait(wait):
                return False
        raise AssertionError("unreachable")


class ServerLease:
    """The held slot of ``epochwise-<name>``; `check` before each step that only its holder may take.

    Made of the parts of ``prefect.concurrency.sync.concurrency`` (prefect 3.8: acquisition with its
    waits on 423, release, events), with `LeaseKeeper` instead of Prefect's renewal loop."""

    def __init__(self, limit: str, lease_s: float, every_s: float) -> None:
        self.limit, self.lease_s, self.every_s = limit, lease_s, every_s
        self.keeper: LeaseKeeper | None = None
        self.limits: list[Any] = []
        self.events: dict[Any, Any] = {}

    def acquire(self, wait_s: float | None) -> None:
        """Take the slot, waiting up to ``wait_s`` seconds (None: as long as it takes); TimeoutError if busy.

        strict: a limit deleted in between fails loudly instead of silently holding nothing."""
        granted = acquire_concurrency_slots_with_lease(
            [self.limit], 1, timeout_seconds=wait_s, lease_duration=self.lease_s, strict=True
        )
        self.limits = granted.limits
        self.events = emit_concurrency_acquisition_events(self.limits, 1)
        self.keeper = LeaseKeeper(self.limit, granted.lease_id, self.lease_s, self.every_s)

    def release(self, server_away: bool = False) -> None:
        """Give the slot back (a lease already gone: the server answers 204). ``server_away``: the server
        may still be unreachable, so one try, without waiting on a renewal in flight, and a failure is
        only logged (the lease then ends on its own)."""
        if self.keeper is None:
            return
        keeper, self.keeper = self.keeper, None
        keeper.stop(wait=not server_away)
        try:
            with one_try() if server_away else contextlib.nullcontext():
                release_concurrency_slots_with_lease(keeper.lease_id)
        except Exception as exc:
            if not server_away:
                raise
            logger.warning(f"could not release {self.limit} ({exc}); its lease ends on its own")
            return
        _discard_cleanup_lease(keeper.lease_id)
        emit_concurrency_release_events(self.limits, 1, self.events)

    def check(self) -> None:
        """Raise `LeaseLost` once the lease may be over (`LeaseKeeper.expired`): another run may hold the
        slot, or have held it and gone on with the work meanwhile, so this one stops rather than go on
        beside it (or take the slot again). Works while the server is still unreachable."""
        if self.keeper is None or not self.keeper.expired():
            return
        self.release(server_away=True)  # frees the slot at once if the server still has the lease
        raise LeaseLost(
            f"{self.limit}: this run's lease expired while the Prefect server was unreachable for longer than "
            f"{self.lease_s:.0f} s, so another run may hold it now; this run stops here so that two runs never "
            "go on at once (a rerun goes on from what is done)"
        )

    def taken(self) -> bool:
        """Whether a run holds the slot now (after `check` raised: another run); True when the server
        cannot say, so that nothing of that run's is stopped."""
        try:
            with one_try(), get_client(sync_client=True) as client:
                return client.read_global_concurrency_limit_by_name(self.limit).active_slots > 0
        except Exception as exc:
            logger.warning(f"could not read {self.limit} ({exc}); taking it as held by another run")
            return True


def one_try() -> contextlib.AbstractContextManager[Any]:
    """Prefect clients made within make each request once: a call to a server that may still be away
    fails at once instead of retrying for a minute or more."""
    return temporary_settings({PREFECT_CLIENT_MAX_RETRIES: 0})


class HostOnly:
    """What `fold_guard` holds without a Prefect server: the file lock alone, which cannot expire."""

    def check(self) -> None:
        pass


@contextlib.contextmanager
def server_lease(
    name: str, wait_s: float | None, lease_s: float, busy: Exception, renew_every_s: float | None = None
) -> Iterator[ServerLease]:
    """Hold the single slot of the global concurrency limit ``epochwise-<name>`` (created on demand);
    raise ``busy`` if it is still taken after ``wait_s`` seconds (None: wait as long as it takes).

    The lease is renewed every ``renew_every_s`` (default a third of ``lease_s``), through outages. A
    lease that may have ended stops its holder only where it calls `ServerLease.check` (before a paid
    step); an hours-long local epoch, which calls none, goes on under its file lock."""
    limit = lease_limit_name(name)
    with get_client(sync_client=True) as client:
        read_or_create_limit(client, limit, 1)
    held = ServerLease(limit, lease_s, lease_s / 3 if renew_every_s is None else renew_every_s)
    try:
        held.acquire(wait_s)
    except TimeoutError:
        raise busy from None
    try:
        yield held
    finally:
        held.release()


@contextlib.contextmanager
def fold_guard(
    name: str, wait_s: float | None, lease_s: float, busy: Exception, directory: Path | None = None
) -> Iterator[ServerLease | HostOnly]:
    """The file lock (in ``directory``, default `locks_dir`), then, with a Prefect server, its lease of
    ``name``: one holder at a time on this host and on every worker of the server.

    No lease on the ephemeral API (no ``PREFECT_API_URL``): it is host-local like the file lock, and it
    never reclaims expired leases (Prefect runs that service only in ``prefect server start``), so a
    killed run would leave the slot taken in ``$PREFECT_HOME``'s database for good.
    """
    start = time.monotonic()
    with exclusive_lock(name, float("inf") if wait_s is None else wait_s, busy, directory):
        if not PREFECT_API_URL.value():
            yield HostOnly()
            return
        left = None if wait_s is None else max(wait_s - (time.monotonic() - start), 1.0)
        with server_lease(name, left, lease_s, busy) as held:
            yield held


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
