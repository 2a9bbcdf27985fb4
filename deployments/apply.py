"""Register everything epochwise needs on a Prefect server; safe to run again at any time.

Each step reads what is there first and creates or updates by name, so re-applying changes
schedules, parameters and limits in place and never duplicates a deployment, limit or automation:

1. the process work pool (``ops.work_pool``), created if missing;
2. concurrency limits: the tag limit ``together-api`` (tasks tagged ``together-api``, i.e. Together
   calls, running at once anywhere) and ``nightly-folds`` (folds the nightly fan-out trains at once).
   One run per fold at a time is the per-fold deployment's own concurrency limit of 1 (definitions.py);
3. the crashed-run automation: a running epochwise flow run whose heartbeats stop (worker and flow
   process both gone, e.g. a lost machine) is marked Crashed (https://docs.prefect.io/v3/advanced/detect-zombie-flows);
4. the deployments from `deployments.definitions.plan_deployments`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from prefect import get_client
from prefect.automations import Automation
from prefect.client.schemas.actions import (
    GlobalConcurrencyLimitUpdate,
    WorkPoolCreate,
)
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH

from deployments.definitions import plan_deployments
from epochwise.config import OpsConfig, Settings
from epochwise.names import TAG
from tasks.locks import read_or_create_limit

CRASH_AUTOMATION = "epochwise: crash flow runs without heartbeat"
WORK_POOL_TYPE = "process"


@dataclass(frozen=True)
class Applied:
    """One line of the apply report."""

    kind: str  # work pool, limit, automation, deployment
    name: str
    action: str  # created, updated, unchanged, stale, deleted
    detail: str = ""


def default_result_storage() -> str:
    """This process's result storage directory, absolute (``$PREFECT_HOME/storage`` unless set)."""
    return str(Path(PREFECT_RESULTS_LOCAL_STORAGE_PATH.value()).expanduser().resolve())


def ensure_work_pool(client, name: str) -> Applied:
    """Create the process work pool ``name`` if missing; refuse to reuse a pool of another type."""
    try:
        pool = client.read_work_pool(name)
    except ObjectNotFound:
        from prefect.workers.process import ProcessWorker

        try:
            client.create_work_pool(
                WorkPoolCreate(
                    name=name,
                    type=WORK_POOL_TYPE,
                    base_job_template=ProcessWorker.get_default_base_job_template(),
                    description="epochwise flow runs, each in its own process on the worker's machine.",
                )
            )
            return Applied("work pool", name, "created", WORK_POOL_TYPE)
        except ObjectAlreadyExists:  # a rival apply made it, or this create did and its resend found it
            pool = client.read_work_pool(name)
    if pool.type != WORK_POOL_TYPE:
        raise ValueError(f"work pool {name!r} exists with type {pool.type!r}; epochwise needs a process pool")
    return Applied("work pool", name, "unchanged", WORK_POOL_TYPE)


def ensure_limit(client, name: str, slots: int) -> Applied:
    """Create or update an active global concurrency limit with ``slots`` slots.

    A limit that Prefect auto-created (inactive, when a flow asked for a name before any apply) is
    switched on here: an inactive limit limits nothing.
    """
    limit = read_or_create_limit(client, name, slots)
    if limit is None:
        return Applied("limit", name, "created", f"{slots} slot(s)")
    if limit.limit == slots and limit.active:
        return Applied("limit", name, "unchanged", f"{slots} slot(s)")
    client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=slots, active=True))
    return Applied("limit", name, "updated", f"{limit.limit} -> {slots} slot(s)")


def crash_automation(ops: OpsConfig) -> Automation:
    """Mark an epochwise flow run Crashed when no heartbeat came for ``ops.heartbeat_timeout_s``.

    Proactive: it fires when the expected event (the next heartbeat, or a terminal state) does not come
    within the window after a heartbeat. Scoped to flow runs tagged ``epochwise`` (every epochwise
    deployment carries the tag) so other projects on the same server are left alone.
    """
    return Automation(
        name=CRASH_AUTOMATION,
        description=(
            f"A running epochwise flow run with no heartbeat for {ops.heartbeat_timeout_s} s is marked Crashed "
            "(worker and flow process gone). Installed by `epochwise deployments apply`."
        ),
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={
                "prefect.flow-run.heartbeat",
                "prefect.flow-run.Completed",
                "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled",
                "prefect.flow-run.Crashed",
            },
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            match_related=ResourceSpecification(
                {"prefect.resource.role": "tag", "prefect.resource.id": f"prefect.tag.{TAG}"}
            ),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=ops.heartbeat_timeout_s),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED, message="No heartbeat: the flow run's process is gone")],
    )


def ensure_automation(client, automation: Automation) -> Applied:
    """Create the automation, or update the one with the same name (and remove any duplicates)."""
    existing = client.read_automations_by_name(automation.name)
    if not existing:
        automation.create()
        return Applied("automation", automation.name, "created")
    keep, *extra = sorted(existing, key=lambda a: str(a.id))
    for duplicate in extra:
        client.delete_automation(duplicate.id)
    client.update_automation(keep.id, automation)
    return Applied("automation", automation.name, "updated")


def stale_fold_deployments(client, folds_root: Path, current: set[str]) -> list:
    """Per-fold deployments (tag ``fold:<name>``) of folds under ``folds_root`` that are gone from disk."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterTags

    tagged = client.read_deployments(deployment_filter=DeploymentFilter(tags=DeploymentFilterTags(all_=[TAG])))
    return [
        dep
        for dep in tagged
        if any(tag.startswith("fold:") for tag in dep.tags)
        and Path(str(dep.parameters.get("fold", ""))).parent == folds_root
        and dep.name not in current
    ]


def apply_all(
    folds_root: Path | str, settings: Settings, result_storage: str | None = None, prune: bool = False
) -> list[Applied]:
    """Register work pool, limits, automation and deployments; returns what was done, in order.

    A fold deleted from disk leaves its ``epoch-train/<fold>`` deployment behind (its nightly runs would
    fail); it is reported as stale, and deleted with ``prune=True``. Its past runs stay in the database.
    """
    ops = settings.ops
    storage = result_storage or ops.result_storage or default_result_storage()
    plan = plan_deployments(folds_root, settings, storage)
    report: list[Applied] = []
    with get_client(sync_client=True) as client:
        report.append(ensure_work_pool(client, ops.work_pool))
        # Prefect stores a tag limit as the global limit "tag:<tag>", acquired by every task with that tag.
        report.append(ensure_limit(client, f"tag:{ops.together_api_tag}", ops.together_api_slots))
        report.append(ensure_limit(client, ops.nightly_limit, ops.max_parallel_folds))
        report.append(ensure_automation(client, crash_automation(ops)))
        for deployment in plan.deployments:
            try:
                existing = client.read_deployment_by_name(deployment.full_name)
                # Pausing is an operator's decision in the UI or CLI; re-applying keeps it.
                deployment.paused = existing.paused
                action = "updated"
            except ObjectNotFound:
                action = "created"
            deployment.apply()
            detail = ", ".join(
                f"{s.schedule.cron} {s.schedule.timezone}" + ("" if s.active else " (inactive)")
                for s in deployment.schedules or []
            ) or "no schedule"
            report.append(Applied("deployment", deployment.full_name, action, detail))
        per_fold = [d for d in plan.deployments if d.flow_name == "epoch-train" and "fold" in d.parameters]
        current = {Path(d.parameters["fold"]).name for d in per_fold}
        stale = stale_fold_deployments(client, Path(folds_root).expanduser().resolve(), current)
        for dep in stale:
            if prune:
                client.delete_deployment(dep.id)
            flow_name = client.read_flow(dep.flow_id).name  # epoch-train or sweep
            report.append(Applied("deployment", f"{flow_name}/{dep.name}", "deleted" if prune else "stale",
                                  f"fold {dep.parameters['fold']} is gone" + ("" if prune else "; --prune deletes")))
    return report
