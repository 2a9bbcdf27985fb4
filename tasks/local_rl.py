"""Prefect task for one local DPO or GRPO epoch (`epochwise.local.dpo` / `epochwise.local.grpo`), cached by content.

The same contract as `tasks.local_train` for SFT: the cache key hashes the run key (the method's fold files,
model, hyper-parameters, local settings and `TrainConfig.method_fields`: the method, its parameters and the
reward specs), the epoch, the parent and the finished epoch's ``metrics.json``; a run killed mid-epoch left a
checkpoint that the rerun continues; two runs of one epoch at once train it once (`tasks.locks.fold_guard`).
Per step: a terminal bar, the ``<fold>-local-epoch-<k>`` progress artifact and W&B metrics when configured.

torch is imported inside the task only: importing this module (and the flows) stays light.
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.context import TaskRunContext

from epochwise.artifacts import artifact_key
from epochwise.config.local import LocalConfig
from epochwise.config.train import TrainConfig
from epochwise.epochs import EpochRecord
from epochwise.fold import Fold
from epochwise.local.keys import finished_metrics, run_dir, run_epoch_cache_key, run_key
from tasks.local_train import to_record
from tasks.locks import fold_guard

ZERO_STD_WARNING = 0.5  # the same threshold as epochwise.local.grpo (not imported: it pulls in torch)


def rl_run_key(fold: str, train: TrainConfig, local: LocalConfig) -> str:
    """The run key of a DPO / GRPO chain: SFT's inputs plus the method's fields."""
    return run_key(fold, train.local_model, train.hyper, local, method=train.method_fields())


def local_rl_epoch_key(context: TaskRunContext, params: dict[str, Any]) -> str | None:
    """Content key of one finished epoch; None (not cached) while it is not finished on disk."""
    key = rl_run_key(params["fold"], params["train"], params["local"])
    return run_epoch_cache_key(params["fold"], key, params["epoch"], params["parent"])


class RLProgress:
    """Step callback: a rich bar on a terminal, a Prefect progress artifact, W&B metrics when configured."""

    def __init__(self, fold: str, epoch: int, method: str, wandb_run: Any = None) -> None:
        self.fold, self.epoch, self.method, self.wandb_run = fold, epoch, method, wandb_run
        self.artifact = create_progress_artifact(
            0.0,
            key=artifact_key(fold, f"local-epoch-{epoch}"),
            description=f"{fold}: local {method} epoch {epoch} steps done (%)",
        )
        self.last_percent = 0.0
        self.bar = None
        self.shown = "reward" if method == "grpo" else "loss"
        if sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn(f"{fold} {method} epoch {epoch}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn(f"{self.shown} {{task.fields[value]:.4f}}"),
                TimeRemainingColumn(),
            )
            self.bar.start()
            self.bar_task = self.bar.add_task("train", total=None, value=float("nan"))

    def __call__(self, step: int, total: int, metrics: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.update(self.bar_task, completed=step, total=total, value=metrics.get(self.shown, float("nan")))
        percent = 100.0 * step / total
        if percent - self.last_percent >= 5 or step == total:  # ~20 API calls per epoch, not one per step
            update_progress_artifact(self.artifact, percent)
            self.last_percent = percent
        if self.wandb_run is not None:
            self.wandb_run.log_step(step, {f"train/{k}": v for k, v in metrics.items()})

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


@task(cache_key_fn=local_rl_epoch_key, persist_result=True)
def train_local_rl_epoch(
    fold: str, epoch: int, train: TrainConfig, local: LocalConfig, parent: str | None
) -> EpochRecord:
    """Train DPO or GRPO (``train.method``) epoch ``epoch`` of ``fold`` locally from ``parent``."""
    where = Fold.of(fold)
    key = rl_run_key(fold, train, local)
    wait = "as long as it takes" if local.lock_wait_s is None else f"{local.lock_wait_s:.0f} s"
    busy = RuntimeError(f"{where.name} epoch {epoch} is being trained by another run; waited {wait} (rerun later)")
    guard = fold_guard(f"local-{where.slug}-{key}", local.lock_wait_s, local.lock_lease_s, busy, run_dir(fold, key))
    with guard:
        return _train_locked(fold, epoch, train, local, parent, where.name, key)


def _train_locked(
    fold: str, epoch: int, train: TrainConfig, local: LocalConfig, parent: str | None, name: str, key: str
) -> EpochRecord:
    logger = get_run_logger()
    finished = finished_metrics(fold, key, epoch, parent)
    if finished is not None:  # trained by an earlier or a concurrent run: no torch needed
        logger.info("%s epoch %d already finished in %s", name, epoch, finished["adapter_dir"])
        return to_record(finished, parent, train.local_model)
    method = train.method
    rewards = []
    if method == "grpo":
        from epochwise.rewards import load_rewards

        rewards = load_rewards(train.rewards)
    wandb_run = None
    if train.wandb_project:
        from epochwise.wandb_log import start_run

        config = {"model": train.local_model, **train.hyper.model_dump(mode="json"), **train.method_fields()}
        wandb_run = start_run(
            train.wandb_project, name, epoch, key, config, per=local.wandb_run_per,
            directory=Path(fold).resolve() / "local",
        )  # fmt: skip
    progress = RLProgress(name, epoch, method, wandb_run)
    try:
        if method == "dpo":
            from epochwise.local.dpo import train_dpo_epoch

            result = train_dpo_epoch(
                fold, epoch, train.local_model, train.hyper, train.dpo, local, key, parent, on_step=progress
            )
        else:
            from epochwise.local.grpo import train_grpo_epoch

            result = train_grpo_epoch(fold, epoch, train.local_model, train, rewards, local, key, parent, progress)
    finally:
        progress.close()
    if wandb_run is not None:
        wandb_run.finish(
            {
                "train/epoch_loss": result.train_loss,
                "val/loss": result.val_loss,
                "val/reward": result.val_reward,
                "tokens_per_s": result.tokens_per_s,
                **{f"epoch/{k}": v for k, v in result.metrics.items()},
            }
        )
    if result.resumed_from_step:
        logger.info(
            "%s epoch %d resumed from its checkpoint at step %d of %d", name, epoch, result.resumed_from_step,
            result.steps,
        )  # fmt: skip
    shown = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items())
    logger.info("%s %s epoch %d: %s; adapter %s", name, method, epoch, shown, result.adapter_dir)
    share = result.metrics.get("zero_std_share")
    if share is not None and share > ZERO_STD_WARNING:
        logger.warning(
            "%s epoch %d: %.0f%% of the prompt groups had equal rewards for all completions and taught nothing; "
            "grade the rewards more finely, raise train.grpo.num_generations or train.grpo.temperature",
            name, epoch, 100 * share,
        )  # fmt: skip
    return to_record(asdict(result), parent, train.local_model)

