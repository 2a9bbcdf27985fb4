"""Prefect tasks for dedicated endpoints: pick the epoch (`epochwise.epochs.choose_epoch`), deploy, wait, smoke-test, stop, reap.

Thin wrappers over `epochwise.endpoints_api`. What keeps the bill under control:

* ``deploy_model`` finds the fold/epoch endpoint and the model's deployment in Together's listing before
  creating either, under a per-endpoint OS file lock, so two runs never create two of anything. It is
  never cached: Together's listing is the state (a cached id could point at a deployment the reaper
  deleted).
* The flow runs it in a transaction with ``wait_until_ready`` and ``smoke_test``; when either fails,
  ``deploy_model``'s ``on_rollback`` puts the previous traffic split back, deletes the deployment
  (Together refuses to delete one that still receives traffic) and an endpoint this run created, so a
  broken model never keeps billing. When a rollback step fails anyway, the flow fails naming the live
  deployment and the command that stops it, and the deployment is recorded for the reaper.
* ``stop_fold_endpoints`` and ``reap_endpoints`` scale deployments to zero; the reaper only touches
  endpoints named ``ew-<fold>-e<k>``, and deployments left by a failed rollback whatever their age.

Credentials are resolved inside each task (blocks or environment), never passed as parameters.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import Artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.transactions import BaseTransaction, Transaction, get_transaction
from prefect.variables import Variable
from together import APIError, NotFoundError, Together

from blocks.credentials import together_client
from epochwise import endpoints_api as ea
from epochwise import together_api
from epochwise.artifacts import artifact_key
from epochwise.config.deploy import DeployConfig
from epochwise.config.together import TogetherConfig
from epochwise.epochs import EpochRecord, choose_epoch, read_epochs, records_from_table
from epochwise.fold import Fold
from epochwise.io import atomic_dir
from tasks.locks import HostOnly, ServerLease, fold_guard


def project_client(together: TogetherConfig) -> Together:
    """A project-bound client (TOGETHER_PROJECT_ID / block project_id, else whoami)."""
    return ea.with_project(together_client(together))


def endpoint_lock(
    slug: str, wait_s: float, lease_s: float
) -> contextlib.AbstractContextManager[ServerLease | HostOnly]:
    """An exclusive lock per endpoint name (`fold_guard`: a file lock, and with a Prefect server its
    lease): find-then-create is never interleaved by two runs on this host or on two workers of a server."""
    busy = ea.EndpointFailure(f"endpoint {slug} is being deployed by another run")
    return fold_guard(f"endpoint-{slug}", wait_s, lease_s, busy)


# ---------------------------------------------------------------------------------------------------
# Which epoch
# ---------------------------------------------------------------------------------------------------

@task(cache_policy=NO_CACHE)
def read_epoch_records(fold: str, together: TogetherConfig) -> list[EpochRecord]:
    """The epochs of ``fold`` (its directory): the latest ``<fold>-epochs`` artifact of ``epoch-train``;
    without one (a new Prefect database), the local epochs on disk, else Together's own job list for
    the fold with losses from each job's metrics."""
    name = Fold.of(fold).name
    rows = read_epochs(name)
    if rows:
        return records_from_table(name, rows)
    log = get_run_logger()
    if (Path(fold) / "local").is_dir():
        from epochwise.local.export import find_epochs

        log.info(f"no {artifact_key(name, 'epochs')} artifact; using the local epochs under {fold}/local")
        return [EpochRecord(fold=name, epoch=m["epoch"], backend="local", model=m["adapter_dir"],
                            train_loss=m.get("train_loss"), val_loss=m.get("val_loss")) for m in find_epochs(fold)]
    log.info(f"no {artifact_key(name, 'epochs')} artifact; reading {name}'s jobs from Together")
    client = together_client(together)
    by_epoch: dict[int, EpochRecord] = {}
    for epoch, job in together_api.fold_jobs(client, name):
        # A retried epoch has several jobs (oldest first): the completed, else the newest, one stands for it.
        if epoch in by_epoch and by_epoch[epoch].status == "completed" and job.status != "completed":
            continue
        train, val = together_api.job_losses(client, job.id) if job.status == "completed" else (None, None)
        by_epoch[epoch] = EpochRecord(fold=name, epoch=epoch, backend="together", status=job.status, job_id=job.id,
                                      model=job.model_output_name, train_loss=train, val_loss=val)
    return list(by_epoch.values())


def read_evaluation_rows(fold: str) -> list[dict[str, Any]]:
    """The latest ``<fold>-evaluation`` table of ``epochwise evaluate`` (for ``--epoch best-eval``)."""
    from epochwise.evaluate import EvaluationError

    name = Fold.of(fold).name
    artifact = Artifact.get(artifact_key(name, "evaluation"))
    if artifact is None or not artifact.data:
        raise EvaluationError(
            f"no {artifact_key(name, 'evaluation')} table: run `epochwise evaluate {fold} --on ...` first"
        )
    return json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data


@task(cache_policy=NO_CACHE)
def pick_epoch(
    fold: str, epoch: str | int, job_id: str | None, together: TogetherConfig, trial: int | None = None,
    sweep: str | None = None,
) -> EpochRecord:
    """The epoch to deploy: ``best``/``best-eval``/``N`` from the fold's records, or the given job (its epoch from its
    ``ew-<fold>-e<k>-...`` suffix, or ``N``). With ``trial`` (or ``sweep``): that sweep trial's epoch ``N`` or
    best (`epochwise.sweep`). ``best`` alone is the lowest validation loss over the fold's own epochs and
    every epoch of every trial of its latest sweep, when it has one."""
    if job_id is None and (trial is not None or sweep is not None or str(epoch).lower() == "best"):
        picked = _pick_sweep_epoch(fold, epoch, trial, sweep)
        if picked is not None:
            return picked
    if job_id is None:
        if str(epoch).lower() == "best-eval":  # the best mean score over eval folds (`epochwise evaluate`)
            from epochwise.evaluate import best_eval_epoch

            epoch = best_eval_epoch(read_evaluation_rows(fold))
            get_run_logger().info(f"best-eval: epoch {epoch} of {Fold.of(fold).name}'s evaluation table")
        return choose_epoch(read_epoch_records(fold, together), epoch)
    name = Fold.of(fold).name
    client = together_client(together)
    job = together_api.get_job(client, job_id)
    number = int(epoch) if str(epoch).isdigit() else together_api.parse_suffix(name, job.suffix)
    if number is None:
        raise ea.EndpointFailure(f"job {job_id} is not an epoch of {name} (suffix {job.suffix!r}); pass --epoch N")
    return EpochRecord(fold=name, epoch=number, backend="together", status=job.status, job_id=job_id,
                       model=job.model_output_name)


def _pick_sweep_epoch(fold: str, epoch: str | int, trial: int | None, sweep: str | None) -> EpochRecord | None:
    """A sweep's epoch (``--trial``/``--sweep``), or for plain ``best`` the better of the fold's own best
    and its latest sweep's best; None when ``best`` finds no sweep (the fold's own records decide)."""
    from epochwise import sweep as sw
    from epochwise.epochs import EpochChoiceError, best_epoch

    name = Fold.of(fold).name
    loaded = sw.load_trials(fold, sweep)
    if loaded is None:
        if trial is None and sweep is None:
            return None
        known = ", ".join(sw.sweep_names(fold)) or "none"
        raise EpochChoiceError(f"{name} has no sweep {sweep or ''} (sweeps: {known}); run `epochwise sweep` first")
    study, trials = loaded
    found = sw.candidates(trials, name)
    log = get_run_logger()
    if trial is not None or sweep is not None:
        chosen = sw.choose_trial_epoch(found, trial, epoch)
        log.info(f"sweep {study}: trial {chosen.trial} epoch {chosen.record.epoch} (val loss {chosen.record.val_loss})")
        return chosen.record
    best = sw.best_trial_epoch(found)
    rows = read_epochs(name)
    own = best_epoch(records_from_table(name, rows)) if rows else None
    if best is None or (own is not None and own.val_loss is not None and own.val_loss <= (best.record.val_loss or 0)):
        return None  # the fold's own chain holds the best epoch
    log.info(f"best: sweep {study} trial {best.trial} epoch {best.record.epoch} (val loss {best.record.val_loss})"
             + ("" if own is None else f"; the fold's own best epoch {own.epoch} has val loss {own.val_loss}"))
    return best.record


@task(cache_policy=NO_CACHE)
def deploy_local(fold: str, record: EpochRecord, deploy: DeployConfig) -> dict[str, str]:
    """Local backend: export the epoch as a merged model (base + LoRA, loadable without peft) and
    smoke-test it by generating one reply locally. Returns its ``<fold>-endpoints`` row.

    The export is written next to the fold (``exports/<run key>-epoch-<k>``), under a temporary name
    first, so a killed export is never mistaken for a finished one; a finished one is reused.
    """
    from epochwise.local.export import export_epoch, sample_epoch
    from epochwise.local.export import pick_epoch as pick_local_epoch

    run = Path(record.model).parent.name if record.model else None
    metrics = pick_local_epoch(fold, str(record.epoch), run)
    out = Path(fold) / "exports" / f"{metrics['run_key']}-epoch-{metrics['epoch']}"
    if not (out / "config.json").is_file():
        atomic_dir(out, lambda tmp: export_epoch(metrics, tmp, merged=True), replace=True)
    reply = sample_epoch(metrics, deploy.smoke_prompt, deploy.smoke_max_tokens)
    get_run_logger().info(f"exported {record.fold} epoch {record.epoch} to {out}; smoke reply {reply!r}")
    return ea.local_row(str(out), record.epoch, metrics["adapter_dir"], reply)


# ---------------------------------------------------------------------------------------------------
# Deploy, wait, smoke test (one transaction in the flow)
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DeploymentRef:
    """What ``deploy_model`` set up, and what its rollback needs to undo it."""

    fold: str
    epoch: int
    job_id: str
    model: str  # registry model name
    endpoint_id: str
    endpoint_name: str  # what client.chat.completions.create(model=...) takes
    endpoint_created: bool
    deployment_id: str
    deployment_name: str
    deployment_created: bool
    hardware: str
    previous_traffic: tuple[tuple[str, float], ...]


@task(cache_policy=NO_CACHE)
def deploy_model(record: EpochRecord, deploy: DeployConfig, together: TogetherConfig) -> DeploymentRef:
    """Deploy one epoch's model on its ``ew-<fold>-e<k>`` endpoint and route all traffic to it.

    Reuses the endpoint and the model's deployment when Together lists them (a stopped one is scaled
    back up); otherwise creates them with the configured hardware, replicas and idle timeout.
    """
    log = get_run_logger()
    if not record.job_id:
        raise ea.EndpointFailure(f"{record.fold} epoch {record.epoch} has no Together job to deploy")
    client = project_client(together)
    target = ea.model_of_epoch(client, record.job_id, record.model)
    config = ea.choose_config(client, target, deploy.hardware)
    slug = ea.endpoint_slug(record.fold, record.epoch)
    with endpoint_lock(slug, together.fold_lock_wait_s, together.fold_lease_s):
        endpoint, ep_created = ea.ensure_endpoint(client, slug)
        dep, dep_created = ea.ensure_deployment(client, endpoint, target, config, deploy)
        ref = DeploymentRef(
            fold=record.fold, epoch=record.epoch, job_id=record.job_id, model=target.model_name,
            endpoint_id=endpoint.id, endpoint_name=endpoint.name, endpoint_created=ep_created,
            deployment_id=dep.id, deployment_name=dep.name, deployment_created=dep_created,
            hardware=dep.hardware or ea.config_hardware(config), previous_traffic=endpoint.traffic,
        )
        txn = get_transaction()
        if txn is not None:  # what the rollback hook undoes
            txn.set("deployment", ref)
            txn.set("together", together)
        try:
            ea.route_traffic(client, endpoint.id, dep.id)
        except Exception as exc:
            # The hook only runs for a task that finished; a deployment this call created must not stay.
            if dep_created:
                try:
                    roll_back_deployment(client, ref)
                except ea.RollbackFailure as failed:
                    raise ea.RollbackFailure(f"routing traffic to {dep.name} failed ({exc}); {failed}") from None
            raise
    log.info(f"{'created' if dep_created else 'reusing'} deployment {dep.name} of {target.model_name} on "
             f"{'new' if ep_created else 'existing'} endpoint {endpoint.name} ({ref.hardware}, "
             f"{deploy.min_replicas}-{deploy.max_replicas} replicas)")
    return ref


@deploy_model.on_rollback
def delete_failed_deployment(txn: Transaction) -> None:
    """Undo ``deploy_model`` (see `ea.rollback_deployment`). Prefect only logs a hook's exception, so a
    failed rollback is stored in the transaction (``rollback_failure``) for the flow to fail with."""
    ref: DeploymentRef | None = txn.get("deployment", None)
    if ref is None:
        return
    try:
        done = roll_back_deployment(project_client(txn.get("together", TogetherConfig())), ref)
    except ea.RollbackFailure as exc:
        owner: BaseTransaction = txn  # the task's own transaction; the flow reads the one it opened
        for _ in range(8):
            owner.set("rollback_failure", str(exc))
            parent = owner.get_parent()
            if parent is None or parent is owner:
                break
            owner = parent
        get_run_logger().error(str(exc))
        return
    get_run_logger().warning(f"rolled back {ref.deployment_name} on {ref.endpoint_name} so it does not keep "
                             f"billing: {', '.join(done)}")


def stop_command(ref: DeploymentRef) -> str:
    """The command that stops exactly this deployment."""
    return f"epochwise endpoints {ref.fold} --stop --deployment {ref.deployment_name}"


def roll_back_deployment(client: Together, ref: DeploymentRef) -> list[str]:
    """Roll back; on failure the deployment is recorded for the reaper and `ea.RollbackFailure` raised."""
    try:
        return ea.rollback_deployment(
            client, ref.endpoint_id, ref.deployment_id,
            [t for t in ref.previous_traffic if t[0] != ref.deployment_id], ref.endpoint_created,
            describe=f"deployment {ref.deployment_name} on endpoint {ref.endpoint_name}", stop_command=stop_command(ref),
        )
    except ea.RollbackFailure:
        _remember_leftover(ref)
        raise


# A deployment whose rollback failed is recorded as a Prefect variable (``ew-leftover-<deployment id>``),
# so the reaper stops it whatever its endpoint's age; a later successful deploy of it forgets it.
_LEFTOVER = "ew-leftover-"


def _leftover_name(deployment_id: str) -> str:
    return _LEFTOVER + re.sub(r"[^a-z0-9_-]", "-", deployment_id.lower())


def _remember_leftover(ref: DeploymentRef) -> None:
    try:
        Variable.set(_leftover_name(ref.deployment_id), {
            "endpoint_id": ref.endpoint_id, "endpoint_name": ref.endpoint_name, "deployment_id": ref.deployment_id,
            "deployment_name": ref.deployment_name, "fold": ref.fold, "epoch": ref.epoch,
        }, overwrite=True)
    except Exception as exc:  # the failure message still names the command; never hide the rollback's reason
        get_run_logger().warning(f"could not record {ref.deployment_name} for the reaper: {exc}")


def _forget_leftover(deployment_id: str) -> None:
    with contextlib.suppress(Exception):
        Variable.unset(_leftover_name(deployment_id))


_VARIABLES_PAGE = 200  # the server's PREFECT_API_DEFAULT_LIMIT: no variables request returns more


def _leftovers() -> list[dict[str, Any]]:
    """Every recorded leftover: the variables named ``ew-leftover-...``, a page at a time (one request
    answers at most 200 variables, and a workspace may hold more)."""
    found: list[dict[str, Any]] = []
    name = {"like_": _LEFTOVER + "%"}
    with get_client(sync_client=True) as client:
        for offset in itertools.count(0, _VARIABLES_PAGE):
            body = {"variables": {"name": name}, "offset": offset, "limit": _VARIABLES_PAGE}
            page = client.request("POST", "/variables/filter", json=body).json()
            found += [v["value"] for v in page if v["name"].startswith(_LEFTOVER) and isinstance(v["value"], dict)]
            if len(page) < _VARIABLES_PAGE:
                return found
    return found


@task(cache_policy=NO_CACHE)
def wait_until_ready(ref: DeploymentRef, deploy: DeployConfig, together: TogetherConfig) -> str:
    """Poll the deployment until DEPLOYMENT_STATE_READY; fails with Together's message on FAILED.
    A Together outage is ridden out for ``together.outage_tolerance_s`` (the status calls are read-only)."""
    log = get_run_logger()
    seen: list[str] = []

    def on_update(dep: ea.DeploymentInfo) -> None:
        if not seen or seen[-1] != dep.state:
            seen.append(dep.state)
            log.info(f"{dep.name}: {dep.state} {dep.message}")

    return ea.wait_ready(project_client(together), ref.endpoint_id, ref.deployment_id, deploy, on_update,
                         outage=together, log=log.info).state


@task(cache_policy=NO_CACHE)
def smoke_test(ref: DeploymentRef, deploy: DeployConfig, together: TogetherConfig) -> str:
    """One chat completion through the endpoint name, exactly as a user would call it; returns the reply."""
    reply = ea.smoke_chat(project_client(together), ref.endpoint_name, deploy)
    get_run_logger().info(f"smoke test of {ref.endpoint_name}: {reply!r}")
    return reply


@task(cache_policy=NO_CACHE)
def retire_replaced(ref: DeploymentRef, together: TogetherConfig) -> list[str]:
    """Delete the endpoint's other deployments (older models of the same epoch) once the new one works
    (and forget it as a failed rollback's leftover, should an earlier run have recorded it)."""
    _forget_leftover(ref.deployment_id)
    client = project_client(together)
    retired = []
    for dep in ea.list_deployments(client, ref.endpoint_id):
        if dep.id != ref.deployment_id and ea.delete_deployment(client, ref.endpoint_id, dep.id):
            retired.append(dep.name)
    if retired:
        get_run_logger().info(f"deleted replaced deployment(s) {', '.join(retired)}")
    return retired


# ---------------------------------------------------------------------------------------------------
# State, stop, reap
# ---------------------------------------------------------------------------------------------------

@task(cache_policy=NO_CACHE)
def list_fold_endpoints(fold: str, together: TogetherConfig) -> list[ea.EndpointInfo]:
    """The fold's epochwise endpoints with their deployments, oldest first."""
    return ea.epochwise_endpoints(project_client(together), fold)


@task(cache_policy=NO_CACHE)
def stop_fold_endpoints(fold: str, together: TogetherConfig) -> list[str]:
    """Scale every deployment of the fold's endpoints to zero; returns the deployments stopped."""
    client = project_client(together)
    stopped = [d.name for ep in ea.epochwise_endpoints(client, fold) for d in ea.stop_endpoint(client, ep)]
    get_run_logger().info(f"stopped {len(stopped)} deployment(s) of {fold}" + (f": {', '.join(stopped)}" if stopped else ""))
    return stopped


@task(cache_policy=NO_CACHE)
def reap_endpoints(older_than_s: float, together: TogetherConfig) -> list[str]:
    """Scale to zero every epochwise endpoint created more than ``older_than_s`` seconds ago, and first
    every deployment a failed rollback left live (recorded by ``deploy-epoch``), whatever its age.

    Only ``ew-<fold>-e<k>`` endpoints are touched; anything else in the project is left alone.
    """
    log = get_run_logger()
    client = project_client(together)
    stopped = []
    for left in _leftovers():  # failed rollbacks first, whatever their age
        try:
            dep = ea.get_deployment(client, left["endpoint_id"], left["deployment_id"])
            if dep.max_replicas > 0:
                stopped.append(ea.scale_to_zero(client, left["endpoint_id"], dep.id).name)
                log.info(f"stopped {dep.name}: left live on {left['endpoint_name']} by a failed rollback")
        except NotFoundError:
            log.info(f"{left['deployment_name']} (left by a failed rollback) is gone")
        except APIError as exc:
            log.warning(f"could not stop {left['deployment_name']} yet ({exc}); the next reap tries again")
            continue
        _forget_leftover(left["deployment_id"])
    for ep in ea.epochwise_endpoints(client):
        if ep.age_s() <= older_than_s:
            continue
        for dep in ea.stop_endpoint(client, ep):
            stopped.append(dep.name)
            log.info(f"stopped {dep.name}: endpoint {ep.name} is {ep.age_s() / 3600:.1f} h old")
    return stopped
