"""``evaluate-epochs`` on Together: the real flow and SDK against the fake server. An epoch's endpoint is
deployed for the evaluation (after the price check) and deleted when it ends, also when it fails midway;
a rerun asks only for the rows not answered before; a READY deployment is reused and left running."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from epochwise.cli import app
from epochwise.config.evaluate import EvaluateConfig
from epochwise.endpoints_api import EndpointFailure
from epochwise.evaluate import EvaluationError
from flows.deploy_epoch import deploy_epoch
from flows.evaluate_epochs import evaluate_epochs
from tests.flows.test_deploy_epoch import DEPLOY, train
from tests.flows.test_epoch_train_together import FAST, make_fold

NO_RETRY = FAST.model_copy(update={"max_retries": 0})  # a scripted 500 fails at once instead of after backoff
CREATE_DEPLOYMENT = "POST /v2/projects/{project}/endpoints/{eid}/deployments"


def billing(fake) -> list[str]:
    """Deployments that would bill: any left with replicas."""
    return [d["name"] for d in fake.state.deployments.values() if d["autoscaling"].get("maxReplicas", 0) > 0]


def prompts(fake, start: int = 0) -> list[str]:
    return [c["messages"][-1]["content"] for c in fake.state.chats[start:]]


@pytest.fixture
def trained(fake_together, tmp_path):
    _, fold = train(fake_together, tmp_path, "evt", {1: (2.0, 1.5), 2: (1.8, 1.2)})
    make_fold(tmp_path, "evo", "evaluate-other", n_val=2)
    # both folds' 2 val rows ask "What is i + i?" for i = 100, 101; the fake answers only 100 right
    fake_together.script.chat_answers = {"100 + 100": "200", "101 + 101": "999"}
    fake_together.script.chat_reply = "no idea"
    return fold, [str(tmp_path / "ev*")]


def test_each_epoch_is_deployed_scored_and_deleted_after(fake_together, trained):
    fold, on = trained
    evaluate = EvaluateConfig(metrics=["exact", "labels"], max_new_tokens=4, chunk_rows=2, concurrency=2)
    fake_together.burst("POST /v1/chat/completions", [429, 503])  # retried by the SDK, answered once each
    summary = evaluate_epochs(str(fold), on, evaluate, DEPLOY, FAST)

    values = {(r["epoch"], r["eval fold"], r["metric"]): r["value"] for r in summary["rows"]}
    # evt's 2 val rows: 100 right, 101 wrong; evo's 2 val rows: the same questions (content differs by system prompt)
    for epoch in (1, 2):
        assert values[(epoch, "evt", "exact")] == 0.5 and values[(epoch, "evo", "exact")] == 0.5
        # labels 200, 202 vs replies 200, 999: per label P/R = (1,1), (0,0), (0,0) -> macro 1/3
        assert values[(epoch, "evt", "precision")] == pytest.approx(1 / 3, abs=1e-4)
    assert len(fake_together.state.chats) == 2 * 4  # 2 epochs x 4 rows, each answered once
    assert fake_together.counts["POST /v1/chat/completions"] == 2 * 4 + 2  # plus the 429 and the 503
    assert {c["model"] for c in fake_together.state.chats} == {"me/ew-evt-e1", "me/ew-evt-e2"}
    assert all(c["temperature"] == 0 and c["max_tokens"] == 4 for c in fake_together.state.chats)
    assert fake_together.counts[CREATE_DEPLOYMENT] == 2
    assert fake_together.state.deployments == {} and fake_together.state.endpoints == {}  # nothing left billing

    # both epochs score the same mean exact: best-eval takes the earlier one
    assert summary["best_eval_epoch"] == 1
    row = deploy_epoch(str(fold), "best-eval", deploy=DEPLOY, together=FAST)
    assert row["endpoint"] == "me/ew-evt-e1" and row["epoch"] == "1"


def test_best_eval_without_an_evaluation_says_what_to_run(fake_together, tmp_path):
    _, fold = train(fake_together, tmp_path, "nevt", {1: (2.0, 1.5)})
    with pytest.raises(
        EvaluationError, match=r"no nevt-evaluation table: run `epochwise evaluate .*nevt --on \.\.\.` first"
    ):
        deploy_epoch(str(fold), "best-eval", deploy=DEPLOY, together=FAST)
    assert fake_together.state.deployments == {}


def test_a_failure_midway_deletes_the_deployment_and_the_rerun_asks_only_the_rest(fake_together, trained):
    fold, on = trained
    evaluate = EvaluateConfig(epochs="2", metrics=["exact"], max_new_tokens=4, chunk_rows=1, concurrency=1)
    fake_together.script.chat_prompt_errors = {"101 + 101": 500}  # evo is scored first: its 2nd row fails
    with pytest.raises(EndpointFailure, match=r"chat completion on me/ew-evt-e2 failed \(500\)"):
        evaluate_epochs(str(fold), on, evaluate, DEPLOY, NO_RETRY)
    assert billing(fake_together) == [] and fake_together.state.deployments == {}
    assert len(fake_together.state.chats) == 1  # evo's first row was answered (and cached)

    fake_together.script.chat_prompt_errors = {}
    asked = len(fake_together.state.chats)
    summary = evaluate_epochs(str(fold), on, evaluate, DEPLOY, NO_RETRY)
    assert len(fake_together.state.chats) - asked == 3  # the 4 rows less the one answered before
    assert [(r["fold"], r["generated"], r["reused"]) for r in summary["results"]] == [("evo", 1, 1), ("evt", 2, 0)]
    assert fake_together.state.deployments == {}


def test_a_deployment_that_never_gets_ready_is_deleted_and_nothing_is_asked(fake_together, trained):
    fold, on = trained
    fake_together.script.deployment_fail = "no capacity in us-east"
    with pytest.raises(EndpointFailure, match="no capacity in us-east"):
        evaluate_epochs(str(fold), on, EvaluateConfig(metrics=["exact"]), DEPLOY, FAST)
    assert fake_together.counts[CREATE_DEPLOYMENT] == 1 and fake_together.state.chats == []
    assert fake_together.state.deployments == {} and fake_together.state.endpoints == {}


def test_a_ready_deployment_is_reused_and_left_running(fake_together, trained):
    fold, on = trained
    deploy_epoch(str(fold), 1, deploy=DEPLOY, together=FAST)
    (dep,) = fake_together.state.deployments.values()
    evaluate = EvaluateConfig(epochs="1", metrics=["contains"], max_new_tokens=4)
    evaluate_epochs(str(fold), on, evaluate, DEPLOY, FAST)
    assert fake_together.counts[CREATE_DEPLOYMENT] == 1 and list(fake_together.state.deployments) == [dep["id"]]
    assert billing(fake_together) == [dep["name"]]  # it was up before: the evaluation leaves it as it was


def test_the_budget_stops_before_anything_is_deployed(fake_together, trained):
    fold, on = trained
    # 1x H100 at $3.99/h; a deployment that has to start bills ~10 min: about $0.67 before any token
    evaluate = EvaluateConfig(metrics=["exact"], budget_usd=0.5)
    with pytest.raises(EvaluationError, match=r"evaluating evt epoch 1 .*about \$0\.\d\d.*budget of \$0\.50"):
        evaluate_epochs(str(fold), on, evaluate, DEPLOY, FAST)
    assert fake_together.counts[CREATE_DEPLOYMENT] == 0 and fake_together.state.chats == []


def test_cli_names_the_estimate_and_checks_metrics_before_deploying(fake_together, trained):
    fold, on = trained
    runner = CliRunner()
    bad = runner.invoke(app, ["evaluate", str(fold), "--on", on[0], "--metric", "no_such_module_xyz:score"])
    assert bad.exit_code == 1 and "cannot import no_such_module_xyz" in bad.output and "Traceback" not in bad.output
    over = runner.invoke(app, ["evaluate", str(fold), "--on", on[0], "--budget", "0.5", "--max-new-tokens", "4"])
    assert over.exit_code == 1, over.output
    assert re.search(
        r"evaluating evt epoch 1 on 1x_nvidia_h100_80gb_sxm \(~\d+ tokens, ~10 min of endpoint time at "
        r"\$3\.99/h: about \$0\.67\) with \$0\.00 already estimated would go over the budget of \$0\.50",
        over.output,
    ), over.output
    assert "Traceback" not in over.output
    assert fake_together.counts[CREATE_DEPLOYMENT] == 0 and fake_together.state.chats == []
