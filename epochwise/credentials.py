"""Resolved credentials as plain values, and their resolution from the environment (no Prefect here).

Keys are ``SecretStr`` so they print as ``**********`` in logs and reprs. ``blocks.credentials`` resolves
a saved Prefect block into these same types; everything below the blocks layer only sees these.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from pydantic import SecretStr

from epochwise.problems import UserError

DEFAULT_BASE_URL = "https://api.together.ai"


@dataclass(frozen=True)
class TogetherAccess:
    """A resolved Together key and API base; ``repr`` never shows the key."""

    api_key: SecretStr
    base_url: str
    project_id: str | None = None


@dataclass(frozen=True)
class WandbAccess:
    """A resolved W&B key (forwarded to Together's jobs), with its optional server and entity."""

    api_key: SecretStr
    base_url: str | None = None
    entity: str | None = None


class MissingCredentials(UserError, RuntimeError):
    """No key in a block or the environment."""


def normalise_base(url: str) -> str:
    """An API base without a trailing ``/v1``: together 3.x paths carry their own (``/v1/v1/...`` otherwise)."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def env_base_url() -> str:
    """TOGETHER_BASE_URL, else Together's public API."""
    return os.environ.get("TOGETHER_BASE_URL") or DEFAULT_BASE_URL


def together_from_env() -> TogetherAccess:
    """TOGETHER_API_KEY / TOGETHER_BASE_URL / TOGETHER_PROJECT_ID, or `MissingCredentials`."""
    key = os.environ.get("TOGETHER_API_KEY")
    if not key:
        raise MissingCredentials(
            "no Together API key: export TOGETHER_API_KEY or save a TogetherCredentials block "
            "and set together.credentials_block"
        )
    return TogetherAccess(SecretStr(key), normalise_base(env_base_url()), os.environ.get("TOGETHER_PROJECT_ID"))


def together_configured(block: str | None = None) -> bool:
    """Whether a Together key is available (what ``backend="auto"`` decides on): a named block, or the env."""
    return bool(block) or bool(os.environ.get("TOGETHER_API_KEY"))


def wandb_from_env() -> WandbAccess | None:
    """WANDB_API_KEY (with WANDB_BASE_URL / WANDB_ENTITY), else None: W&B forwarding is off."""
    key = os.environ.get("WANDB_API_KEY")
    if not key:
        return None
    return WandbAccess(SecretStr(key), os.environ.get("WANDB_BASE_URL"), os.environ.get("WANDB_ENTITY"))
