"""GRPO on Together's post-training API, against the fake with the real SDK: a 2-epoch run whose mean
reward rises, idempotent operations, resume without repeating an applied step, the budget before
provisioning, the resource stopped after a failure and by the reaper, deploy of a GRPO epoch."""

from __future__ import annotations

import signal
import time

import pytest
from prefect.client.orchestration import get_client

from epochwise.config.train import GRPOParams
from flows.epoch_train import epoch_train
from tasks.locks import lease_limit_name
from tasks.post_training import drive_lease_name
from tests.fake_together import post_training as fake_pt
from tests.helpers import (
    BASE,
    HOSTS_PT,
    PT,
    Hosts,
    epoch_sessions,
    epoch_train_child,
    grpo_cfg,
    grpo_fold,
    operation_posts,
    wait_for,
)


def test_two_grpo_epochs_reward_rises_checkpoints_and_nothing_left_billing(fake_together, tmp_path):
    fold, reward = grpo_fold(tmp_path, "g1", "rise", n_train=16, n_val=8)
    cfg = grpo_cfg(reward).model_copy(
        update={"grpo": GRPOParams(num_generations=4, max_new_tokens=16, tokenizer="bytes")}
    )
    records = epoch_train(str(fold), cfg, PT)
    pt = fake_pt.state(fake_together)
    assert [r.epoch for r in records] == [1, 2] and all(r.method == "grpo" for r in records)
    assert records[1].val_reward > records[0].val_reward
    assert records[1].metrics["train_reward"] > records[0].metrics["train_reward"]
    # the policy saved at each epoch's end samples the rewarded letter more and more often (uniform: 1/26)
    p1, p2 = (
        fake_pt.token_probability(pt.checkpoints[r.job_id]["_policy"], ord("a"), pt.script.vocab) for r in records
    )
    assert p2 > p1 > 1 / 26
    assert len(pt.resources) == 1 and pt.billing() == []  # one resource, stopped at the end
    assert pt.applied["optim-step"] == 2 * 8  # 16 prompts / 2 per step, 2 epochs
    assert pt.applied["training-checkpoint"] == 2 and pt.applied["inference-checkpoint"] == 2
    second = next(s for s in pt.sessions.values() if s.body["display_name"].startswith("ew-g1-e2-"))
    assert second.body["resume_from_checkpoint_id"] == records[0].job_id
    assert records[1].model.startswith("projects/proj_1/models/ml_") and "/revisions/rv_" in records[1].model
    assert fake_together.counts["POST /v1/rl/model-resources/{id}/extend-expiry"] >= 16
    # a rerun finds both epochs done: nothing provisioned, nothing applied
    again = epoch_train(str(fold), cfg, PT)
    assert [r.job_id for r in again] == [r.job_id for r in records]
    assert len(pt.resources) == 1 and pt.applied["optim-step"] == 16


def ready_resource(client):
    """A model resource of the base model, made READY (the fake moves one state per GET), as another run's."""

    res = client.post_training.model_resources.create(base_model=BASE, compute_config={"num_generator_replicas": 1})
    client.post_training.model_resources.retrieve(res.id)
    client.post_training.model_resources.retrieve(res.id)
    return res


def free_leases_of_a_killed_run(*names: str) -> None:
    """A killed run leaves the server leases it held (the fold's, the epoch's drive lease); `prefect server
    start` frees them when they expire, which the test harness's server does not do: free them as that
    sweep would."""
    with get_client(sync_client=True) as prefect:
        for name in names:
            prefect.delete_global_concurrency_limit_by_name(lease_limit_name(name))


def test_a_run_killed_while_its_session_starts_resumes_on_that_session(fake_together, tmp_path):
    fold, reward = grpo_fold(tmp_path, "gc", "kill-creating")
    pt = fake_pt.state(fake_together)
    pt.script.hold_sessions_creating = True
    child = epoch_train_child(fold, 1, grpo_cfg(reward, epochs=1), PT)
    try:
        wait_for(lambda: epoch_sessions(pt, "gc", 1), "the flow process never created its session", alive=[child])
        child.send_signal(signal.SIGKILL)
        child.wait()
    finally:
        if child.poll() is None:
            child.kill()
    (starting,) = epoch_sessions(pt, "gc", 1)
    assert starting.status == "TRAINING_SESSION_STATUS_CREATING"
    pt.script.hold_sessions_creating = False
    free_leases_of_a_killed_run("grpo-gc", drive_lease_name("gc", BASE, 1))

    records = epoch_train(str(fold), grpo_cfg(reward, epochs=1), PT)

    assert [r.epoch for r in records] == [1] and len(pt.resources) == 1
    assert epoch_sessions(pt, "gc", 1) == [starting]  # the starting session, not a second one of that name
    assert pt.billing() == []


def test_a_killed_run_resumes_on_its_session_without_repeating_an_applied_step(fake_together, tmp_path):
    fold, reward = grpo_fold(tmp_path, "gk", "kill")
    pt = fake_pt.state(fake_together)
    pt.script.hold_after = {"optim-step": 2}  # the 3rd optim step is applied, then never reported done
    child = epoch_train_child(fold, 2, grpo_cfg(reward), PT)
    try:
        wait_for(
            lambda: (
                fake_together.counts["GET /v1/rl/training-sessions/{id}/operations/{kind}/{op}"] >= 1
                and pt.applied["optim-step"] >= 3
            ),
            "the flow process never waited on the third step",
            alive=[child],
        )
        time.sleep(0.2)  # it is polling the held operation now
        child.send_signal(signal.SIGKILL)
        child.wait()
    finally:
        if child.poll() is None:
            child.kill()
    assert pt.applied["optim-step"] == 3 and pt.billing()  # killed: nothing stopped the resource
    pt.script.hold_after = {}
    free_leases_of_a_killed_run(drive_lease_name("gk", BASE, 1))

    records = epoch_train(str(fold), grpo_cfg(reward), PT)

    assert [r.epoch for r in records] == [1, 2]
    assert len(pt.resources) == 1  # the killed run's resource was found again, not a second one
    assert len(epoch_sessions(pt, "gk", 1)) == 1  # re-attached to the epoch's running session
    assert pt.applied["optim-step"] == 8 and pt.applied["forward-backward"] == 8  # 4 steps x 2 epochs, none twice
    assert len(set(pt.applied_keys)) == len(pt.applied_keys)
    assert pt.billing() == []


def test_a_lost_operation_reply_is_retried_with_the_same_key_and_applied_once(fake_together, tmp_path):
    fold, reward = grpo_fold(tmp_path, "gl", "lost", n_train=4)
    pt = fake_pt.state(fake_together)
    pt.script.lose_replies.update({"forward-backward": 1, "optim-step": 1, "inference-checkpoint": 1})
    records = epoch_train(str(fold), grpo_cfg(reward, epochs=1), PT)
    assert len(records) == 1
    posts = fake_together.counts["POST /v1/rl/training-sessions/{id}/operations/optim-step"]
    assert posts == 3 and pt.applied["optim-step"] == 2  # 2 steps, one retried POST
    assert pt.applied["forward-backward"] == 2 and pt.applied["inference-checkpoint"] == 1
    assert len(fake_together.state.models) == 1  # one registered model, not two


def test_budget_stops_before_any_resource_is_provisioned(fake_together, tmp_path):
    fold, reward = grpo_fold(tmp_path, "gb", "budget")
    records = epoch_train(str(fold), grpo_cfg(reward, budget_usd=5.0), PT)  # the fake: $12/h, 1 h per epoch
    pt = fake_pt.state(fake_together)
    assert records == [] and pt.resources == {} and pt.cost_estimates == 1
    assert fake_together.counts["POST /v1/rl/model-resources"] == 0


def test_a_lost_resource_create_reply_trains_on_the_resource_together_made(fake_together, tmp_path):
    fold, reward = grpo_fold(tmp_path, "gl", "lost-create", n_train=2)
    pt = fake_pt.state(fake_together)
    pt.script.create_then_500 = 1  # Together makes the resource, its reply is lost

    records = epoch_train(str(fold), grpo_cfg(reward, epochs=1), PT)

    assert [r.epoch for r in records] == [1]
    assert fake_together.counts["POST /v1/rl/model-resources"] == 1  # no second create
    (resource,) = pt.resources
    assert {s.resource_id for s in epoch_sessions(pt, "gl", 1)} == {resource}  # trained on it
    assert pt.billing() == []  # and stopped it at the end (the old code failed, leaving it to bill)


def test_a_failed_step_fails_the_run_and_stops_the_resource(fake_together, tmp_path):
    fold, reward = grpo_fold(tmp_path, "gf", "fail")
    pt = fake_pt.state(fake_together)
    pt.script.fail_ops["forward-backward"] = "TRAINING_OPERATION_ERROR_CODE_NON_FINITE_LOSS"
    with pytest.raises(Exception, match="NON_FINITE_LOSS"):
        epoch_train(str(fold), grpo_cfg(reward), PT)
    assert len(pt.resources) == 1 and pt.billing() == []
    assert all(s.status == "TRAINING_SESSION_STATUS_STOPPED" for s in pt.sessions.values())
    # the rerun trains on a new resource (the old one is stopped) and finishes
    records = epoch_train(str(fold), grpo_cfg(reward), PT)
    assert len(records) == 2 and len(pt.resources) == 2 and pt.billing() == []


def test_a_broken_reward_fails_before_anything_is_paid(fake_together, tmp_path):
    fold, _ = grpo_fold(tmp_path, "gr", "reward")
    (tmp_path / "bad.py").write_text("def bad(prompts, completions, **kw):\n    return [1.0]\n")
    with pytest.raises(Exception, match="returned 1 values for 2 completions"):
        epoch_train(str(fold), grpo_cfg(f"{tmp_path / 'bad.py'}:bad"), PT)
    assert fake_pt.state(fake_together).resources == {}
    assert fake_pt.state(fake_together).cost_estimates == 0


def test_the_reaper_stops_a_leftover_resource_no_live_run_owns_and_leaves_others(fake_together, tmp_path):
    from together import Together

    from flows.job_reaper import job_reaper

    fold, reward = grpo_fold(tmp_path, "gz", "reap", n_train=2)
    pt = fake_pt.state(fake_together)
    fake_together.burst("POST /v1/rl/model-resources/{id}/stop", [503] * 12)  # the run's own stop fails
    records = epoch_train(str(fold), grpo_cfg(reward, epochs=1), PT)
    fake_together.clear_bursts()
    assert len(records) == 1 and len(pt.billing()) == 1  # the finished run left its resource billing
    leftover = pt.billing()[0]
    client = Together(api_key=fake_together.api_key, base_url=fake_together.base_url, max_retries=0)
    foreign = client.post_training.model_resources.create(
        base_model="someone/else", compute_config={"num_generator_replicas": 1}
    )
    client.post_training.model_resources.retrieve(foreign.id)
    client.post_training.model_resources.retrieve(foreign.id)  # READY, not epochwise's

    job_reaper(PT)

    assert pt.resources[leftover].status == "MODEL_RESOURCES_STATUS_STOPPED"
    assert pt.billing() == [foreign.id]


def test_deploy_of_a_grpo_epoch_deploys_its_registered_inference_checkpoint(fake_together, tmp_path):
    from flows.deploy_epoch import deploy_epoch
    from tests.helpers import DEPLOY

    fold, reward = grpo_fold(tmp_path, "gd", "deploy", n_train=4)
    records = epoch_train(str(fold), grpo_cfg(reward), PT)

    row = deploy_epoch(str(fold), 1, deploy=DEPLOY, together=PT)  # epoch 1 from the fold's epoch table

    (dep,) = fake_together.state.deployments.values()
    assert dep["model"] == records[0].model  # projects/proj_1/models/ml_.../revisions/rv_...
    assert dep["modelRevisionId"] == records[0].model.rsplit("/", 1)[-1]
    assert dep["status"]["state"] == "DEPLOYMENT_STATE_READY"
    assert row["endpoint"] == "me/ew-gd-e1" and row["smoke reply"] == "pong"


def test_cli_plan_then_train_a_grpo_fold_on_together_shows_the_price_first(fake_together, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from epochwise.cli import app
    from tests.helpers import BASE

    env = {
        "TOGETHER__POST_TRAINING__POLL_S": "0.001",
        "TRAIN__GRPO__TOKENIZER": "bytes",
        "TRAIN__GRPO__MAX_NEW_TOKENS": "4",
        "TOGETHER__FOLD_LOCK_WAIT_S": "30",
    }
    for name, value in env.items():
        monkeypatch.setenv(f"EPOCHWISE_{name}", value)
    fold, reward = grpo_fold(tmp_path, "gc", "cli", n_train=2)
    args = [
        str(fold),
        "--backend",
        "together",
        "--base-model",
        BASE,
        "--method",
        "grpo",
        "--reward",
        reward,
        "--epochs",
        "2",
        "--budget",
        "30",
    ]
    runner = CliRunner()
    planned = runner.invoke(app, ["plan", *args])
    assert planned.exit_code == 0, planned.output
    assert "estimate-cost" in planned.output and "12.00/hour" in planned.output
    assert "total for 2 epoch(s): $24.00" in planned.output
    assert fake_pt.state(fake_together).resources == {}  # the plan provisions nothing

    result = runner.invoke(app, ["train", *args])
    assert result.exit_code == 0, result.output
    assert result.output.index("estimate-cost") < result.output.index("epoch 1: projects/proj_1/models/")
    pt = fake_pt.state(fake_together)
    assert len(pt.resources) == 1 and pt.applied["optim-step"] == 2 and pt.billing() == []


def test_two_runs_of_one_fold_at_once_share_one_resource_and_apply_each_step_once(fake_together, tmp_path):
    import threading

    fold, reward = grpo_fold(tmp_path, "gt", "twins", n_train=4)
    pt = fake_pt.state(fake_together)
    pt.script.op_polls = 3
    results: dict[int, object] = {}

    def run(i: int) -> None:
        results[i] = epoch_train(str(fold), grpo_cfg(reward), PT, return_state=True)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert any(state.is_completed() for state in results.values())
    assert len(pt.resources) == 1 and pt.billing() == []
    assert [len(epoch_sessions(pt, "gt", e)) for e in (1, 2)] == [1, 1]
    assert pt.applied["optim-step"] == 4 and len(set(pt.applied_keys)) == len(pt.applied_keys)
    # whichever run lost the race, a rerun finds both epochs done
    records = epoch_train(str(fold), grpo_cfg(reward), PT)
    assert len(records) == 2 and pt.applied["optim-step"] == 4 and len(pt.resources) == 1


def test_abort_stops_the_folds_model_resource(fake_together, tmp_path):
    from typer.testing import CliRunner

    from epochwise.cli import app

    fold, reward = grpo_fold(tmp_path, "ga", "abort", n_train=2)
    pt = fake_pt.state(fake_together)
    fake_together.burst("POST /v1/rl/model-resources/{id}/stop", [503] * 12)  # the run's own stop fails
    epoch_train(str(fold), grpo_cfg(reward, epochs=1), PT)
    fake_together.clear_bursts()
    (left,) = pt.billing()
    result = CliRunner().invoke(app, ["abort", str(fold)])
    assert result.exit_code == 0, result.output
    assert f"model resource {left}" in result.output and pt.billing() == []


def test_a_rerun_on_a_new_host_uses_the_epochs_togethers_session_list_shows_finished(fake_together, tmp_path):
    from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings

    fold, reward = grpo_fold(tmp_path, "gh", "newhost", n_train=4)
    first = epoch_train(str(fold), grpo_cfg(reward), PT)
    pt = fake_pt.state(fake_together)
    sessions, applied = len(pt.sessions), dict(pt.applied)

    # A second machine (or a wiped volume): no cache record of either epoch.
    storage = tmp_path / "new-host-storage"
    with temporary_settings({PREFECT_RESULTS_LOCAL_STORAGE_PATH: storage}):
        again = epoch_train(str(fold), grpo_cfg(reward), PT)

    assert any(storage.iterdir())  # that run kept its records there, not in the old storage
    assert [(r.job_id, r.model) for r in again] == [(r.job_id, r.model) for r in first]
    assert len(pt.sessions) == sessions and pt.applied == applied  # nothing trained again
    assert len(pt.resources) == 1 and pt.billing() == []  # and nothing provisioned for it


def test_a_run_leaves_the_folds_resource_to_another_run_training_on_it_and_the_reaper_stops_it_after(
    fake_together, tmp_path
):
    from together import Together

    from flows.job_reaper import job_reaper

    fold, reward = grpo_fold(tmp_path, "gs", "shared", n_train=2)
    pt = fake_pt.state(fake_together)
    # Another run of the fold (another config) is training on the fold's resource right now.
    client = Together(api_key=fake_together.api_key, base_url=fake_together.base_url, max_retries=0)
    res = ready_resource(client)
    other = client.post_training.sessions.create(model_resources_id=res.id, display_name="ew-gs-e1-0ther000")
    client.post_training.sessions.retrieve(other.id)  # RUNNING

    records = epoch_train(str(fold), grpo_cfg(reward, epochs=1), PT)

    assert len(records) == 1 and list(pt.resources) == [res.id]  # trained on the fold's resource
    assert pt.billing() == [res.id]  # and left it to the run still training on it
    client.post_training.sessions.stop(other.id)  # that run's epoch ends ...
    job_reaper(PT)  # ... and (were it to crash before its own stop) the reaper stops the resource
    assert pt.billing() == []


def test_two_hosts_racing_one_grpo_fold_keep_one_session_per_epoch_and_apply_each_step_once(fake_together, tmp_path):
    """Two hosts with no shared lock, cache or Prefect server (each its own ephemeral API) train one
    GRPO fold at once. Together holds the first model resource PENDING until a second one exists, so
    host B, started once host A created its resource, finds no session of the fold anywhere and creates
    a resource and an epoch 1 session too. Each run keeps the oldest session of the epoch; the other one
    stops its own session and resource and waits for the first run's epochs, so one run drives every
    session, each step is applied once and both hosts end on the same checkpoints. (Before, both
    trained the whole chain, each on its own resource.)"""
    fold, reward = grpo_fold(tmp_path / "folds", "gr", "race", n_train=4)
    pt = fake_pt.state(fake_together)
    pt.script.hold_resources_until = 2
    hosts = Hosts(tmp_path, ["host-a", "host-b"], [str(fold)], train=grpo_cfg(reward), together=HOSTS_PT)
    try:
        hosts.wait_ready()
        hosts.go(0)
        hosts.wait_for(lambda: len(pt.resources) >= 1, "host A created no model resource")
        hosts.go(1)
        reported = hosts.finish()
    finally:
        hosts.kill()

    assert len(pt.resources) == 2  # the race did happen: each host created a resource
    assert pt.billing() == []
    first = epoch_sessions(pt, "gr", 1)
    assert len(first) == 2  # and an epoch 1 session
    trained = {op.session_id for op in pt.operations.values()}
    assert sum(s.id in trained for s in first) == 1  # the duplicate was stopped before any operation
    assert pt.applied["optim-step"] == 4 and len(set(pt.applied_keys)) == len(pt.applied_keys)
    op_posts = operation_posts(fake_together)
    assert op_posts == len(pt.operations)  # one driver: no operation was sent twice
    (duplicate,) = [s for s in first if s.id not in trained]
    (kept,) = [s for s in first if s.id in trained]
    assert pt.resources[duplicate.resource_id].stopped_at is not None
    assert {s.resource_id for s in epoch_sessions(pt, "gr", 2)} == {kept.resource_id}  # epoch 2 on the kept one
    assert reported[0]["gr"] == reported[1]["gr"]  # both hosts recorded the same checkpoints
    assert len(reported[0]["gr"]) == 2


def test_a_following_run_gives_the_other_runs_next_session_time_to_appear(fake_together, tmp_path):
    import logging
    import threading

    from together import Together

    from tasks.post_training import ResourceLease

    _, reward = grpo_fold(tmp_path, "gw", "follow")
    together = PT.model_copy(update={"list_catchup_s": 5.0, "list_poll_s": 0.02})
    lease = ResourceLease("gw", grpo_cfg(reward), together)
    lease.following = True
    client = Together(api_key=fake_together.api_key, base_url=fake_together.base_url, max_retries=0)
    res = ready_resource(client)
    name = "ew-gw-e2-0ther000"

    def other_run_starts_its_epoch() -> None:  # the run being followed, between epochs for a moment
        time.sleep(0.3)
        client.post_training.sessions.create(model_resources_id=res.id, display_name=name)

    starter = threading.Thread(target=other_run_starts_its_epoch)
    starter.start()
    rival = lease.await_rival(client, name, logging.getLogger("test"))
    starter.join()
    assert rival is not None and rival.display_name == name and rival.resource_id == res.id
    assert len(fake_pt.state(fake_together).resources) == 1  # nothing provisioned meanwhile

    quick = ResourceLease("gw", grpo_cfg(reward), PT.model_copy(update={"list_catchup_s": 0.1, "list_poll_s": 0.02}))
    assert quick.await_rival(client, "ew-gw-e3-0ther000", logging.getLogger("test")) is None  # that run is gone


def test_close_stops_both_a_duplicate_settle_could_not_stop_and_the_folds_resource(fake_together, tmp_path):
    from together import Together

    from tasks.post_training import ResourceLease

    _, reward = grpo_fold(tmp_path, "gx", "close")
    client = Together(api_key=fake_together.api_key, base_url=fake_together.base_url, max_retries=0)
    ids = []
    for _ in range(2):
        ids.append(ready_resource(client).id)
    lease = ResourceLease("gx", grpo_cfg(reward), PT)
    lease.leftover, lease.resource_id = ids  # the duplicate's stop failed; later this run trained the fold

    lease.close()

    assert fake_pt.state(fake_together).billing() == []
    assert lease.leftover is None and lease.resource_id is None


@pytest.mark.parametrize("shared", [False, True], ids=["own-servers", "one-server"])
def test_a_host_that_starts_a_fold_mid_epoch_follows_the_run_training_it_and_sends_no_operation(
    fake_together, tmp_path, shared
):
    """Host B starts the fold while host A's epoch 1 session is RUNNING with a step applied; the hosts
    share no file lock. With its own Prefect server, B finds that no run of its server created the
    session and follows A's run. With one server for both (workers on two machines), B waits on the
    epoch's drive lease that A holds. Either way B uses A's checkpoints instead of re-attaching to A's
    session and sending every operation a second time (as it did before: with one server, until the
    drive lease). A rerun of a killed follower is the first case."""
    from prefect.settings import PREFECT_API_URL

    fold, reward = grpo_fold(tmp_path / "folds", "gm", "midway", n_train=4)
    pt = fake_pt.state(fake_together)
    pt.script.hold_after = {"optim-step": 1}  # A's 2nd optim step is applied, then held until B is in
    api_url = PREFECT_API_URL.value() if shared else None
    hosts = Hosts(
        tmp_path, ["host-a", "host-b"], [str(fold)], api_url=api_url, train=grpo_cfg(reward), together=HOSTS_PT
    )
    expected = "waiting for that run's epoch" if shared else "to finish the epoch"  # drive lease / follow
    decided = ("to finish the epoch", "waiting for that run's epoch", "re-attaching")
    try:
        hosts.wait_ready()
        hosts.go(0)
        hosts.wait_for(lambda: pt.applied["optim-step"] >= 2, "host A never reached its held step")
        hosts.go(1)
        hosts.wait_for(
            lambda: any(line in hosts.log(1) for line in decided),
            "host B never decided what to do with host A's session",
        )
        assert "re-attaching" not in hosts.log(1) and expected in hosts.log(1)
        pt.script.hold_after = {}
        reported = hosts.finish()
    finally:
        hosts.kill()

    assert len(pt.resources) == 1 and pt.billing() == []  # B provisioned nothing; A stopped its resource
    assert [len(epoch_sessions(pt, "gm", e)) for e in (1, 2)] == [1, 1]
    op_posts = operation_posts(fake_together)
    assert op_posts == len(pt.operations)  # one driver: no operation was sent twice
    assert pt.applied["optim-step"] == 4 and len(set(pt.applied_keys)) == len(pt.applied_keys)
    assert reported[0]["gm"] == reported[1]["gm"] and len(reported[0]["gm"]) == 2


@pytest.mark.parametrize(
    ("intent", "ids", "expected"),
    [
        (False, set(), None),  # no run here set out to create it: another machine's run drives it
        (True, {"ts_a"}, "ts_a"),  # a run here created it and was killed or failed: re-attach
        (True, {"ts_dup"}, None),  # a killed follower: its duplicate (stopped by settle) was recorded, not ts_a
        (True, set(), "ts_a"),  # killed before Together's reply: the oldest session is taken as its own
    ],
)
def test_a_rerun_re_attaches_only_to_a_session_a_run_of_its_server_created(intent, ids, expected):
    from epochwise.post_training import RUNNING, SessionInfo
    from tasks.post_training import left_by_this_server

    existing = [
        SessionInfo(sid, "mr_1", RUNNING, "ew-f-e1-00000000", 2, f"2026-12-07T12:00:0{i}")
        for i, sid in enumerate(["ts_a", "ts_b"])
    ]
    left = left_by_this_server(existing, intent, ids)
    assert (left.id if left else None) == expected


def test_a_run_waiting_on_a_slot_nobody_frees_uses_the_epoch_once_together_shows_it_finished(fake_together, tmp_path):
    """A Prefect server restarted with in-memory leases keeps a slot held at the time taken for good. A
    run that waits on that epoch's drive lease asks Together meanwhile, and uses the epoch once a run on
    another machine (its own Prefect server) finished it: it provisions nothing and sends no operation,
    instead of waiting forever."""
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

    from tasks.locks import read_or_create_limit

    fold, reward = grpo_fold(tmp_path / "folds", "go", "orphan", n_train=4)
    pt = fake_pt.state(fake_together)
    train = grpo_cfg(reward, epochs=1)
    limit = lease_limit_name(drive_lease_name("go", BASE, 1))
    with get_client(sync_client=True) as prefect:
        read_or_create_limit(prefect, limit, 1)
        prefect.update_global_concurrency_limit(limit, GlobalConcurrencyLimitUpdate(active_slots=1))
    log = tmp_path / "waiter.log"
    waiter = epoch_train_child(fold, 1, train, HOSTS_PT, log=log)
    hosts = None
    try:
        wait_for(
            lambda: "waiting for that run's epoch" in log.read_text(),
            "the waiting run never reached the drive lease",
            alive=[waiter],
            explain=lambda: log.read_text()[-3000:],
        )
        hosts = Hosts(tmp_path, ["host-a"], [str(fold)], train=train, together=HOSTS_PT)
        hosts.wait_ready()
        hosts.go(0)
        (reported,) = hosts.finish()
        assert waiter.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        for child in [waiter, *(hosts.children if hosts else [])]:
            if child.poll() is None:
                child.kill()
        with get_client(sync_client=True) as prefect:
            prefect.delete_global_concurrency_limit_by_name(limit)

    assert "already ran to its end" in log.read_text() and "re-attaching" not in log.read_text()
    assert len(pt.resources) == 1 and pt.billing() == []  # host A's resource only, stopped
    assert len(epoch_sessions(pt, "go", 1)) == 1
    op_posts = operation_posts(fake_together)
    assert op_posts == len(pt.operations)  # one driver: host A
    assert len(reported["go"]) == 1
