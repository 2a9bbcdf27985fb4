"""Pure parts of deploying: endpoint names, picking a deploy config by hardware, picking the epoch,
DeployConfig rules and the CLI's age parsing. No network, no Prefect."""

from __future__ import annotations

import pytest
import typer
from pydantic import ValidationError
from together.types.models.config import Config

from epochwise import endpoints_api as ea
from epochwise.cli.deploy import parse_age
from epochwise.config.deploy import DeployConfig
from epochwise.epochs import EpochChoiceError, EpochRecord, choose_epoch, epoch_table, records_from_table


def config(cid: str, count: str | None = None, accelerator: str | None = None, **extra: str) -> Config:
    selectors = [] if count is None else [{"key": "accelerator_count", "value": count},
                                          {"key": "accelerator_type", "value": accelerator}]
    return Config.model_validate({"id": cid, "projectId": "proj_public", "referenceModel": "projects/p/models/ml_b",
                                  "referenceModelId": "ml_b", "certifications": [], "selectors": selectors, **extra})


H100 = config("cr_h100", "1", "nvidia-h100-80gb")
H100X2 = config("cr_h100x2", "2", "nvidia-h100-80gb")
L40 = config("cr_l40", "1", "nvidia-l40s-48gb")


def test_endpoint_names_are_deterministic_and_only_epochwise_names_parse():
    assert ea.endpoint_slug("Games Fold", 3) == "ew-games-fold-e3"
    assert ea.parse_endpoint("me/ew-games-fold-e3") == ("games-fold", 3)
    assert ea.parse_endpoint("ew-games-e12") == ("games", 12)
    for other in ("me/my-chatbot", "me/ew-games", "me/ew-games-e3-extra", "me/games-e3"):
        assert ea.parse_endpoint(other) is None, other
    assert ea.deployment_slug("ml_FT-0001abc") == "d-ml-ft-0001abc"


def test_the_only_config_is_used_and_several_need_a_hardware_choice_listing_them():
    assert ea.pick_config([H100], None, "me/m") is H100
    with pytest.raises(ea.EndpointFailure) as err:
        ea.pick_config([H100, H100X2, L40], None, "me/m")
    message = str(err.value)
    assert "3 deploy configs" in message and "--hardware" in message
    for expected in ("cr_h100: 1xnvidia-h100-80gb", "cr_h100x2: 2xnvidia-h100-80gb", "cr_l40: 1xnvidia-l40s-48gb"):
        assert expected in message
    with pytest.raises(ea.EndpointFailure, match="no deploy config for me/m"):
        ea.pick_config([], None, "me/m")


@pytest.mark.parametrize("asked", ["1xnvidia-h100-80gb", "1x_nvidia_h100_80gb", "1XH100-80GB", "1xh100"])
def test_hardware_matches_in_any_spelling(asked):
    assert ea.pick_config([H100, H100X2, L40], asked, "me/m") is H100


def test_hardware_that_fits_none_or_several_configs_is_an_error_naming_the_candidates():
    with pytest.raises(ea.EndpointFailure, match=r"no deploy config of me/m runs on '8xb200'.*cr_l40: 1xnvidia-l40s-48gb"):
        ea.pick_config([H100, L40], "8xb200", "me/m")
    twins = [config("cr_a", hardware="1x_nvidia_h100_80gb_sxm"), config("cr_b", hardware="1x_nvidia_h100_80gb_pcie")]
    with pytest.raises(ea.EndpointFailure, match=r"2 deploy configs of me/m match '1xh100'.*cr_a.*cr_b"):
        ea.pick_config(twins, "1xh100", "me/m")
    assert ea.pick_config(twins, "1x_nvidia_h100_80gb_pcie", "me/m").id == "cr_b"


def records() -> list[EpochRecord]:
    return [
        EpochRecord(fold="g", epoch=1, backend="together", job_id="ft-1", model="me/m-e1", train_loss=2.0, val_loss=1.5),
        EpochRecord(fold="g", epoch=2, backend="together", job_id="ft-2", model="me/m-e2", train_loss=1.8, val_loss=1.2),
        EpochRecord(fold="g", epoch=3, backend="together", job_id="ft-3", model="me/m-e3", train_loss=1.7, val_loss=1.4),
        EpochRecord(fold="g", epoch=4, backend="together", job_id="ft-4", status="error"),
    ]


def test_epochs_read_back_from_the_epoch_table_artifact_rows():
    back = records_from_table("g", epoch_table(records()))
    assert [(r.epoch, r.job_id, r.val_loss, r.status, r.backend) for r in back] == [
        (1, "ft-1", 1.5, "completed", "together"), (2, "ft-2", 1.2, "completed", "together"),
        (3, "ft-3", 1.4, "completed", "together"), (4, "ft-4", None, "error", "together"),
    ]
    local = records_from_table("g", [{"epoch": 1, "status": "completed", "model": "/runs/e1", "job": "", "val loss": ""}])
    assert local[0].backend == "local" and local[0].job_id is None and local[0].model == "/runs/e1"


def test_best_is_the_lowest_validation_loss_and_n_must_be_a_completed_epoch():
    assert choose_epoch(records(), "best").epoch == 2
    assert choose_epoch(records(), "3").job_id == "ft-3"
    with pytest.raises(EpochChoiceError, match=r"epoch 7 was not trained \(epochs: 1, 2, 3, 4\)"):
        choose_epoch(records(), "7")
    with pytest.raises(EpochChoiceError, match="epoch 4 is error"):
        choose_epoch(records(), 4)
    with pytest.raises(EpochChoiceError, match="'best' or a number"):
        choose_epoch(records(), "last")
    with pytest.raises(EpochChoiceError, match="no completed epoch"):
        choose_epoch([], "best")


def test_deploy_config_rejects_what_together_would():
    with pytest.raises(ValidationError, match="30-1440"):
        DeployConfig(inactive_timeout_min=10)
    with pytest.raises(ValidationError, match="above max_replicas"):
        DeployConfig(min_replicas=3, max_replicas=2)
    assert DeployConfig(inactive_timeout_min=0).inactive_timeout_min == 0


def test_ages_for_reap():
    assert parse_age("6h") == 6 and parse_age("90m") == 1.5 and parse_age("2d") == 48
    assert parse_age("3") == 3 and parse_age("1800s") == 0.5
    with pytest.raises(typer.BadParameter, match="not an age"):
        parse_age("six hours")
