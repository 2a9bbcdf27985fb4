"""A command whose flow succeeded prints its result even when the flow's final state proposal was retried.

When the API is slow to answer the final ``Completed`` proposal (CI on 2 busy cores: the client's 60 s
timeout), the client sends it again; the API has already applied the first, so its orchestration rule
``PreventDuplicateTransitions`` rejects the second and answers with its own copy of the state, which
holds no result unless results are persisted. A command that read the value off that state failed
with ``MissingResult`` after the run had done its work (seen: ``epochwise deploy`` after the endpoint
went live). The fixture replays that exchange against the real test API: the proposal, then the same
proposal again, whose rejection is what the engine gets back."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from epochwise.cli import app
from tests.helpers import BASE, REPO, make_fold, train_with_losses


def lose_final_state_answers(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """From now on each final Completed proposal of a flow run reaches the API, but its answer is lost
    (a read timeout), so Prefect's client sends it again; returns the API's answers to those retries."""
    send = httpx.Client.send
    lost: list[httpx.Request] = []  # the proposals whose first answer was dropped
    answers: list[str] = []

    def lose_the_first_answer(self, request: httpx.Request, *args, **kwargs) -> httpx.Response:
        response = send(self, request, *args, **kwargs)
        if request.url.path.endswith("/set_state") and "/flow_runs/" in request.url.path:
            proposed = json.loads(request.content)["state"]["type"]
            if proposed == "COMPLETED" and request not in lost:
                lost.append(request)
                raise httpx.ReadTimeout("the answer was lost (simulated)", request=request)
            if request in lost:
                answers.append(response.json()["status"])
        return response

    monkeypatch.setattr(httpx.Client, "send", lose_the_first_answer)
    return answers


@pytest.fixture
def retried_final_state(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    return lose_final_state_answers(monkeypatch)


def test_prepare_prints_its_summary_after_a_retried_final_state(
    retried_final_state, tmp_path: Path, example_records: Path, monkeypatch
) -> None:
    monkeypatch.chdir(REPO)
    result = CliRunner().invoke(app, ["prepare", str(example_records), "--fold", str(tmp_path / "games")])
    assert retried_final_state == ["REJECT"]  # the retry reached the API, which refused the duplicate
    assert result.exit_code == 0, result.output
    assert "records read" in result.output and "360" in result.output


def fast_polls(monkeypatch) -> None:
    for name, value in {
        "TOGETHER__POLL_INITIAL_S": "0.005",
        "TOGETHER__POLL_MAX_S": "0.02",
        "TOGETHER__FILE_POLL_S": "0.005",
        "DEPLOY__POLL_S": "0.001",
    }.items():
        monkeypatch.setenv(f"EPOCHWISE_{name}", value)


def test_train_prints_its_epochs_after_a_retried_final_state(
    retried_final_state, fake_together, tmp_path: Path, monkeypatch
) -> None:
    fold = make_fold(tmp_path, "retried", "retried-train")
    fast_polls(monkeypatch)
    args = ["train", str(fold), "--backend", "together", "--base-model", BASE, "--epochs", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert retried_final_state == ["REJECT"]
    assert "retried: 1 epoch(s)" in result.output


def test_deploy_prints_its_endpoint_after_a_retried_final_state(fake_together, tmp_path: Path, monkeypatch) -> None:
    _, fold = train_with_losses(fake_together, tmp_path, "retried", {1: (2.0, 1.5)})
    fast_polls(monkeypatch)
    answers = lose_final_state_answers(monkeypatch)  # after training: only deploy-epoch's proposal
    result = CliRunner().invoke(app, ["deploy", str(fold), "--epoch", "1"])
    assert result.exit_code == 0, result.output
    assert answers == ["REJECT"]
    assert "me/ew-retried-e1" in result.output and "pong" in result.output
