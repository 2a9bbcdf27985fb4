"""Prefect task for one local LoRA epoch (`epochwise.local.trainer.train_epoch`), cached by content.

The cache key is the fold's file hashes + model + epoch + hyper-parameters + local settings + parent
+ the finished epoch's metrics (see `epochwise.local.keys.epoch_cache_key`), so a new flow run skips
finished epochs, a changed fold or setting trains again into a different run directory, and a cached
result never points at a deleted adapter. A run killed mid-epoch left a checkpoint; the rerun's task
finds it and continues from it (no variable to set). Two runs of one epoch at once train it once: the
second waits on the run directory's lock (`tasks.locks.fold_guard`) and then reuses the finished epoch.

torch is imported inside the task only: importing this module (and the flows) stays light.
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.context import TaskRunContext

from epochwise.artifacts import artifact_key
from epochwise.config.local import LocalConfig
from epochwise.config.train import TrainConfig
from epochwise.epochs import EpochRecord
from epochwise.fold import Fold
from epochwise.local.keys import finished_metrics, run_dir, run_epoch_cache_key, run_key
from tasks.locks import fold_guard

# The run key each task run's cache key was computed from, by task run id: the task body takes it from
# here instead of hashing the fold again, so each epoch hashes its fold once. The body pops its entry;
# a cached epoch (body skipped) leaves one short string behind.
_RUN_KEYS: dict[UUID, str] = {}


def local_epoch_key(context: TaskRunContext, params: dict[str, Any]) -> str | None:
    """Content key of one finished epoch (never paths alone, never the flow run id); None = not cached.

    The same value as `epochwise.local.keys.epoch_cache_key`.
    """
    train: TrainConfig = params["train"]
    key = run_key(params["fold"], train.local_model, train.hyper, params["local"])
    _RUN_KEYS[context.task_run.id] = key
    return run_epoch_cache_key(params["fold"], key, params["epoch"], params["parent"])


class EpochProgress:
    """Step callback: a rich bar on a terminal, a Prefect progress artifact, W&B metrics when configured."""

    def __init__(self, fold: str, epoch: int, wandb_run: Any = None) -> None:
        self.fold, self.epoch, self.wandb_run = fold, epoch, wandb_run
        self.artifact = create_progress_artifact(
            0.0,
            key=artifact_key(fold, f"local-epoch-{epoch}"),
            description=f"{fold}: local epoch {epoch} steps done (%)",
        )
        self.last_percent = 0.0
        self.bar = None
        if sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn(f"{fold} epoch {epoch}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f}"),
                TimeRemainingColumn(),
            )
            self.bar.start()
            self.bar_task = self.bar.add_task("train", total=None, loss=float("nan"))

    def __call__(self, step: int, total: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(self.bar_task, completed=step, total=total, loss=loss)
        percent = 100.0 * step / total
        if percent - self.last_percent >= 5 or step == total:  # ~20 API calls per epoch, not one per step
            update_progress_artifact(self.artifact, percent)
            self.last_percent = percent
        if self.wandb_run is not None:
            self.wandb_run.log_step(step, {"train/loss": loss})

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


@task(cache_key_fn=local_epoch_key, persist_result=True)
def train_local_epoch(fold: str, epoch: int, train: TrainConfig, local: LocalConfig, parent: str | None) -> EpochRecord:
    """Train epoch ``epoch`` of ``fold`` locally from ``parent`` (previous adapter dir; None = base model)."""
    where = Fold.of(fold)
    name = where.name
    context = TaskRunContext.get()
    key = _RUN_KEYS.pop(context.task_run.id, None) if context else None
    key = key or run_key(fold, train.local_model, train.hyper, local)
    wait = "as long as it takes" if local.lock_wait_s is None else f"{local.lock_wait_s:.0f} s"
    busy = RuntimeError(f"{name} epoch {epoch} is being trained by another run; waited {wait} (rerun later)")
    # One trainer per run directory: a file lock in the directory itself (any PREFECT_HOME, any host
    # sharing the disk) and a lease on the Prefect server (its other workers). A second run waits here,
    # then finds the epoch finished and reuses it.
    guard = fold_guard(f"local-{where.slug}-{key}", local.lock_wait_s, local.lock_lease_s, busy, run_dir(fold, key))
    with guard:
        return _train_locked(fold, epoch, train, local, parent, name, key)


def _train_locked(
    fold: str, epoch: int, train: TrainConfig, local: LocalConfig, parent: str | None, name: str, key: str
) -> EpochRecord:
    logger = get_run_logger()
    finished = finished_metrics(fold, key, epoch, parent)
    if finished is not None:  # trained by an earlier or a concurrent run: no torch needed
        logger.info("%s epoch %d already finished in %s", name, epoch, finished["adapter_dir"])
        return to_record(finished, parent, train.local_model)
    from epochwise.local.trainer import train_epoch

    wandb_run = None
    if train.wandb_project:
        from epochwise.wandb_log import start_run

        wandb_run = start_run(
            train.wandb_project,
            name,
            epoch,
            key,
            {"model": train.local_model, **train.hyper.model_dump(mode="json")},
            per=local.wandb_run_per,
            directory=Path(fold).resolve() / "local",
        )
    progress = EpochProgress(name, epoch, wandb_run)
    try:
        result = train_epoch(fold, epoch, train.local_model, train.hyper, local, parent, on_step=progress, key=key)
    finally:
        progress.close()
    if wandb_run is not None:
        wandb_run.finish(
            {"train/epoch_loss": result.train_loss, "val/loss": result.val_loss, "tokens_per_s": result.tokens_per_s}
        )
    if result.resumed_from_step:
        logger.info(
            "%s epoch %d resumed from its checkpoint at step %d of %d",
            name,
            epoch,
            result.resumed_from_step,
            result.steps,
        )
    logger.info(
        "%s epoch %d: train loss %.4f, val loss %s, %.0f tokens/s, adapter %s",
        name,
        epoch,
        result.train_loss,
        "n/a" if result.val_loss is None else f"{result.val_loss:.4f}",
        result.tokens_per_s,
        result.adapter_dir,
    )
    logger.info("%s epoch %d sample: %r", name, epoch, result.sample)
    return to_record(asdict(result), parent, train.local_model)


def to_record(metrics: dict[str, Any], parent: str | None, base: str) -> EpochRecord:
    """The flow's `EpochRecord` from a local epoch's metrics (``metrics.json`` / `EpochResult`, or a DPO /
    GRPO epoch's `RLEpochResult`, which adds the method, the validation reward and its own metrics)."""
    return EpochRecord(
        fold=metrics["fold"],
        epoch=metrics["epoch"],
        backend="local",
        method=metrics.get("method", "sft"),
        model=metrics["adapter_dir"],
        parent=parent or base,
        train_loss=metrics["train_loss"],
        val_loss=metrics["val_loss"],
        val_reward=metrics.get("val_reward"),
        metrics=metrics.get("metrics") or {},
        tokens_per_s=metrics["tokens_per_s"],
        sample=metrics["sample"],
        started_at=datetime.fromisoformat(metrics["started_at"]),
        finished_at=datetime.fromisoformat(metrics["finished_at"]),
    )
