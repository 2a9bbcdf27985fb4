"""The nightly fan-out's slots: the parent queues its folds in-process for the server limit's slot count."""

from __future__ import annotations

import threading
import time

import pytest
from prefect import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

from tasks.fan_out import parent_slots, read_limit_slots


def test_the_parent_reads_the_limits_slot_count_and_a_missing_limit_is_an_error_naming_it():
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name="fan-out-three", limit=3))
    assert read_limit_slots.fn("fan-out-three") == 3
    with pytest.raises(RuntimeError, match="no global concurrency limit 'fan-out-absent'"):
        read_limit_slots.fn("fan-out-absent")


def test_at_most_slots_folds_run_at_once_and_the_next_starts_when_one_ends():
    slots = parent_slots("run-1:1", 2)
    inside, peak, order = 0, 0, []
    lock = threading.Lock()

    def fold(name: str, seconds: float) -> None:
        nonlocal inside, peak
        with slots:
            with lock:
                inside += 1
                peak = max(peak, inside)
                order.append(f"{name} in")
            time.sleep(seconds)
            with lock:
                inside -= 1
                order.append(f"{name} out")

    threads = [threading.Thread(target=fold, args=(n, s)) for n, s in (("a", 0.2), ("b", 0.6), ("c", 0.1))]
    for thread in threads:
        thread.start()
        time.sleep(0.05)  # a and b take both slots before c asks
    for thread in threads:
        thread.join()
    assert peak == 2
    assert order.index("c in") == order.index("a out") + 1  # c waited for a, not for b
    assert parent_slots("run-1:1", 5) is slots  # one semaphore per parent attempt ...
    assert parent_slots("run-1:2", 2) is not slots  # ... and a fresh one for its retry
