"""``deploy-epoch`` and ``endpoint-reaper``: the real flows and CLI on the Prefect test harness, the real
``together`` SDK against the fake server. Epochs come from a real ``epoch-train`` run (its
``<fold>-epochs`` artifact) or from jobs created through the SDK; deployments become READY after two
status calls and the flow polls every millisecond."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prefect.artifacts import Artifact
from together import Together
from typer.testing import CliRunner

from epochwise.cli import app
from epochwise.config.train import TrainConfig
from epochwise.together_api import epoch_suffix
from flows.deploy_epoch import deploy_epoch
from flows.epoch_train import epoch_train
from tests.fake_together.server import FakeTogether
from tests.helpers import BASE, DEPLOY, FAST, OUTAGE_S, make_fold, run_logs
from tests.helpers import train_with_losses as train


def sdk(fake: FakeTogether) -> Together:
    return Together(api_key=fake.api_key, base_url=fake.base_url, project_id="proj_1", max_retries=0)


def sdk_job(fake: FakeTogether, tmp_path: Path, suffix: str, parent: str | None = None) -> str:
    """A completed job made through the SDK (upload, create, one retrieve), as epoch-train would:
    with a validation file and one evaluation, from ``parent`` when given."""
    fake.script.file_polls, fake.script.job_polls_per_state = 0, 0
    data = tmp_path / f"{suffix}.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}) + "\n")
    client = sdk(fake)
    file_id = client.files.upload(data).id
    start = {"from_checkpoint": parent} if parent else {"model": BASE}
    job = client.fine_tuning.create(training_file=file_id, validation_file=file_id, n_evals=1, suffix=suffix,
                                    lora=True, train_on_inputs=False, **start)
    assert client.fine_tuning.retrieve(job.id).status == "completed"
    return job.id


def endpoints_table(fold: str) -> list[dict[str, str]]:
    return json.loads(Artifact.get(f"{fold}-endpoints").data)


def test_best_epoch_goes_ready_with_smoke_reply_and_a_second_deploy_creates_nothing(fake_together, tmp_path):
    records, fold = train(fake_together, tmp_path, "dgames", {1: (2.0, 1.5), 2: (1.8, 1.2), 3: (1.7, 1.4)})
    best_job = records[1].job_id
    fake_together.script.chat_reply = "ready when you are"

    row = deploy_epoch(str(fold), "best", deploy=DEPLOY, together=FAST)

    (endpoint,) = fake_together.state.endpoints.values()
    (dep,) = fake_together.state.deployments.values()
    assert endpoint["name"] == "me/ew-dgames-e2"
    assert dep["model"] == f"projects/proj_1/models/ml_{best_job}"
    assert dep["status"]["state"] == "DEPLOYMENT_STATE_READY"
    assert dep["autoscaling"] == {"minReplicas": 1, "maxReplicas": 1} and dep["inactiveTimeout"] == 60
    assert dep["config"] == "projects/proj_public/configs/cr_1"
    assert endpoint["trafficSplit"] == [{"deploymentId": dep["id"], "weight": 1}]
    assert [c["model"] for c in fake_together.state.chats] == ["me/ew-dgames-e2"]
    assert row["endpoint"] == "me/ew-dgames-e2" and row["smoke reply"] == "ready when you are"
    (recorded,) = endpoints_table("dgames")
    assert recorded["state"] == "READY" and recorded["hardware"] == "1x_nvidia_h100_80gb_sxm"
    assert recorded["smoke reply"] == "ready when you are" and recorded["epoch"] == "2"

    creates = (fake_together.counts["POST /v2/projects/{project}/endpoints"],
               fake_together.counts["POST /v2/projects/{project}/endpoints/{eid}/deployments"])
    again = deploy_epoch(str(fold), "best", deploy=DEPLOY, together=FAST)
    assert again["endpoint"] == "me/ew-dgames-e2"
    assert len(fake_together.state.endpoints) == 1 and list(fake_together.state.deployments) == [dep["id"]]
    assert creates == (1, 1)
    assert (fake_together.counts["POST /v2/projects/{project}/endpoints"],
            fake_together.counts["POST /v2/projects/{project}/endpoints/{eid}/deployments"]) == creates


def test_smoke_test_failure_rolls_back_to_zero_deployments_and_fails_with_the_reason(fake_together, tmp_path):
    _, fold = train(fake_together, tmp_path, "dsmoke", {1: (2.0, 1.5), 2: (1.9, 1.6)})
    fake_together.script.chat_errors = {"ew-dsmoke-e1": 500}

    state = deploy_epoch(str(fold), "best", deploy=DEPLOY, together=FAST, return_state=True)

    assert state.is_failed()
    with pytest.raises(Exception, match=r"smoke test of me/ew-dsmoke-e1 failed \(500\).*not answering"):
        state.result()
    assert fake_together.counts["POST /v2/projects/{project}/endpoints/{eid}/deployments"] == 1
    assert fake_together.state.deployments == {}  # nothing left billing
    assert fake_together.state.endpoints == {}  # the empty endpoint it created went too
    # Together's order (traffic off, then the deployment, then the endpoint): no step was refused.
    assert [e for e in fake_together.log if e[2] >= 400 and "/chat/" not in e[1]] == []
    (row,) = endpoints_table("dsmoke")
    assert row["state"] == "ROLLED BACK" and "not answering" in row["note"]


def test_smoke_failure_on_a_redeploy_routes_back_to_the_previous_deployment_and_keeps_the_endpoint(
        fake_together, tmp_path):
    first = sdk_job(fake_together, tmp_path, epoch_suffix("back", 1, "01" * 32))
    second = sdk_job(fake_together, tmp_path, epoch_suffix("back", 1, "02" * 32))
    deploy_epoch("folds/back", job_id=first, deploy=DEPLOY, together=FAST)
    (old,) = fake_together.state.deployments
    fake_together.script.chat_errors = {"ew-back-e1": 500}

    state = deploy_epoch("folds/back", job_id=second, deploy=DEPLOY, together=FAST, return_state=True)

    assert state.is_failed()
    with pytest.raises(Exception, match=r"smoke test of me/ew-back-e1 failed \(500\)"):
        state.result()
    assert fake_together.counts["POST /v2/projects/{project}/endpoints/{eid}/deployments"] == 2
    (endpoint,) = fake_together.state.endpoints.values()
    assert endpoint["name"] == "me/ew-back-e1" and endpoint["deployments"] == [old]
    assert endpoint["trafficSplit"] == [{"deploymentId": old, "weight": 1}]
    assert fake_together.state.deployments[old]["autoscaling"] == {"minReplicas": 1, "maxReplicas": 1}
    assert [e for e in fake_together.log if e[2] >= 400 and "/chat/" not in e[1]] == []


DEP_DELETE = "DELETE /v2/projects/{project}/endpoints/{eid}/deployments/{did}"
DEP_PATCH = "PATCH /v2/projects/{project}/endpoints/{eid}/deployments/{did}"


def failing_rollback(fake: FakeTogether, fold: str, job_id: str) -> tuple[str, dict]:
    """Deploy ``job_id`` with a failing smoke test while Together answers 500 to every deployment delete
    and update (the SDK's retries included): the rollback cannot delete nor stop it. Returns the flow's
    failure message and the deployment left live."""
    fake.script.chat_errors = {f"ew-{fold}-e1": 500}
    fake.burst(DEP_DELETE, [500] * 60)
    fake.burst(DEP_PATCH, [500] * 60)
    state = deploy_epoch(fold, job_id=job_id, deploy=DEPLOY, together=FAST, return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception) as failed:
        state.result()
    fake.clear_bursts()  # the outage is over
    (left,) = [d for d in fake.state.deployments.values() if d["model"].endswith(job_id)]
    return str(failed.value), left


def test_a_rollback_that_keeps_failing_fails_the_flow_with_the_stop_command_and_reap_stops_it(
        fake_together, tmp_path):
    other = sdk_job(fake_together, tmp_path, epoch_suffix("dleft", 2, "ee" * 32))
    deploy_epoch("dleft", job_id=other, deploy=DEPLOY, together=FAST)  # a young, healthy epochwise endpoint
    job = sdk_job(fake_together, tmp_path, epoch_suffix("dleft", 1, "dd" * 32))

    message, left = failing_rollback(fake_together, "dleft", job)

    assert message.startswith("smoke test of me/ew-dleft-e1 failed (500)")
    assert (f"deployment {left['name']} on endpoint me/ew-dleft-e1 is still live and may keep billing. "
            f"Stop it with: epochwise endpoints dleft --stop --deployment {left['name']}") in message
    assert left["autoscaling"] == {"minReplicas": 1, "maxReplicas": 1}
    assert fake_together.state.endpoints[left["endpointId"]]["trafficSplit"] == []  # that step did work
    assert endpoints_table("dleft")[-1]["state"] == "ROLLBACK FAILED"

    reaped = CliRunner().invoke(app, ["endpoints", "--reap"])  # the default age (6 h): it is minutes old

    assert reaped.exit_code == 0, reaped.output
    assert left["autoscaling"] == {"minReplicas": 0, "maxReplicas": 0}
    (healthy,) = [d for d in fake_together.state.deployments.values() if d["model"].endswith(other)]
    assert healthy["autoscaling"] == {"minReplicas": 1, "maxReplicas": 1}
    assert f"stopped {left['name']}" in reaped.output and "1 deployment(s) stopped" in reaped.output
    again = CliRunner().invoke(app, ["endpoints", "--reap"])
    assert again.exit_code == 0 and "0 deployment(s) stopped" in again.output


def test_recorded_leftovers_are_found_among_more_variables_than_one_request_returns():
    from prefect.variables import Variable

    from tasks.endpoints import _leftover_name, _leftovers

    fillers = [f"aa-filler-{i:03d}" for i in range(205)]  # sorted before ew-leftover-: the first page
    for name in fillers:
        Variable.set(name, {"not": "a leftover"}, overwrite=True)
    Variable.set(_leftover_name("dep-paged"), {"deployment_id": "dep-paged"}, overwrite=True)
    try:
        assert {"deployment_id": "dep-paged"} in _leftovers()
    finally:
        for name in [*fillers, _leftover_name("dep-paged")]:
            Variable.unset(name)


def test_the_stop_command_of_a_failed_rollback_stops_exactly_the_leftover(fake_together, tmp_path, monkeypatch):
    first = sdk_job(fake_together, tmp_path, epoch_suffix("exact", 1, "03" * 32))
    second = sdk_job(fake_together, tmp_path, epoch_suffix("exact", 1, "04" * 32))
    deploy_epoch("exact", job_id=first, deploy=DEPLOY, together=FAST)
    (old,) = fake_together.state.deployments
    fake_together.script.chat_errors = {"ew-exact-e1": 500}
    fake_together.burst(DEP_DELETE, [500] * 60)
    fake_together.burst(DEP_PATCH, [500] * 60)
    monkeypatch.setenv("EPOCHWISE_DEPLOY__POLL_S", "0.001")

    deployed = CliRunner().invoke(app, ["deploy", "exact", "--job-id", second])  # what the user sees

    fake_together.clear_bursts()
    assert deployed.exit_code == 1 and "Traceback" not in deployed.output
    (left,) = [d for d in fake_together.state.deployments.values() if d["model"].endswith(second)]
    (line,) = [x for x in deployed.output.splitlines() if x.startswith("error: ")]
    assert line.startswith("error: smoke test of me/ew-exact-e1 failed (500)") and "is still live" in line
    command = line.split("Stop it with: ")[1].split(" (")[0]
    assert command == f"epochwise endpoints exact --stop --deployment {left['name']}"

    stopped = CliRunner().invoke(app, command.split()[1:])

    assert stopped.exit_code == 0, stopped.output
    assert left["autoscaling"] == {"minReplicas": 0, "maxReplicas": 0}
    assert fake_together.state.deployments[old]["autoscaling"] == {"minReplicas": 1, "maxReplicas": 1}
    (endpoint,) = fake_together.state.endpoints.values()
    assert endpoint["trafficSplit"] == [{"deploymentId": old, "weight": 1}]  # the previous one serves again


def test_failed_deployment_is_deleted_and_its_message_fails_the_flow(fake_together, tmp_path):
    _, fold = train(fake_together, tmp_path, "dfail", {1: (2.0, 1.5)})
    fake_together.script.deployment_fail = "no H100 capacity in us-east (scripted)"

    state = deploy_epoch(str(fold), 1, deploy=DEPLOY, together=FAST, return_state=True)

    assert state.is_failed()
    with pytest.raises(Exception, match="no H100 capacity in us-east"):
        state.result()
    assert fake_together.state.deployments == {} and fake_together.state.chats == []


def test_the_ready_wait_rides_out_a_together_outage_and_nothing_is_rolled_back(fake_together, tmp_path):
    _, fold = train(fake_together, tmp_path, "doutage", {1: (2.0, 1.5)})
    fake_together.script.deployment_polls = 3
    # Down (connection refused) right after the first deployment status call, for OUTAGE_S seconds.
    fake_together.outage_after("GET /v2/projects/{project}/endpoints/{eid}/deployments/{did}", 1, OUTAGE_S)
    together = FAST.model_copy(update={"max_retries": 1, "outage_tolerance_s": 600})

    patient = DEPLOY.model_copy(update={"ready_deadline_s": 600})  # the outage counts towards the deadline
    state = deploy_epoch(str(fold), 1, deploy=patient, together=together, return_state=True)

    assert state.is_completed(), state.message
    (outage,) = fake_together.outages
    assert outage.seconds is not None and outage.seconds >= OUTAGE_S
    print(f"survived a {outage.seconds:.1f} s outage (connection refused)")  # shown with pytest -s
    (dep,) = fake_together.state.deployments.values()
    assert dep["status"]["state"] == "DEPLOYMENT_STATE_READY"
    assert fake_together.counts["POST /v2/projects/{project}/endpoints/{eid}/deployments"] == 1
    assert fake_together.counts["DELETE /v2/projects/{project}/endpoints/{eid}/deployments/{did}"] == 0
    assert [c["model"] for c in fake_together.state.chats] == ["me/ew-doutage-e1"]
    logs = run_logs(state)
    assert any(re.match(rf"Together unreachable since \d\d:\d\d; deployment {dep['id']} keeps starting", line)
               for line in logs)


def test_job_id_deploys_a_job_without_any_epoch_records(fake_together, tmp_path):
    job_id = sdk_job(fake_together, tmp_path, epoch_suffix("solo", 4, "ab" * 32))

    row = deploy_epoch("folds/solo", job_id=job_id, deploy=DEPLOY.model_copy(update={"max_replicas": 2}), together=FAST)

    assert row["endpoint"] == "me/ew-solo-e4" and row["replicas"] == "1-2" and row["state"] == "READY"
    (dep,) = fake_together.state.deployments.values()
    assert dep["model"] == f"projects/proj_1/models/ml_{job_id}"
    assert dep["autoscaling"] == {"minReplicas": 1, "maxReplicas": 2}


def test_a_retrained_epoch_replaces_the_old_deployment_on_the_same_endpoint(fake_together, tmp_path):
    first = sdk_job(fake_together, tmp_path, epoch_suffix("swap", 1, "01" * 32))
    second = sdk_job(fake_together, tmp_path, epoch_suffix("swap", 1, "02" * 32))
    deploy_epoch("folds/swap", job_id=first, deploy=DEPLOY, together=FAST)
    (old,) = fake_together.state.deployments

    deploy_epoch("folds/swap", job_id=second, deploy=DEPLOY, together=FAST)

    (endpoint,) = fake_together.state.endpoints.values()
    (dep,) = fake_together.state.deployments.values()
    assert dep["id"] != old and dep["model"] == f"projects/proj_1/models/ml_{second}"
    assert endpoint["name"] == "me/ew-swap-e1" and endpoint["trafficSplit"] == [{"deploymentId": dep["id"], "weight": 1}]


def test_without_an_epochs_artifact_the_best_epoch_comes_from_togethers_job_list(fake_together, tmp_path):
    fake_together.script.losses = {1: (2.0, 1.3), 2: (1.9, 1.6)}
    epoch1 = sdk_job(fake_together, tmp_path, epoch_suffix("listed", 1, "aa" * 32))
    sdk_job(fake_together, tmp_path, epoch_suffix("listed", 2, "bb" * 32), parent=epoch1)
    assert Artifact.get("listed-epochs") is None

    row = deploy_epoch("folds/listed", "best", deploy=DEPLOY, together=FAST)

    assert row["endpoint"] == "me/ew-listed-e1"
    (dep,) = fake_together.state.deployments.values()
    assert dep["model"] == f"projects/proj_1/models/ml_{epoch1}"


def test_cli_deploy_then_stop_leaves_zero_replicas(fake_together, tmp_path, monkeypatch):
    _, fold = train(fake_together, tmp_path, "dstop", {1: (2.0, 1.5), 2: (1.9, 1.4)})
    monkeypatch.setenv("EPOCHWISE_DEPLOY__POLL_S", "0.001")
    runner = CliRunner()

    deployed = runner.invoke(app, ["deploy", str(fold), "--epoch", "2"])
    assert deployed.exit_code == 0, deployed.output
    assert "me/ew-dstop-e2" in deployed.output and "pong" in deployed.output

    stopped = runner.invoke(app, ["endpoints", str(fold), "--stop"])
    assert stopped.exit_code == 0, stopped.output
    (dep,) = fake_together.state.deployments.values()
    assert dep["autoscaling"] == {"minReplicas": 0, "maxReplicas": 0}
    assert "stopped me/ew-dstop-e2/" in stopped.output

    shown = runner.invoke(app, ["endpoints", str(fold)])
    assert shown.exit_code == 0 and "0-0" in shown.output
    listed = runner.invoke(app, ["endpoints", str(fold), "--json"])  # for scripts
    assert listed.exit_code == 0, listed.output
    (endpoint,) = json.loads(listed.output)["endpoints"]
    assert (endpoint["endpoint"], endpoint["epoch"], endpoint["replicas"]) == ("me/ew-dstop-e2", "2", "0-0")

    # Deploying the stopped epoch again starts the same deployment instead of making a second one.
    redeployed = runner.invoke(app, ["deploy", str(fold), "--epoch", "2"])
    assert redeployed.exit_code == 0, redeployed.output
    assert list(fake_together.state.deployments) == [dep["id"]]
    assert dep["autoscaling"] == {"minReplicas": 1, "maxReplicas": 1}
    assert dep["status"]["state"] == "DEPLOYMENT_STATE_READY"


def test_cli_reap_stops_only_old_epochwise_endpoints(fake_together, tmp_path):
    client = sdk(fake_together)
    old_job = sdk_job(fake_together, tmp_path, epoch_suffix("reap", 1, "cd" * 32))
    young_job = sdk_job(fake_together, tmp_path, epoch_suffix("reap", 2, "ef" * 32))
    deploy_epoch("reap", job_id=old_job, deploy=DEPLOY, together=FAST)
    deploy_epoch("reap", job_id=young_job, deploy=DEPLOY, together=FAST)
    # Someone's own endpoint in the same project, just as old: never epochwise's to stop.
    mine = client.endpoints.create(name="my-chatbot")
    client.endpoints.deployments.create(mine.id, name="d1", model=f"projects/proj_1/models/ml_{old_job}",
                                        config="projects/proj_public/configs/cr_1",
                                        autoscaling={"min_replicas": 1, "max_replicas": 1})
    ten_hours_ago = (datetime.now(UTC) - timedelta(hours=10)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    by_name = {ep["name"]: ep for ep in fake_together.state.endpoints.values()}
    for name in ("me/ew-reap-e1", "me/my-chatbot"):
        by_name[name]["createdAt"] = ten_hours_ago

    result = CliRunner().invoke(app, ["endpoints", "--reap", "--older-than", "6h"])

    assert result.exit_code == 0, result.output
    scaling = {ep["name"]: [fake_together.state.deployments[d]["autoscaling"] for d in ep["deployments"]]
               for ep in fake_together.state.endpoints.values()}
    assert scaling == {
        "me/ew-reap-e1": [{"minReplicas": 0, "maxReplicas": 0}],
        "me/ew-reap-e2": [{"minReplicas": 1, "maxReplicas": 1}],
        "me/my-chatbot": [{"minReplicas": 1, "maxReplicas": 1}],
    }
    assert "1 deployment(s) stopped" in result.output


def test_local_fold_exports_the_best_epoch_merged_and_records_a_local_smoke_reply(tmp_path):
    from transformers import AutoModelForCausalLM

    from epochwise.config.train import HyperParams
    from tests.helpers import local_config

    fold = make_fold(tmp_path, "dlocal", "local-export", n_train=8, n_val=2)
    train = TrainConfig(backend="local", epochs=2, local_model="tiny",
                        hyper=HyperParams(learning_rate=2e-3, lr_scheduler="cosine", warmup_ratio=0.1, min_lr_ratio=0.1))
    records = epoch_train(str(fold), train=train, local=local_config(tmp_path))
    best = min(records, key=lambda r: r.val_loss)

    result = CliRunner().invoke(app, ["deploy", str(fold), "--epoch", "best"],
                                env={"EPOCHWISE_DEPLOY__SMOKE_MAX_TOKENS": "4"})

    assert result.exit_code == 0, result.output
    (row,) = endpoints_table("dlocal")
    assert row["state"] == "EXPORTED" and row["epoch"] == str(best.epoch) and row["model"] == best.model
    assert isinstance(row["smoke reply"], str) and f"exported epoch {best.epoch}" in result.output
    merged = AutoModelForCausalLM.from_pretrained(row["endpoint"])
    assert not any("lora" in name for name, _ in merged.named_parameters())
    export = Path(row["endpoint"])
    assert [p.name for p in export.parent.iterdir()] == [export.name]  # no temporary export left beside it
