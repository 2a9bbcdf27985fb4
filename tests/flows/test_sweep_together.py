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
import time
from collections import Counter

from prefect.artifacts import Artifact

from epochwise import sweep as sw
from epochwise.config.sweep import SweepConfig
from flows.sweep import sweep
from tests.fake_together.server import FakeTogether
from tests.helpers import FAST, REPO, make_fold, train_cfg

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
