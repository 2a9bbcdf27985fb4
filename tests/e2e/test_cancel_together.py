"""Cancelling a Together-backend run on a real server and process worker cancels its Together job; a
crashed run's job runs on and the next run re-attaches to it.

    prefect server start; epochwise deployments apply; prefect worker start --pool epochwise
    prefect deployment run epoch-train/games    (Together backend, the fake holds the job "running")
    prefect flow-run cancel <id>                -> the fake records POST /v1/fine-tunes/<job>/cancel

The fake Together server runs in this test process; the worker and its flow runs reach it through the
SDK's own TOGETHER_BASE_URL.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from epochwise.job_owners import job_tag
from tests.e2e.processes import Prefect, Worker, start_worker, stop, tail
from tests.fake_together.server import FakeJob, FakeTogether
from tests.helpers import wait_for

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
RECORDS = REPO / "examples" / "records" / "games"
UUID = re.compile(r"UUID: ([0-9a-f-]{36})")
BASE = "meta-llama/Meta-Llama-3.1-8B-Instruct-Reference"
HANG_S = 300  # hang guard for the flow run to reach a running job, not a speed assertion
CANCEL_GUARD_S = 180  # hang guard for the job's cancel; the measured seconds are printed

TOGETHER_TRAINING = {
    "train": {"backend": "together", "epochs": 1, "base_model": BASE},
    "together": {"poll_initial_s": 0.5, "poll_max_s": 1.0, "file_poll_s": 0.2},
    "deploy": {"poll_s": 0.5},
}


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeTogether]:
    with FakeTogether(api_key="fake-key-e2e-cancel") as server:
        yield server


@pytest.fixture(scope="module")
def site(prefect_server: Prefect, fake: FakeTogether, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("site-together")
    folds = root / "folds"
    config = root / "epochwise.yaml"
    config.write_text(yaml.safe_dump(yaml.safe_load((REPO / "epochwise.yaml").read_text()) | TOGETHER_TRAINING))
    prefect_server.env.update(
        TOGETHER_BASE_URL=fake.base_url,
        TOGETHER_API_KEY=fake.api_key,
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
    )
    prefect_server.run(
        "epochwise",
        "prepare",
        str(RECORDS / "nim.jsonl"),
        "--fold",
        str(folds / "games"),
        "--config",
        str(config),
        cwd=root,
    )
    # No active schedules: the job-reaper must not run on its own while a test measures the cancel path.
    prefect_server.run(
        "epochwise",
        "deployments",
        "apply",
        "--folds-root",
        str(folds),
        "--config",
        str(config),
        "--schedule",
        "none",
        cwd=root,
    )
    return {"root": root, "folds": folds, "config": config}


@pytest.fixture(scope="module")
def worker(prefect_server: Prefect, site: dict[str, Path]) -> Iterator[Worker]:
    started = start_worker(prefect_server, "epochwise", site["root"] / "worker.log")
    try:
        yield started
    finally:
        stop(started.process)


def deployment_run(prefect: Prefect, name: str, *params: str) -> str:
    """``prefect deployment run <name> [--param k=v ...]``; returns the new flow run's id."""
    out = prefect.run("prefect", "deployment", "run", name, *(a for p in params for a in ("--param", p))).stdout
    match = UUID.search(out)
    assert match, out
    return match.group(1)


def running_job(
    prefect: Prefect, fake: FakeTogether, flow_run_id: str, worker: Worker, known: set[str], suffix: str = "ew-"
) -> FakeJob:
    """Wait until the run's (new) job, its suffix starting with ``suffix``, is running at the fake and a
    run has recorded it in its tags: the run itself, or a subflow of it."""

    def recorded() -> FakeJob | None:
        jobs = [
            j
            for j in fake.state.jobs.values()
            if j.id not in known and j.status == "running" and (j.suffix or "").startswith(suffix)
        ]
        if jobs:
            runs = [flow_run_id] + [c["id"] for c in subflows(prefect, flow_run_id)]
            if any(job_tag(jobs[0].id) in prefect.get(f"/flow_runs/{run}")["tags"] for run in runs):
                return jobs[0]
        run = prefect.get(f"/flow_runs/{flow_run_id}")
        assert run["state"]["type"] not in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"), (
            run["state"],
            tail(worker.log),
        )
        return None

    return wait_for(recorded, "no running job", explain=lambda: tail(worker.log), timeout_s=HANG_S, every_s=0.2)


def subflows(prefect: Prefect, flow_run_id: str) -> list[dict]:
    return prefect.post("/flow_runs/filter", {"flow_runs": {"parent_flow_run_id": {"any_": [flow_run_id]}}})


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc), children first."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def test_cancelling_a_deployment_run_cancels_its_together_job(
    prefect_server: Prefect, fake: FakeTogether, worker: Worker, capsys
):
    fake.script.hold_jobs = True
    flow_run_id = deployment_run(prefect_server, "epoch-train/games")
    job = running_job(prefect_server, fake, flow_run_id, worker, set())

    cancelled_from = time.time()
    prefect_server.run("prefect", "flow-run", "cancel", flow_run_id)
    wait_for(
        lambda: job.cancelled_at is not None,
        f"job {job.id} not cancelled",
        explain=lambda: tail(worker.log),
        timeout_s=CANCEL_GUARD_S,
        every_s=0.1,
    )
    seconds = job.cancelled_at - cancelled_from
    with capsys.disabled():
        print(f"\ncancel -> fake's POST /v1/fine-tunes/{job.id}/cancel: {seconds:.1f} s")

    run = prefect_server.wait_for_run(flow_run_id, worker.log)
    assert run["state"]["type"] == "CANCELLED", run["state"]
    assert fake.counts["POST /v1/fine-tunes/{id}/cancel"] >= 1
    assert len(fake.state.jobs) == 1  # nothing created after the cancel

    # The backstop finds nothing left to cancel, and the run's record survives for it.
    reaper = prefect_server.wait_for_run(deployment_run(prefect_server, "job-reaper/frequent"), worker.log)
    assert reaper["state"]["type"] == "COMPLETED", (reaper["state"], tail(worker.log))
    assert fake.state.jobs[job.id].status in ("cancel_requested", "cancelled")
    assert job_tag(job.id) in prefect_server.get(f"/flow_runs/{flow_run_id}")["tags"]


def test_a_crashed_runs_job_is_not_reaped_and_the_next_run_reattaches(
    prefect_server: Prefect, fake: FakeTogether, worker: Worker
):
    fake.script.hold_jobs = True
    before = set(fake.state.jobs)
    flow_run_id = deployment_run(prefect_server, "epoch-train/games")
    job = running_job(prefect_server, fake, flow_run_id, worker, before)

    for pid in descendants(worker.process.pid):  # the flow run's processes die; the worker survives
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    crashed = prefect_server.wait_for_run(flow_run_id, worker.log)
    assert crashed["state"]["type"] == "CRASHED", crashed["state"]

    reaper = prefect_server.wait_for_run(deployment_run(prefect_server, "job-reaper/frequent"), worker.log)
    assert reaper["state"]["type"] == "COMPLETED", (reaper["state"], tail(worker.log))
    assert job.cancelled_at is None and fake.state.jobs[job.id].status == "running"

    fake.release_jobs()
    rerun = prefect_server.wait_for_run(deployment_run(prefect_server, "epoch-train/games"), worker.log)
    assert rerun["state"]["type"] == "COMPLETED", (rerun["state"], tail(worker.log))
    assert set(fake.state.jobs) - before == {job.id}  # re-attached: no second job
    assert fake.state.jobs[job.id].status == "completed"
    [latest, *_] = prefect_server.artifacts("games-epochs")
    assert [row["job"] for row in json.loads(latest["data"])] == [job.id]


def test_cancelling_a_threaded_nightly_run_cancels_its_folds_jobs(
    prefect_server: Prefect, fake: FakeTogether, worker: Worker, site: dict[str, Path], capsys
):
    # fan_out=threads: the fold's chain is a subflow in a thread of the nightly run's process, which the
    # worker's SIGTERM reaches only in its main thread; that thread cancels the chain's job.
    chess = site["folds"] / "chess"  # a fold of its own, added after the apply (games may be trained already)
    chess.mkdir()
    shutil.copy(site["folds"] / "games" / "val.jsonl", chess / "val.jsonl")
    rows = (site["folds"] / "games" / "train.jsonl").read_text().splitlines(keepends=True)
    (chess / "train.jsonl").write_text("".join(rows[:-1]))  # other bytes: epoch keys are content-addressed
    fake.script.hold_jobs = True
    before = set(fake.state.jobs)
    nightly_id = deployment_run(prefect_server, "nightly-folds/nightly", "fan_out=threads")
    job = running_job(prefect_server, fake, nightly_id, worker, before, suffix="ew-chess-")
    [child] = [c for c in subflows(prefect_server, nightly_id) if c["name"] == "chess"]
    assert child["deployment_id"] is None  # a subflow of the nightly run, not a deployment run on the worker
    assert job_tag(job.id) in prefect_server.get(f"/flow_runs/{child['id']}")["tags"]

    cancelled_from = time.time()
    at_cancel = set(fake.state.jobs)
    prefect_server.run("prefect", "flow-run", "cancel", nightly_id)
    wait_for(
        lambda: job.cancelled_at is not None,
        f"job {job.id} not cancelled",
        explain=lambda: tail(worker.log),
        timeout_s=CANCEL_GUARD_S,
        every_s=0.1,
    )
    with capsys.disabled():
        print(
            f"\nthreaded nightly cancel -> fake's POST /v1/fine-tunes/{job.id}/cancel: {job.cancelled_at - cancelled_from:.1f} s"
        )

    run = prefect_server.wait_for_run(nightly_id, worker.log)
    assert run["state"]["type"] == "CANCELLED", run["state"]
    assert set(fake.state.jobs) == at_cancel  # no job created after the cancel
    assert all(j.status in ("cancel_requested", "cancelled") for j in fake.state.jobs.values() if j.id not in before)
    fake.release_jobs()


def test_two_deploy_epoch_runs_on_the_worker_make_one_endpoint_under_its_server_lease(
    prefect_server: Prefect, fake: FakeTogether, worker: Worker, site: dict[str, Path]
):
    """``prefect deployment run deploy-epoch/any-fold`` twice at once on the worker: one endpoint and one
    deployment, the second run finding the first one's. The endpoint's lock is a file lock plus, with
    this real server, a lease (a global concurrency limit of one slot): the lease path runs here against
    a real server and is released. On one worker the file lock alone already serializes the two runs;
    the lease is what serializes two workers on two hosts (the two-host SFT test covers that path)."""
    fake.release_jobs()
    fake.script.hold_jobs = False
    trained = prefect_server.wait_for_run(deployment_run(prefect_server, "epoch-train/games"), worker.log)
    assert trained["state"]["type"] == "COMPLETED", (trained["state"], tail(worker.log))
    endpoints = "POST /v2/projects/{project}/endpoints"
    deployments = "POST /v2/projects/{project}/endpoints/{eid}/deployments"
    before = (fake.counts[endpoints], fake.counts[deployments])

    fold = f"fold={site['folds'] / 'games'}"
    runs = [deployment_run(prefect_server, "deploy-epoch/any-fold", fold, "epoch=1") for _ in range(2)]
    for run_id in runs:
        run = prefect_server.wait_for_run(run_id, worker.log)
        assert run["state"]["type"] == "COMPLETED", (run["state"], tail(worker.log))

    assert (fake.counts[endpoints], fake.counts[deployments]) == (before[0] + 1, before[1] + 1)
    (endpoint,) = [e for e in fake.state.endpoints.values() if e["name"] == "me/ew-games-e1"]
    (deployment,) = endpoint["deployments"]
    assert fake.state.deployments[deployment]["status"]["state"] == "DEPLOYMENT_STATE_READY"
    lease = prefect_server.get("/v2/concurrency_limits/epochwise-endpoint-ew-games-e1")
    assert lease["limit"] == 1 and lease["active_slots"] == 0  # taken on the server, released by both runs
