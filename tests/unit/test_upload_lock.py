"""The lock behind `upload_if_missing`'s SERIALIZABLE cache: many runs contending for one upload key."""

from __future__ import annotations

import threading
import time
import uuid

from tasks.together import upload_policy


def test_a_contended_upload_lock_admits_one_holder_at_a_time_and_never_fails():
    # Prefect's FileSystemLockManager failed this (ValueError: EOF while parsing, reading a lock file
    # another run had created but not yet written); CI hit it with two runs of one fold at once.
    manager = upload_policy().lock_manager
    key = f"test-upload-contention-{uuid.uuid4().hex}"
    inside = peak = rounds = 0
    errors: list[str] = []
    mutex = threading.Lock()

    def contend(holder: str) -> None:
        nonlocal inside, peak, rounds
        try:
            for _ in range(40):
                assert manager.acquire_lock(key, holder)
                assert manager.is_lock_holder(key, holder)
                with mutex:
                    inside += 1
                    peak = max(peak, inside)
                time.sleep(0.001)
                with mutex:
                    inside -= 1
                    rounds += 1
                manager.release_lock(key, holder)
        except Exception as exc:  # noqa: BLE001  (collected: a thread's exception would be lost)
            errors.append(f"{holder}: {exc!r}")

    threads = [threading.Thread(target=contend, args=(f"run-{i}",)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert (peak, rounds) == (1, 6 * 40)
    assert not manager.is_locked(key)
