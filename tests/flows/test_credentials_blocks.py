"""A saved credentials block resolves into the plain `TogetherAccess` / `WandbAccess` the core uses, and
the one client factory builds its Together client from it (the real SDK against the fake server)."""

from __future__ import annotations

import uuid

from pydantic import SecretStr

from blocks.credentials import (
    TogetherCredentials,
    WandbCredentials,
    resolve_together,
    resolve_wandb,
    together_client,
)
from epochwise.config import TogetherConfig
from epochwise.credentials import TogetherAccess, WandbAccess


def test_a_saved_together_block_resolves_into_plain_access_and_a_working_client(fake_together, monkeypatch):
    name = f"together-{uuid.uuid4().hex[:8]}"
    TogetherCredentials(api_key=SecretStr(fake_together.api_key), base_url=fake_together.base_url + "/v1/").save(name)
    monkeypatch.delenv("TOGETHER_API_KEY")  # the block, not the environment, holds the key
    access = resolve_together(name)
    assert type(access) is TogetherAccess
    assert access.base_url == fake_together.base_url  # /v1 stripped: together 3.x adds it per route
    assert access.api_key.get_secret_value() == fake_together.api_key and fake_together.api_key not in repr(access)
    client = together_client(TogetherConfig(credentials_block=name))
    assert list(client.files.list().data) == []  # the fake checks the key on every call


def test_a_saved_wandb_block_resolves_into_plain_access():
    name = f"wandb-{uuid.uuid4().hex[:8]}"
    WandbCredentials(api_key=SecretStr("wk-789"), base_url="https://wandb.example", entity="team").save(name)
    access = resolve_wandb(name)
    assert access == WandbAccess(SecretStr("wk-789"), "https://wandb.example", "team")
    assert "wk-789" not in repr(access)
