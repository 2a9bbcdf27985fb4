"""Pure pieces of the Together backend: epoch keys, the early-stop rule, credential resolution."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from blocks.credentials import MissingCredentials, WandbAccess, resolve_together, resolve_wandb
from epochwise.config.train import HyperParams
from epochwise.epochs import EpochRecord, epoch_key, val_stalled


def test_epoch_key_depends_on_content_not_on_dict_order():
    hyper = HyperParams().model_dump(mode="json")
    key = epoch_key(["a", "b"], "m", 1, hyper, None)
    assert key == epoch_key(["a", "b"], "m", 1, dict(reversed(list(hyper.items()))), None)
    changed = [
        epoch_key(["a", "c"], "m", 1, hyper, None),
        epoch_key(["a", "b"], "m2", 1, hyper, None),
        epoch_key(["a", "b"], "m", 2, hyper, None),
        epoch_key(["a", "b"], "m", 1, {**hyper, "learning_rate": 2e-4}, None),
        epoch_key(["a", "b"], "m", 1, hyper, "ft-1"),
    ]
    assert key not in changed and len(set(changed)) == len(changed)


def rec(epoch: int, val: float | None, status: str = "completed") -> EpochRecord:
    return EpochRecord(fold="f", epoch=epoch, backend="together", status=status, val_loss=val)


@pytest.mark.parametrize(
    ("vals", "patience", "stalled"),
    [
        ([1.5, 1.4, 1.3], 1, False),
        ([1.5, 1.6], 1, True),
        ([1.5, 1.6], 2, False),  # not enough epochs after the best yet
        ([1.5, 1.6, 1.7], 2, True),
        ([1.5, 1.6, 1.4], 2, False),  # a new best inside the window
        ([1.5, None, None], 2, True),  # epochs without a loss do not count as better
        ([None, None, 1.0], 1, False),  # no loss before: nothing to compare with
        ([1.5, 1.6, 1.7], None, False),
    ],
)
def test_val_stalled(vals, patience, stalled):
    assert val_stalled([rec(i + 1, v) for i, v in enumerate(vals)], patience) is stalled


def test_val_stalled_ignores_failed_epochs():
    assert not val_stalled([rec(1, 1.5), rec(2, 9.9, status="error")], 1)


def test_together_credentials_from_the_environment(monkeypatch):
    monkeypatch.setenv("TOGETHER_API_KEY", "tk-123")
    monkeypatch.setenv("TOGETHER_BASE_URL", "http://127.0.0.1:9/v1/")
    access = resolve_together()
    assert access.api_key.get_secret_value() == "tk-123"
    assert access.base_url == "http://127.0.0.1:9"  # /v1 stripped: together 3.x adds it per route
    assert "tk-123" not in repr(access)
    monkeypatch.delenv("TOGETHER_BASE_URL")
    assert resolve_together().base_url == "https://api.together.ai"
    monkeypatch.delenv("TOGETHER_API_KEY")
    with pytest.raises(MissingCredentials, match="TOGETHER_API_KEY"):
        resolve_together()


def test_wandb_key_is_optional_and_secret(monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert resolve_wandb() is None
    monkeypatch.setenv("WANDB_API_KEY", "wk-456")
    creds = resolve_wandb()
    assert isinstance(creds, WandbAccess) and isinstance(creds.api_key, SecretStr)
    assert creds.api_key.get_secret_value() == "wk-456" and "wk-456" not in repr(creds)


def test_short_together_tasks_carry_the_runs_ops_tag_and_the_poller_does_not():
    from epochwise.config.ops import OpsConfig
    from tasks import together

    ops = OpsConfig(together_api_tag="custom-together-tag")
    for short in (together.upload_if_missing, together.file_is_live, together.launch_epoch_job,
                  together.fetch_epoch_metrics):
        tagged = together.api_tagged(short, ops)
        assert "custom-together-tag" in tagged.tags and tagged.fn is short.fn, short.name
        assert OpsConfig().together_api_tag not in short.tags  # no import-time default tag
    assert not together.wait_for_job.tags  # it holds a slot for the whole job
