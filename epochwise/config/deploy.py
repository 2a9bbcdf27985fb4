"""Settings of ``deploy-epoch`` and ``endpoint-reaper`` (Together dedicated endpoints, v2 project API)."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from epochwise.config.base import Section


class DeployConfig(Section):
    """Endpoint hardware, autoscaling, smoke test, polling and the reaper's age limit.

    A dedicated endpoint bills per GPU-minute while a replica runs, whether or not anyone calls it, so
    the defaults are one replica, Together's own idle shutdown after an hour, and a reaper that stops
    any epochwise endpoint six hours after it was created.
    """

    hardware: str | None = Field(
        None,
        description="Hardware of the deploy config to use, e.g. '1x_nvidia_h100_80gb_sxm' or '1xnvidia-h100-80gb' "
        "(case, 'nvidia' and separators are ignored). Needed only when the model has several configs.",
    )
    min_replicas: int = Field(1, ge=0, description="Replicas kept running (0 = scale to zero when idle).")
    max_replicas: int = Field(1, ge=1, description="Replicas at most under load.")
    inactive_timeout_min: int = Field(
        60,
        ge=0,
        le=1440,
        description="Together stops the deployment after this many idle minutes (0 = never; else 30-1440).",
    )
    smoke_prompt: str = Field("Reply with one short sentence: are you ready?", description="Smoke-test user message.")
    smoke_max_tokens: int = Field(32, gt=0, description="Longest smoke-test reply (tokens).")
    poll_s: float = Field(15.0, gt=0, description="Wait between deployment status calls (seconds).")
    ready_deadline_s: float = Field(
        3600.0, gt=0, description="Give up (and roll back) when the deployment is not READY after this long (seconds)."
    )
    reap_older_than_h: float = Field(
        6.0, gt=0, description="`endpoint-reaper` stops epochwise endpoints created more than this many hours ago."
    )

    @field_validator("inactive_timeout_min")
    @classmethod
    def _timeout_range(cls, value: int) -> int:
        if 0 < value < 30:
            raise ValueError("inactive_timeout_min is 0 (disabled) or 30-1440 minutes (Together's range)")
        return value

    @model_validator(mode="after")
    def _replicas_order(self) -> DeployConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})")
        return self
