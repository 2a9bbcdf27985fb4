"""``nightly-folds`` with ``fan_out=threads``: every fold's ``epoch-train`` runs as a subflow in a thread
of the nightly run's process, with the parameters its deployment would have run it with (from
``epochwise deployments apply``, against the test harness's API), one slot of the nightly limit each.

The real flows, the real ``together`` SDK against the fake; the cancel path of threaded chains runs in
``tests/e2e/test_cancel_together.py`` (it needs a worker's SIGTERM).
"""

from __future__ import annotations

import json

import pytest
from prefect.artifacts import Artifact
from prefect.client.orchestration import get_client

from deployments.apply import apply_all
from epochwise.config.ops import OpsConfig
from epochwise.config.settings import Settings
from epochwise.problems import UserError
from flows.nightly_folds import nightly_folds
from tests.helpers import FAST, make_fold, train_cfg


def test_threads_fan_out_trains_every_fold_as_a_subflow_with_its_deployments_parameters(fake_together, tmp_path):
    root = tmp_path / "threads-root"
    for name in ("thr-alpha", "thr-beta", "thr-gamma"):
        make_fold(root, name, f"threads-{name}")
    ops = OpsConfig(nightly_limit="nightly-threads-test", max_parallel_folds=2, nightly_fan_out="threads")
    apply_all(root, Settings(train=train_cfg(2), together=FAST, ops=ops), result_storage=str(tmp_path / "results"))
    make_fold(root, "thr-delta", "threads-delta")  # added after the apply: it runs with epoch-train/any-fold's parameters

    rows = nightly_folds(str(root), limit=ops.nightly_limit, fan_out="threads")

    assert {r["fold"] for r in rows} == {"thr-alpha", "thr-beta", "thr-gamma", "thr-delta"}
    assert all(r["state"] == "Completed" and r["deployment"] == "subflow" for r in rows), rows
    jobs = fake_together.state.jobs_in_order()
    assert len(jobs) == 8  # 4 folds x 2 epochs: the baked-in train.epochs, not the flow's default
    spans = []
    with get_client(sync_client=True) as client:
        for row in rows:
            name = row["fold"]
            child = client.read_flow_run(row["flow run id"])
            spans.append((child.start_time, child.end_time))
            assert child.parent_task_run_id is not None  # a subflow, shown under the nightly run in the UI
            assert child.state.is_completed() and child.name == name
            assert child.parameters["train"]["epochs"] == 2
            table = json.loads(Artifact.get(f"{name}-epochs").data)
            assert [row["epoch"] for row in table] == [1, 2]
    most_at_once = max(sum(1 for s, e in spans if s <= start < e) for start, _ in spans)
    assert most_at_once == 2  # threads as many as the limit's slots, and they did run side by side

    again = nightly_folds(str(root), limit=ops.nightly_limit, fan_out="threads")
    assert all(r["state"] == "Completed" for r in again)
    assert len(fake_together.state.jobs) == 8  # the rerun re-used every epoch: no new job


def test_threads_fan_out_runs_epoch_train_only_and_needs_its_limit(fake_together, tmp_path):
    root = tmp_path / "threads-refused"
    make_fold(root, "only", "threads-refused")
    ops = OpsConfig(nightly_limit="nightly-threads-refused", max_parallel_folds=1)
    apply_all(root, Settings(train=train_cfg(1), together=FAST, ops=ops), result_storage=str(tmp_path / "results"))

    state = nightly_folds(str(root), flow_name="sweep", limit=ops.nightly_limit, fan_out="threads", return_state=True)
    assert state.is_failed()
    with pytest.raises(UserError, match="epoch-train folds only"):
        state.result()
    state = nightly_folds(str(root), limit="no-such-limit", fan_out="threads", return_state=True)
    with pytest.raises(UserError, match="no global concurrency limit 'no-such-limit'"):
        state.result()
    assert fake_together.state.jobs == {}
