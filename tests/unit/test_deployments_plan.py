"""What ``epochwise deployments apply`` would register, built without a server: names, parameters,
schedules, limits and entrypoints (the e2e tests register them on a real server)."""

from __future__ import annotations

from pathlib import Path

import pytest
from prefect.utilities.importtools import import_object
from typer.testing import CliRunner

from deployments.definitions import plan_deployments
from epochwise.cli import app
from epochwise.config import load_settings
from epochwise.fold import discover_folds

ALL = {"epoch-train/games", "epoch-train/chess", "sweep/games", "sweep/chess", "epoch-train/any-fold", "nightly-folds/nightly", "prepare-fold/any",
       "deploy-epoch/any-fold", "evaluate-epochs/any-fold", "endpoint-reaper/hourly", "job-reaper/frequent"}


@pytest.fixture
def folds_root(tmp_path: Path) -> Path:
    root = tmp_path / "folds"
    for name in ("games", "chess", ".hidden"):
        (root / name).mkdir(parents=True)
        (root / name / "train.jsonl").write_text("{}\n")
    (root / "no-train-file").mkdir()
    (root / "notes.txt").write_text("not a fold")
    return root


def by_name(plan) -> dict:
    return {d.full_name: d for d in plan.deployments}


def test_discover_folds_lists_directories_with_train_jsonl(folds_root: Path):
    assert [f.name for f in discover_folds(folds_root)] == ["chess", "games"]
    assert all(f.is_absolute() for f in discover_folds(folds_root))
    with pytest.raises(FileNotFoundError, match="folds root is not a directory"):
        discover_folds(folds_root / "missing")


def test_plan_has_one_deployment_per_fold_plus_generic_ones(folds_root: Path):
    plan = by_name(plan_deployments(folds_root, load_settings(), "/srv/results"))
    assert set(plan) == ALL

    games = plan["epoch-train/games"]
    assert games.parameters == {"fold": str(folds_root.resolve() / "games")}  # config defaults are not baked
    assert games.work_pool_name == "epochwise"
    assert games.job_variables == {"env": {"PREFECT_RESULTS_LOCAL_STORAGE_PATH": "/srv/results"}}
    assert games.concurrency_limit == 1 and games.concurrency_options.collision_strategy == "ENQUEUE"
    assert {"epochwise", "fold:games"} <= set(games.tags)
    assert import_object(games.entrypoint).name == "epoch-train"  # workers import it from the install
    assert plan["epoch-train/any-fold"].parameters == {}
    sweep = plan["sweep/games"]
    assert sweep.parameters == {"fold": str(folds_root.resolve() / "games"),
                                "space": str(folds_root.resolve() / "games" / "sweep.yaml")}
    assert sweep.concurrency_limit == 1 and import_object(sweep.entrypoint).name == "sweep"
    assert plan["nightly-folds/nightly"].parameters == {"folds_root": str(folds_root.resolve()),
                                                        "limit": "nightly-folds"}


def test_non_default_config_is_baked_into_parameters(folds_root: Path):
    settings = load_settings(overrides={"train": {"backend": "local", "epochs": 2, "hyper": {"lora_r": 8}}})
    plan = by_name(plan_deployments(folds_root, settings, "/srv/results"))
    expected = {"backend": "local", "epochs": 2, "hyper": {"lora_r": 8}}
    assert plan["epoch-train/games"].parameters["train"] == expected
    assert plan["epoch-train/any-fold"].parameters["train"] == expected
    assert "train" not in plan["prepare-fold/any"].parameters  # prepare-fold takes no train section


def test_a_configured_together_api_tag_is_baked_into_the_epoch_train_deployments(folds_root: Path):
    """Worker runs carry the tag `apply` registers the limit for (tests/flows/test_ops_limits.py runs it)."""
    settings = load_settings(overrides={"ops": {"together_api_tag": "together-api-team"}})
    plan = by_name(plan_deployments(folds_root, settings, "/srv/results"))
    assert plan["epoch-train/games"].parameters["ops"] == {"together_api_tag": "together-api-team"}
    assert plan["epoch-train/any-fold"].parameters["ops"] == {"together_api_tag": "together-api-team"}


def test_a_threads_fan_out_is_baked_into_the_nightly_deployment(folds_root: Path):
    settings = load_settings(overrides={"ops": {"nightly_fan_out": "threads"}})
    plan = by_name(plan_deployments(folds_root, settings, "/srv/results"))
    assert plan["nightly-folds/nightly"].parameters["fan_out"] == "threads"


@pytest.mark.parametrize("mode, per_fold, nightly", [("per-fold", True, False), ("nightly-folds", False, True),
                                                     ("none", False, False)])
def test_schedule_mode_picks_the_active_nightly_schedule(folds_root: Path, mode: str, per_fold: bool, nightly: bool):
    settings = load_settings(overrides={"ops": {"schedule": mode, "cron": "30 1 * * *", "timezone": "Europe/Berlin"}})
    plan = by_name(plan_deployments(folds_root, settings, "/srv/results"))
    for name, active in (("epoch-train/games", per_fold), ("epoch-train/chess", per_fold),
                         ("nightly-folds/nightly", nightly)):
        [schedule] = plan[name].schedules
        assert (schedule.schedule.cron, schedule.schedule.timezone) == ("30 1 * * *", "Europe/Berlin")
        assert schedule.active is active, name
    assert plan["epoch-train/any-fold"].schedules == []



@pytest.mark.parametrize("mode", ["per-fold", "none"])
def test_reaper_runs_hourly_only_when_together_is_configured(folds_root: Path, monkeypatch, mode: str):
    settings = load_settings(overrides={"ops": {"schedule": mode}})
    [offline] = by_name(plan_deployments(folds_root, settings, "/srv/results"))["endpoint-reaper/hourly"].schedules
    monkeypatch.setenv("TOGETHER_API_KEY", "test-key-not-used")
    [online] = by_name(plan_deployments(folds_root, settings, "/srv/results"))["endpoint-reaper/hourly"].schedules
    assert offline.schedule.cron == online.schedule.cron == "0 * * * *"
    assert offline.active is False
    assert online.active is (mode != "none")


@pytest.mark.parametrize("mode", ["per-fold", "none"])
def test_job_reaper_runs_every_5_minutes_only_when_together_is_configured(folds_root: Path, monkeypatch, mode):
    settings = load_settings(overrides={"ops": {"schedule": mode}})
    [offline] = by_name(plan_deployments(folds_root, settings, "/srv/results"))["job-reaper/frequent"].schedules
    monkeypatch.setenv("TOGETHER_API_KEY", "test-key-not-used")
    plan = by_name(plan_deployments(folds_root, settings, "/srv/results"))
    [online] = plan["job-reaper/frequent"].schedules
    assert offline.schedule.cron == online.schedule.cron == "*/5 * * * *"
    assert offline.active is False and online.active is (mode != "none")
    assert import_object(plan["job-reaper/frequent"].entrypoint).name == "job-reaper"


@pytest.mark.parametrize("flag, value, message", [("--timezone", "Mars/Base", "unknown time zone"),
                                                   ("--cron", "61 * * * *", "invalid cron expression"),
                                                   ("--schedule", "weekly", "--schedule: input should be")])
def test_apply_rejects_bad_schedule_settings_before_contacting_prefect(folds_root: Path, flag, value, message):
    result = CliRunner().invoke(app, ["deployments", "apply", "--folds-root", str(folds_root), flag, value])
    assert result.exit_code == 1
    assert message in result.output
