"""``epoch-train``: train a fold one epoch at a time, each epoch its own deployable model.

Steps:
1. Together backend: resolve the key first (a missing one fails before any work); validate
   ``train.jsonl`` / ``val.jsonl`` (``path:line: reason``; nothing uploaded or paid before this);
2. Together backend: Harmony parquet for gpt-oss base models, upload each file once per content
   (sha256-cached, remote existence confirmed), then per epoch k = 1..epochs:
   launch (estimate price, stop before the budget is exceeded; epoch 1 on the base model, epoch k
   ``from_checkpoint`` = job of epoch k-1) -> wait (one polling task) -> losses;
   local backend: ``train_local_epoch`` per epoch, continuing from the previous adapter;
3. after each epoch: the ``<fold>-epochs`` table and the ``<fold>-progress`` artifacts; stop early when
   the validation loss stopped improving (``stop_when_val_worsens``).

Resume rule: an epoch is done when its launch committed with a completed job (Prefect cache record keyed
on fold hashes, base model, epoch, hyper-parameters and parent). A rerun skips done epochs without any
upload or job, re-attaches to a job that was still running (found by its suffix in Together's list),
and resubmits only a failed epoch, from the previous epoch's model. More ``epochs`` trains only the new ones.

    epochwise train folds/games --backend together --epochs 5
    prefect deployment run epoch-train/games
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.transactions import transaction

from epochwise.artifacts import artifact_key
from epochwise.config.data import DataConfig
from epochwise.config.harmony import HarmonyConfig
from epochwise.config.local import LocalConfig
from epochwise.config.ops import OpsConfig
from epochwise.config.together import TogetherConfig
from epochwise.config.train import TrainConfig
from epochwise.epochs import EpochRecord, publish_epochs, val_stalled
from epochwise.fold import TRAIN_FILE, VAL_FILE
from epochwise.together_api import BudgetExceeded, JobFailed
from tasks.cancellation import cancel_jobs_on_interrupt, cancel_owned_jobs
from tasks.data import validate_files
from tasks.harmony import convert_fold_to_harmony
from tasks.report import publish_report
from tasks.together import (
    EpochSpec,
    api_base,
    api_tagged,
    ensure_uploaded,
    fetch_epoch_metrics,
    launch_epoch_job,
    resolve_backend,
    wait_for_job,
)


@flow(name="epoch-train", log_prints=True, validate_parameters=True, on_cancellation=[cancel_owned_jobs])
def epoch_train(
    fold: str,
    train: TrainConfig = TrainConfig(),
    together: TogetherConfig = TogetherConfig(),
    local: LocalConfig = LocalConfig(),
    harmony: HarmonyConfig = HarmonyConfig(),
    ops: OpsConfig = OpsConfig(),
    data: DataConfig = DataConfig(),
) -> list[EpochRecord]:
    """Train ``fold`` (a directory with train.jsonl and val.jsonl) for ``train.epochs`` epochs."""
    name = Path(fold).name
    jsonl = [str(Path(fold) / TRAIN_FILE), str(Path(fold) / VAL_FILE)]
    backend = resolve_backend(train.backend, together)
    if backend == "together":  # credentials first: a missing key fails before validation or conversion
        base = api_base(together)
    validate_files(jsonl, data.max_line_bytes)
    progress = create_progress_artifact(0.0, key=artifact_key(name, "progress"), description=f"{name}: epochs done")
    records: list[EpochRecord] = []
    uploads = None  # the Together files every epoch trains on, for the report's lineage

    if backend == "together":
        if "gpt-oss" in train.base_model:  # gpt-oss trains on Harmony token parquet, not ChatML
            parquet = convert_fold_to_harmony(fold, harmony, data.max_line_bytes)
            jsonl = [parquet["train"], parquet["val"]]
        train_file, val_file = (ensure_uploaded(path, together, ops) for path in jsonl)
        hashes = (train_file.sha256, val_file.sha256)
        uploads = [train_file, val_file]
    else:
        from tasks.local_train import train_local_epoch

    for epoch in range(1, train.epochs + 1):
        parent = (records[-1].job_id or records[-1].model) if records else None
        if backend == "together":
            spec = EpochSpec(name, epoch, train.base_model, parent, hashes, train.hyper.model_dump(mode="json"), base)
            record = _together_epoch(spec, train_file.id, val_file.id, train, together, ops, records)
            if record is None:
                break
        else:
            record = train_local_epoch(fold, epoch, train, local, parent)
        records.append(record)
        publish_epochs(name, records)
        publish_report(fold, records, train, together, uploads, ops)
        update_progress_artifact(progress, 100 * epoch / train.epochs)
        print(f"{name} epoch {epoch}: {record.model} train loss {_loss(record.train_loss)} val loss {_loss(record.val_loss)}")
        if val_stalled(records, train.stop_when_val_worsens):
            print(f"validation loss has not improved for {train.stop_when_val_worsens} epoch(s); stopping")
            break
    return records


def _together_epoch(
    spec: EpochSpec,
    train_file: str,
    val_file: str,
    train: TrainConfig,
    together: TogetherConfig,
    ops: OpsConfig,
    done: list[EpochRecord],
) -> EpochRecord | None:
    """Launch -> wait -> losses for one epoch; None when the budget stops the chain before submitting.

    The transaction makes the launch's cache record commit only together with a completed job.
    Cancelling the run cancels the job (`tasks.cancellation`).
    """
    spent = sum(r.price_usd or 0.0 for r in done)
    try:  # Ctrl-C, or the SIGTERM of a cancel, cancels the job at Together (a crash leaves it to re-attach)
        with cancel_jobs_on_interrupt(together), transaction():
            job = api_tagged(launch_epoch_job, ops)(spec, train_file, val_file, train, together, spent)
            info = wait_for_job(job, together)
            return api_tagged(fetch_epoch_metrics, ops)(job, info, together)
    except BudgetExceeded as stop:
        print(f"stopping before epoch {spec.epoch}: {stop}")
        return None
    except JobFailed as failed:  # shown by `epochwise status`; the next run resubmits this epoch
        row = EpochRecord(fold=spec.fold, epoch=spec.epoch, backend="together", status=failed.status,
                          job_id=failed.job_id, parent=spec.parent)
        publish_epochs(spec.fold, [*done, row])
        raise


def _loss(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
