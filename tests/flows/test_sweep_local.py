"""``sweep`` on the local backend: 6 trials x 3 epochs of the test tiny model (a few optimizer steps per
epoch), each trial a real ``epoch-train`` subflow; the median pruner, the best (trial, epoch), a rerun."""

from __future__ import annotations

from pathlib import Path

from epochwise import sweep as sw
from epochwise.config.sweep import SweepConfig
from epochwise.config.train import TrainConfig
from flows.sweep import sweep
from tests.helpers import HYPER, local_config, make_fold

# Far from a good rate (too small to move the random-init model, or too large) loses to the median.
SPACE = {"train.hyper.learning_rate": [2e-3, 1e-6, 5e-3, 1e-7, 1e-3, 3e-7], "train.epochs": 3}


def test_local_sweep_prunes_chooses_the_best_over_all_epochs_and_reruns_as_a_no_op(tmp_path):
    fold = make_fold(tmp_path, "locsweep", "sweep-local", n_train=12, n_val=4)
    local = local_config(tmp_path, max_steps=3)
    train = TrainConfig(backend="local", local_model="tiny", hyper=HYPER)
    cfg = SweepConfig(trials=6, sampler="grid", pruner_startup_trials=2)

    result = sweep(str(fold), SPACE, "lr", cfg, train, local=local)

    name, trials = sw.load_trials(fold, "lr")
    assert name == "lr" and len(trials) == 6
    states = {t.number: sw.trial_state(t) for t in trials}
    epochs = {t.number: sw.trial_epochs(t, "locsweep") for t in trials}
    pruned = [n for n, s in states.items() if s == "pruned"]
    assert pruned and set(states.values()) == {"complete", "pruned"}
    assert all(len(epochs[n]) < 3 for n in pruned)
    assert all(len(epochs[n]) == 3 for n, s in states.items() if s == "complete")
    # every trained epoch is an adapter on disk, in its own trial's run directory
    adapters = [Path(r.model) for rs in epochs.values() for r in rs]
    assert len(set(adapters)) == len(adapters) and all((a / "adapter_model.safetensors").is_file() for a in adapters)
    assert len({a.parent for a in adapters}) == 6
    # the best (trial, epoch) is the lowest validation loss of all epochs of all trials, pruned included
    every = [(r.val_loss, n, r.epoch) for n, rs in epochs.items() for r in rs]
    loss, trial, epoch = min(every)
    assert (result["best"]["trial"], result["best"]["epoch"], result["best"]["val_loss"]) == (trial, epoch, loss)
    assert (fold / "sweeps" / "lr" / "sweep.png").is_file() and (fold / "sweeps" / "lr" / "sweep.md").is_file()

    stamps = {a: (a / "metrics.json").stat().st_mtime_ns for a in adapters}
    again = sweep(str(fold), SPACE, "lr", cfg, train, local=local)
    assert again["trials"] == {} and again["best"] == result["best"]  # nothing asked, nothing retrained
    assert {a: (a / "metrics.json").stat().st_mtime_ns for a in adapters} == stamps
