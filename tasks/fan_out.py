"""Prefect tasks for ``nightly-folds``: find the folds, and train one fold as its own deployment run.

Each fold runs as a separate flow run on a worker (``run_deployment``), not as a subflow in this process:
its own process, logs, retries and per-fold concurrency limit, shown under the parent run in the UI.
"""

from __future__ import annotations

from prefect import get_client, task
from prefect.cache_policies import NO_CACHE
from prefect.concurrency.sync import concurrency
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound

from epochwise.fold import Fold, discover_folds
from epochwise.names import ANY_FOLD


@task(cache_policy=NO_CACHE)
def list_folds(folds_root: str) -> list[str]:
    """Every fold directory under ``folds_root`` (absolute paths, sorted), looked up now."""
    return [str(fold) for fold in discover_folds(folds_root)]


def fold_deployment(flow_name: str, fold: str) -> str:
    """``<flow>/<fold>`` when that deployment exists (it carries the per-fold limit), else ``<flow>/any-fold``."""
    name = f"{flow_name}/{Fold.of(fold).name}"
    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(name)
            return name
        except ObjectNotFound:
            return f"{flow_name}/{ANY_FOLD}"


@task(cache_policy=NO_CACHE)
def run_fold_deployment(fold: str, flow_name: str, limit: str, parent_key: str) -> dict[str, str]:
    """Run ``fold``'s deployment once a slot of ``limit`` is free and wait for it; returns its final state.

    ``strict=True``: a missing limit is an error, not an unbounded fan-out. The idempotency key makes a
    crashed-and-restarted attempt of the parent re-attach to the child it already started.
    """
    deployment = fold_deployment(flow_name, fold)
    with concurrency(limit, occupy=1, strict=True):
        child = run_deployment(
            deployment,
            parameters={"fold": fold},
            idempotency_key=f"{parent_key}:{fold}",
            poll_interval=2,  # seconds between state checks of the child run: a finished fold frees its slot
        )
    return {"fold": Fold.of(fold).name, "deployment": deployment,
            "state": child.state.name if child.state else "unknown", "flow run": child.name,
            "flow run id": str(child.id)}
