"""The sweep's pure core: the search space file (and its errors), trial settings, the budget's
arithmetic and the choice of the best (trial, epoch) over every epoch of every trial."""

from __future__ import annotations

from pathlib import Path

import pytest

from epochwise import sweep as sw
from epochwise.config.local import LocalConfig
from epochwise.config.sweep import SweepConfig
from epochwise.config.train import TrainConfig
from epochwise.epochs import EpochRecord
from epochwise.problems import UserError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return path


def test_space_file_with_a_range_a_list_and_a_fixed_value(tmp_path):
    space = sw.read_space(write(tmp_path, (
        "train.hyper.learning_rate: {log_uniform: [1e-6, 1e-4]}\n"
        "train.hyper.lora_r: [16, 32, 64]\n"
        "train.epochs: 4\n"
    )))
    lr, rank, epochs = space.dimensions
    assert (lr.kind, lr.values) == ("log_uniform", (1e-6, 1e-4))  # YAML reads 1e-6 as a string
    assert (rank.kind, rank.values) == ("choice", (16, 32, 64))
    assert space.fixed() == {"train.epochs": 4}
    assert [d.path for d in space.varying] == ["train.hyper.learning_rate", "train.hyper.lora_r"]
    with pytest.raises(UserError, match="grid needs lists of values, not ranges: train.hyper.learning_rate"):
        space.grid()


def test_nested_keys_are_the_same_space(tmp_path):
    nested = sw.read_space(write(tmp_path, "train:\n  hyper:\n    lora_r: [8, 16]\n  epochs: 2\n"))
    assert nested.digest == sw.parse_space({"train.hyper.lora_r": [8, 16], "train.epochs": 2}).digest


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("train.hyper.learning_rat: [1e-5, 1e-4]\n", r"sweep.yaml:1: unknown setting 'train.hyper.learning_rat' \(did you mean 'train.hyper.learning_rate'\?\)"),
        ("train.epochs: 2\ntrain.hyper.lora_r: [16, 0]\n", r"sweep.yaml:2: train.hyper.lora_r: 0: input should be greater than 0"),
        ("train.hyper.learning_rate: {log_uniform: [1e-4, 1e-6]}\n", r"sweep.yaml:1: .*needs low < high"),
        ("together.poll_max_s: [1, 2]\n", r"sweep.yaml:1: together.poll_max_s: a sweep varies how a chain trains"),
        ("train.hyper: [1, 2]\n", r"sweep.yaml:1: train.hyper is a section"),
        ("train.epochs: 3\n", r"the space varies nothing"),
        ("train.hyper.lora_r: {int: [8, 64], step: 8}\n", r"sweep.yaml:1: train.hyper.lora_r: a range is one of"),
    ],
)
def test_bad_spaces_name_file_line_and_reason(tmp_path, text, message):
    with pytest.raises(UserError, match=message):
        sw.read_space(write(tmp_path, text))


def test_trial_settings_put_the_trials_values_over_the_config():
    train = TrainConfig(backend="local", epochs=2, hyper={"lora_r": 8, "seed": 7})
    trained, local = sw.trial_settings(
        {"train.hyper.lora_r": 32, "train.epochs": 4, "local.max_steps": 5}, train, LocalConfig()
    )
    assert (trained.hyper.lora_r, trained.hyper.seed, trained.epochs, trained.backend) == (32, 7, 4, "local")
    assert local.max_steps == 5


def record(epoch: int, val: float | None, price: float | None = None) -> EpochRecord:
    return EpochRecord(fold="f", epoch=epoch, backend="together", job_id=f"ft-{epoch}-{val}", val_loss=val, price_usd=price)


def study(tmp_path: Path, cfg: SweepConfig | None = None) -> sw.Study:
    space = sw.parse_space({"train.hyper.lora_r": [8, 16, 32, 64]})
    return sw.Study(tmp_path / "sweeps" / "s", "s", cfg or SweepConfig(sampler="grid", pruner_startup_trials=1), space)


def test_the_median_pruner_stops_a_worse_chain_and_the_decision_is_kept(tmp_path):
    s = study(tmp_path)
    first = s.ask(None)
    for epoch, val in ((1, 1.0), (2, 0.8), (3, 0.7)):
        assert s.report_epoch(first, record(epoch, val), 3)
    s.finish(first, [record(1, 1.0), record(2, 0.8), record(3, 0.7)], 3, stalled=False)
    worse = s.ask(None)
    assert not s.report_epoch(worse, record(1, 1.5), 3)  # worse than the median at epoch 1: pruned
    trials = {t.number: t for t in s.trials()}
    assert sw.trial_state(trials[worse]) == "pruned" and trials[worse].user_attrs["decision-1"] == "prune"
    # reopened from the journal (a resumed sweep) the same trial is not asked again and stays pruned
    again = study(tmp_path)
    assert again.unfinished() == [] and not again.report_epoch(worse, record(1, 1.5), 3)


def test_a_resumed_trial_reuses_a_recorded_continue(tmp_path):
    s = study(tmp_path, SweepConfig(sampler="grid", pruner_startup_trials=0))
    number = s.ask(None)
    s.set(number, "decision-1", "continue")  # written by the killed run before it could go on
    assert s.report_epoch(number, record(1, 99.0), 3)


def test_budget_holds_a_running_trials_estimate_and_a_finished_ones_spend(tmp_path):
    s = study(tmp_path)
    done = s.ask(4.5)
    s.report_epoch(done, record(1, 1.0, 1.5), 3)
    s.finish(done, [record(1, 1.0, 1.5)], 3, stalled=False)  # ended by the budget after epoch 1
    running = s.ask(4.5)
    s.report_epoch(running, record(1, 1.0, 1.5), 3)
    trials = s.trials()
    assert sw.committed_usd(trials) == 1.5 + 4.5
    assert sw.committed_usd(trials, excluding=running) == 1.5
    assert sw.trial_state(next(t for t in trials if t.number == done)) == "budget"  # ended before its epochs


def test_best_is_over_every_epoch_of_every_trial_pruned_ones_included():
    found = [
        sw.TrialEpoch(0, record(1, 1.2)),
        sw.TrialEpoch(0, record(2, 1.1)),
        sw.TrialEpoch(3, record(1, 0.9)),  # a pruned trial's only epoch
        sw.TrialEpoch(4, record(2, None)),
    ]
    best = sw.best_trial_epoch(found)
    assert (best.trial, best.record.epoch) == (3, 1)
    chosen = sw.choose_trial_epoch(found, 0, "best")
    assert (chosen.trial, chosen.record.epoch) == (0, 2)
    assert sw.choose_trial_epoch(found, 0, 1).record.val_loss == 1.2
    with pytest.raises(ValueError, match="trial 7 has no recorded epochs"):
        sw.choose_trial_epoch(found, 7, "best")


def test_a_sweep_resumed_with_another_space_is_refused(tmp_path):
    study(tmp_path)
    other = sw.parse_space({"train.hyper.lora_r": [8, 128]})
    with pytest.raises(UserError, match="was started with another search space"):
        sw.Study(tmp_path / "sweeps" / "s", "s", SweepConfig(), other)


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_seeded_samplers_propose_new_values_each_trial_and_the_same_ones_on_a_rerun(tmp_path, sampler):
    space = sw.parse_space({"train.hyper.learning_rate": {"log_uniform": [1e-6, 1e-2]}})
    cfg = SweepConfig(sampler=sampler, seed=3)

    def proposals(directory: Path) -> list[float]:
        values = []
        for _ in range(4):  # each ask from a study opened afresh, as every task of the flow does
            opened = sw.Study(directory, "s", cfg, space)
            values.append(opened.params(opened.ask(None))["train.hyper.learning_rate"])
        return values

    first = proposals(tmp_path / "a")
    assert len(set(first)) == 4
    assert proposals(tmp_path / "b") == first
