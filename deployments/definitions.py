"""What ``epochwise deployments apply`` registers: one Python definition per deployment.

Why Python and not a ``prefect.yaml``: the per-fold deployments come from the folds that exist on disk
and their parameters from the typed config (``epochwise.yaml``, environment), neither of which a static
YAML file can express without a generator. The flows are referenced by module path
(``flows.epoch_train.epoch_train``), not by a file on the applying machine: workers import them from the
installed ``epochwise`` distribution (a virtual environment or the docker image), so no code storage or
``pull`` step is needed and the same definitions work on a laptop and in compose.

| deployment                   | parameters                      | schedule (``ops.schedule``)            |
|------------------------------|---------------------------------|----------------------------------------|
| ``epoch-train/<fold>``       | ``fold`` = that fold's path     | nightly cron, active for ``per-fold``; one run at a time |
| ``epoch-train/any-fold``     | pass ``--param fold=...``       | none                                   |
| ``sweep/<fold>``             | ``fold``, ``space`` = ``<fold>/sweep.yaml`` | none; one run at a time    |
| ``nightly-folds/nightly``    | ``folds_root``                  | nightly cron, active for ``nightly-folds`` |
| ``prepare-fold/any``         | ``records``, ``fold``           | none                                   |
| ``deploy-epoch/any-fold``    | pass ``--param fold=...``       | none                                   |
| ``evaluate-epochs/any-fold`` | ``--param fold=... --param on=[...]`` | none                             |
| ``endpoint-reaper/hourly``   | the reaper's defaults           | hourly, active when Together credentials are configured (unless ``none``) |
| ``job-reaper/frequent``      | the reaper's defaults           | every 5 minutes, active like ``endpoint-reaper/hourly`` |

Config sections that a flow takes as parameters (``train``, ``data``, ``deploy``, ...) are baked in with
only their non-default values, so a default still lives in one place (epochwise/config/) and the UI
shows exactly what this deployment overrides.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import Flow
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.schedules import Cron

from blocks.credentials import together_configured
from epochwise.config import Settings
from epochwise.fold import discover_folds
from epochwise.names import ANY_FOLD, NIGHTLY, SCHEDULE_SLUG, TAG
from flows.deploy_epoch import deploy_epoch
from flows.endpoint_reaper import endpoint_reaper
from flows.epoch_train import epoch_train
from flows.evaluate_epochs import evaluate_epochs
from flows.job_reaper import job_reaper
from flows.nightly_folds import nightly_folds
from flows.prepare_fold import prepare_fold
from flows.sweep import SPACE_FILE, sweep


@dataclass
class Plan:
    """The deployments to apply."""

    deployments: list[RunnerDeployment] = field(default_factory=list)


def config_parameters(flow: Flow, settings: Settings) -> dict[str, Any]:
    """The non-default values of every config section that ``flow`` takes as a parameter."""
    accepted = set(flow.parameters.properties)
    parameters: dict[str, Any] = {}
    for section in Settings.model_fields:
        if section in accepted:
            values = getattr(settings, section).model_dump(mode="json", exclude_defaults=True)
            if values:
                parameters[section] = values
    return parameters


def plan_deployments(folds_root: Path | str, settings: Settings, result_storage: str) -> Plan:
    """Build (without registering) every epochwise deployment for the folds under ``folds_root``."""
    ops = settings.ops
    root = Path(folds_root).expanduser().resolve()
    folds = discover_folds(root)
    plan = Plan()
    # Worker-started runs write cache records where the CLI does, so a fold trained from the CLI is not
    # trained again by the nightly schedule (and the other way round).
    job_variables = {"env": {"PREFECT_RESULTS_LOCAL_STORAGE_PATH": result_storage}}

    def nightly(cron: str, active: bool) -> list[Any]:
        return [Cron(cron, timezone=ops.timezone, active=active, slug=SCHEDULE_SLUG)]

    def deployment(flow: Flow, name: str, description: str, **kwargs: Any) -> RunnerDeployment:
        kwargs["parameters"] = {**config_parameters(flow, settings), **kwargs.get("parameters", {})}
        kwargs.setdefault("schedules", [])  # explicit empty list: re-applying removes stale schedules
        return flow.to_deployment(
            name=name,
            description=description,
            work_pool_name=ops.work_pool,
            job_variables=job_variables,
            entrypoint_type=EntrypointType.MODULE_PATH,
            **kwargs,
        )

    def one_at_a_time() -> ConcurrencyLimitConfig:
        # A second run of the same deployment waits (AwaitingConcurrencySlot) instead of overlapping.
        return ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)

    for fold in folds:
        plan.deployments.append(
            deployment(
                epoch_train,
                fold.name,
                f"Train the fold {fold} epoch by epoch (nightly: {ops.cron} {ops.timezone}).",
                parameters={"fold": str(fold)},
                schedules=nightly(ops.cron, ops.schedule == "per-fold"),
                tags=[TAG, f"fold:{fold.name}"],
                concurrency_limit=one_at_a_time(),
            )
        )
    for fold in folds:
        plan.deployments.append(
            deployment(
                sweep,
                fold.name,
                f"Sweep the fold {fold} over {fold / SPACE_FILE} (or --param space=...; --param sweep='{{\"trials\": 6}}').",
                parameters={"fold": str(fold), "space": str(fold / SPACE_FILE)},
                tags=[TAG, f"fold:{fold.name}"],
                concurrency_limit=one_at_a_time(),
            )
        )
    plan.deployments.append(
        deployment(
            epoch_train,
            ANY_FOLD,
            "Train any fold: prefect deployment run epoch-train/any-fold --param fold=/path/to/fold",
            tags=[TAG],
        )
    )

    plan.deployments.append(
        deployment(
            nightly_folds,
            NIGHTLY,
            f"Train every fold under {root}, {ops.max_parallel_folds} at a time ({ops.cron} {ops.timezone}).",
            parameters={"folds_root": str(root), "limit": ops.nightly_limit}
            | ({"fan_out": ops.nightly_fan_out} if ops.nightly_fan_out != "worker" else {}),  # defaults not baked
            schedules=nightly(ops.cron, ops.schedule == "nightly-folds"),
            tags=[TAG],
            concurrency_limit=one_at_a_time(),
        )
    )

    plan.deployments.append(
        deployment(
            prepare_fold,
            "any",
            "Records -> fold: --param records=examples/records/games --param fold=folds/games",
            tags=[TAG],
        )
    )

    plan.deployments.append(
        deployment(
            deploy_epoch,
            ANY_FOLD,
            "Deploy an epoch of a fold: --param fold=/path/to/fold",
            tags=[TAG],
        )
    )
    plan.deployments.append(
        deployment(
            evaluate_epochs,
            ANY_FOLD,
            "Score a fold's epochs on held-out folds: --param fold=/path/to/fold --param 'on=[\"/path/to/folds/*\"]'",
            tags=[TAG],
        )
    )

    # Reapers: without Together credentials there is nothing to reap, and every scheduled run would fail.
    reapers_active = ops.schedule != "none" and together_configured(settings.together.credentials_block)
    for flow, slug, cron, description in (
        (endpoint_reaper, "hourly", ops.reaper_cron, "Stop epochwise endpoints past their time, so nothing keeps billing."),
        (job_reaper, "frequent", ops.job_reaper_cron,
         "Cancel Together jobs whose epoch-train run was cancelled, so nothing keeps billing."),
    ):
        plan.deployments.append(
            deployment(
                flow,
                slug,
                description,
                schedules=[Cron(cron, timezone=ops.timezone, slug=slug, active=reapers_active)],
                tags=[TAG],
                concurrency_limit=one_at_a_time(),
            )
        )
    return plan
