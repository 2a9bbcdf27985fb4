"""The fake Together server itself, driven through the real SDK: the rules other tests rely on."""

from __future__ import annotations

import json
import time

import pytest
from together import AuthenticationError, BadRequestError, ConflictError, InternalServerError, Together

BASE = "meta-llama/Meta-Llama-3.1-8B-Instruct-Reference"
CONVO = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


@pytest.fixture
def train_file(together_client, tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(CONVO) + "\n")
    remote = together_client.files.upload(path, purpose="fine-tune")
    while together_client.files.retrieve(remote.id).processing_status == "PENDING":
        pass
    return remote.id


def finish(client: Together, job_id: str) -> str:
    while (status := client.fine_tuning.retrieve(job_id).status) not in (
        "completed",
        "error",
        "cancelled",
        "user_error",
    ):
        pass
    return status


def test_upload_is_three_requests_and_counts_one_upload(fake_together, train_file):
    assert fake_together.counts["POST /v1/files"] == 1
    assert fake_together.counts["PUT /_upload/{id}"] == 1
    assert fake_together.counts["POST /v1/files/{id}/preprocess"] == 1
    assert fake_together.state.uploads == 1


def test_dedup_answers_409_and_the_sdk_returns_the_existing_file(fake_together, together_client, train_file, tmp_path):
    fake_together.script.dedup_uploads = True
    copy = tmp_path / "copy.jsonl"
    copy.write_text(json.dumps(CONVO) + "\n")
    again = together_client.files.upload(copy, purpose="fine-tune")
    assert again.id == train_file and fake_together.state.uploads == 1


def test_jobs_need_a_validated_file_and_a_completed_parent(fake_together, together_client, train_file):
    fake_together.script.job_polls_per_state = 2
    with pytest.raises(BadRequestError, match="not found"):
        together_client.fine_tuning.create(training_file="file-nope", model=BASE, lora=True)
    first = together_client.fine_tuning.create(training_file=train_file, model=BASE, lora=True, suffix="a")
    with pytest.raises(BadRequestError, match="not completed"):
        together_client.fine_tuning.create(training_file=train_file, from_checkpoint=first.id, lora=True)
    assert finish(together_client, first.id) == "completed"
    second = together_client.fine_tuning.create(training_file=train_file, from_checkpoint=first.id, lora=True)
    assert fake_together.state.jobs[second.id].depth == 2
    assert fake_together.state.jobs[second.id].model == BASE
    # The output model name works as from_checkpoint too (with or without :step).
    by_name = together_client.fine_tuning.create(
        training_file=train_file, from_checkpoint=first.output_name + ":10", lora=True
    )
    assert fake_together.state.jobs[by_name.id].depth == 2


def test_job_progression_metrics_checkpoints_and_cancel(fake_together, together_client, train_file):
    job = together_client.fine_tuning.create(training_file=train_file, model=BASE, lora=True)
    seen = []
    while not seen or seen[-1] != "completed":
        seen.append(together_client.fine_tuning.retrieve(job.id).status)
    assert seen == ["queued", "running", "compressing", "uploading", "completed"]
    done = together_client.fine_tuning.retrieve(job.id)
    assert done.api_model_object_id == f"ml_{job.id}"
    assert together_client.fine_tuning.list_metrics(job.id).metrics[-1]["train/loss"] == 2.0
    assert len(together_client.fine_tuning.list_checkpoints(job.id).data) == 2

    other = together_client.fine_tuning.create(training_file=train_file, model=BASE, lora=True)
    assert together_client.fine_tuning.cancel(other.id).status == "cancel_requested"
    assert finish(together_client, other.id) == "cancelled"


def test_a_delayed_job_list_shows_a_new_job_only_after_list_delay_s(fake_together, together_client, train_file):
    fake_together.script.list_delay_s = 3600.0
    hidden = together_client.fine_tuning.create(training_file=train_file, model=BASE, lora=True, suffix="late")
    assert hidden.id not in [j.id for j in together_client.fine_tuning.list().data or []]
    assert together_client.fine_tuning.retrieve(hidden.id).suffix == "late"  # retrieve is consistent at once
    assert together_client.fine_tuning.cancel(hidden.id).status == "cancel_requested"

    fake_together.script.list_delay_s = 0.3
    before = time.monotonic()
    soon = together_client.fine_tuning.create(training_file=train_file, model=BASE, lora=True, suffix="soon")
    deadline = before + 60  # a generous bound on a loaded machine, not a speed assertion
    while soon.id not in [j.id for j in together_client.fine_tuning.list().data or []]:
        assert time.monotonic() < deadline, "the job never showed in the list"
        time.sleep(0.02)
    assert time.monotonic() - before >= 0.3  # never listed before its delay
    assert hidden.id not in [j.id for j in together_client.fine_tuning.list().data or []]
    fake_together.script.list_delay_s = 0.0
    assert hidden.id not in [j.id for j in together_client.fine_tuning.list().data or []]  # fixed at creation


def test_a_held_job_list_shows_no_job_until_list_hold_creates_jobs_exist(fake_together, together_client, train_file):
    fake_together.script.list_hold_creates = 2
    first = together_client.fine_tuning.create(training_file=train_file, model=BASE, lora=True, suffix="a")
    assert together_client.fine_tuning.list().data == []
    assert together_client.fine_tuning.retrieve(first.id).suffix == "a"  # retrieve is not held
    second = together_client.fine_tuning.create(training_file=train_file, model=BASE, lora=True, suffix="b")
    assert [j.id for j in together_client.fine_tuning.list().data] == [first.id, second.id]


def test_bursts_are_retried_by_the_sdk_and_counted(fake_together, together_client):
    fake_together.burst("GET /v1/fine-tunes", [429, 500, 503])
    assert together_client.fine_tuning.list().data == []
    assert fake_together.counts["GET /v1/fine-tunes"] == 4


def test_wrong_key_is_refused(fake_together):
    client = Together(api_key="wrong", base_url=fake_together.base_url, max_retries=0)
    with pytest.raises(AuthenticationError):
        client.fine_tuning.list()


def test_v2_deploy_progression_and_chat(fake_together, together_client, train_file):
    fake_together.script.job_polls_per_state = 0
    job = together_client.fine_tuning.create(training_file=train_file, model=BASE, lora=True)
    client = together_client.with_options(project_id=together_client.whoami().project.id)
    model = client.models.retrieve(f"ml_{job.id}")
    config = client.models.configs.list(reference_model=model.base_model).data[0]
    assert client.models.configs.list(reference_model_id=model.id).data == []  # the fine-tuned model: none
    assert client.models.configs.list().data == []
    endpoint = client.endpoints.create(name="games")
    with pytest.raises(ConflictError):
        client.with_options(max_retries=0).endpoints.create(name="games")
    dep = client.endpoints.deployments.create(
        endpoint.id,
        name="d1",
        model=f"projects/{model.project_id}/models/{model.id}",
        config=f"projects/{config.project_id}/configs/{config.id}",
        autoscaling={"min_replicas": 1, "max_replicas": 1},
    )
    client.endpoints.update(
        endpoint.id,
        traffic_split=[{"deployment_id": dep.id, "weight": 1}],
        update_mask="trafficSplit",
        etag=endpoint.etag,
    )
    states = []
    while not states or states[-1] != "DEPLOYMENT_STATE_READY":
        states.append(client.endpoints.deployments.retrieve(dep.id, endpoint_id=endpoint.id).status.state)
    assert states[0] == "DEPLOYMENT_STATE_PROVISIONING"
    reply = client.chat.completions.create(model=endpoint.name, messages=[{"role": "user", "content": "ping"}])
    assert reply.choices[0].message.content == "pong" and fake_together.state.chats
    # scripted answers per conversation (matched on the last message), and a conversation that keeps failing
    fake_together.script.chat_answers = {"who wins": "Kofi"}
    fake_together.script.chat_prompt_errors = {"broken": 500}
    asked = [{"role": "user", "content": "a story. Who wins?"}]
    assert client.chat.completions.create(model=endpoint.name, messages=asked).choices[0].message.content == "pong"
    asked = [{"role": "user", "content": "a story: who wins"}]
    assert client.chat.completions.create(model=endpoint.name, messages=asked).choices[0].message.content == "Kofi"
    with pytest.raises(InternalServerError):
        client.with_options(max_retries=0).chat.completions.create(
            model=endpoint.name, messages=[{"role": "user", "content": "a broken row"}])
    assert len(fake_together.state.chats) == 3  # the failed request is not recorded as answered

    client.endpoints.deployments.update(
        dep.id, endpoint_id=endpoint.id, autoscaling={"min_replicas": 0, "max_replicas": 0}, update_mask="autoscaling"
    )
    assert (
        client.endpoints.deployments.retrieve(dep.id, endpoint_id=endpoint.id).status.state
        == "DEPLOYMENT_STATE_STOPPED"
    )
    # An update changes only what its mask names: a stop sent under another mask stops nothing.
    client.endpoints.deployments.update(
        dep.id, endpoint_id=endpoint.id, autoscaling={"min_replicas": 1, "max_replicas": 1}, update_mask="autoscaling"
    )
    client.endpoints.deployments.update(
        dep.id, endpoint_id=endpoint.id, name="d2", autoscaling={"min_replicas": 0, "max_replicas": 0}, update_mask="name"
    )
    renamed = client.endpoints.deployments.retrieve(dep.id, endpoint_id=endpoint.id)
    assert renamed.name == "d2" and renamed.autoscaling.max_replicas == 1
    assert renamed.status.state != "DEPLOYMENT_STATE_STOPPED"
    for bad_mask in ("inactive_timeout", "autoscaling"):  # a snake_case path; a masked field the body lacks
        with pytest.raises(BadRequestError):
            client.with_options(max_retries=0).endpoints.deployments.update(
                dep.id, endpoint_id=endpoint.id, name="d3", update_mask=bad_mask
            )
    client.endpoints.deployments.update(
        dep.id, endpoint_id=endpoint.id, autoscaling={"min_replicas": 0, "max_replicas": 0}, update_mask="autoscaling"
    )
    routed = client.endpoints.retrieve(endpoint.id)
    client.endpoints.update(endpoint.id, traffic_split=[], update_mask="trafficSplit", etag=routed.etag)
    client.endpoints.deployments.delete(dep.id, endpoint_id=endpoint.id)
    client.endpoints.delete(endpoint.id)
    assert not fake_together.state.endpoints and not fake_together.state.deployments


def _live_deployment(fake_together, together_client, train_file):
    fake_together.script.job_polls_per_state = 0
    job = together_client.fine_tuning.create(training_file=train_file, model=BASE, lora=True)
    client = together_client.with_options(project_id="proj_1", max_retries=0)
    endpoint = client.endpoints.create(name="rules")
    dep = client.endpoints.deployments.create(
        endpoint.id,
        name="d1",
        model=f"projects/proj_1/models/ml_{job.id}",
        config="projects/proj_public/configs/cr_1",
        autoscaling={"min_replicas": 1, "max_replicas": 1},
    )
    client.endpoints.update(
        endpoint.id, traffic_split=[{"deployment_id": dep.id, "weight": 1}], update_mask="trafficSplit", etag="e1"
    )
    return client, endpoint, dep


def test_v2_delete_rules_live_traffic_deployments_first_and_etags(fake_together, together_client, train_file):
    client, endpoint, dep = _live_deployment(fake_together, together_client, train_file)

    # A deployment in the traffic split is not deleted, and neither is an endpoint that holds one.
    with pytest.raises(BadRequestError, match="remove the deployment from live traffic first"):
        client.endpoints.deployments.delete(dep.id, endpoint_id=endpoint.id)
    with pytest.raises(BadRequestError, match="delete the endpoint's deployments first"):
        client.endpoints.delete(endpoint.id)
    assert list(fake_together.state.deployments) == [dep.id] and list(fake_together.state.endpoints) == [endpoint.id]

    # The etag read at create (e1) went stale when the split was set: 409 until the current one is sent.
    with pytest.raises(ConflictError, match="changed since it was read"):
        client.endpoints.update(endpoint.id, traffic_split=[], update_mask="trafficSplit", etag=endpoint.etag)
    assert fake_together.state.endpoints[endpoint.id]["trafficSplit"] == [{"deploymentId": dep.id, "weight": 1}]
    current = client.endpoints.retrieve(endpoint.id).etag
    client.endpoints.update(endpoint.id, traffic_split=[], update_mask="trafficSplit", etag=current)

    # DELETE carries its etag as a query parameter; a stale one is refused the same way.
    with pytest.raises(ConflictError):
        client.endpoints.deployments.delete(dep.id, endpoint_id=endpoint.id, etag="d0")
    with pytest.raises(ConflictError):
        client.endpoints.deployments.update(
            dep.id, endpoint_id=endpoint.id, etag="d0", inactive_timeout=30, update_mask="inactiveTimeout"
        )
    client.endpoints.deployments.delete(dep.id, endpoint_id=endpoint.id, etag=dep.etag)
    with pytest.raises(ConflictError):
        client.endpoints.delete(endpoint.id, etag="e1")
    client.endpoints.delete(endpoint.id, etag=client.endpoints.retrieve(endpoint.id).etag)
    assert not fake_together.state.endpoints and not fake_together.state.deployments


def test_scripted_delete_refusal_lasts_until_the_deployment_is_scaled_to_zero(
    fake_together, together_client, train_file
):
    client, endpoint, dep = _live_deployment(fake_together, together_client, train_file)
    client.endpoints.update(endpoint.id, traffic_split=[], update_mask="trafficSplit", etag="e2")
    fake_together.script.delete_refusal = "deployment is scaling; try again later"

    with pytest.raises(BadRequestError, match="deployment is scaling"):
        client.endpoints.deployments.delete(dep.id, endpoint_id=endpoint.id)
    client.endpoints.deployments.update(
        dep.id, endpoint_id=endpoint.id, autoscaling={"min_replicas": 0, "max_replicas": 0}, update_mask="autoscaling"
    )
    client.endpoints.deployments.delete(dep.id, endpoint_id=endpoint.id)
    assert fake_together.state.deployments == {}

def test_files_list_returns_file_responses_named_as_the_sdk_sent_them(fake_together, together_client, tmp_path):
    fake_together.script.file_polls = 5
    path = tmp_path / "train-0123456789abcdef.jsonl"
    path.write_text(json.dumps(CONVO) + "\n")
    remote = together_client.files.upload(path, purpose="fine-tune")
    fields = fake_together.state.files[remote.id]

    (listed,) = together_client.files.list().data
    assert listed.id == remote.id and listed.filename == "train-0123456789abcdef.jsonl" == fields.filename
    assert listed.bytes == path.stat().st_size and listed.purpose == "fine-tune" and listed.file_type == "jsonl"
    assert listed.processing_status == "PENDING"  # Together validates after the upload; the list says so
    while together_client.files.retrieve(remote.id).processing_status == "PENDING":
        pass
    assert together_client.files.list().data[0].processing_status == "COMPLETED"


def test_an_outage_refuses_connections_drops_open_ones_and_keeps_the_port_and_state(fake_together, train_file):
    import http.client
    import socket

    from together import APIConnectionError

    client = Together(api_key=fake_together.api_key, base_url=fake_together.base_url, max_retries=0)
    host, port = fake_together.base_url.removeprefix("http://").split(":")
    kept = http.client.HTTPConnection(host, int(port), timeout=10)
    kept.request("GET", "/v3/whoami", headers={"Authorization": f"Bearer {fake_together.api_key}"})
    assert kept.getresponse().read() and kept.sock is not None  # a keep-alive connection, still open

    fake_together.go_down()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, int(port)), timeout=10)
    with pytest.raises(APIConnectionError):
        client.files.list()
    with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
        kept.request("GET", "/v3/whoami", headers={"Authorization": f"Bearer {fake_together.api_key}"})
        kept.getresponse().read()

    fake_together.come_back()
    assert [f.id for f in client.files.list().data] == [train_file]  # same URL, same state
    (outage,) = fake_together.outages
    assert outage.seconds is not None and outage.seconds >= 0


def test_outage_after_a_route_goes_down_after_that_reply_and_comes_back_by_itself(fake_together):
    from together import APIConnectionError

    client = Together(api_key=fake_together.api_key, base_url=fake_together.base_url, max_retries=0)
    fake_together.outage_after("GET /v3/whoami", 2, seconds=0.5)
    client.get("/v3/whoami", cast_to=object)
    client.get("/v3/whoami", cast_to=object)  # answered, then the fake goes down
    with pytest.raises(APIConnectionError):
        client.get("/v3/whoami", cast_to=object)
    assert fake_together.counts["GET /v3/whoami"] == 2

    fake_together.wait_up()
    client.get("/v3/whoami", cast_to=object)
    (outage,) = fake_together.outages
    assert outage.seconds is not None and outage.seconds >= 0.5  # no earlier than scripted
    assert fake_together.counts["GET /v3/whoami"] == 3

USER, ASSISTANT = CONVO["messages"]
IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}


@pytest.mark.parametrize(
    "messages, reason",
    [
        (
            [USER, {"role": "tool", "content": "42"}, ASSISTANT],
            "a tool message must follow an assistant or tool message",
        ),
        ([USER, {**ASSISTANT, "reasoning_content": ["step"]}], "reasoning_content must be a string"),
        ([USER, {"role": "assistant", "content": [IMAGE]}], "images are only allowed in user messages"),
    ],
    ids=["tool after user", "reasoning not a string", "image from the assistant"],
)
def test_server_side_validation_rejects_broken_message_rules(together_client, tmp_path, messages, reason):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(CONVO) + "\n" + json.dumps({"messages": messages}) + "\n")
    remote = together_client.files.upload(path, purpose="fine-tune", check=False)
    while (found := together_client.files.retrieve(remote.id)).processing_status == "PENDING":
        pass
    assert found.processing_status == "INVALID_FORMAT"
    assert found.validation_report.error == f"line 2: messages[1]: {reason}"
