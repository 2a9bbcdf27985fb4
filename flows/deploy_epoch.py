"""``deploy-epoch``: serve one epoch of a fold on a Together dedicated endpoint, smoke-tested.

Steps:
1. pick the epoch: ``best`` (lowest validation loss in the fold's ``<fold>-epochs`` records; without
   them, the local epochs on disk or Together's job list; when the fold has a sweep, its trials' epochs
   compete too), epoch ``N``, a sweep trial's epoch (``trial``, ``sweep``), or a given ``job_id``;
   a local epoch is exported as a merged model and smoke-tested by generating locally instead;
2. in one transaction: deploy the job's model on the endpoint ``ew-<fold>-e<k>`` (endpoint and
   deployment reused when Together lists them; hardware from the model's deploy configs; autoscaling
   and idle timeout from ``DeployConfig``; all traffic routed to it) -> wait until READY -> one smoke
   chat completion through the endpoint name. If waiting or the smoke test fails, the rollback puts
   the previous traffic split back and deletes the deployment (and an endpoint this run created), and
   the flow fails with the reason; if a rollback step fails too, the flow says what is still live and
   the exact command that stops it;
3. delete deployments of older models on the same endpoint; publish the ``<fold>-endpoints`` table
   (endpoint, state, hardware, replicas, smoke reply) and print how to call the model.

Running it again for the same epoch creates nothing: the same endpoint and deployment are found.

    epochwise deploy folds/games --epoch best
    epochwise deploy folds/games --trial 3 --epoch 2      # one epoch of one trial of the latest sweep
    prefect deployment run deploy-epoch/any-fold --param fold=/srv/folds/games --param epoch=3
"""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_table_artifact
from prefect.transactions import transaction

from epochwise import endpoints_api as ea
from epochwise.artifacts import artifact_key
from epochwise.config.deploy import DeployConfig
from epochwise.config.together import TogetherConfig
from epochwise.fold import Fold
from tasks.endpoints import (
    deploy_local,
    deploy_model,
    list_fold_endpoints,
    pick_epoch,
    retire_replaced,
    smoke_test,
    wait_until_ready,
)


@flow(name="deploy-epoch", log_prints=True, validate_parameters=True)
def deploy_epoch(
    fold: str,
    epoch: str | int = "best",
    job_id: str | None = None,
    deploy: DeployConfig = DeployConfig(),
    together: TogetherConfig = TogetherConfig(),
    trial: int | None = None,
    sweep: str | None = None,
) -> dict[str, str]:
    """Deploy ``epoch`` (``best`` or a number) of ``fold`` (its directory or name), or of its sweep's
    ``trial``; returns its table row."""
    name = Fold.of(fold).name
    record = pick_epoch(fold, epoch, job_id, together, trial, sweep)
    print(f"deploying {name} epoch {record.epoch} ({record.job_id or record.model}, val loss {record.val_loss})")
    if record.backend == "local":
        row = deploy_local(fold, record, deploy)
        _publish(name, [row])
        print(f"local model exported to {row['endpoint']}; smoke reply: {row['smoke reply']!r}")
        return row
    txn = None
    try:
        with transaction() as txn:
            ref = deploy_model(record, deploy, together)
            state = wait_until_ready(ref, deploy, together)
            reply = smoke_test(ref, deploy, together)
    except Exception as exc:
        # A failed rollback (stored by the hook, or raised by deploy_model itself) fails the flow with
        # what is still live and the command that stops it, after the deploy's own reason.
        undone = txn.get("rollback_failure", None) if txn is not None else None
        reason = f"{exc}; {undone}" if undone else str(exc)
        listed = list_fold_endpoints(name, together, return_state=True)  # must not hide the reason
        rows = ea.endpoint_rows(listed.result()) if listed.is_completed() else []
        rolled_back = not (undone or isinstance(exc, ea.RollbackFailure))
        _publish(name, rows + [ea.failure_row(ea.endpoint_slug(name, record.epoch), record.epoch, reason, rolled_back)])
        if undone:
            raise ea.RollbackFailure(reason) from None
        raise
    retire_replaced(ref, together)
    rows = ea.endpoint_rows(list_fold_endpoints(name, together), replies={ref.endpoint_name: reply})
    _publish(name, rows)
    print(f"{ref.endpoint_name} is {state} on {ref.hardware}; smoke reply: {reply!r}\n"
          f"call it with: client.chat.completions.create(model={ref.endpoint_name!r}, messages=[...])\n"
          f"stop it with: epochwise endpoints {fold} --stop")
    return next((r for r in rows if r["endpoint"] == ref.endpoint_name and r["routed"] == "yes"), rows[-1])


def _publish(name: str, rows: list[dict[str, str]]) -> None:
    create_table_artifact(rows, key=artifact_key(name, "endpoints"), description=f"{name} dedicated endpoints")
