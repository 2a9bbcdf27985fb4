"""The endpoint adapter against the fake Together server through the real SDK (no Prefect): project
discovery, reuse instead of duplicates, FAILED and smoke-test errors with Together's message, stop,
and the listing the reaper works from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from together import ConflictError, Together

from epochwise import endpoints_api as ea
from epochwise.config.deploy import DeployConfig
from tests.fake_together.server import FakeTogether

FAST = DeployConfig(poll_s=0.001, ready_deadline_s=5)


@pytest.fixture
def client(fake_together: FakeTogether) -> Together:
    return Together(api_key=fake_together.api_key, base_url=fake_together.base_url, project_id="proj_1", max_retries=0)


def completed_job(fake: FakeTogether, client: Together, tmp_path: Path, suffix: str = "ew-g-e1-0123abcd") -> str:
    fake.script.file_polls, fake.script.job_polls_per_state = 0, 0
    data = tmp_path / "t.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}) + "\n")
    job = client.fine_tuning.create(training_file=client.files.upload(data).id, model="base/m", suffix=suffix,
                                    lora=True, train_on_inputs=False)
    client.fine_tuning.retrieve(job.id)
    return job.id


def deployed(fake: FakeTogether, client: Together, tmp_path: Path, slug: str = "ew-g-e1"):
    target = ea.model_from_job(client, completed_job(fake, client, tmp_path))
    config = ea.choose_config(client, target, None)
    endpoint, _ = ea.ensure_endpoint(client, slug)
    dep, _ = ea.ensure_deployment(client, endpoint, target, config, FAST)
    return target, config, endpoint, dep


def test_a_deployment_create_whose_reply_is_lost_is_found_by_its_name_not_made_twice(fake_together, tmp_path):
    # The SDK's own retries would resend the create (409 on the name, or a second deployment).
    client = Together(api_key=fake_together.api_key, base_url=fake_together.base_url, project_id="proj_1")
    target = ea.model_from_job(client, completed_job(fake_together, client, tmp_path))
    endpoint, _ = ea.ensure_endpoint(client, "ew-lost-e1")
    fake_together.script.deployment_create_then_500 = 1
    waits: list[float] = []
    config = ea.choose_config(client, target, None)
    dep, created = ea.ensure_deployment(client, endpoint, target, config, FAST, sleep=waits.append)

    assert created and fake_together.counts["POST /v2/projects/{project}/endpoints/{eid}/deployments"] == 1
    assert [d.id for d in ea.list_deployments(client, endpoint.id)] == [dep.id] and waits == [2.0]
    with pytest.raises(ConflictError):  # the fake's name rule, as Together's
        client.with_options(max_retries=0).endpoints.deployments.create(
            endpoint.id, name=ea.deployment_slug(target.model_id), model=target.model_path,
            config=ea.config_path(config), autoscaling={"min_replicas": 1, "max_replicas": 1},
        )


def test_project_comes_from_the_client_or_else_whoami(fake_together, monkeypatch):
    monkeypatch.delenv("TOGETHER_PROJECT_ID", raising=False)
    bare = Together(api_key=fake_together.api_key, base_url=fake_together.base_url, max_retries=0)
    assert ea.with_project(bare).project_id == "proj_1"
    assert fake_together.counts["GET /v3/whoami"] == 1
    monkeypatch.setenv("TOGETHER_PROJECT_ID", "proj_1")
    from_env = Together(api_key=fake_together.api_key, base_url=fake_together.base_url, max_retries=0)
    assert ea.with_project(from_env) is from_env
    assert fake_together.counts["GET /v3/whoami"] == 1


def test_model_comes_from_the_completed_job(fake_together, client, tmp_path):
    job_id = completed_job(fake_together, client, tmp_path)
    target = ea.model_from_job(client, job_id)
    assert target.model_id == f"ml_{job_id}" and target.model_path == f"projects/proj_1/models/ml_{job_id}"
    assert target.reference_model_id == "ml_base"

    fake_together.script.hold_jobs = True
    held = completed_job(fake_together, client, tmp_path, "ew-g-e2-0123abcd")
    fake_together.state.jobs[held].status = "running"
    with pytest.raises(ea.EndpointFailure, match=f"job {held} is running, not completed"):
        ea.model_from_job(client, held)


def test_endpoint_and_deployment_are_reused_not_duplicated(fake_together, client, tmp_path):
    target, config, endpoint, dep = deployed(fake_together, client, tmp_path)
    again_ep, ep_created = ea.ensure_endpoint(client, "ew-g-e1")
    again_dep, dep_created = ea.ensure_deployment(client, again_ep, target, config, FAST)
    assert (again_ep.id, again_dep.id, ep_created, dep_created) == (endpoint.id, dep.id, False, False)
    assert fake_together.counts["POST /v2/projects/{project}/endpoints"] == 1
    assert fake_together.counts["POST /v2/projects/{project}/endpoints/{eid}/deployments"] == 1


def test_a_stopped_deployment_is_scaled_back_up_and_a_failed_one_replaced(fake_together, client, tmp_path):
    target, config, endpoint, dep = deployed(fake_together, client, tmp_path)
    ea.scale_to_zero(client, endpoint.id, dep.id)
    revived, created = ea.ensure_deployment(client, endpoint, target, config, FAST)
    assert revived.id == dep.id and not created and (revived.min_replicas, revived.max_replicas) == (1, 1)
    longer, _ = ea.ensure_deployment(client, endpoint, target, config, FAST.model_copy(update={"inactive_timeout_min": 120}))
    assert longer.id == dep.id and fake_together.state.deployments[dep.id]["inactiveTimeout"] == 120

    fake_together.state.deployments[dep.id]["status"]["state"] = "DEPLOYMENT_STATE_FAILED"
    routed = ea.route_traffic(client, endpoint.id, dep.id)  # a routed FAILED one is taken out of traffic first
    replaced, created = ea.ensure_deployment(client, routed, target, config, FAST)
    assert created and replaced.id != dep.id and list(fake_together.state.deployments) == [replaced.id]
    assert fake_together.state.endpoints[endpoint.id]["trafficSplit"] == []


def test_wait_ready_fails_with_togethers_message_or_at_the_deadline(fake_together, client, tmp_path):
    fake_together.script.deployment_fail = "image pull failed (scripted)"
    _, _, endpoint, dep = deployed(fake_together, client, tmp_path)
    with pytest.raises(ea.EndpointFailure, match=r"deployment me/ew-g-e1/d-.* failed: image pull failed \(scripted\)"):
        ea.wait_ready(client, endpoint.id, dep.id, FAST)

    fake_together.script.deployment_fail, fake_together.script.deployment_polls = None, 10**6
    _, _, slow_ep, slow = deployed(fake_together, client, tmp_path, "ew-g-e2")
    with pytest.raises(ea.EndpointFailure, match="still DEPLOYMENT_STATE_PROVISIONING after 0 s"):
        ea.wait_ready(client, slow_ep.id, slow.id, DeployConfig(poll_s=0.001, ready_deadline_s=0.01))


def test_smoke_chat_reply_and_a_500_reported_once_with_its_message(fake_together, client, tmp_path):
    _, _, endpoint, dep = deployed(fake_together, client, tmp_path)
    ea.route_traffic(client, endpoint.id, dep.id)
    ea.wait_ready(client, endpoint.id, dep.id, FAST)
    assert ea.smoke_chat(client, endpoint.name, FAST) == "pong"
    assert fake_together.state.chats[-1]["max_tokens"] == FAST.smoke_max_tokens

    fake_together.script.chat_errors = {"ew-g-e1": 500}
    before = fake_together.counts["POST /v1/chat/completions"]
    with pytest.raises(ea.EndpointFailure, match=r"smoke test of me/ew-g-e1 failed \(500\): scripted 500"):
        ea.smoke_chat(client, endpoint.name, FAST)
    assert fake_together.counts["POST /v1/chat/completions"] == before + 1


def test_stop_scales_to_zero_and_the_listing_keeps_only_epochwise_endpoints(fake_together, client, tmp_path):
    _, _, endpoint, dep = deployed(fake_together, client, tmp_path)
    client.endpoints.create(name="my-chatbot")
    client.endpoints.create(name="ew-other-e1")

    (mine,) = ea.epochwise_endpoints(client, "g")
    assert mine.name == "me/ew-g-e1" and mine.deployments[0].id == dep.id and mine.age_s() < 3600
    assert [e.name for e in ea.epochwise_endpoints(client)] == ["me/ew-g-e1", "me/ew-other-e1"]

    (stopped,) = ea.stop_endpoint(client, mine)
    assert (stopped.min_replicas, stopped.max_replicas) == (0, 0)
    assert ea.stop_endpoint(client, ea.epochwise_endpoints(client, "g")[0]) == []  # already stopped

    assert ea.delete_deployment(client, endpoint.id, dep.id) and not ea.delete_deployment(client, endpoint.id, dep.id)
    assert ea.delete_endpoint_if_empty(client, endpoint.id)
    assert [e.name for e in ea.list_endpoints(client)] == ["me/my-chatbot", "me/ew-other-e1"]


def test_the_endpoint_lock_lets_one_deploy_at_a_time_find_and_create(tmp_path):
    """Two threads (two runs) deploying one endpoint never interleave their find-then-create."""
    import contextvars
    import threading
    import time

    from prefect.settings import PREFECT_HOME, temporary_settings

    from tasks.endpoints import endpoint_lock

    inside, overlaps = [], []
    start = threading.Barrier(3)

    def deploy_once() -> None:
        start.wait()
        with endpoint_lock("ew-g-e1", wait_s=30, lease_s=60):
            inside.append(1)
            overlaps.append(len(inside))
            time.sleep(0.05)  # a listing and a create call
            inside.pop()

    with temporary_settings({PREFECT_HOME: tmp_path}):  # settings live in a context variable: copy it
        threads = [threading.Thread(target=contextvars.copy_context().run, args=(deploy_once,)) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert overlaps == [1, 1, 1]
    assert (tmp_path / "locks" / "endpoint-ew-g-e1.lock").is_file()


def _second_model_on(fake: FakeTogether, client: Together, tmp_path: Path, endpoint: ea.EndpointInfo):
    """A second model's deployment on ``endpoint`` (a retrained epoch), not yet routed."""
    target = ea.model_from_job(client, completed_job(fake, client, tmp_path, "ew-g-e1-4567cdef"))
    dep, created = ea.ensure_deployment(client, endpoint, target, ea.choose_config(client, target, None), FAST)
    assert created
    return dep


ROLLBACK = {"describe": "deployment D on endpoint E", "stop_command": "epochwise endpoints g --stop --deployment D"}


def test_rollback_restores_the_previous_split_then_deletes_the_new_deployment_and_keeps_the_endpoint(
        fake_together, client, tmp_path):
    _, _, endpoint, old = deployed(fake_together, client, tmp_path)
    before = ea.route_traffic(client, endpoint.id, old.id).traffic
    new = _second_model_on(fake_together, client, tmp_path, endpoint)
    ea.route_traffic(client, endpoint.id, new.id)

    done = ea.rollback_deployment(client, endpoint.id, new.id, before, endpoint_created=False, **ROLLBACK)

    assert done == ["traffic split restored (1 deployment(s))", "deployment deleted"]
    assert fake_together.state.endpoints[endpoint.id]["trafficSplit"] == [{"deploymentId": old.id, "weight": 1.0}]
    assert list(fake_together.state.deployments) == [old.id]
    assert [s for _, _, s in fake_together.log if s >= 400] == []  # in Together's order: nothing refused


def test_rollback_of_a_new_endpoint_leaves_nothing_and_rereads_a_stale_etag(fake_together, client, tmp_path):
    _, _, endpoint, dep = deployed(fake_together, client, tmp_path)
    ea.route_traffic(client, endpoint.id, dep.id)
    fake_together.burst("PATCH /v2/projects/{project}/endpoints/{eid}", [409])  # someone changed it meanwhile
    retrieves = fake_together.counts["GET /v2/projects/{project}/endpoints/{eid}"]

    ea.rollback_deployment(client, endpoint.id, dep.id, (), endpoint_created=True, **ROLLBACK)

    assert fake_together.state.endpoints == {} and fake_together.state.deployments == {}
    assert fake_together.counts["GET /v2/projects/{project}/endpoints/{eid}"] == retrieves + 2  # read again on 409


def test_a_delete_refused_for_another_reason_is_retried_after_scaling_to_zero(fake_together, client, tmp_path):
    _, _, endpoint, dep = deployed(fake_together, client, tmp_path)
    ea.route_traffic(client, endpoint.id, dep.id)
    fake_together.script.delete_refusal = "deployment is still scaling up (scripted)"

    done = ea.rollback_deployment(client, endpoint.id, dep.id, (), endpoint_created=True, **ROLLBACK)

    assert done == ["traffic split restored (0 deployment(s))", "scaled to zero", "deployment deleted", "endpoint deleted"]
    assert fake_together.state.endpoints == {} and fake_together.state.deployments == {}


def test_a_rollback_step_that_keeps_failing_names_what_is_live_and_the_stop_command(fake_together, client, tmp_path):
    _, _, endpoint, dep = deployed(fake_together, client, tmp_path)
    ea.route_traffic(client, endpoint.id, dep.id)
    fake_together.burst("PATCH /v2/projects/{project}/endpoints/{eid}", [500] * 3)
    fake_together.burst("PATCH /v2/projects/{project}/endpoints/{eid}/deployments/{did}", [503])

    with pytest.raises(ea.RollbackFailure) as failed:
        ea.rollback_deployment(client, endpoint.id, dep.id, (), endpoint_created=True, **ROLLBACK)

    assert str(failed.value) == (
        "rollback failed to restore the traffic split (Together answered 500: scripted 500 for PATCH "
        "/v2/projects/{project}/endpoints/{eid}); deployment D on endpoint E is still live and may keep billing. "
        "Stop it with: epochwise endpoints g --stop --deployment D (`epochwise endpoints --reap` stops it too)")
    assert fake_together.state.deployments[dep.id]["autoscaling"] == {"minReplicas": 1, "maxReplicas": 1}

    # Traffic can be restored but the delete keeps failing: it is scaled to zero, so it no longer bills.
    fake_together.clear_bursts()
    fake_together.burst("DELETE /v2/projects/{project}/endpoints/{eid}/deployments/{did}", [500] * 2)
    with pytest.raises(ea.RollbackFailure, match=r"failed to delete the deployment after scaling it to zero .*"
                                                 r"deployment D on endpoint E is stopped \(0 replicas, not billing\)"):
        ea.rollback_deployment(client, endpoint.id, dep.id, (), endpoint_created=True, **ROLLBACK)
    assert fake_together.state.deployments[dep.id]["autoscaling"] == {"minReplicas": 0, "maxReplicas": 0}
    assert fake_together.state.endpoints[endpoint.id]["trafficSplit"] == []
