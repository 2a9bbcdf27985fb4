"""``sweep`` on the Together backend: the real flow, each trial a real ``epoch-train`` subflow, the real
``together`` SDK against the fake server. The fake's validation loss depends on each job's learning
rate (far from 1e-4 is worse) and on its depth in the chain, so the median pruner has bad chains to stop.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from collections import Counter

from prefect.artifacts import Artifact

from epochwise import sweep as sw
from epochwise.config.sweep import SweepConfig
from flows.deploy_epoch import deploy_epoch
from flows.sweep import sweep
from tests.fake_together.server import FakeTogether
from tests.helpers import DEPLOY, FAST, REPO, make_fold, train_cfg, wait_for

RATES = [1e-4, 3e-4, 3e-5, 1e-3, 1e-5, 5e-5]
SPACE = {"train.hyper.learning_rate": RATES, "train.epochs": 3}


def lr_loss(body: dict, depth: int) -> tuple[float, float]:
    """(train, val) loss of a job: best at lr 1e-4, improving with each epoch of the chain."""
    miss = abs(math.log10(float(body["learning_rate"])) + 4)
    val = round(1.0 + 0.8 * miss + 0.6 / depth, 4)
    return round(val - 0.1, 4), val


def suffix_counts(fake: FakeTogether) -> Counter:
    return Counter(j.suffix for j in fake.state.jobs_in_order())


def all_val_losses(fake: FakeTogether) -> list[float]:
    return [lr_loss(j.request, j.depth)[1] for j in fake.state.jobs_in_order()]


def test_median_pruner_stops_bad_chains_before_their_next_job(fake_together, tmp_path):
    fake_together.script.loss_for = lr_loss
    fold = make_fold(tmp_path, "swp", "sweep-prune")
    cfg = SweepConfig(trials=6, sampler="grid", parallel=1, pruner_startup_trials=2)

    result = sweep(str(fold), SPACE, "lr", cfg, train_cfg(3), FAST)

    study = sw.load_trials(fold, "lr")
    assert study is not None
    trials = study[1]
    states = {t.number: sw.trial_state(t) for t in trials}
    assert len(trials) == 6 and set(states.values()) <= {"complete", "pruned"}
    pruned = [n for n, s in states.items() if s == "pruned"]
    assert pruned, states
    # a pruned chain stopped before its next epoch's job: it has fewer than 3 epochs, one job each
    epochs = {t.number: len(sw.trial_epochs(t, "swp")) for t in trials}
    assert all(epochs[n] < 3 for n in pruned) and all(epochs[n] == 3 for n in states if n not in pruned)
    assert len(fake_together.state.jobs) == sum(epochs.values()) < 18
    assert max(suffix_counts(fake_together).values()) == 1
    assert fake_together.state.uploads == 2  # the fold's two files, once for the whole sweep
    # the best (trial, epoch) is the lowest validation loss of every epoch of every trial
    assert result["best"]["val_loss"] == min(all_val_losses(fake_together))
    best_trial = next(t for t in trials if t.number == result["best"]["trial"])
    assert best_trial.params["train.hyper.learning_rate"] == 1e-4 and result["best"]["epoch"] == 3
    rows = json.loads(Artifact.get("swp-sweep").data)
    assert [r["trial"] for r in rows] == list(range(6))
    assert {r["state"] for r in rows} == {"complete", "pruned"}
    assert (fold / "sweeps" / "lr" / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    plot = Artifact.get("swp-sweep-plot").data
    assert "data:image/png;base64," in plot

    # deploy: `--epoch best` is the sweep's best (the fold has no chain of its own), `--trial T --epoch N` one epoch
    deploy_epoch(str(fold), "best", deploy=DEPLOY, together=FAST)
    deployed = [d["model"] for d in fake_together.state.deployments.values()]
    assert deployed == [f"projects/proj_1/models/ml_{result['best']['job_id']}"]
    loser = next(t for t in trials if t.number == pruned[0])
    deploy_epoch(str(fold), 1, trial=loser.number, deploy=DEPLOY, together=FAST)
    job = sw.trial_epochs(loser, "swp")[0].job_id
    assert [d["model"] for d in fake_together.state.deployments.values()][-1] == f"projects/proj_1/models/ml_{job}"


def test_budget_admits_no_trial_whose_chain_would_exceed_it(fake_together, tmp_path):
    fake_together.script.loss_for = lr_loss
    fold = make_fold(tmp_path, "bud", "sweep-budget")
    cfg = SweepConfig(trials=6, sampler="grid", parallel=1, pruner_startup_trials=1, budget_usd=12.0)

    sweep(str(fold), SPACE, "lr", cfg, train_cfg(3), FAST)

    trials = sw.load_trials(fold, "lr")[1]
    chain = 3 * fake_together.script.price_per_epoch_usd  # Together's estimate of one 3-epoch chain
    paid = sum(r.price_usd for t in trials for r in sw.trial_epochs(t, "bud"))
    assert paid == 1.5 * len(fake_together.state.jobs) <= 12.0
    assert len(trials) < 6  # the sweep stopped asking: the next chain would not have fitted
    assert paid + chain > 12.0
    assert "pruned" in {sw.trial_state(t) for t in trials}  # pruned chains left room for more trials
    assert max(suffix_counts(fake_together).values()) == 1


def test_budget_stops_a_chain_before_an_epoch_that_would_exceed_it(fake_together, tmp_path):
    """Together's price went up after the sweep priced its chains: the trial's own budget (what the
    sweep's budget leaves it) stops the chain before the epoch that would exceed it."""

    def dearer(body: dict, depth: int) -> tuple[float, float]:
        fake_together.script.price_per_epoch_usd = 4.0
        return lr_loss(body, depth)

    fake_together.script.loss_for = dearer
    fold = make_fold(tmp_path, "dear", "sweep-dearer")
    cfg = SweepConfig(trials=3, sampler="grid", parallel=1, budget_usd=6.0)

    sweep(str(fold), SPACE, "lr", cfg, train_cfg(3), FAST)

    (trial,) = sw.load_trials(fold, "lr")[1]  # a second chain (~$4.50 estimated) did not fit any more
    assert sw.trial_state(trial) == "budget"
    assert [r.price_usd for r in sw.trial_epochs(trial, "dear")] == [1.5, 4.0]  # epoch 3 ($4) not submitted
    assert len(fake_together.state.jobs) == 2


def sweep_child(fold, cfg: SweepConfig) -> subprocess.Popen:
    """The sweep in a child process sharing this test's Prefect API and result storage (to SIGKILL it)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_RESULTS_LOCAL_STORAGE_PATH

    params = {
        "fold": str(fold),
        "space": SPACE,
        "name": "lr",
        "sweep": cfg.model_dump(mode="json"),
        "train": train_cfg(3).model_dump(mode="json"),
        "together": FAST.model_dump(mode="json"),
    }
    env = {
        **os.environ,
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(PREFECT_RESULTS_LOCAL_STORAGE_PATH.value()),
        "PYTHONPATH": str(REPO),
    }
    code = "import json,sys; from flows.sweep import sweep; sweep(**json.loads(sys.argv[1]))"
    return subprocess.Popen([sys.executable, "-c", code, json.dumps(params)], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_killed_sweep_resumes_without_a_duplicate_job_and_ends_with_the_same_best(fake_together, tmp_path):
    cfg = SweepConfig(trials=6, sampler="grid", parallel=1, pruner_startup_trials=2)
    fake_together.script.loss_for = lr_loss
    reference = sweep(str(make_fold(tmp_path, "ref", "sweep-resume")), SPACE, "lr", cfg, train_cfg(3), FAST)
    before = len(fake_together.state.jobs)

    finished: set[str] = set()

    def hold_after_first_trial(body: dict, depth: int) -> tuple[float, float]:
        finished.add(body["suffix"])
        if len(finished) == 3:  # the first trial's chain is done: the next job stays "running"
            fake_together.script.hold_jobs = True
        return lr_loss(body, depth)

    fake_together.script.loss_for = hold_after_first_trial
    fold = make_fold(tmp_path, "kil", "sweep-killed")  # losses depend on lr and depth only: same as "ref"
    child = sweep_child(fold, cfg)
    try:
        wait_for(
            lambda: fake_together.script.hold_jobs
            and len(fake_together.state.jobs) == before + 4
            and fake_together.state.jobs_in_order()[-1].polls >= 3,
            "the sweep never reached its second trial",
            alive=[child],
        )
        child.send_signal(signal.SIGKILL)
        child.wait()
    finally:
        if child.poll() is None:
            child.kill()
    held = fake_together.state.jobs_in_order()[-1]
    assert held.status == "running"
    trials = sw.load_trials(fold, "lr")[1]
    assert [sw.trial_state(t) for t in trials] == ["complete", "running"]

    fake_together.release_jobs()
    fake_together.script.loss_for = lr_loss
    creates = fake_together.counts["POST /v1/fine-tunes"]
    resumed = sweep(str(fold), SPACE, "lr", cfg, train_cfg(3), FAST)

    jobs = fake_together.state.jobs_in_order()[before:]
    assert max(Counter(j.suffix for j in jobs).values()) == 1  # no duplicate job for any epoch
    assert fake_together.counts["POST /v1/fine-tunes"] - creates == len(jobs) - 4  # nothing created twice
    trials = sw.load_trials(fold, "lr")[1]
    second = next(t for t in trials if t.number == 1)
    assert sw.trial_epochs(second, "kil")[0].job_id == held.id  # re-attached to the running job
    assert len(jobs) == before  # the same chains as the uninterrupted sweep
    assert (resumed["best"]["trial"], resumed["best"]["epoch"], resumed["best"]["val_loss"]) == (
        reference["best"]["trial"], reference["best"]["epoch"], reference["best"]["val_loss"])
    assert set(resumed["trials"]) == {1, 2, 3, 4, 5}  # trial 0 was not redone
