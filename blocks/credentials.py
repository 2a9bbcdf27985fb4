"""Credentials blocks and the one place that resolves them (a saved block, else the environment).

Keys are ``SecretStr`` so they print as ``**********`` in logs, reprs and the Prefect UI. They are
resolved inside the tasks that call the APIs and are never flow parameters, task results or artifacts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from epochwise.problems import UserError

DEFAULT_BASE_URL = "https://api.together.ai"


class TogetherCredentials(Block):
    """Together AI API key (and API base, for proxies or a test server)."""

    _block_type_name = "Together Credentials"
    _block_type_slug = "together-credentials"
    _description = "API key for Together AI files, fine-tuning jobs and endpoints."

    api_key: SecretStr = Field(..., description="Together API key.")
    base_url: str | None = Field(
        None, description="API base without /v1 (default https://api.together.ai, or TOGETHER_BASE_URL)."
    )
    project_id: str | None = Field(None, description="Project for the v2 endpoint API (default: from whoami).")


class WandbCredentials(Block):
    """Weights & Biases API key, forwarded to Together so it logs each epoch job to W&B."""

    _block_type_name = "Wandb Credentials"
    _block_type_slug = "wandb-credentials"
    _description = "W&B API key forwarded to Together fine-tuning jobs."

    api_key: SecretStr = Field(..., description="W&B API key.")
    base_url: str | None = Field(None, description="W&B server for self-hosted instances.")
    entity: str | None = Field(None, description="W&B entity (team or user).")


@dataclass(frozen=True)
class TogetherAccess:
    """A resolved Together key and API base; ``repr`` never shows the key."""

    api_key: SecretStr
    base_url: str
    project_id: str | None = None


class MissingCredentials(UserError, RuntimeError):
    """No key in a block or the environment."""


def _normalise_base(url: str) -> str:
    # together 3.x paths carry their own /v1 (its default base is https://api.together.ai); a base ending
    # in /v1 would call /v1/v1/...
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def resolve_together(block: str | None = None) -> TogetherAccess:
    """The Together key and API base: from the named block, else TOGETHER_API_KEY / TOGETHER_BASE_URL."""
    if block:
        creds = TogetherCredentials.load(block)
        base = creds.base_url or os.environ.get("TOGETHER_BASE_URL") or DEFAULT_BASE_URL
        return TogetherAccess(creds.api_key, _normalise_base(base), creds.project_id)
    key = os.environ.get("TOGETHER_API_KEY")
    if not key:
        raise MissingCredentials(
            "no Together API key: export TOGETHER_API_KEY or save a TogetherCredentials block "
            "and set together.credentials_block"
        )
    base = os.environ.get("TOGETHER_BASE_URL") or DEFAULT_BASE_URL
    return TogetherAccess(SecretStr(key), _normalise_base(base), os.environ.get("TOGETHER_PROJECT_ID"))


def together_configured(block: str | None = None) -> bool:
    """Whether a Together key is available (what ``backend="auto"`` decides on)."""
    if block:
        return True
    return bool(os.environ.get("TOGETHER_API_KEY"))


def resolve_wandb(block: str | None = None) -> WandbCredentials | None:
    """The W&B key from the named block, else WANDB_API_KEY, else None (W&B forwarding is off)."""
    if block:
        return WandbCredentials.load(block)
    key = os.environ.get("WANDB_API_KEY")
    if not key:
        return None
    return WandbCredentials(
        api_key=SecretStr(key), base_url=os.environ.get("WANDB_BASE_URL"), entity=os.environ.get("WANDB_ENTITY")
    )
