"""Credentials blocks, and the one place that resolves them (a saved block, else the environment).

Keys are ``SecretStr`` so they print as ``**********`` in logs, reprs and the Prefect UI. They are
resolved inside the tasks that call the APIs and are never flow parameters, task results or artifacts.
A block resolves into the plain `TogetherAccess` / `WandbAccess` of `epochwise.credentials`, which is
all the core ever sees.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from epochwise.credentials import (
    DEFAULT_BASE_URL,
    MissingCredentials,
    TogetherAccess,
    WandbAccess,
    env_base_url,
    normalise_base,
    together_configured,
    together_from_env,
    wandb_from_env,
)

if TYPE_CHECKING:
    from together import Together

    from epochwise.config.together import TogetherConfig

__all__ = [
    "DEFAULT_BASE_URL",
    "MissingCredentials",
    "TogetherAccess",
    "TogetherCredentials",
    "WandbAccess",
    "WandbCredentials",
    "resolve_together",
    "resolve_wandb",
    "together_client",
    "together_configured",
]


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


def resolve_together(block: str | None = None) -> TogetherAccess:
    """The Together key and API base: from the named block, else TOGETHER_API_KEY / TOGETHER_BASE_URL."""
    if not block:
        return together_from_env()
    creds = TogetherCredentials.load(block)
    return TogetherAccess(creds.api_key, normalise_base(creds.base_url or env_base_url()), creds.project_id)


def resolve_wandb(block: str | None = None) -> WandbAccess | None:
    """The W&B key from the named block, else WANDB_API_KEY, else None (W&B forwarding is off)."""
    if not block:
        return wandb_from_env()
    creds = WandbCredentials.load(block)
    return WandbAccess(creds.api_key, creds.base_url, creds.entity)


def together_client(cfg: TogetherConfig) -> Together:
    """The one way to get a Together client: ``cfg``'s credentials (block or environment), retries, timeout."""
    from epochwise.together_api import make_client

    return make_client(resolve_together(cfg.credentials_block), cfg)
