"""Settings of ``deploy-epoch`` (dedicated endpoints)."""

from __future__ import annotations

from pydantic import BaseModel


class DeployConfig(BaseModel):
    """Endpoint hardware, autoscaling and smoke test."""
