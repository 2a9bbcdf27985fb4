"""The Together API limit that ``epochwise deployments apply`` creates really bounds tasks carrying the tag
(Prefect keeps tag limits as global limits named ``tag:<tag>``; a wrong name would limit nothing)."""

from __future__ import annotations

import time

from prefect import flow, get_client, task

from deployments.apply import ensure_limit
from epochwise.config import OpsConfig

TAG = OpsConfig().together_api_tag


@task(tags=[TAG])
def call_together(i: int) -> tuple[float, float]:
    """Stands in for a Together call; returns when it held the slot (monotonic seconds)."""
    start = time.monotonic()
    time.sleep(0.5)
    return start, time.monotonic()


@flow
def two_calls() -> list[tuple[float, float]]:
    futures = [call_together.submit(i) for i in range(2)]
    return [f.result() for f in futures]


def test_together_api_limit_is_idempotent_and_serialises_tagged_tasks():
    name = f"tag:{TAG}"
    with get_client(sync_client=True) as client:
        try:
            assert ensure_limit(client, name, 2).action == "created"
            assert ensure_limit(client, name, 2).action == "unchanged"
            assert ensure_limit(client, name, 1).action == "updated"
            assert client.read_global_concurrency_limit_by_name(name).limit == 1

            (first_start, first_end), (second_start, _) = sorted(two_calls())
            assert second_start >= first_end  # one slot: the second call began after the first ended
        finally:
            client.delete_global_concurrency_limit_by_name(name)
