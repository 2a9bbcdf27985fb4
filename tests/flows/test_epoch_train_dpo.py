"""``epoch-train --method dpo`` on the Together backend: the real flow, real Prefect (test harness), the
real ``together`` SDK against the fake server, which enforces Together's DPO rules (training_method on
the wire, no train_on_inputs, preference files only, from_checkpoint of an SFT job allowed)."""

from __future__ import annotations

import json
import signal

import pytest
from prefect.artifacts import Artifact
from typer.testing import CliRunner

from epochwise.cli import app
from epochwise.config.train import DPOParams
from epochwise.problems import InputError
from flows.deploy_epoch import deploy_epoch
from flows.epoch_train import epoch_train
from tests.helpers import BASE, DEPLOY, FAST, add_preference_files, epoch_train_child, make_fold, train_cfg, wait_for

DPO = DPOParams(beta=0.2, rpo_alpha=0.5)


def dpo_cfg(epochs: int, **kw):
    return train_cfg(epochs, method="dpo", dpo=DPO, **kw)


def test_dpo_epochs_are_chained_dpo_jobs_on_the_preference_files_and_a_rerun_creates_nothing(fake_together, tmp_path):
    fold = add_preference_files(make_fold(tmp_path, "prefs", "dpo-chain"), "dpo-chain")
    records = epoch_train(str(fold), dpo_cfg(2), FAST)

    jobs = fake_together.state.jobs_in_order()
    assert [r.epoch for r in records] == [1, 2] and [r.method for r in records] == ["dpo", "dpo"]
    assert [r.job_id for r in records] == [j.id for j in jobs]
    assert jobs[0].request["model"] == BASE and jobs[1].request["from_checkpoint"] == jobs[0].id
    for job in jobs:
        assert job.request["training_method"] == {
            "method": "dpo",
            "dpo_beta": 0.2,
            "dpo_normalize_logratios_by_length": False,
            "dpo_reference_free": False,
            "rpo_alpha": 0.5,
        }
        trained_on = fake_together.state.files[job.request["training_file"]]
        assert trained_on.filename.startswith("train_dpo-") and trained_on.dataset_format == "PREFERENCE_OPENAI"
        assert fake_together.state.files[job.request["validation_file"]].filename.startswith("val_dpo-")
    assert all(r.train_loss is not None and r.val_loss is not None for r in records)
    # The fake prices DPO at 2.5x its SFT price: the estimate was asked as a DPO job.
    assert [r.price_usd for r in records] == [3.75, 3.75]
    table = json.loads(Artifact.get("prefs-epochs").data)
    assert [row["method"] for row in table] == ["dpo", "dpo"]

    creates = fake_together.counts["POST /v1/fine-tunes"]
    again = epoch_train(str(fold), dpo_cfg(2), FAST)
    assert [r.job_id for r in again] == [r.job_id for r in records]
    assert fake_together.counts["POST /v1/fine-tunes"] == creates and fake_together.state.uploads == 2


def test_dpo_parameters_are_part_of_the_epoch_key(fake_together, tmp_path):
    fold = add_preference_files(tmp_path / "beta", "beta-key")
    first = epoch_train(str(fold), dpo_cfg(1), FAST)
    other = epoch_train(str(fold), train_cfg(1, method="dpo", dpo=DPOParams(beta=0.3)), FAST)

    assert first[0].job_id != other[0].job_id
    assert fake_together.state.jobs[other[0].job_id].request["training_method"]["dpo_beta"] == 0.3


def test_sft_then_dpo_continues_from_the_last_sft_job(fake_together, tmp_path):
    fold = make_fold(tmp_path, "switch", "sft-dpo")
    sft = epoch_train(str(fold), train_cfg(3), FAST)
    add_preference_files(fold, "sft-dpo")

    planned = CliRunner().invoke(
        app, ["plan", str(fold), "--backend", "together", "--method", "dpo", "-n", "5", "--base-model", BASE]
    )
    assert planned.exit_code == 0, planned.output
    assert "epochs 1-3 are recorded with another method" in planned.output
    epoch_rows = [line for line in planned.output.splitlines() if line.startswith("│ ") and "yes" in line]
    assert [row.split("│")[1].strip() for row in epoch_rows] == ["4", "5"]  # only the DPO epochs are priced

    records = epoch_train(str(fold), dpo_cfg(5), FAST)

    jobs = fake_together.state.jobs_in_order()
    assert len(jobs) == 5
    assert [r.method for r in records] == ["sft", "sft", "sft", "dpo", "dpo"]
    assert [r.job_id for r in records[:3]] == [r.job_id for r in sft]  # the SFT epochs as they were
    assert jobs[3].request["from_checkpoint"] == sft[2].job_id and "model" not in jobs[3].request
    assert jobs[4].request["from_checkpoint"] == jobs[3].id
    assert [j.request["training_method"]["method"] for j in jobs] == ["sft"] * 3 + ["dpo"] * 2
    assert all("train_on_inputs" not in j.request["training_method"] for j in jobs[3:])
    table = json.loads(Artifact.get("switch-epochs").data)
    assert [(row["epoch"], row["method"]) for row in table] == [
        (1, "sft"),
        (2, "sft"),
        (3, "sft"),
        (4, "dpo"),
        (5, "dpo"),
    ]
    assert [row["best"] for row in table].index("*") >= 3  # the best epoch is a DPO one (latest method)

    creates = fake_together.counts["POST /v1/fine-tunes"]
    again = epoch_train(str(fold), dpo_cfg(5), FAST)  # a rerun: every epoch found again, nothing created
    assert [r.job_id for r in again] == [r.job_id for r in records]
    fewer = epoch_train(str(fold), dpo_cfg(3), FAST)  # epochs 1-3 are SFT: nothing to train
    assert [r.job_id for r in fewer] == [r.job_id for r in sft]
    assert fake_together.counts["POST /v1/fine-tunes"] == creates


def test_dpo_on_chat_rows_fails_before_any_upload_naming_the_expected_format(fake_together, tmp_path):
    fold = make_fold(tmp_path, "chatonly", "dpo-on-chat")
    with pytest.raises(InputError) as caught:
        epoch_train(str(fold), dpo_cfg(1), FAST)
    message = str(caught.value)
    assert "train.jsonl:1: a chat row ('messages'), but DPO trains on preference rows" in message
    assert '"preferred_output"' in message
    assert fake_together.counts["POST /v1/files"] == 0 and not fake_together.state.jobs


def test_cli_train_dpo_on_chat_rows_is_a_clear_error_before_prefect_starts(fake_together, tmp_path):
    fold = make_fold(tmp_path, "clichat", "cli-dpo-chat")
    result = CliRunner().invoke(
        app, ["train", str(fold), "--backend", "together", "--method", "dpo", "--base-model", BASE]
    )
    assert result.exit_code != 0
    assert "but DPO trains on preference rows" in result.output and "Traceback" not in result.output
    assert fake_together.counts["POST /v1/files"] == 0


def test_dpo_sigkill_while_polling_then_rerun_reattaches_without_a_new_job(fake_together, tmp_path):
    fold = add_preference_files(tmp_path / "dkilled", "dpo-sigkill")
    fake_together.script.hold_jobs = True  # epoch 1 stays "running" until released
    child = epoch_train_child(fold, 2, method="dpo")
    try:
        wait_for(
            lambda: fake_together.counts["GET /v1/fine-tunes/{id}"] >= 5,
            "the flow process never started polling",
            alive=[child],
        )
        child.send_signal(signal.SIGKILL)
        child.wait()
    finally:
        if child.poll() is None:
            child.kill()
    (held,) = fake_together.state.jobs_in_order()
    assert held.status == "running" and held.request["training_method"]["method"] == "dpo"

    fake_together.release_jobs()
    records = epoch_train(str(fold), train_cfg(2, method="dpo"), FAST)

    assert records[0].job_id == held.id
    assert len(fake_together.state.jobs) == 2 and fake_together.state.uploads == 2


def test_a_dpo_epoch_deploys_like_an_sft_epoch(fake_together, tmp_path, monkeypatch):
    fold = make_fold(tmp_path, "dpodeploy", "dpo-deploy")
    epoch_train(str(fold), train_cfg(1), FAST)
    add_preference_files(fold, "dpo-deploy")
    records = epoch_train(str(fold), dpo_cfg(2), FAST)

    row = deploy_epoch(str(fold), "2", deploy=DEPLOY, together=FAST)

    (dep,) = fake_together.state.deployments.values()
    assert row["endpoint"] == "me/ew-dpodeploy-e2"
    assert dep["model"] == f"projects/proj_1/models/ml_{records[1].job_id}"
    assert dep["status"]["state"] == "DEPLOYMENT_STATE_READY"

    monkeypatch.setenv("EPOCHWISE_DEPLOY__POLL_S", "0.001")
    runner = CliRunner()
    best = runner.invoke(app, ["deploy", str(fold), "--epoch", "best"])  # best of the latest method: a DPO epoch
    assert best.exit_code == 0, best.output
    assert "me/ew-dpodeploy-e" in best.output and "me/ew-dpodeploy-e1" not in best.output
    status = runner.invoke(app, ["status", str(fold)])
    assert status.exit_code == 0, status.output
    assert "dpo" in status.output and "sft" in status.output


def test_the_budget_counts_the_sft_epochs_and_the_dearer_dpo_estimate(fake_together, tmp_path):
    fold = make_fold(tmp_path, "dbudget", "dpo-budget")
    epoch_train(str(fold), train_cfg(3), FAST)  # 3 x $1.50 at the fake's SFT price
    add_preference_files(fold, "dpo-budget")

    records = epoch_train(str(fold), dpo_cfg(5, budget_usd=9.0), FAST)

    # $4.50 spent; epoch 4 adds $3.75 (fits: $8.25), epoch 5 would reach $12.00: not submitted.
    assert [(r.epoch, r.method, r.price_usd) for r in records] == [
        (1, "sft", 1.5),
        (2, "sft", 1.5),
        (3, "sft", 1.5),
        (4, "dpo", 3.75),
    ]
    assert len(fake_together.state.jobs) == 4


def test_without_an_epochs_table_a_switched_chain_continues_from_togethers_job_list(fake_together, tmp_path):
    from together import Together

    from epochwise.together_api import epoch_suffix

    fake_together.script.file_polls, fake_together.script.job_polls_per_state = 0, 0
    client = Together(api_key=fake_together.api_key, base_url=fake_together.base_url, max_retries=0)
    chat = tmp_path / "chat.jsonl"
    chat.write_text(
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}) + "\n"
    )
    file_id = client.files.upload(chat).id
    parent = None
    for epoch in (1, 2):  # two SFT epochs of fold "listed" made elsewhere: no <fold>-epochs table here
        start = {"from_checkpoint": parent} if parent else {"model": BASE}
        parent = client.fine_tuning.create(
            training_file=file_id,
            suffix=epoch_suffix("listed", epoch, f"{epoch}" * 64),
            lora=True,
            train_on_inputs=False,
            **start,
        ).id
        client.fine_tuning.retrieve(parent)
    assert Artifact.get("listed-epochs") is None

    fold = add_preference_files(tmp_path / "listed", "listed")
    planned = CliRunner().invoke(
        app, ["plan", str(fold), "--backend", "together", "--method", "dpo", "-n", "3", "--base-model", BASE]
    )
    assert planned.exit_code == 0 and "epochs 1-2 are recorded with another method" in planned.output

    records = epoch_train(str(fold), dpo_cfg(3), FAST)

    assert [(r.epoch, r.method) for r in records] == [(1, "sft"), (2, "sft"), (3, "dpo")]
    (dpo_job,) = [j for j in fake_together.state.jobs.values() if j.request["training_method"]["method"] == "dpo"]
    assert dpo_job.request["from_checkpoint"] == parent and dpo_job.suffix.startswith("ew-listed-e3-")
    assert len(fake_together.state.jobs) == 3
