"""A flow whose caller reads its return value keeps that value readable from the state the API holds.

When a client's final state proposal times out after the server committed it (a busy server: the
default `PREFECT_API_REQUEST_TIMEOUT` is 60 s), the client's retry carries the same transition id and
Prefect's `PreventDuplicateTransitions` rule rejects it, answering with the run's state as the API
holds it. Without a persisted result that state has no data and `state.result()` raises
`MissingResult`: a CI run once failed `epochwise deploy` this way after the endpoint was live. These
tests read each flow's completed state back from the API, the state such a retry returns."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect.client.orchestration import get_client
from prefect.states import State

from flows.deploy_epoch import deploy_epoch
from flows.endpoint_reaper import endpoint_reaper
from flows.epoch_train import epoch_train
from flows.prepare_fold import prepare_fold
from tests.flows.test_prepare_flow import GAMES_DATA
from tests.helpers import DEPLOY, FAST, make_fold, train_cfg


def api_state(state: State) -> State:
    """The run's state as the Prefect API returns it (no data from this process's memory)."""
    with get_client(sync_client=True) as client:
        return client.read_flow_run(state.state_details.flow_run_id).state


def read_back(state: State) -> Any:
    assert state.is_completed(), state
    return api_state(state).result()


def test_prepare_fold_result_reads_back_from_the_api(tmp_path: Path, example_records: Path) -> None:
    state = prepare_fold(str(example_records), str(tmp_path / "games"), GAMES_DATA, return_state=True)

    assert read_back(state) == state.result()
    assert read_back(state).records_read == 360


def test_epoch_train_deploy_and_reaper_results_read_back_from_the_api(fake_together, tmp_path: Path) -> None:
    fake_together.script.losses = {1: (2.0, 1.5), 2: (1.9, 1.4)}
    fold = make_fold(tmp_path, "readback", "flow-results-readback")

    trained = epoch_train(str(fold), train_cfg(2), FAST, return_state=True)
    records = read_back(trained)
    assert [r.epoch for r in records] == [1, 2] and records == trained.result()

    deployed = deploy_epoch(str(fold), "2", deploy=DEPLOY, together=FAST, return_state=True)
    assert read_back(deployed)["endpoint"] == "me/ew-readback-e2"

    reaped = endpoint_reaper(0, DEPLOY, FAST, return_state=True)
    assert read_back(reaped) == reaped.result() and len(reaped.result()) == 1
