"""Settings of ``epochwise deployments apply``: work pool, schedules, concurrency limits, crash detection.

These describe how epochwise runs on a Prefect server with workers; none of them changes what a run
trains. Everything here can also be set from the environment, e.g. ``EPOCHWISE_OPS__TIMEZONE=Europe/Berlin``.
"""

from __future__ import annotations

from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, field_validator

from epochwise.config.base import Section


class OpsConfig(Section):
    """Deployments, schedules and limits registered on the Prefect server."""

    work_pool: str = Field("epochwise", description="Process work pool the deployments run on.")
    cron: str = Field("0 2 * * *", description="Nightly training schedule (cron, in `timezone`).")
    timezone: str = Field("UTC", description="IANA time zone of every cron schedule, e.g. Europe/Berlin.")
    schedule: Literal["per-fold", "nightly-folds", "none"] = Field(
        "per-fold",
        description=(
            "Which nightly schedule is active: one per `epoch-train/<fold>` deployment, the single "
            "`nightly-folds/nightly` fan-out (picks up new folds without re-applying), or none. The other "
            "schedule is still registered, inactive, so it can be switched on in the UI."
        ),
    )
    reaper_cron: str = Field("0 * * * *", description="`endpoint-reaper` schedule (hourly by default).")
    job_reaper_cron: str = Field(
        "*/5 * * * *",
        description=(
            "`job-reaper` schedule: cancels Together jobs whose flow run was cancelled but that still run "
            "(every 5 minutes by default; a forgotten GPU job bills by the minute)."
        ),
    )
    together_api_tag: str = Field(
        "together-api",
        description=(
            "Tag carried by the tasks that call Together; a tag concurrency limit (global concurrency limit "
            "`tag:<tag>`) caps how many of them run at once, across all flows and workers."
        ),
    )
    together_api_slots: int = Field(4, ge=1, description="Together-calling tasks running at once.")
    nightly_limit: str = Field("nightly-folds", description="Global limit bounding the nightly fan-out.")
    max_parallel_folds: int = Field(2, ge=1, description="Folds the nightly fan-out trains at once.")
    nightly_fan_out: Literal["worker", "threads"] = Field(
        "worker",
        description=(
            "How the nightly fan-out runs each fold: `worker`, as its own deployment run (a process each, "
            "its own logs and per-fold limit); `threads`, as a subflow in a thread of the nightly run's "
            "process (no process start per fold: for many Together folds, which mostly wait on their jobs)."
        ),
    )
    heartbeat_timeout_s: int = Field(
        600,
        ge=90,
        description=(
            "A running flow run with no heartbeat for this long is marked Crashed; about 3x "
            "PREFECT_FLOWS_HEARTBEAT_FREQUENCY (180 s by default)."
        ),
    )
    result_storage: str | None = Field(
        None,
        description=(
            "Result storage directory for flow runs started by workers (their cache records). Default: the "
            "applying process's PREFECT_RESULTS_LOCAL_STORAGE_PATH, so CLI runs and worker runs share caches."
        ),
    )

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {value!r} (use an IANA name such as Europe/Berlin)") from exc
        return value

    @field_validator("cron", "reaper_cron", "job_reaper_cron")
    @classmethod
    def _valid_cron(cls, value: str) -> str:
        # Prefect's own schedule model is the judge; imported here to keep importing the config cheap.
        from prefect.client.schemas.schedules import CronSchedule

        try:
            CronSchedule(cron=value)
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            raise ValueError(f"invalid cron expression {value!r}") from exc
        return value
