"""Cancelling a Together-backend run cancels its job, by every path: Ctrl-C on ``epochwise train``, the
SIGTERM of a cancel, the ``on_cancellation`` hook and the ``job-reaper`` flow; a run that crashed (or got
a SIGTERM that was no cancel) leaves its job running and the next run re-attaches.

The real flow and tasks on Prefect's test harness, the real SDK against the fake server; flow runs that
must be killed run in a child process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.states import Cancelled, Cancelling, Crashed, Running
from together import Together

from epochwise import together_api as api
from epochwise.io import sha256_file
from epochwise.job_owners import job_tag, suffix_tag
from flows.epoch_train import epoch_train
from flows.job_reaper import job_reaper
from tasks.cancellation import cancel_owned_jobs
from tests.fake_together.server import FakeJob, FakeTogether
from tests.helpers import BASE, FAST, epoch_train_child, make_fold, train_cfg, wait_for

START_S = 180  # hang guard for a child process to reach a running job, not a speed assertion


def held_jobs(fake: FakeTogether, tmp_path: Path, *suffixes: str) -> list[str]:
    """Jobs created straight through the SDK (as another run would have), held at "running"."""
    fake.script.hold_jobs = True
    fold = make_fold(tmp_path, "held", "held-" + suffixes[0])
    client = Together(api_key=fake.api_key, base_url=fake.base_url)
    path = fold / "train.jsonl"
    remote = api.upload_file(client, path, sha256_file(path), FAST, log=lambda _: None)
    ids = [client.fine_tuning.create(training_file=remote.id, model=BASE, suffix=s, lora=True).id for s in suffixes]
    for job_id in ids:
        while client.fine_tuning.retrieve(job_id).status != "running":  # pending -> queued -> running (held)
            pass
    return ids


def owner_run(job_ids: list[str], state, parameters: dict | None = None):
    """A flow run tagged as the owner of ``job_ids``, put in ``state``."""
    with get_client(sync_client=True) as prefect:
        run = prefect.create_flow_run(
            job_reaper, tags=[job_tag(j) for j in job_ids], parameters=parameters or {}, state=Running()
        )
        prefect.set_flow_run_state(run.id, state, force=True)
        return prefect.read_flow_run(run.id)


def test_job_reaper_cancels_only_jobs_whose_newest_owner_was_cancelled(fake_together, tmp_path):
    cancelled, cancelling, crashed, reattached, orphan, foreign = held_jobs(
        fake_together,
        tmp_path,
        "ew-reap-e1-00000001",
        "ew-reap-e1-00000002",
        "ew-reap-e1-00000003",
        "ew-reap-e1-00000004",
        "ew-reap-e1-00000005",
        "not-epochwise",
    )
    owner_run([cancelled, reattached, foreign], Cancelled())
    owner_run([cancelling], Cancelling())
    owner_run([crashed], Crashed())  # machine lost: the next run re-attaches
    owner_run([reattached], Running())  # a newer run took the job over

    assert sorted(job_reaper(FAST)) == sorted([cancelled, cancelling])
    status = {
        j: fake_together.state.jobs[j].status for j in (cancelled, cancelling, crashed, reattached, orphan, foreign)
    }
    assert status == {
        cancelled: "cancel_requested",
        cancelling: "cancel_requested",
        crashed: "running",
        reattached: "running",
        orphan: "running",
        foreign: "running",
    }
    assert job_reaper(FAST) == []  # nothing left to cancel: a cancel-requested job is not cancelled twice


def test_on_cancellation_hook_cancels_the_runs_live_jobs(fake_together, tmp_path):
    live, done = held_jobs(fake_together, tmp_path, "ew-hook-e1-00000001", "ew-hook-e2-00000002")
    fake_together.state.jobs[done].status = "completed"
    run = owner_run([live, done], Cancelling(), {"together": FAST.model_dump(mode="json")})

    cancel_owned_jobs(epoch_train, run, Cancelling())

    assert fake_together.state.jobs[live].status == "cancel_requested"
    assert fake_together.state.jobs[done].status == "completed"
    assert fake_together.counts["POST /v1/fine-tunes/{id}/cancel"] == 1


def running_job(fake: FakeTogether, child: subprocess.Popen) -> tuple[FakeJob, str]:
    """The child's job once it is running and recorded on its flow run; returns (job, flow run id)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    def recorded() -> tuple[FakeJob, str] | None:
        jobs = [j for j in fake.state.jobs.values() if j.status == "running"]
        if not jobs:
            return None
        with get_client(sync_client=True) as prefect:
            runs = prefect.read_flow_runs(
                flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[job_tag(jobs[0].id)]))
            )
        return (jobs[0], str(runs[0].id)) if runs else None

    return wait_for(recorded, "the flow process never reached a running job", alive=[child], timeout_s=START_S)


@pytest.mark.parametrize("cancelled", [True, False], ids=["cancel", "shutdown"])
def test_sigterm_cancels_the_job_only_when_the_run_was_cancelled(fake_together, tmp_path, cancelled: bool):
    fold = make_fold(tmp_path, "termed", f"sigterm-{cancelled}")
    fake_together.script.hold_jobs = True
    child = epoch_train_child(fold, 1)
    try:
        job, flow_run_id = running_job(fake_together, child)
        if cancelled:  # what `prefect flow-run cancel` does before the worker's SIGTERM
            with get_client(sync_client=True) as prefect:
                prefect.set_flow_run_state(flow_run_id, Cancelling(), force=True)
        child.send_signal(signal.SIGTERM)
        child.wait(timeout=START_S)
    finally:
        if child.poll() is None:
            child.kill()
    if cancelled:
        assert job.cancelled_at is not None and job.status == "cancel_requested"
        return
    assert job.cancelled_at is None and job.status == "running"  # a shutdown is a crash: re-attach
    fake_together.release_jobs()
    [record] = epoch_train(str(fold), train_cfg(1), FAST)
    assert record.job_id == job.id and len(fake_together.state.jobs) == 1


def test_a_cancel_while_the_create_is_in_flight_cancels_the_job_it_made(fake_together, tmp_path):
    """The SIGTERM of a cancel arrives after Together made the job, before its reply reached the run:
    the run never recorded the job, and finds it in Together's list by the suffix it sent."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    fold = make_fold(tmp_path, "inflight", "create-in-flight")
    fake_together.script.hold_jobs = True
    fake_together.script.create_reply_delay_s = 60.0  # longer than the test waits: the reply never arrives
    child = epoch_train_child(fold, 1)
    try:
        wait_for(
            lambda: fake_together.state.jobs, "the flow process never sent its create", alive=[child], timeout_s=START_S
        )
        (job,) = fake_together.state.jobs.values()
        with get_client(sync_client=True) as prefect:
            (run,) = prefect.read_flow_runs(
                flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[suffix_tag(job.suffix)]))
            )
            assert job_tag(job.id) not in run.tags  # the create has not returned
            prefect.set_flow_run_state(run.id, Cancelling(), force=True)
        child.send_signal(signal.SIGTERM)
        child.wait(timeout=START_S)
    finally:
        if child.poll() is None:
            child.kill()
    assert job.cancelled_at is not None and job.status == "cancel_requested"


def test_the_reaper_finds_the_owner_of_a_job_whose_create_reply_was_cut_off_by_its_suffix(fake_together, tmp_path):
    (job_id,) = held_jobs(fake_together, tmp_path, "ew-held-e1-9a9a9a9a")
    with get_client(sync_client=True) as prefect:
        run = prefect.create_flow_run(job_reaper, tags=[suffix_tag("ew-held-e1-9a9a9a9a")], state=Running())
        prefect.set_flow_run_state(run.id, Cancelled(), force=True)
    assert job_reaper(FAST) == [job_id]
    assert fake_together.state.jobs[job_id].status == "cancel_requested"


def test_ctrl_c_on_epochwise_train_cancels_its_job(fake_together, tmp_path):
    fold = make_fold(tmp_path, "ctrlc", "ctrl-c")
    fake_together.script.hold_jobs = True
    home = tmp_path / "prefect-home"  # the CLI's own ephemeral API, as on a user's machine
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        EPOCHWISE_TOGETHER__POLL_INITIAL_S="0.05",
        EPOCHWISE_TOGETHER__POLL_MAX_S="0.1",
        EPOCHWISE_TOGETHER__FILE_POLL_S="0.05",
        COLUMNS="200",
    )
    out = tmp_path / "cli.log"
    with out.open("w") as log:
        # Its own session: Ctrl-C reaches the CLI's whole process group (its ephemeral server too), as in a terminal.
        child = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "epochwise"),
                "train",
                str(fold),
                "--backend",
                "together",
                "--epochs",
                "1",
                "--base-model",
                BASE,
            ],
            env=env,
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for(
            lambda: any(j.status == "running" for j in fake_together.state.jobs.values()),
            "the flow process never reached a running job",
            alive=[child],
            explain=out.read_text,
            timeout_s=START_S,
        )
        [job] = fake_together.state.jobs.values()
        os.killpg(child.pid, signal.SIGINT)
        try:
            child.wait(timeout=START_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running {START_S} s after Ctrl-C:\n{out.read_text()}") from None
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
    output = out.read_text()
    assert job.cancelled_at is not None and job.status == "cancel_requested", output
    assert f"cancelling Together job {job.id}" in output, output
    # The temporary API server runs in its own session, so Ctrl-C leaves it up while the run ends:
    # one line and exit code 130, not minutes of retries against a dead API with tracebacks.
    assert child.returncode == 130, output
    assert "Traceback" not in output and output.splitlines()[-1] == "interrupted", output
