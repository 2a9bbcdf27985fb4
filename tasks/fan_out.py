"""Prefect tasks for ``nightly-folds``: find the folds, and train one fold as its own deployment run or
as a subflow of the nightly run.

By default each fold runs as a separate flow run on a worker (``run_deployment``): its own process, logs,
retries and per-fold concurrency limit, shown under the parent run in the UI. With ``fan_out=threads``
it runs as a subflow in a thread of the nightly run's process (`run_fold_here`), with the parameters of
the deployment it would have run.
"""

from __future__ import annotations

from typing import Any

from prefect import Flow, get_client, task
from prefect.cache_policies import NO_CACHE
from prefect.concurrency.sync import concurrency
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound

from epochwise.fold import Fold, discover_folds
from epochwise.names import ANY_FOLD
from epochwise.problems import UserError


@task(cache_policy=NO_CACHE)
def list_folds(folds_root: str) -> list[str]:
    """Every fold directory under ``folds_root`` (absolute paths, sorted), looked up now."""
    return [str(fold) for fold in discover_folds(folds_root)]


def read_fold_deployment(flow_name: str, fold: str) -> Any:
    """``<flow>/<fold>`` when that deployment exists (it carries the per-fold limit), else ``<flow>/any-fold``."""
    with get_client(sync_client=True) as client:
        try:
            return client.read_deployment_by_name(f"{flow_name}/{Fold.of(fold).name}")
        except ObjectNotFound:
            return client.read_deployment_by_name(f"{flow_name}/{ANY_FOLD}")


def fold_deployment(flow_name: str, fold: str) -> str:
    """The full name of `read_fold_deployment`'s deployment."""
    return f"{flow_name}/{read_fold_deployment(flow_name, fold).name}"


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
    return {
        "fold": Fold.of(fold).name,
        "deployment": deployment,
        "state": child.state.name if child.state else "unknown",
        "flow run": child.name,
        "flow run id": str(child.id),
    }


def fold_parameters(flow_name: str, fold: str) -> dict[str, Any]:
    """The parameters ``fold``'s deployment (`fold_deployment`) would run it with: its config sections as
    ``epochwise deployments apply`` baked them in, and ``fold``."""
    if flow_name != "epoch-train":
        raise UserError(f"fan_out=threads runs epoch-train folds only, not {flow_name}; use fan_out=worker")
    return {**read_fold_deployment(flow_name, fold).parameters, "fold": fold}


def limit_slots(limit: str) -> int:
    """The slot count of the global concurrency limit ``limit``; a missing limit is an error, as with
    ``strict=True``, not an unbounded fan-out."""
    with get_client(sync_client=True) as client:
        try:
            return client.read_global_concurrency_limit_by_name(limit).limit
        except ObjectNotFound:
            raise UserError(f"no global concurrency limit {limit!r}: run `epochwise deployments apply`") from None


def run_fold_here(chain: Flow, parameters: dict[str, Any], limit: str) -> dict[str, str]:
    """Run ``chain`` (epoch-train) for one fold as a subflow of the current run, once a slot of ``limit``
    is free; returns its final state as `run_fold_deployment` does."""
    fold = parameters["fold"]
    name = Fold.of(fold).name
    with concurrency(limit, occupy=1, strict=True):
        state = chain.with_options(flow_run_name=name)(**parameters, return_state=True)
    run_id = str(state.state_details.flow_run_id) if state.state_details.flow_run_id else ""
    return {
        "fold": name,
        "deployment": "subflow",
        "state": state.name or state.type.value,
        "flow run": name,
        "flow run id": run_id,
    }
