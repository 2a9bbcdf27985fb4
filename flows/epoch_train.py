"""``epoch-train``: train a fold one epoch at a time, each epoch its own deployable model.

Steps:
1. Together backend: resolve the key first (a missing one fails before any work); validate
   ``train.jsonl`` / ``val.jsonl`` (``path:line: reason``; nothing uploaded or paid before this);
2. the training method chosen once from (backend, method) (`tasks.methods`) prepares: Together:
   Harmony parquet for gpt-oss base models, upload each file once per content (sha256-cached, remote
   existence confirmed); local: nothing. Then per epoch k = 1..epochs it runs the epoch: Together:
   launch (estimate price, stop before the budget is exceeded; epoch 1 on the base model, epoch k
   ``from_checkpoint`` = job of epoch k-1) -> wait (one polling task) -> losses;
   local: ``train_local_epoch``, continuing from the previous adapter;
3. after each epoch: the ``<fold>-epochs`` table and the ``<fold>-progress`` artifacts; stop early when
   the validation loss stopped improving (``stop_when_val_worsens``). A sweep's trial (``trial``, see
   `flows.sweep`) reports each epoch to its sweep instead, whose pruner may stop the chain before the
   next epoch is submitted; its tables are its own (``<fold>-<sweep>-t<n>-epochs``), not the fold's.

Switching method: a run of another method than the fold's recorded epochs (``--method dpo`` after
three SFT epochs) keeps those epochs as the ``<fold>-epochs`` table recorded them and trains epochs 4..N
from epoch 3's model (`tasks.methods.earlier_epochs`); ``train.dpo`` reads the fold's preference rows
(``train_dpo.jsonl`` / ``val_dpo.jsonl``) beside the chat rows of the SFT epochs.

Resume rule: an epoch is done when its launch committed with a completed job (Prefect cache record keyed
on fold hashes, base model, epoch, hyper-parameters and parent). A rerun skips done epochs without any
upload or job, re-attaches to a job that was still running (found by its suffix in Together's list),
and resubmits only a failed epoch, from the previous epoch's model. More ``epochs`` trains only the new ones.
A rerun with nothing to do costs one sha256 pass per fold file (shared by every key of the run,
`epochwise.io.hashes_once`) and one flow run: bytes that already passed validation are not parsed
again (``<fold>/.validated.json``), and a report that already shows these epochs is not redrawn.

    epochwise train folds/games --backend together --epochs 5
    prefect deployment run epoch-train/games
"""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from epochwise.artifacts import artifact_key
from epochwise.config.data import DataConfig
from epochwise.config.harmony import HarmonyConfig
from epochwise.config.local import LocalConfig
from epochwise.config.ops import OpsConfig
from epochwise.config.together import TogetherConfig
from epochwise.config.train import TrainConfig
from epochwise.epochs import EpochRecord, publish_epochs, val_stalled
from epochwise.fold import Fold
from epochwise.io import hashes_once
from epochwise.sweep import TrialLink
from tasks.cancellation import cancel_owned_jobs
from tasks.data import validate_files
from tasks.methods import TrainContext, earlier_epochs, training_method
from tasks.report import publish_report
from tasks.sweep import keep_training
from tasks.together import resolve_backend


@flow(name="epoch-train", log_prints=True, validate_parameters=True, on_cancellation=[cancel_owned_jobs])
def epoch_train(
    fold: str,
    train: TrainConfig = TrainConfig(),
    together: TogetherConfig = TogetherConfig(),
    local: LocalConfig = LocalConfig(),
    harmony: HarmonyConfig = HarmonyConfig(),
    ops: OpsConfig = OpsConfig(),
    data: DataConfig = DataConfig(),
    trial: TrialLink | None = None,
) -> list[EpochRecord]:
    """Train ``fold`` (a directory with train.jsonl and val.jsonl) for ``train.epochs`` epochs."""
    with hashes_once():  # each fold file is read for its sha256 once in this run, whatever keys need it
        ctx = TrainContext(Fold.of(fold), fold, train, together, local, harmony, ops, data)
        name = ctx.fold.name if trial is None else trial.label
        backend = resolve_backend(train.backend, together)
        method = training_method(ctx, backend)  # Together: the key first
        validate_files(ctx.fold.jsonl_for(train.method), data.max_line_bytes, train.method)
        ctx.records = earlier_epochs(ctx, backend)  # a switched chain (sft -> dpo): the earlier method's epochs
        if len(ctx.records) >= train.epochs:
            print(f"{name}: epochs 1-{len(ctx.records)} are recorded with another method; ask for more than {train.epochs}")
            return ctx.records
        progress = create_progress_artifact(0.0, key=artifact_key(name, "progress"), description=f"{name}: epochs done")
        report = None  # the latest epoch's report, drawn while the next epoch launches
        try:  # a method holding a paid resource for the run (GRPO's model resource) releases it in close()
            method.prepare(ctx)
            records = ctx.records
            for epoch in range(len(records) + 1, train.epochs + 1):
                parent = (records[-1].job_id or records[-1].model) if records else None
                record = method.run_epoch(ctx, epoch, parent)
                if record is None:
                    break
                records.append(record)
                publish_epochs(name, records)
                if trial is None:  # a sweep draws one picture of all its trials
                    if report is not None:
                        report.result()  # one at a time, in epoch order; a failed report fails the run
                    report = publish_report.submit(fold, list(records), train, together, ctx.uploads, ops)
                update_progress_artifact(progress, 100 * epoch / train.epochs)
                reward = "" if record.val_reward is None else f" val reward {record.val_reward:.4f}"
                print(f"{name} epoch {epoch}: {record.model} train loss {_loss(record.train_loss)} val loss {_loss(record.val_loss)}{reward}")
                if trial is not None and not keep_training(trial, record, train.epochs):
                    print(f"{name}: pruned by sweep {trial.study} after epoch {epoch}")
                    break
                if val_stalled(records, train.stop_when_val_worsens):
                    print(f"validation loss has not improved for {train.stop_when_val_worsens} epoch(s); stopping")
                    break
            if report is not None:
                report.result()
            return records
        finally:
            if report is not None:
                report.wait()  # never left running past the run, whatever ended it
            close = getattr(method, "close", None)
            if close is not None:
                close()


def _loss(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
