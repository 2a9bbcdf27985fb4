"""The Together API limit that ``epochwise deployments apply`` creates really bounds tasks carrying the tag
(Prefect keeps tag limits as global limits named ``tag:<tag>``; a wrong name would limit nothing)."""

from __future__ import annotations

import contextlib
import time

from prefect import flow, get_client, task
from prefect.exceptions import ObjectNotFound

from deployments.apply import ensure_limit, ensure_work_pool
from epochwise.config import OpsConfig
from tasks.locks import read_or_create_limit
from tests.prefect_proxy import LIMITS, late_first_create

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
        try:  # the session's API is shared: start from no limit, whatever an earlier test left
            client.delete_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            pass
        try:
            assert ensure_limit(client, name, 2).action == "created"
            assert ensure_limit(client, name, 2).action == "unchanged"
            assert ensure_limit(client, name, 1).action == "updated"
            assert client.read_global_concurrency_limit_by_name(name).limit == 1

            # Prefect remembers for 5 s, per process, that a set of tags had no limit
            # (`prefect.concurrency.services._no_limits_cache`, TTL 5.0): an earlier test's together-api
            # task in this process may have just seen none. A new worker process never has that memory.
            time.sleep(5.5)
            (first_start, first_end), (second_start, _) = sorted(two_calls())
            assert second_start >= first_end  # one slot: the second call began after the first ended
        finally:
            client.delete_global_concurrency_limit_by_name(name)


def test_a_configured_together_api_tag_is_the_tag_the_flows_together_tasks_carry(fake_together, tmp_path):
    """A non-default ``ops.together_api_tag`` reaches the task runs at call time (an import-time default
    would register a limit that no task carries); only the calls that create take a slot."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from epochwise.config import TrainConfig
    from flows.epoch_train import epoch_train
    from tests.helpers import BASE, FAST, make_fold

    custom = "together-api-custom"
    fold = make_fold(tmp_path, "tagged", "custom-tag")
    train = TrainConfig(backend="together", base_model=BASE, epochs=1)
    state = epoch_train(str(fold), train, FAST, ops=OpsConfig(together_api_tag=custom), return_state=True)
    assert state.is_completed()
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
    tags = {run.name.rsplit("-", 1)[0]: set(run.tags) for run in runs}
    for creates in ("upload_if_missing", "launch_epoch_job"):
        assert custom in tags[creates] and TAG not in tags[creates], (creates, tags[creates])
    for reads in ("wait_for_job", "file_is_live", "fetch_epoch_metrics"):  # reads take no slot
        assert custom not in tags[reads] and TAG not in tags[reads], (reads, tags[reads])


def delete_if_there(limits: list[str], pool: str) -> None:
    with get_client(sync_client=True) as client:
        for name in limits:
            with contextlib.suppress(ObjectNotFound):
                client.delete_global_concurrency_limit_by_name(name)
        with contextlib.suppress(ObjectNotFound):
            client.delete_work_pool(pool)


def test_a_create_that_commits_but_answers_late_is_found_not_failed():
    """Prefect's client resends a create that timed out; the resend of one that had committed answers 409.
    `read_or_create_limit` (behind `deployments apply`, the sweep's trial slots and the server lease)
    and `ensure_work_pool` read what is there then instead of failing."""
    names = ["epochwise-test-late-create-apply", "epochwise-test-late-create-lease"]
    pool = "epochwise-test-late-create"
    delete_if_there(names, pool)  # the session's API is shared
    try:
        with late_first_create(LIMITS) as proxy, get_client(sync_client=True) as client:
            applied = ensure_limit(client, names[0], 2)
            assert proxy.rules[0].seen == 2  # the client resent the create that answered late
            assert applied.action == "unchanged" and applied.name == names[0]
        with late_first_create(LIMITS) as proxy, get_client(sync_client=True) as client:
            found = read_or_create_limit(client, names[1], 1)
            assert proxy.rules[0].seen == 2
            assert found is not None and (found.name, found.limit, found.active) == (names[1], 1, True)
        with late_first_create("/work_pools") as proxy, get_client(sync_client=True) as client:
            applied = ensure_work_pool(client, pool)
            assert proxy.rules[0].seen == 2
            assert (applied.action, client.read_work_pool(pool).type) == ("unchanged", "process")
    finally:
        delete_if_there(names, pool)
