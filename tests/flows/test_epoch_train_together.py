"""``epoch-train`` on the Together backend: the real flow, real Prefect (test harness), the real
``together`` SDK against the fake server on 127.0.0.1. Jobs advance one state per status call and the
flow polls every few milliseconds, so an epoch takes a fraction of a second."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import pytest
from prefect.artifacts import Artifact
from prefect.settings import (
    PREFECT_API_URL,
    PREFECT_HOME,
    PREFECT_RESULTS_LOCAL_STORAGE_PATH,
    PREFECT_SERVER_DATABASE_CONNECTION_URL,
)

from epochwise.problems import UserError
from flows.epoch_train import epoch_train
from tests.fake_together.server import FakeTogether
from tests.helpers import BASE, FAST, OUTAGE_S, Hosts, epoch_train_child, make_fold, run_logs, train_cfg, wait_for


def progress_artifacts() -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterType

    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(type=ArtifactFilterType(any_=["progress"])))


def jobs_for(fake: FakeTogether, epoch: int) -> list:
    return [j for j in fake.state.jobs.values() if f"-e{epoch}-" in (j.suffix or "")]


def test_three_epochs_two_uploads_three_chained_jobs_then_a_noop_rerun(fake_together, tmp_path):
    fold = make_fold(tmp_path, "games", "chain")
    records = epoch_train(str(fold), train_cfg(3), FAST)

    assert [r.epoch for r in records] == [1, 2, 3]
    assert all(r.status == "completed" and r.val_loss is not None and r.train_loss is not None for r in records)
    assert fake_together.state.uploads == 2
    jobs = fake_together.state.jobs_in_order()
    assert len(jobs) == 3
    assert jobs[0].request["model"] == BASE and "from_checkpoint" not in jobs[0].request
    assert jobs[1].request["from_checkpoint"] == jobs[0].id
    assert jobs[2].request["from_checkpoint"] == jobs[1].id
    for job in jobs:
        assert job.request["n_epochs"] == 1 and job.request["n_evals"] >= 1
        assert job.request["validation_file"] and job.request["training_type"]["type"] == "Lora"
    assert [r.job_id for r in records] == [j.id for j in jobs]
    assert records[2].model == jobs[2].output_name
    table = json.loads(Artifact.get("games-epochs").data)
    assert [row["job"] for row in table] == [j.id for j in jobs]
    progress = {a.description: a.data for a in progress_artifacts() if jobs[0].id in (a.description or "")}
    assert progress == {f"games epoch 1: job {jobs[0].id} completed": 100.0}  # one per job, not one per poll

    creates, upload_posts = fake_together.counts["POST /v1/fine-tunes"], fake_together.counts["POST /v1/files"]
    estimates = fake_together.counts["POST /v1/fine-tunes/estimate-price"]
    again = epoch_train(str(fold), train_cfg(3), FAST)
    assert [r.job_id for r in again] == [r.job_id for r in records]
    assert fake_together.state.uploads == 2 and len(fake_together.state.jobs) == 3
    assert fake_together.counts["POST /v1/fine-tunes"] == creates
    assert fake_together.counts["POST /v1/files"] == upload_posts
    assert fake_together.counts["POST /v1/fine-tunes/estimate-price"] == estimates


def test_more_epochs_later_trains_only_the_new_ones(fake_together, tmp_path):
    fold = make_fold(tmp_path, "more", "more-epochs")
    first = epoch_train(str(fold), train_cfg(3), FAST)
    later = epoch_train(str(fold), train_cfg(5), FAST)

    assert [r.job_id for r in later[:3]] == [r.job_id for r in first]
    jobs = fake_together.state.jobs_in_order()
    assert len(jobs) == 5 and fake_together.state.uploads == 2
    assert jobs[3].request["from_checkpoint"] == first[2].job_id
    assert jobs[4].request["from_checkpoint"] == jobs[3].id


def test_rate_limits_server_errors_and_a_lost_create_reply_make_no_duplicates(fake_together, tmp_path):
    fold = make_fold(tmp_path, "bursty", "bursts")
    fake_together.burst("POST /v1/files", [500, 429])
    fake_together.burst("GET /v1/fine-tunes", [429, 503])
    fake_together.burst("GET /v1/fine-tunes/{id}", [500, 429, 502])
    fake_together.burst("POST /v1/fine-tunes/estimate-price", [429])
    # Together creates the job but the reply is lost: the SDK must not blindly retry the create.
    fake_together.script.create_then_500 = 1

    records = epoch_train(str(fold), train_cfg(3), FAST)

    assert [r.status for r in records] == ["completed"] * 3
    assert fake_together.state.uploads == 2
    assert [len(jobs_for(fake_together, e)) for e in (1, 2, 3)] == [1, 1, 1]
    assert fake_together.counts["POST /v1/fine-tunes"] == 3  # no retry of the create whose reply was lost


def test_failed_epoch_fails_the_flow_and_the_rerun_resubmits_only_that_epoch(fake_together, tmp_path):
    fold = make_fold(tmp_path, "flaky", "fail-e2")
    fake_together.fail_jobs("-e2-", "CUDA out of memory on node 7 (scripted)")

    state = epoch_train(str(fold), train_cfg(3), FAST, return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match="CUDA out of memory on node 7"):
        state.result()
    assert [len(jobs_for(fake_together, e)) for e in (1, 2, 3)] == [1, 1, 0]
    (failed,) = jobs_for(fake_together, 2)
    assert failed.status == "error"
    table = json.loads(Artifact.get("flaky-epochs").data)
    assert [(row["epoch"], row["status"], row["job"]) for row in table][1] == (2, "error", failed.id)

    records = epoch_train(str(fold), train_cfg(3), FAST)
    assert [len(jobs_for(fake_together, e)) for e in (1, 2, 3)] == [1, 2, 1]
    epoch1, retried = jobs_for(fake_together, 1)[0], jobs_for(fake_together, 2)[1]
    assert retried.request["from_checkpoint"] == epoch1.id
    assert records[1].job_id == retried.id
    assert fake_together.state.uploads == 2


def test_budget_stops_before_submitting_the_epoch_that_would_exceed_it(fake_together, tmp_path):
    fold = make_fold(tmp_path, "cheap", "budget")
    fake_together.script.price_per_epoch_usd = 1.5
    records = epoch_train(str(fold), train_cfg(3, budget_usd=4.0), FAST)

    assert [r.epoch for r in records] == [1, 2]
    assert len(fake_together.state.jobs) == 2


def test_a_full_fine_tune_is_budgeted_at_the_full_price(fake_together, tmp_path):
    fold = make_fold(tmp_path, "full", "budget-full")
    fake_together.script.price_per_epoch_usd = 1.5  # LoRA; a full epoch is 4x that (6.0)
    full = train_cfg(3, budget_usd=10.0)
    full.hyper.lora = False
    records = epoch_train(str(fold), full, FAST)

    assert [r.epoch for r in records] == [1]  # 6 spent; another 6 would pass 10 (at the LoRA price: 3 epochs)
    assert [j.request["training_type"] for j in fake_together.state.jobs.values()] == [{"type": "Full"}]


def test_stop_when_val_worsens(fake_together, tmp_path):
    fold = make_fold(tmp_path, "plateau", "val-worsens")
    fake_together.script.losses = {1: (2.0, 1.5), 2: (1.8, 1.6), 3: (1.7, 1.7), 4: (1.6, 1.4)}
    records = epoch_train(str(fold), train_cfg(4, stop_when_val_worsens=2), FAST)

    assert [r.val_loss for r in records] == [1.5, 1.6, 1.7]
    assert len(fake_together.state.jobs) == 3


def test_invalid_fold_fails_before_any_upload(fake_together, tmp_path):
    fold = make_fold(tmp_path, "broken", "invalid")
    with open(fold / "train.jsonl", "a") as handle:
        handle.write('{"messages": [{"role": "assistant", "content": "hi"}]}\n')
    state = epoch_train(str(fold), train_cfg(1), FAST, return_state=True)

    assert state.is_failed()
    with pytest.raises(Exception, match=r"train.jsonl:7"):
        state.result()
    assert fake_together.state.uploads == 0 and sum(fake_together.counts.values()) == 0


def test_settings_outside_togethers_limits_fail_before_any_upload(fake_together, tmp_path):
    fold = make_fold(tmp_path, "wide", "limits")
    state = epoch_train(str(fold), train_cfg(2, hyper={"lora_r": 128, "n_checkpoints": 50}), FAST, return_state=True)

    assert state.is_failed()
    with pytest.raises(
        Exception, match=r"refuse every job on .*n_checkpoints 50 .*lora_r 128 is above Together's max_rank 64"
    ) as failed:
        state.result()
    assert isinstance(failed.value, UserError)  # the CLI shows the message, not a traceback
    assert fake_together.state.uploads == 0 and fake_together.counts["POST /v1/files"] == 0
    assert not fake_together.state.jobs


def test_no_api_key_under_prefect_home_or_result_storage(fake_together, tmp_path, monkeypatch):
    wandb_key = "wandb-secret-" + "51d2e8aa90"
    monkeypatch.setenv("WANDB_API_KEY", wandb_key)
    fold = make_fold(tmp_path, "secret", "no-secrets")
    epoch_train(str(fold), train_cfg(2, wandb_project="epochwise-tests"), FAST)

    assert all(job.request.get("wandb_key") == wandb_key for job in fake_together.state.jobs.values())
    assert fake_together.state.jobs_in_order()[1].request["wandb_name"] == "secret-epoch-2"
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # logs reach the database in batches; make sure they are there
    database = PREFECT_SERVER_DATABASE_CONNECTION_URL.value().split("///", 1)[-1]  # the harness's SQLite file
    roots = {Path(PREFECT_HOME.value()), Path(PREFECT_RESULTS_LOCAL_STORAGE_PATH.value()), Path(database).parent}
    job_id, seen_job_id = fake_together.state.jobs_in_order()[0].id.encode(), False
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                seen_job_id |= job_id in data
                assert fake_together.api_key.encode() not in data, path
                assert wandb_key.encode() not in data, path
    assert seen_job_id  # the scan did read the run's records


def test_sigkill_while_polling_then_rerun_reattaches_without_a_new_job(fake_together, tmp_path):
    fold = make_fold(tmp_path, "killed", "sigkill")
    fake_together.script.hold_jobs = True  # epoch 1 stays "running" until released
    child = epoch_train_child(fold, 2)
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
    assert len(fake_together.state.jobs) == 1 and fake_together.state.jobs_in_order()[0].status == "running"

    fake_together.release_jobs()
    records = epoch_train(str(fold), train_cfg(2), FAST)

    first = fake_together.state.jobs_in_order()[0]
    assert records[0].job_id == first.id
    assert [len(jobs_for(fake_together, e)) for e in (1, 2)] == [1, 1]
    assert fake_together.state.uploads == 2


def test_cli_train_status_deploy_info_and_abort(fake_together, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from epochwise.cli import app

    for field, value in {"POLL_INITIAL_S": "0.005", "POLL_MAX_S": "0.02", "FILE_POLL_S": "0.005"}.items():
        monkeypatch.setenv(f"EPOCHWISE_TOGETHER__{field}", value)
    fold = make_fold(tmp_path, "clifold", "cli")
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "train",
            str(fold),
            "--backend",
            "together",
            "--epochs",
            "2",
            "--base-model",
            BASE,
            "--lr",
            "2e-4",
            "--batch-size",
            "16",
            "--lora-r",
            "8",
            "--warmup-ratio",
            "0.1",
        ],
    )
    assert result.exit_code == 0, result.output
    jobs = fake_together.state.jobs_in_order()
    assert len(jobs) == 2 and jobs[0].request["learning_rate"] == 2e-4 and jobs[0].request["batch_size"] == 16
    assert jobs[0].request["training_type"]["lora_r"] == 8 and jobs[0].request["warmup_ratio"] == 0.1
    assert jobs[1].output_name in result.output

    before = sum(fake_together.counts.values())
    result = runner.invoke(app, ["status", str(fold)])
    assert result.exit_code == 0, result.output
    assert jobs[1].id in result.output and sum(fake_together.counts.values()) == before  # no Together call

    listed = fake_together.counts["GET /v1/fine-tunes"]
    result = runner.invoke(app, ["status", str(fold), "--sync", "--json"])
    assert result.exit_code == 0, result.output
    assert fake_together.counts["GET /v1/fine-tunes"] > listed  # --sync reads Together's list itself
    synced = [(row["epoch"], row["job"], row["recorded"]) for row in json.loads(result.output)["together"]]
    assert synced == [(1, jobs[0].id, "yes"), (2, jobs[1].id, "yes")]
    result = runner.invoke(app, ["status", str(fold), "--sync"])
    assert result.exit_code == 0, result.output
    assert "jobs at Together" in result.output and "no jobs at Together" not in result.output

    result = runner.invoke(app, ["deploy-info", str(fold), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["model"] == jobs[1].output_name and info["job"] == jobs[1].id  # val loss falls: epoch 2 is best

    # A job still running for this fold (e.g. a killed run's) is cancelled by abort; other folds' are not.
    fake_together.script.hold_jobs = True
    from together import Together

    client = Together(api_key=fake_together.api_key, base_url=fake_together.base_url)
    files = [f.id for f in fake_together.state.files.values()]
    live = client.fine_tuning.create(training_file=files[0], model=BASE, suffix="ew-clifold-e3-0123abcd", lora=True)
    other = client.fine_tuning.create(training_file=files[0], model=BASE, suffix="ew-other-e1-0123abcd", lora=True)
    result = runner.invoke(app, ["abort", str(fold)])
    assert result.exit_code == 0, result.output
    assert fake_together.state.jobs[live.id].status == "cancel_requested"
    assert fake_together.state.jobs[other.id].status == "pending"


def test_cli_train_reports_bad_data_before_anything_else(fake_together, tmp_path):
    from typer.testing import CliRunner

    from epochwise.cli import app

    fold = make_fold(tmp_path, "clibad", "cli-bad")
    (fold / "val.jsonl").write_text('{"messages": "not a list"}\n')
    result = CliRunner().invoke(app, ["train", str(fold), "--backend", "together", "--base-model", BASE])
    assert result.exit_code == 1
    assert "val.jsonl:1" in result.output
    assert sum(fake_together.counts.values()) == 0


def test_gpt_oss_base_models_upload_harmony_parquet(fake_together, tmp_path):
    fold = make_fold(tmp_path, "oss", "gpt-oss")
    records = epoch_train(str(fold), train_cfg(1).model_copy(update={"base_model": "openai/gpt-oss-20b"}), FAST)

    assert records[0].status == "completed"
    uploaded = sorted(f.filename for f in fake_together.state.files.values())
    assert [re.sub(r"-[0-9a-f]{16}\.", ".", name) for name in uploaded] == [
        "train_harmony.parquet",
        "val_harmony.parquet",
    ]
    assert all(f.processing_status == "COMPLETED" for f in fake_together.state.files.values())
    assert fake_together.state.jobs_in_order()[0].request["model"] == "openai/gpt-oss-20b"


def test_two_runs_of_one_fold_at_once_submit_each_epoch_once(fake_together, tmp_path):
    import threading

    fold = make_fold(tmp_path, "twins", "concurrent")
    fake_together.script.job_polls_per_state = 3
    results: dict[int, object] = {}

    def run(i: int) -> None:
        results[i] = epoch_train(str(fold), train_cfg(2), FAST, return_state=True)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert all(state.is_completed() for state in results.values())
    assert [len(jobs_for(fake_together, e)) for e in (1, 2)] == [1, 1]
    assert fake_together.state.uploads == 2
    assert results[0].result()[1].job_id == results[1].result()[1].job_id


def test_a_cached_upload_deleted_at_together_is_uploaded_again(fake_together, tmp_path):
    fold = make_fold(tmp_path, "gone", "file-gone")
    first = epoch_train(str(fold), train_cfg(1), FAST)
    train_id = fake_together.state.jobs_in_order()[0].request["training_file"]
    del fake_together.state.files[train_id]  # deleted (or expired) at Together

    records = epoch_train(str(fold), train_cfg(2), FAST)
    assert fake_together.state.uploads == 3
    assert records[0].job_id == first[0].job_id  # epoch 1 is keyed on content, not on the file id
    second = fake_together.state.jobs_in_order()[1]
    assert second.request["training_file"] != train_id and second.request["training_file"] in fake_together.state.files


def test_an_outage_while_a_job_is_polled_is_ridden_out_and_the_job_is_not_duplicated(fake_together, tmp_path):
    fold = make_fold(tmp_path, "outage", "outage-ridden")
    # Down (connection refused) right after epoch 1's second status call, for OUTAGE_S seconds.
    fake_together.outage_after("GET /v1/fine-tunes/{id}", 2, OUTAGE_S)
    together = FAST.model_copy(update={"max_retries": 1, "outage_tolerance_s": 600})

    state = epoch_train(str(fold), train_cfg(2), together, return_state=True)

    assert state.is_completed()
    records = state.result()
    (outage,) = fake_together.outages
    assert outage.seconds is not None and outage.seconds >= OUTAGE_S
    print(f"survived a {outage.seconds:.1f} s outage (connection refused)")  # shown with pytest -s
    assert [r.status for r in records] == ["completed"] * 2
    assert [len(jobs_for(fake_together, e)) for e in (1, 2)] == [1, 1]
    assert fake_together.counts["POST /v1/fine-tunes"] == 2 and fake_together.state.uploads == 2
    first = fake_together.state.jobs_in_order()[0].id
    logs = run_logs(state)
    assert any(re.match(rf"Together unreachable since \d\d:\d\d; job {first} keeps running", line) for line in logs)
    assert any(line.startswith("Together reachable again") for line in logs)


def test_an_outage_longer_than_the_tolerance_fails_the_run_and_the_rerun_reattaches(fake_together, tmp_path):
    fold = make_fold(tmp_path, "longout", "outage-too-long")
    fake_together.outage_after("GET /v1/fine-tunes/{id}", 2, seconds=6)
    impatient = FAST.model_copy(update={"max_retries": 0, "outage_tolerance_s": 1})

    state = epoch_train(str(fold), train_cfg(1), impatient, return_state=True)

    assert state.is_failed()
    (job,) = fake_together.state.jobs_in_order()
    with pytest.raises(Exception, match="rerun re-attaches") as failure:
        state.result()
    assert f"job {job.id} keeps running at Together" in str(failure.value)
    assert fake_together.base_url in str(failure.value) and "outage_tolerance_s=1" in str(failure.value)

    fake_together.wait_up()
    records = epoch_train(str(fold), train_cfg(1), FAST)
    assert records[0].job_id == job.id and records[0].status == "completed"
    assert len(fake_together.state.jobs) == 1 and fake_together.counts["POST /v1/fine-tunes"] == 1


def test_a_rerun_without_result_storage_finds_the_uploads_in_togethers_list(fake_together, tmp_path):
    from prefect.settings import temporary_settings

    fold = make_fold(tmp_path, "newhost", "storage-wiped")
    first = epoch_train(str(fold), train_cfg(1), FAST)
    files = {f.id for f in fake_together.state.files.values()}
    posts, lists = fake_together.counts["POST /v1/files"], fake_together.counts["GET /v1/files"]

    # A second machine (or a wiped volume): empty result storage, so no upload cache record at all.
    storage = tmp_path / "new-host-storage"
    with temporary_settings({PREFECT_RESULTS_LOCAL_STORAGE_PATH: storage}):
        again = epoch_train(str(fold), train_cfg(1), FAST)

    assert any(storage.iterdir())  # that run did keep its records there, not in the old storage
    assert fake_together.state.uploads == 2 and fake_together.counts["POST /v1/files"] == posts
    assert fake_together.counts["GET /v1/files"] == lists + 2  # one listing per file found again
    assert {f.id for f in fake_together.state.files.values()} == files
    assert again[0].job_id == first[0].job_id and len(fake_together.state.jobs) == 1


def test_two_hosts_training_the_same_folds_at_once_keep_one_job_per_epoch(fake_together, tmp_path):
    """Two hosts with no shared lock or cache (each its own ephemeral API) train the same 3 folds for 2
    epochs against one Together account whose job list lags creates. Host B starts once host A created
    its first jobs. The list shows no job until both hosts created their epoch 1 jobs (a lag longer than
    B's start, however slow the machine), so B's look-ups find nothing and B creates too; after that each
    new job shows 5 s after its create. The oldest job of each epoch survives, the other is cancelled,
    and both hosts end on the same chain of jobs."""
    fake_together.script.list_hold_creates = 6  # 3 folds x 2 hosts
    fake_together.script.list_delay_s = 5.0
    folds = [str(make_fold(tmp_path / "folds", f"race{i}", f"two-hosts-{i}")) for i in range(3)]
    hosts = Hosts(tmp_path, ["host-a", "host-b"], folds, epochs=2)
    try:
        hosts.wait_ready()
        hosts.go(0)
        hosts.wait_for(lambda: fake_together.counts["POST /v1/fine-tunes"] >= 3, "host A created no epoch 1 jobs")
        hosts.go(1)
        reported = hosts.finish()
    finally:
        hosts.kill()

    created = {}
    for fold in folds:
        name = Path(fold).name
        chain = []
        for epoch in (1, 2):
            jobs = fake_together.job_by_suffix(f"ew-{name}-e{epoch}-")
            survivors = [j for j in jobs if j.status not in ("cancelled", "cancel_requested")]
            assert len(survivors) == 1, [(j.id, j.status) for j in jobs]
            assert survivors[0].status == "completed"
            assert survivors[0] is min(jobs, key=lambda j: (j.created_at, j.id))  # the oldest one was kept
            chain.append(survivors[0].id)
            created[f"{name} e{epoch}"] = len(jobs)
        assert reported[0][name] == reported[1][name] == chain  # both hosts recorded the surviving chain
        assert fake_together.state.jobs[chain[1]].request["from_checkpoint"] == chain[0]
    print("jobs created per fold and epoch:", created)
    assert max(created.values()) == 2  # the race did happen: host B created duplicates, which were cancelled


def test_two_workers_of_one_prefect_server_create_each_epoch_once(fake_together, tmp_path):
    """Two hosts sharing a Prefect server (the test harness) but no file lock start 2 folds at the same
    moment, with Together's job list lagging creates by 3 s: the per-fold server lease, held until the
    list shows the new job, makes the second host re-attach instead of creating."""
    from prefect.client.orchestration import get_client

    fake_together.script.list_delay_s = 3.0
    folds = [str(make_fold(tmp_path / "folds", f"lease{i}", f"server-lease-{i}")) for i in range(2)]
    hosts = Hosts(tmp_path, ["worker-a", "worker-b"], folds, epochs=2, api_url=PREFECT_API_URL.value())
    try:
        hosts.wait_ready()
        hosts.go(0)
        hosts.go(1)
        reported = hosts.finish()
    finally:
        hosts.kill()

    assert len(fake_together.state.jobs) == 4 and fake_together.counts["POST /v1/fine-tunes"] == 4
    assert all(job.status == "completed" for job in fake_together.state.jobs.values())
    for fold in folds:
        name = Path(fold).name
        chain = [fake_together.job_by_suffix(f"ew-{name}-e{epoch}-")[0].id for epoch in (1, 2)]
        assert reported[0][name] == reported[1][name] == chain
    with get_client(sync_client=True) as client:
        for name in ("lease0", "lease1"):
            limit = client.read_global_concurrency_limit_by_name(f"epochwise-fold-{name}")
            assert limit.limit == 1 and limit.active_slots == 0  # held on the server, released by both
